"""Inversion throughput on a GPU: ViT-B/32 at 224 (random init), fp32 vs bf16 autocast (vs compile).

For each mode, one timed ``invariance.core.inversion.invert`` of ``--samples`` images for
``--iterations`` steps at ``--layer`` (default: the pre-logits, i.e. the whole network, the
most expensive inversion), after an untimed warm-up. Reports image-iterations per second,
achieved TFLOP/s (FLOPs from ``invariance.core.cost`` x images x steps / time) against this
device's bf16 matmul peak measured here with a large bf16 matmul, peak memory
(torch.cuda.max_memory_allocated), the final relative loss (bf16 must converge like fp32),
and the projected time of the paper's grid per checkpoint: 13 ft inversions per seed x 3 seeds
(plus, once per pretrained model, the same 13 x 3 for pt), next to what the reference
scripts' pairwise loop (13 x 13 x 2 full-depth inversions per seed) would take. The other
layers' times are projected from the measured one by their FLOPs; ``--time-all-layers``
measures each instead.

    python bench/bench_gpu.py                                  # paper settings: 500 x 500
    python bench/bench_gpu.py --samples 128 --iterations 50    # quick
    python bench/bench_gpu.py --compile --modes fp32,tf32,bf16

Without a CUDA device it prints why and exits 0. ``--cpu-smoke`` runs the same code on the
CPU at whatever (tiny) settings are given, to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shards_vs_pairwise import FullDepthForward, markdown_table  # noqa: E402

from invariance.config import InversionConfig, ModelConfig  # noqa: E402
from invariance.core.cost import inversion_step_flops  # noqa: E402
from invariance.core.inversion import auto_micro_batch, invert, start_noise  # noqa: E402
from invariance.core.models import FeatureModel, load_model  # noqa: E402
from invariance.io.synthetic import make_shapes  # noqa: E402

NO_CUDA_MESSAGE = (
    "bench_gpu.py: no CUDA device found; this benchmark measures GPU inversion throughput only, "
    "nothing to do here. Run it on a machine with a GPU: python bench/bench_gpu.py"
)
MODES = ("fp32", "tf32", "bf16", "bf16-compile")
PAPER_SEEDS = 3  # the grid: every layer of the model (13 for ViT-B/32) x 3 seeds


@dataclass(frozen=True)
class ModeResult:
    mode: str
    micro_batch: int
    warmup_s: float
    seconds: float
    image_iterations_per_s: float
    tflops_per_s: float
    fraction_of_bf16_peak: float
    peak_memory_gib: float | None
    final_loss_mean: float
    projected_ft_per_checkpoint_h: float
    projected_pt_once_h: float
    projected_pairwise_per_checkpoint_h: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 50) -> float:
    """Achieved TFLOP/s of ``repeats`` ``[size, size] @ [size, size]`` matmuls (2 size^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - began) / 1e12


def mode_config(mode: str, iterations: int, micro_batch: int | str) -> InversionConfig:
    return InversionConfig(
        iterations=iterations, micro_batch=micro_batch, bf16=mode.startswith("bf16"), compile=mode.endswith("compile")
    )


def mode_context(mode: str) -> contextlib.AbstractContextManager:
    # fp32 is strict float32 (the library's bf16=false); tf32 is that with TF32 matmuls allowed
    # (set here: the library enables TF32 only inside bf16 runs)
    return float32_matmul_precision("high" if mode == "tf32" else "highest")


def time_inversion(model: FeatureModel, layer: int, images: torch.Tensor, noise: torch.Tensor,
                   config: InversionConfig, mode: str) -> tuple[float, float, float | None, float]:  # fmt: skip
    """(warm-up s, timed s, peak memory GiB or None, mean final loss) of one inversion."""
    device = images.device
    with mode_context(mode):
        began = time.perf_counter()
        # warm-up on the same shapes: compiles (compile mode), autotunes, fills the allocator
        invert(model, layer, images, noise, config.model_copy(update={"iterations": 2}))
        synchronize(device)
        warmup = time.perf_counter() - began
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        result = invert(model, layer, images, noise, config)
        synchronize(device)
        seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return warmup, seconds, peak, float(result.final_loss.mean())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_base_patch32_224", help="timm architecture (random init)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model")
    parser.add_argument("--samples", type=int, default=500, help="images (paper: 500)")
    parser.add_argument("--iterations", type=int, default=500, help="inversion steps (paper scripts: 500)")
    parser.add_argument("--layer", type=int, default=None, help="reference layer to time (default: pre-logits)")
    parser.add_argument("--modes", default="fp32,bf16", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--compile", action="store_true", help="add the bf16-compile mode (torch.compile)")
    parser.add_argument("--micro-batch", default="auto", help="'auto' (sized to free memory) or an integer")
    parser.add_argument("--time-all-layers", action="store_true", help="time every layer instead of FLOP-scaling one")
    parser.add_argument("--seeds", type=int, default=PAPER_SEEDS, help="seeds of the projected grid")
    parser.add_argument("--peak-size", type=int, default=8192, help="side of the matmul that measures the peak")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU to check the script; figures meaningless")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.compile and "bf16-compile" not in modes:
        modes.append("bf16-compile")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.modes = modes
    args.micro_batch = args.micro_batch if args.micro_batch == "auto" else int(args.micro_batch)
    return args


def format_table(results: Sequence[ModeResult]) -> str:
    header = ("mode", "micro-batch", "s", "img-it/s", "TFLOP/s", "% bf16 peak", "peak GiB", "final loss",
              "ft h/ckpt", "pt h once", "pairwise h/ckpt")  # fmt: skip
    rows = [header]
    for r in results:
        memory = "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}"
        rows.append((r.mode, str(r.micro_batch), f"{r.seconds:.1f}", f"{r.image_iterations_per_s:,.0f}",
                     f"{r.tflops_per_s:.1f}", f"{100 * r.fraction_of_bf16_peak:.0f}%", memory,
                     f"{r.final_loss_mean:.4f}", f"{r.projected_ft_per_checkpoint_h:.2f}",
                     f"{r.projected_pt_once_h:.2f}", f"{r.projected_pairwise_per_checkpoint_h:.1f}"))  # fmt: skip
    return markdown_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only oversubscribe it
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        print(f"device: {properties.name}, {properties.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}", flush=True)  # fmt: skip
    else:
        print("device: CPU (--cpu-smoke: checks the script only, the figures mean nothing)", flush=True)

    with float32_matmul_precision("highest"):
        bf16_peak = matmul_tflops(device, torch.bfloat16, args.peak_size)
        fp32_peak = matmul_tflops(device, torch.float32, args.peak_size)
    with float32_matmul_precision("high"):
        tf32_peak = matmul_tflops(device, torch.float32, args.peak_size)
    print(f"measured matmul peak ({args.peak_size}^2): bf16 {bf16_peak:.1f}, tf32 {tf32_peak:.1f}, "
          f"fp32 {fp32_peak:.1f} TFLOP/s", flush=True)  # fmt: skip

    torch.manual_seed(0)
    model = load_model(ModelConfig(arch=args.arch, kwargs=json.loads(args.model_kwargs)), None).to(device)
    depth, size = model.depth, model.input_size
    layer = depth if args.layer is None else args.layer
    layers = list(range(depth + 1))
    images = make_shapes(args.samples, size=size, seed=5).images.to(device)
    noise = start_noise(0, torch.arange(args.samples), tuple(images.shape[1:]))
    # FLOPs of one step for one image, per layer: truncated (ours) and full-depth (reference scripts)
    step_flops = {j: inversion_step_flops(model, j) for j in layers}
    full_depth = FullDepthForward(model)
    full_step_flops = {j: inversion_step_flops(full_depth, j) for j in layers}
    print(f"{args.arch}: {depth + 1} layers, {size}px; {args.samples} samples x {args.iterations} iterations at "
          f"layer {layer}; {step_flops[layer] / 1e9:.2f} GFLOP per image-step there", flush=True)  # fmt: skip

    results = []
    for mode in args.modes:
        config = mode_config(mode, args.iterations, args.micro_batch)
        chunk = config.micro_batch
        if not isinstance(chunk, int):
            chunk = auto_micro_batch(model, layer, "flatten", images, noise.to(device), config)
        warmup, seconds, peak, loss = time_inversion(model, layer, images, noise, config, mode)
        if args.time_all_layers:
            per_layer = {j: time_inversion(model, j, images, noise, config, mode)[1] for j in layers}
        else:
            per_layer = {j: seconds * step_flops[j] / step_flops[layer] for j in layers}
        seconds_per_flop = seconds / step_flops[layer]
        # a step is a forward and an input-gradient backward; the target and final evaluation
        # forwards (2 of ~500 steps' worth at paper settings) are left out, as in invariance.core.cost
        achieved = step_flops[layer] * args.samples * args.iterations / seconds / 1e12
        one_seed = sum(per_layer.values())  # one inversion per layer
        hours = 1.0 / 3600
        pairwise = sum(seconds_per_flop * full_step_flops[j] for j in layers) * len(layers) * 2
        results.append(
            ModeResult(
                mode=mode,
                micro_batch=min(chunk, args.samples),
                warmup_s=warmup,
                seconds=seconds,
                image_iterations_per_s=args.samples * args.iterations / seconds,
                tflops_per_s=achieved,
                fraction_of_bf16_peak=achieved / bf16_peak,
                peak_memory_gib=peak,
                final_loss_mean=loss,
                projected_ft_per_checkpoint_h=args.seeds * one_seed * hours,
                projected_pt_once_h=args.seeds * one_seed * hours,
                projected_pairwise_per_checkpoint_h=args.seeds * pairwise * hours,
            )
        )
        print(f"  {mode}: {seconds:.1f} s (warm-up {warmup:.1f} s), micro-batch {results[-1].micro_batch}, "
              f"final loss {loss:.4f}", flush=True)  # fmt: skip

    print()
    print(format_table(results))
    print()
    print(f"projections are for {args.samples} samples x {args.iterations} iterations and {args.seeds} seeds: "
          f"'ft h/ckpt' = {len(layers)} ft inversions x {args.seeds} seeds per checkpoint (one per reference layer, "
          f"forward stopping there); 'pt h once' = the same for the pretrained model, once for all checkpoints; "
          f"'pairwise h/ckpt' = the reference scripts' {len(layers)} x {len(layers)} x 2 full-depth inversions per "
          f"seed per checkpoint. "
          + ("Every layer timed." if args.time_all_layers else f"Other layers scaled from layer {layer} by FLOPs."))
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items()},
            "peak_tflops": {"bf16": bf16_peak, "tf32": tf32_peak, "fp32": fp32_peak},
            "results": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
