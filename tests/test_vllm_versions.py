"""The vLLM versions kvcached patches: one row each (versions.py), and which model runner each one gets."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from kvcached.integrations.vllm import autopatch, versions


@pytest.fixture(autouse=True)
def keep_running_row(monkeypatch):
    monkeypatch.setattr(versions, "_running", versions._running)


def test_each_supported_version_has_its_row_and_a_local_suffix_is_ignored():
    assert versions.SUPPORTED_VLLM == ("0.26.0", "0.32.0")
    assert versions.select("0.26.0+cu130") == versions.ROWS["0.26.0"] == versions.running()
    assert versions.ROWS["0.26.0"].per_layer_kv_tensors and versions.ROWS["0.26.0"].model_runner_v2
    assert not versions.ROWS["0.32.0"].per_layer_kv_tensors and not versions.ROWS["0.32.0"].model_runner_v2


def test_an_unsupported_version_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(RuntimeError, match=r"^kvcached is enabled \(ENABLE_KVCACHED\) but vLLM 0\.27\.1 is not "
                                           r"supported: this kvcached patches vLLM 0\.26\.0, 0\.32\.0\. "):
        versions.select("0.27.1")


def test_where_v2_is_supported_vllm_picks_its_runner_as_without_kvcached(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    autopatch._check_vllm(SimpleNamespace(__version__="0.26.0"))
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_elsewhere_the_v1_runner_is_chosen_and_asking_for_v2_is_refused(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    autopatch._check_vllm(SimpleNamespace(__version__="0.32.0"))
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(RuntimeError, match=r"^kvcached supports vLLM 0\.32\.0's V1 model runner only: unset "
                                           r"VLLM_USE_V2_MODEL_RUNNER$"):
        autopatch._check_vllm(SimpleNamespace(__version__="0.32.0"))
