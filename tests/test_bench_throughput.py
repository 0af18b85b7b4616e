"""bench_throughput.py (inversion GFLOP/s against a matmul on the same threads) and the plan's
GPU-hours, which use a throughput it recorded for the device, else say they are a guess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from invariance.config import ModelConfig
from invariance.core.models import load_model
from jobs.run import GUESSED_TFLOPS, THROUGHPUT_TABLE, inversion_throughput, plan_only
from tests.helpers import load_bench_module, tiny_config, write_checkpoints, write_eval_parquet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

throughput = load_bench_module("bench_throughput")


def test_the_bench_measures_the_inversion_against_a_matmul_on_the_same_threads(tmp_path: Path):
    name = list(throughput.MODELS)[0]
    model = load_model(ModelConfig(**{**throughput.MODELS[name], "kwargs": {**throughput.MODELS[name]["kwargs"], "depth": 2}}), None)
    result = throughput.measure(name, model, threads=1, samples=4, steps=2, device=__import__("torch").device("cpu"))
    # FLOPs as invert executes them: 4 samples x (2 steps + 2 forwards without gradient)
    assert result.inversion_gflop * 1e9 == throughput.inversion_flops_exact(model, model.depth, 4, 2)
    assert result.inversion_gflops > 0 and result.matmul_gflops > 0
    assert result.ratio == pytest.approx(result.inversion_gflops / result.matmul_gflops)
    assert "| " + name in throughput.format_table([result])
    # --record keeps the best figure of the largest model per device, which the plan then reads
    table = tmp_path / "throughput.json"
    table.write_text('{"devices": {}}')
    big = throughput.ThroughputResult(list(throughput.MODELS)[-1], 1, 4, 2, 100.0, 0.5, 200_000.0, 1.0, 1.0)
    throughput.record("NVIDIA H100 80GB HBM3", [result, big], table)
    assert json.loads(table.read_text())["devices"]["NVIDIA H100 80GB HBM3"]["tflops"] == 200.0
    tflops, source = inversion_throughput("NVIDIA H100 80GB HBM3", table)
    assert tflops == 200.0 and source.startswith("measured on NVIDIA H100 80GB HBM3")


def test_without_a_recorded_figure_the_throughput_is_called_a_guess(tmp_path: Path):
    table = tmp_path / "throughput.json"
    table.write_text(json.dumps({"devices": {"NVIDIA A100-SXM4-80GB": {"tflops": 150.0, "measured": "2026-11-27"}}}))
    assert inversion_throughput("NVIDIA A100-SXM4-80GB", table) == (150.0, "measured on NVIDIA A100-SXM4-80GB (2026-11-27, throughput.json)")
    for device in ("NVIDIA H200", None):
        tflops, source = inversion_throughput(device, table)
        assert tflops == GUESSED_TFLOPS and source.startswith("a guess")
    assert inversion_throughput("x", tmp_path / "missing.json")[1].startswith("a guess")
    # the repository's table (package data) parses, and every figure it records is usable
    for name, entry in json.loads(THROUGHPUT_TABLE.read_text())["devices"].items():
        assert entry["tflops"] > 0 and entry["measured"], name
    assert "invariance/core" in THROUGHPUT_TABLE.as_posix()
    # the plan names the devices that have a figure when it has to guess
    assert inversion_throughput(None, table)[1].endswith("measured: NVIDIA A100-SXM4-80GB")


def test_the_plan_says_where_its_gpu_hours_come_from(tmp_path: Path, capsys):
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps(tiny_config(tmp_path, str(tmp_path / "out"))))
    plan_only(str(config_path))
    out = capsys.readouterr().out
    assert f"GPU-hours at {GUESSED_TFLOPS:g} TFLOP/s, a guess: no throughput measured" in out
    plan_only(str(config_path), gpu="NVIDIA B200")  # the workers' GPU, named: looked up by that name
    assert "a guess: no throughput measured for NVIDIA B200 in throughput.json" in capsys.readouterr().out
