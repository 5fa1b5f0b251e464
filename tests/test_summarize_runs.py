"""benchmarks.summarize_runs: the ratio of medians over alternating server starts, and a group missing a side."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks import summarize_runs


def write_run(path, side: str, tok_per_s: float) -> str:
    row = {key: 0.0 for key in summarize_runs.FIELDS} | {"tok_per_s": tok_per_s}
    result = {"config": {"kvcached": "on" if side == "kvcached" else "off"}, "table": {side: row}}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump(result, f)
    return str(path)


def test_the_ratio_is_of_the_medians_of_each_side(tmp_path):
    runs = [write_run(tmp_path / "1.json.gz", "vanilla", 100.0), write_run(tmp_path / "2.json", "kvcached", 90.0),
            write_run(tmp_path / "3.json.gz", "vanilla", 120.0), write_run(tmp_path / "4.json", "kvcached", 99.0),
            write_run(tmp_path / "5.json", "kvcached", 200.0)]
    group = summarize_runs.summarize("small", runs)
    assert group["median_tok_per_s"] == {"vanilla": 110.0, "kvcached": 99.0}
    assert group["ratio_of_medians"] == 0.9
    assert [run["file"] for run in group["runs"]] == ["1.json.gz", "2.json", "3.json.gz", "4.json", "5.json"]


def test_a_group_without_both_sides_is_refused_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=r"^group '8b': needs runs of both sides, got only vanilla$"):
        summarize_runs.summarize("8b", [write_run(tmp_path / "1.json", "vanilla", 100.0)])
