"""The benchmarks: shards vs the reference scripts' pairwise loop (counts, FLOPs, equal STIR),
and bench_gpu.py's clean refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from invariance.core.cost import inversion_flops, inversion_step_flops
from invariance.core.inversion import invert, start_noise
from tests.helpers import BENCH, load_bench_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

bench = load_bench_module("bench_shards_vs_pairwise")
SMALL = bench.BenchSettings(depth=3, samples=4, iterations=2, checkpoints=2, seeds=1)


@pytest.fixture(scope="module")
def small_result():
    return bench.run_benchmark(SMALL)


def test_inversion_counts_follow_the_structure(small_result):
    checkpoints, seeds, n_layers = SMALL.checkpoints, SMALL.seeds, SMALL.depth + 1
    assert small_result.pairwise.inversions == checkpoints * seeds * n_layers * n_layers * 2 == 64
    assert small_result.shards.inversions == n_layers * seeds + checkpoints * n_layers * seeds == 12


def test_inversion_flops_are_the_counts_times_the_per_layer_cost(small_result):
    """pairwise: every (checkpoint, seed, i, direction) pays a full-depth inversion at each j;
    shards: each (seed, j) pays one truncated pt inversion plus one ft per checkpoint."""
    pretrained, _ = bench.build_models(SMALL)
    full = bench.FullDepthForward(pretrained)
    n, iterations, layers = SMALL.samples, SMALL.iterations, SMALL.layers
    truncated_cost = {j: inversion_flops(pretrained, j, n, iterations) for j in layers}
    full_cost = {j: inversion_flops(full, j, n, iterations) for j in layers}
    checkpoints, seeds = SMALL.checkpoints, SMALL.seeds

    assert small_result.pairwise.inversion_flops == checkpoints * seeds * len(layers) * 2 * sum(full_cost.values())
    assert small_result.shards.inversion_flops == seeds * (1 + checkpoints) * sum(truncated_cost.values())
    # stopping the forward at j saves the blocks after j; from the last block on both run them all
    # (the pre-logits head has no matmul, so no counted FLOPs)
    assert all(full_cost[j] > truncated_cost[j] for j in layers[:-2])
    assert all(full_cost[j] == truncated_cost[j] for j in layers[-2:])
    assert small_result.shards.inversion_flops < small_result.pairwise.inversion_flops
    assert small_result.flop_ratio > small_result.inversion_count_ratio == pytest.approx(64 / 12)


def test_both_methods_give_the_same_stir(small_result):
    assert small_result.shared_pairs == small_result.pairwise.inversions
    assert small_result.max_abs_diff_stir < 1e-4
    assert small_result.max_abs_diff_stir_debiased < 1e-4
    # the shards also give the self terms STIR(r[i] | r[j]) the pairwise loop never computes
    assert len(small_result.shards.stir) == 2 * len(small_result.pairwise.stir)


@pytest.mark.parametrize("forward", ["truncated", "full"])
def test_the_cost_model_matches_what_invert_executes(forward):
    """A FlopCounterMode count of a real invert() is n x (iterations steps + 2 forwards: the target
    and the final evaluation, both without gradient); the full-depth forward runs every block."""
    pretrained, _ = bench.build_models(SMALL)
    model = pretrained if forward == "truncated" else bench.FullDepthForward(pretrained)
    data, layer = bench.eval_images(SMALL), 0
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.layer_features(data.images[:1], [layer])
    forward_flops = counter.get_total_flops()
    noise = start_noise(0, data.indices, tuple(data.images.shape[1:]))
    with FlopCounterMode(display=False) as counter:
        invert(model, layer, data.images, noise, bench.inversion_config(SMALL))
    step = inversion_step_flops(model, layer)
    assert counter.get_total_flops() == SMALL.samples * (SMALL.iterations * step + 2 * forward_flops)
    if forward == "full":  # layer 0 of 3 blocks: the full-depth forward runs 2 more
        assert step > inversion_step_flops(pretrained, layer)


def test_the_flop_count_is_taken_at_the_image_size_the_run_feeds_the_model():
    """A convolutional model has no fixed input size: evaluated at data.image_size 32, its
    inversion costs what 32 px cost, not its 224 px default (the plan's GPU-hours follow)."""
    from invariance.config import ModelConfig
    from invariance.core.models import load_model

    model = load_model(ModelConfig(arch="resnet18", kwargs={"num_classes": 10}), None)
    assert model.input_size == 224
    at_32, at_default = inversion_step_flops(model, 1, image_size=32), inversion_step_flops(model, 1)
    assert at_default / at_32 == pytest.approx((224 / 32) ** 2, rel=0.05)
    assert inversion_flops(model, 1, 4, 9, image_size=32) == 4 * 10 * at_32


def _run_bench_gpu(*args: str, hide_cuda: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if hide_cuda else os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    return subprocess.run(
        [sys.executable, str(BENCH / "bench_gpu.py"), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_bench_gpu_refuses_cleanly_without_cuda():
    completed = _run_bench_gpu("--samples", "4", "--iterations", "2")
    assert completed.returncode == 0, completed.stderr
    assert "no CUDA device" in completed.stdout
    assert "Traceback" not in completed.stderr


def test_bench_gpu_code_path_runs_on_cpu(tmp_path):
    """--cpu-smoke runs the GPU script's code on a tiny ViT, so it cannot rot unseen on CPU runners."""
    kwargs = '{"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}'
    out = tmp_path / "gpu.json"
    completed = _run_bench_gpu(
        "--cpu-smoke", "--arch", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--samples", "4",
        "--iterations", "2", "--peak-size", "64", "--modes", "fp32,bf16", "--json", str(out),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "| fp32" in completed.stdout and "| bf16" in completed.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["fp32", "bf16"]
    assert all(r["image_iterations_per_s"] > 0 and r["projected_ft_per_checkpoint_h"] > 0 for r in results)
