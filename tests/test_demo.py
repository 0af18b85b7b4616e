"""`invariance demo`, as a newcomer runs it: trains its own tiny ViTs, runs the pipeline on a local
Ray, and a second call reuses everything (one finetuning epoch here, to keep it short)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest


def _demo(out: Path) -> subprocess.CompletedProcess:
    invariance = str(Path(sys.executable).with_name("invariance"))
    return subprocess.run([invariance, "demo", "--out", str(out), "--epochs", "1"], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_a_second_call_reuses_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _demo(out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "demo finished" in first.stdout
    results = out / "results"
    curves = pl.read_parquet(results / "reduced" / "curves.parquet")
    assert curves["epoch"].unique().to_list() == [1] and curves.height == 5  # layers 0..4 of the tiny ViT
    assert curves["forgetting_mean"].is_not_null().all()
    assert {p.name for p in (results / "plots").glob("*.png")} >= {"layer_curves.png", "dynamics.png"}
    assert (out / "demo.yaml").exists() and (out / "checkpoints" / "finetune" / "epoch=01.safetensors").exists()

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "leases" not in p.parts}
    second = _demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "using the checkpoints already" in second.stdout and "computed 0/0 units" in second.stdout
    changed = [p for p, mtime in written.items() if p.stat().st_mtime_ns != mtime and p.name != "demo.yaml"]
    assert changed == []  # nothing retrained, recomputed or rewritten
