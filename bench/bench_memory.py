"""Peak memory of a paper-sized inversion, ViT-B/32 at 224, counted without a GPU.

Does a 500-sample ViT-B/32 inversion fit one 80 GB GPU without user tuning? This script runs
``invariance.core.inversion.invert`` with fake tensors (torch's FakeTensorMode: every op's output
shape and dtype, no data, no arithmetic) under a dispatch-mode tracker that adds up the bytes of
every tensor storage alive at each op, as a caching allocator would count them
(``torch.cuda.max_memory_allocated``; each storage rounded up to 512 bytes). Saved activations,
gradients, the iterates and the model all count; views and in-place results do not allocate.

For each mode (fp32; bf16 autocast) it reports:

- what ``micro_batch: auto`` would choose on a ``--device-gib`` device: the library's own
  ``probe_inversion_step`` measured by the tracker, the free memory (device minus model, images,
  start noise, the X' and loss buffers ``invert`` allocates before sizing its chunks, and
  ``--reserve-gib`` for the CUDA context and library workspaces, which no tensor holds), and the
  library's own ``micro_batch_for_memory``;
- the peak of the whole ``--samples`` inversion at that micro-batch (two steps and the final
  evaluation: every later step repeats the second), and whether peak + reserve fits the device;
- the peak per sample, and how many samples would fit in one chunk.

    python bench/bench_memory.py                                # 500 samples, 80 GiB, pre-logits
    python bench/bench_memory.py --device-gib 139 --samples 2000

What it cannot see: allocator fragmentation (auto's 0.6 share of the free memory leaves room for
it), and kernel workspaces below the tensor level. On CUDA the attention kernels (flash,
memory-efficient) save less than the CPU kernels counted here; for ViT-B/32 (50 tokens) the
attention maps are under 1% of the activations either way. bf16 is counted under CPU autocast,
whose cast list for the matmuls matches CUDA's. The tracker is checked against real tensors in
``tests/test_bench_memory.py`` (same peak with and without fake tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shards_vs_pairwise import markdown_table  # noqa: E402

from invariance.config import InversionConfig, ModelConfig  # noqa: E402
from invariance.core.inversion import invert, micro_batch_for_memory, probe_inversion_step  # noqa: E402
from invariance.core.models import FeatureModel, load_model  # noqa: E402

GIB = 2**30
MIB = 2**20
ALLOCATION_ROUNDING = 512  # bytes: the CUDA caching allocator's smallest block
MODES = ("fp32", "bf16")


class PeakMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops create while the mode is active.

    ``track`` adds storages that existed before (the model, the inputs). A storage counts from
    the op that creates it until it is freed (its last tensor, saved-for-backward ones included,
    is gone), once however many views share it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._add(tensor.untyped_storage())

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._sizes:
            return
        size = -(-storage.nbytes() // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING
        self._sizes[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        output = func(*args, **(kwargs or {}))
        # a view allocates nothing; under fake tensors a view of a real tensor (the model's
        # weights) would otherwise look like a new storage
        if not func.is_view:
            for tensor in tree_flatten(output)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._add(tensor.untyped_storage())
        return output


@dataclass(frozen=True)
class MemoryResult:
    mode: str
    samples: int
    micro_batch: int
    model_and_inputs_gib: float
    results_gib: float
    probe_mib_per_sample: float
    peak_gib: float
    peak_mib_per_sample: float
    device_gib: float
    reserve_gib: float
    fits: bool
    one_chunk_capacity: int


def _mode_context(mode: str) -> contextlib.AbstractContextManager:
    # the library enables autocast on CUDA only; here the tensors are CPU fakes
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def inversion_peak(model: FeatureModel, layer: int, samples: int, micro_batch: int | None, mode: str,
                   device_bytes: int, reserve_bytes: int, fake: bool = True) -> MemoryResult:  # fmt: skip
    """Peak memory of one ``samples``-image inversion at ``layer``, and what auto micro-batching
    would choose on a ``device_bytes`` device (``micro_batch=None``) or the given chunk size."""
    size = model.input_size
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        images = torch.rand(samples, 3, size, size)
        noise = torch.randn(samples, 3, size, size)
        tracker = PeakMemory()
        tracker.track([*model.parameters(), *model.buffers(), images, noise])
        resident = tracker.current
        settings = InversionConfig(iterations=2, bf16=False)
        with tracker:
            probed = probe_inversion_step(model, layer, "flatten", images, noise, settings)
        per_sample_probe = (tracker.peak - resident) // probed
        # invert allocates X' and the losses before it sizes the chunks: they are not free
        results_bytes = images.nbytes + 4 * samples
        free = device_bytes - reserve_bytes - resident - results_bytes
        if micro_batch is None:
            micro_batch = micro_batch_for_memory(per_sample_probe, free)
        chunk = min(micro_batch, samples)
        tracker.reset_peak()
        with tracker, _mode_context(mode):
            invert(model, layer, images, noise, settings.model_copy(update={"micro_batch": chunk}))
    peak = tracker.peak
    per_sample = (peak - resident - results_bytes) / chunk
    return MemoryResult(
        mode=mode,
        samples=samples,
        micro_batch=chunk,
        model_and_inputs_gib=resident / GIB,
        results_gib=results_bytes / GIB,
        probe_mib_per_sample=per_sample_probe / MIB,
        peak_gib=peak / GIB,
        peak_mib_per_sample=per_sample / MIB,
        device_gib=device_bytes / GIB,
        reserve_gib=reserve_bytes / GIB,
        fits=peak + reserve_bytes <= device_bytes,
        one_chunk_capacity=int(free // per_sample),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_base_patch32_224", help="timm architecture (random init)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model")
    parser.add_argument("--samples", type=int, default=500, help="images inverted together (paper: 500)")
    parser.add_argument("--layer", type=int, default=None, help="reference layer (default: pre-logits, the deepest)")
    parser.add_argument("--micro-batch", default="auto", help="'auto' (as the library sizes it) or an integer")
    parser.add_argument("--device-gib", type=float, default=80.0, help="GPU memory, GiB (default 80)")
    parser.add_argument("--reserve-gib", type=float, default=1.0, help="CUDA context and workspaces, GiB")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.micro_batch = None if args.micro_batch == "auto" else int(args.micro_batch)
    return args


def format_table(results: Sequence[MemoryResult]) -> str:
    header = ("mode", "samples", "micro-batch", "model+inputs GiB", "X' GiB", "probe MiB/sample", "peak GiB",
              "peak MiB/sample", "fits", "samples in one chunk")  # fmt: skip
    rows = [header]
    for r in results:
        rows.append((r.mode, str(r.samples), str(r.micro_batch), f"{r.model_and_inputs_gib:.2f}", f"{r.results_gib:.2f}",
                     f"{r.probe_mib_per_sample:.1f}", f"{r.peak_gib:.2f}", f"{r.peak_mib_per_sample:.1f}",
                     f"{'yes' if r.fits else 'NO'} ({r.peak_gib + r.reserve_gib:.1f} of {r.device_gib:.0f} GiB)",
                     f"{r.one_chunk_capacity:,}"))  # fmt: skip
    return markdown_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = load_model(ModelConfig(arch=args.arch, kwargs=json.loads(args.model_kwargs)), None)
    layer = model.depth if args.layer is None else args.layer
    device_bytes, reserve_bytes = int(args.device_gib * GIB), int(args.reserve_gib * GIB)
    print(f"{args.arch}: {model.depth + 1} layers, {model.input_size}px; {args.samples} samples inverted at layer "
          f"{layer}; a {args.device_gib:g} GiB device with {args.reserve_gib:g} GiB kept for the CUDA context "
          f"(counted with fake tensors: no GPU needed)", flush=True)  # fmt: skip
    results = [
        inversion_peak(model, layer, args.samples, args.micro_batch, mode, device_bytes, reserve_bytes)
        for mode in args.modes
    ]
    print()
    print(format_table(results))
    print()
    print("model+inputs = weights, images and start noise; X' = the inverted images and losses, allocated "
          "whole before the chunks; micro-batch 'auto' = the library's micro_batch_for_memory(probe per sample, "
          "what is left); peak MiB/sample = (peak - model+inputs - X') / micro-batch; 'samples in one chunk' = "
          "how many the device holds at that.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
