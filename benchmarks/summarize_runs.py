"""Many bench_vllm runs, one server start each, summed up: a table, a JSON summary and a plot of every run.

Note (why): one start of a small model on a GPU varies by +-10% in throughput from the next start of the same side (the
first start on a fresh machine also compiles), so a kvcached/vanilla comparison is made over several alternating
starts and judged by the ratio of medians; the plot shows each run, so the spread is seen, not averaged away.

    python -m benchmarks.summarize_runs --out benchmarks/results/h100/bench_vllm_summary \\
        --group "8b: Llama-8B-shaped, off then on" run_off.json.gz run_on.json.gz \\
        --group "small: 4 layers, alternating" small_1_on.json.gz small_2_off.json.gz ...
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics

FIELDS = ("tok_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "ok", "mem_idle", "mem_peak", "kv_idle", "kv_peak")
SIDES = ("vanilla", "kvcached")


def load_run(path: str) -> dict:
    """One bench_vllm JSON (plain or gzipped) reduced to its side and figures."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        result = json.load(f)
    side = "kvcached" if result["config"]["kvcached"] == "on" else "vanilla"
    row = result["table"][side]
    return {"file": os.path.basename(path), "side": side, **{key: row[key] for key in FIELDS}}


def summarize(label: str, paths: list[str]) -> dict:
    runs = [load_run(path) for path in paths]
    medians = {side: statistics.median([r["tok_per_s"] for r in runs if r["side"] == side]) for side in SIDES
               if any(r["side"] == side for r in runs)}
    if len(medians) < 2:
        raise SystemExit(f"group {label!r}: needs runs of both sides, got only {', '.join(medians) or 'none'}")
    return {"name": label, "runs": runs, "median_tok_per_s": medians,
            "ratio_of_medians": round(medians["kvcached"] / medians["vanilla"], 3)}


def print_table(groups: list[dict]) -> None:
    print(f"{'group':<44} {'side':<9} {'tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for group in groups:
        for run in group["runs"]:
            print(f"{group['name'][:44]:<44} {run['side']:<9} {run['tok_per_s']:8.0f} {run['ttft_p50'] * 1e3:7.0f}ms "
                  f"{run['itl_p50'] * 1e3:6.2f}ms {run['itl_p99'] * 1e3:6.1f}ms")
        print(f"{'':<44} ratio of medians (kvcached / vanilla): {group['ratio_of_medians']:.3f}")


def plot(groups: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for x, side in enumerate(SIDES):
            values = [r["tok_per_s"] for r in group["runs"] if r["side"] == side]
            ax.scatter([x] * len(values), values, label=side)
            ax.hlines(group["median_tok_per_s"][side], x - 0.25, x + 0.25, colors="black")
        ax.set_xticks(range(len(SIDES)), SIDES)
        ax.set_xlim(-0.6, len(SIDES) - 0.4)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{group['name'][:38]}\nkvcached/vanilla = {group['ratio_of_medians']:.3f}", fontsize=9)
        ax.set_ylabel("output tokens/s (one dot a server start; bar: median)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="path without extension: writes OUT.json and OUT.png")
    parser.add_argument("--note", default="", help="a line of context kept in the JSON")
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"),
                        help="a label, then the bench_vllm JSON files of its runs")
    args = parser.parse_args()
    groups = [summarize(label, paths) for label, *paths in args.group]
    print_table(groups)
    with open(args.out + ".json", "w") as f:
        json.dump({"note": args.note, "groups": groups}, f, indent=1)
    plot(groups, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
