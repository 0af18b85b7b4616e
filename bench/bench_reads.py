"""Nothing read twice: bytes read from the store, and memory held, per shard, as checkpoints grow.

Runs whole plans (epochs x 13 layers x 3 seeds, a tiny 13-layer ViT, a local store) through the
in-process executor with one Workspace, as one worker runs them, counting every byte read
through fsspec's ``cat_file`` (X' from the inversion cache, checkpoints, eval data, completion
records), by kind. Each plan runs twice: with the worker's X' cache (the default) and without it
(``inversion_cache_bytes=0``: the pretrained X' read again for every checkpoint, as before).
Also reports what a shard context keeps (the Grams of the features on X) against what it kept
before (the features too), and the process's peak resident memory.

    python bench/bench_reads.py                         # 1, 2 and 4 epochs (~5 min on 1 thread)
    python bench/bench_reads.py --epochs 1 4 100 --json reads.json   # 100 with the cache only (~4 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import save_file

from invariance.io.layout import StirUnit
from invariance.config import ModelConfig, parse_config
from invariance.core.models import build_network
from invariance.core.shards import ShardContext
from invariance.engine.execute import execute_in_process
from invariance.engine.plan import make_plan
from invariance.core.workspace import INVERSION_CACHE_BYTES, RunSpec, Workspace
from invariance.io.storage import Store
from invariance.io.synthetic import make_shapes, to_parquet_bytes

MODEL = {
    "arch": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 12, "num_heads": 2, "num_classes": 3},
}


@dataclass
class ReadsResult:
    epochs: int
    cache: bool
    units: int
    shards: int
    seconds: float
    bytes_read: dict[str, int]
    context_bytes_held: int  # largest Grams a shard context kept
    features_bytes: int  # what the clean features of one context's models would have held
    # resident memory (MB) after the units of the first and of the last checkpoint (largest sample
    # each): memory that grew with the checkpoints would show as last > first
    rss_first_mb: float = 0.0
    rss_last_mb: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.bytes_read.values())

    @property
    def per_shard(self) -> float:
        return self.total / self.shards


XPRIME = "pretrained X'"


def _kind(path: str) -> str:
    if "_cache/inversions/" in path:
        return XPRIME
    if path.endswith(".safetensors"):
        return "checkpoints"
    if path.endswith(".parquet") and "/data/" in path:
        return "eval data"
    return "records and other"


@contextmanager
def counting_reads() -> Iterator[Counter]:
    """Counts the bytes every local ``cat_file`` returns, by kind of file."""
    counts: Counter = Counter()
    original = LocalFileSystem.cat_file

    def cat_file(self, path, *args, **kwargs):  # noqa: ANN001
        data = original(self, path, *args, **kwargs)
        counts[_kind(str(path))] += len(data)
        return data

    LocalFileSystem.cat_file = cat_file
    try:
        yield counts
    finally:
        LocalFileSystem.cat_file = original


def resident_mb() -> float:
    """This process's resident memory now (not its peak), in MiB (as the peak below): /proc/self/statm on Linux."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 1024**2


@contextmanager
def sampling_memory(samples: dict[int, float]) -> Iterator[None]:
    """Records {epoch: the largest resident memory after one of its units} (-1: the inversions)."""
    from invariance.engine import execute as execute_module

    original = execute_module.run_unit

    def run_unit(spec, unit, workspace):  # noqa: ANN001
        key = original(spec, unit, workspace)
        epoch = getattr(unit, "epoch", -1)
        samples[epoch] = max(samples.get(epoch, 0.0), resident_mb())
        return key

    execute_module.run_unit = run_unit
    try:
        yield
    finally:
        execute_module.run_unit = original


def write_inputs(folder: Path, epochs: int, samples: int) -> None:
    torch.manual_seed(0)
    pretrained = build_network(ModelConfig(**MODEL)).state_dict()
    (folder / "ckpt" / "ft").mkdir(parents=True)
    save_file(pretrained, str(folder / "ckpt" / "pretrained.safetensors"))
    for epoch in range(1, epochs + 1):
        generator = torch.Generator().manual_seed(epoch)
        state = {k: (v + 0.01 * epoch * torch.randn(v.shape, generator=generator)).contiguous() for k, v in pretrained.items()}
        save_file(state, str(folder / "ckpt" / "ft" / f"epoch={epoch:03d}.safetensors"))
    (folder / "data").mkdir()
    (folder / "data" / "test-00000-of-00001.parquet").write_bytes(to_parquet_bytes(make_shapes(samples, size=16, seed=5), "texture"))


def run_plan(folder: Path, epochs: int, cache: bool, samples: int, iterations: int) -> ReadsResult:
    output = folder / ("out-cache" if cache else "out-nocache")
    config = parse_config({
        "output": str(output), "model": MODEL, "pretrained": str(folder / "ckpt" / "pretrained.safetensors"),
        "checkpoints": str(folder / "ckpt" / "ft" / "epoch={epoch}.safetensors"),
        "data": {"format": "parquet", "path": str(folder / "data"), "n_samples": samples},
        "layers": "all", "seeds": [0, 1, 2], "inversion": {"iterations": iterations, "micro_batch": 64},
    })  # fmt: skip
    store = Store(config.output)
    plan = make_plan(config, store)
    spec = RunSpec.from_plan(config, store, plan)
    workspace = Workspace("cpu", inversion_cache_bytes=INVERSION_CACHE_BYTES if cache else 0)
    held = 0
    original_grams = ShardContext.clean_grams

    def clean_grams(self, model_name, debiased):  # noqa: ANN001
        nonlocal held
        gram = original_grams(self, model_name, debiased)
        held = max(held, self.held_bytes())
        return gram

    ShardContext.clean_grams = clean_grams
    began = time.perf_counter()
    try:
        memory: dict[int, float] = {}
        with counting_reads() as counts, sampling_memory(memory):
            summary = execute_in_process(plan, spec, workspace)
    finally:
        ShardContext.clean_grams = original_grams
    if summary.failures:
        raise RuntimeError(f"{len(summary.failures)} units failed: {summary.failures[:3]}")
    n_layers = len(plan.layers)
    # the flattened features on X of both models at every layer, float32: [n, tokens x width] per layer
    kwargs = MODEL["kwargs"]
    tokens = (kwargs["img_size"] // kwargs["patch_size"]) ** 2 + 1
    features = 2 * samples * ((n_layers - 1) * tokens * kwargs["embed_dim"] + kwargs["embed_dim"]) * 4
    return ReadsResult(
        epochs=epochs, cache=cache, units=summary.completed, shards=len(plan.of_type(StirUnit)) + len(plan.units["cka"]),
        seconds=time.perf_counter() - began, bytes_read=dict(counts), context_bytes_held=held, features_bytes=features,
        rss_first_mb=memory.get(1, 0.0), rss_last_mb=memory.get(epochs, 0.0),
    )  # fmt: skip


def format_table(results: list[ReadsResult]) -> str:
    kinds = sorted({k for r in results for k in r.bytes_read})
    header = ["epochs", "X' cache", "shards", *[f"{k} MB" for k in kinds], "total MB", "KB per shard",
              "RSS MB first -> last checkpoint", "s"]  # fmt: skip
    rows = [[str(r.epochs), "on" if r.cache else "off", str(r.shards),
             *[f"{r.bytes_read.get(k, 0) / 1e6:.2f}" for k in kinds], f"{r.total / 1e6:.2f}",
             f"{r.per_shard / 1e3:.1f}", f"{r.rss_first_mb:.0f} -> {r.rss_last_mb:.0f}", f"{r.seconds:.0f}"]
            for r in results]  # fmt: skip
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def vit_b32_context_bytes(samples: int = 500) -> tuple[int, int]:
    """(features kept before, Grams kept now) per model of a ViT-B/32 shard context at 224 with
    `flatten`: 12 blocks of 50 x 768 plus the 768-d pre-logits, float32; 13 biased and 13 debiased
    n x n Grams, float64."""
    features = samples * (12 * 50 * 768 + 768) * 4
    grams = 2 * 13 * samples * samples * 8
    return features, grams


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2, help="inversion steps (the reads do not depend on them)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline-up-to", type=int, default=10, metavar="EPOCHS",
                        help="run the no-cache baseline only for plans of at most this many epochs (a 100-epoch "
                             "baseline doubles a half-hour run to show what the smaller plans already show)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"tiny ViT depth 12 (13 layers), 3 seeds, {args.samples} samples, {args.iterations} steps; local store; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}", flush=True)  # fmt: skip
    results = []
    for epochs in args.epochs:
        with tempfile.TemporaryDirectory() as tmp:
            write_inputs(Path(tmp), epochs, args.samples)
            for cache in (True, False) if epochs <= args.baseline_up_to else (True,):
                results.append(run_plan(Path(tmp), epochs, cache, args.samples, args.iterations))
                print(f"  {epochs} epochs, cache {'on' if cache else 'off'}: {results[-1].seconds:.0f} s", flush=True)
    print()
    print(format_table(results))
    with_cache = [r for r in results if r.cache]
    print(f"\nX' read with the cache: {', '.join(str(r.bytes_read.get(XPRIME, 0)) for r in with_cache)} bytes "
          f"for {', '.join(str(r.epochs) for r in with_cache)} epochs (the same: each X' once per worker)")  # fmt: skip
    held = max(r.context_bytes_held for r in results)
    features = results[0].features_bytes
    before, now = vit_b32_context_bytes()
    print(f"a shard context keeps its Grams only: {held / 1e3:.0f} KB (tiny ViT, both models), where the features "
          f"were another {features / 1e3:.0f} KB; ViT-B/32 at 224, 500 samples, flatten: {now / 1e6:.0f} MB of Grams "
          f"per model kept, {before / 1e6:.0f} MB of features per model no longer kept")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"results": [asdict(r) | {"per_shard": r.per_shard} for r in results], "peak_rss_mb": peak}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
