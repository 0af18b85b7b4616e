"""`invariance demo`, as a newcomer runs it: trains its own tiny ViTs, runs the pipeline on a local
Ray, and a second call reuses everything (one finetuning epoch here, to keep it short)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from invariance.analysis import report
from jobs.demo import demo_config


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
    # the demo's inversions converge at every reference layer: its report has no such warning
    page = (results / "reports" / "index.html").read_text()
    assert "Inversion quality" in page and "did not converge" not in page
    stir = pl.read_parquet(results / "stir" / "**" / "*.parquet", hive_partitioning=True)
    assert stir["inv_loss_mean"].max() <= report.CONVERGED_LOSS

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "leases" not in p.parts}
    second = _demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "using the checkpoints already" in second.stdout and "computed 0/0 units" in second.stdout
    changed = [p for p, mtime in written.items() if p.stat().st_mtime_ns != mtime and p.name != "demo.yaml"]
    assert changed == []  # nothing retrained, recomputed or rewritten


def test_the_demo_inverts_with_adam() -> None:
    # the reference step at the demo's 100 iterations left four layers above CONVERGED_LOSS
    assert demo_config(Path("/tmp/x"))["inversion"] == {"optimizer": "adam", "iterations": 100, "micro_batch": 96}


def test_the_non_convergence_warning_names_the_keys_and_the_values_to_set() -> None:
    quality = pl.DataFrame({"ref_model": ["pt", "pt", "ft"], "ref_layer": [0, 3, 3], "final_loss_mean": [0.05, 0.23, 0.18],
                            "final_loss_worst": [0.1, 0.5, 0.4], "self_stir": [1.0, 0.98, 0.99], "iterations": [100] * 3}
                           ).with_columns((pl.col("final_loss_mean") <= report.CONVERGED_LOSS).alias("converged"))  # fmt: skip
    section = report._inversion_section(quality)
    assert "did not converge at pt[3], ft[3]:" in section and "worst 0.23 after 100 iterations" in section
    assert "<code>inversion.optimizer: adam</code>" in section
    # 100 * (0.23 / 0.1) ** (1 / 0.4) = 802 -> rounded up to 850
    assert "<code>inversion.iterations: 850</code>" in section
    # just above the threshold: at least twice the iterations run
    barely = quality.with_columns(pl.lit(0.11).alias("final_loss_mean"), pl.lit(False).alias("converged"))
    assert "<code>inversion.iterations: 200</code>" in report._inversion_section(barely)
    assert "did not converge" not in report._inversion_section(quality.filter(pl.col("converged")))
