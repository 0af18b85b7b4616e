"""How fast the inversion's hot loop runs: achieved GFLOP/s against a float32 matmul, same threads.

For each model (the tiny 13-layer bench ViT at 32 px, and a ViT-S/16-sized model at 224: timm
``vit_small_patch16_224``, random init) and each thread count: a short ``invert`` at the
pre-logits (the whole network) after a warm-up, its FLOPs counted by torch's FlopCounterMode
(samples x (steps x one step + 2 forwards: the target and the final evaluation)), and a
1024 x 1024 float32 matmul timed in the same process on the same threads. The ratio is what
to watch: a change that slows the hot loop lowers it. On a GPU (``--device cuda``) the same
figures, and ``--record`` writes the measured TFLOP/s into invariance/core/throughput.json, which
``invariance plan`` uses for its GPU-hours.

    python bench/bench_throughput.py                       # CPU, 1 and 2 threads (~2 min)
    python bench/bench_throughput.py --device cuda --samples 64 --steps 20 --record
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from invariance.config import InversionConfig, ModelConfig
from invariance.core.cost import inversion_step_flops
from invariance.core.inversion import invert, start_noise
from invariance.core.models import FeatureModel, load_model

THROUGHPUT_TABLE = Path(__file__).resolve().parent.parent / "invariance" / "core" / "throughput.json"
MODELS: dict[str, dict] = {
    "tiny ViT (32 px, depth 12, width 32)": {
        "arch": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 12, "num_heads": 2},
    },
    "ViT-S/16 at 224": {"arch": "vit_small_patch16_224", "kwargs": {}},
}


@dataclass
class ThroughputResult:
    model: str
    threads: int
    samples: int
    steps: int
    inversion_gflop: float
    inversion_s: float
    inversion_gflops: float  # GFLOP/s
    matmul_gflops: float
    ratio: float


def matmul_gflops(device: torch.device, size: int = 1024, seconds: float = 1.0) -> float:
    """float32 ``size x size`` matmul throughput, best of a few timed loops of ~``seconds`` / 4."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    flops = 2 * size**3
    best = 0.0
    for _ in range(4):
        repeats, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds / 4:
            torch.mm(a, b)
            repeats += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, flops * repeats / (time.perf_counter() - began) / 1e9)
    return best


def inversion_flops_exact(model: FeatureModel, layer: int, samples: int, steps: int) -> int:
    """What ``invert`` executes: samples x (steps x one step + the target and final forwards)."""
    image = torch.rand(1, 3, model.input_size, model.input_size, device=model.mean.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.layer_features(image, [layer])
    return samples * (steps * inversion_step_flops(model, layer) + 2 * counter.get_total_flops())


def measure(name: str, model: FeatureModel, threads: int, samples: int, steps: int, device: torch.device) -> ThroughputResult:
    torch.set_num_threads(threads)
    layer = model.depth
    size = model.input_size
    images = torch.rand(samples, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    noise = start_noise(0, torch.arange(samples), (3, size, size))
    # float32 on the CPU; on CUDA the library's default, bf16 autocast (what `invariance run` does there)
    config = InversionConfig(iterations=steps, micro_batch=samples, bf16=device.type == "cuda")
    invert(model, layer, images, noise, config.model_copy(update={"iterations": 1}))  # warm-up
    matmul = matmul_gflops(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    invert(model, layer, images, noise, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    matmul = max(matmul, matmul_gflops(device))  # before and after: the better of the two
    gflop = inversion_flops_exact(model, layer, samples, steps) / 1e9
    return ThroughputResult(name, threads, samples, steps, gflop, seconds, gflop / seconds, matmul, gflop / seconds / matmul)


def format_table(results: list[ThroughputResult]) -> str:
    header = ["model", "threads", "samples x steps", "GFLOP", "s", "inversion GFLOP/s", "matmul GFLOP/s", "ratio"]
    rows = [[r.model, str(r.threads), f"{r.samples} x {r.steps}", f"{r.inversion_gflop:.1f}", f"{r.inversion_s:.2f}",
             f"{r.inversion_gflops:.1f}", f"{r.matmul_gflops:.1f}", f"{100 * r.ratio:.0f}%"] for r in results]  # fmt: skip
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def record(device_name: str, results: list[ThroughputResult], path: Path = THROUGHPUT_TABLE) -> None:
    """Write the best achieved TFLOP/s of the largest model on ``device_name`` into the table."""
    table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    best = max((r for r in results if r.model == list(MODELS)[-1]), key=lambda r: r.inversion_gflops)
    table["devices"][device_name] = {
        "tflops": round(best.inversion_gflops / 1000, 3),
        "measured": time.strftime("%Y-%m-%d"),
        "how": f"bench_throughput.py, {best.model}, {best.samples} samples x {best.steps} steps, bf16 autocast",
    }
    path.write_text(json.dumps(table, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny-samples", type=int, default=64)
    parser.add_argument("--tiny-steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true", help="write the measured TFLOP/s into invariance/core/throughput.json")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{device_name}; torch {torch.__version__}", flush=True)
    results = []
    for name in args.models:
        torch.manual_seed(0)
        model = load_model(ModelConfig(**MODELS[name]), None).to(device)
        tiny = name == list(MODELS)[0]
        for threads in args.threads:
            results.append(measure(name, model, threads, args.tiny_samples if tiny else args.samples,
                                   args.tiny_steps if tiny else args.steps, device))  # fmt: skip
            print(f"  {name}, {threads} thread(s): {100 * results[-1].ratio:.0f}% of the matmul", flush=True)
    print()
    print(format_table(results))
    if args.record:
        record(device_name, results)
        print(f"recorded in {THROUGHPUT_TABLE}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "results": [asdict(r) for r in results]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
