"""bench_reruns.py at a tiny size (N in {1, 3}, local store only): it prints the rerun's split into
plan / execute / reduce / report and the ratio, and each rerun computed only the new checkpoint's
units (the history's were cloned, not recomputed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import load_bench_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

reruns = load_bench_module("bench_reruns")


def test_bench_reruns_prints_the_split_and_reruns_compute_only_the_new_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "reruns.json"
    assert reruns.main(["--sizes", "1", "3", "--study", "0", "0", "--stores", "local", "--json", str(out),
                        "--keep", str(tmp_path / "work")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| history | store | plan | execute | compact | reduce | report | rerun | rerun - execute |" in printed
    assert "| N=1 | local |" in printed and "| N=3 | local |" in printed
    assert "ratio (rerun - execute) local N=3 / N=1:" in printed and "target <= 1.5" in printed
    results = json.loads(out.read_text())
    by_history = {r["history"]: r for r in results["reruns"]}
    assert set(by_history) == {1, 3}
    # one checkpoint's units: 3 layers x (pt, ft) STIR + CKA + subspace, 1 seed; none of the history's
    per_checkpoint = 3 * 2 + 1 + 1
    for history, result in by_history.items():
        assert result["new_units"] == result["computed"] == per_checkpoint, result
        assert result["computed_epochs"] == [history + 1]
        assert result["total_s"] >= (result["plan_s"] + result["execute_s"] + result["compact_s"] + result["reduce_s"]
                                     + result["report_s"] - 1e-6)  # fmt: skip
        assert result["report_s"] > 0 and result["requests"] == {}
    # the history of 3 was cloned from its first checkpoint: 2 x 8 units written, not computed
    assert {h["checkpoints"] for h in results["histories"]} == {1, 3}
    assert results["ratios"]["local N=3"] > 0
    # the history and each rerun were compacted as `invariance run` leaves them: one file per data folder
    # (a folder of one shard, CKA's or the subspace's per checkpoint, stays that shard)
    data = [p for p in (tmp_path / "work" / "n3" / "out").rglob("*.parquet") if "/_" not in str(p) and "reduced" not in str(p)]
    folders = Counter(p.parent for p in data)
    assert len(folders) == 3 * 4 and set(folders.values()) == {1}, folders  # 3 measures x epochs 1..4
    assert all(p.name.startswith("compacted-") for p in data if "/stir/" in str(p))
    assert all(h["compact_s"] > 0 for h in results["histories"] if h["checkpoints"] > 1)
