"""The reference scripts' pairwise loop vs our shards, in one process, on the same tiny ViT and data.

(a) pairwise, as the released finetuning-paper scripts run it: for each checkpoint, seed,
    (i, j) layer pair and direction (pt-ref, ft-ref), a fresh inversion of the reference model
    at layer j with a FULL-DEPTH forward (every block and the head run, as a model returning
    all latents does), then STIR of the other model at layer i:
    ``checkpoints x seeds x L x L x 2`` inversions.
(b) shards: one ShardContext per checkpoint; pt inversions once per (j, seed) and reused for
    every checkpoint, ft inversions once per (j, seed) per checkpoint, forward stopping at j;
    each inversion gives STIR for both models at all target layers:
    ``L x seeds + checkpoints x L x seeds`` inversions.

Both use the library's ``invert`` with the same (seed, sample)-keyed start noise; only the
forward differs, and the layers past j do not enter the loss, so X' and the STIR values of the
pairs both compute must agree (printed: max abs difference). Inversion FLOPs come from
``invariance.core.cost`` (torch's FlopCounterMode on one step of one image, x samples x steps).

    python bench/bench_shards_vs_pairwise.py               # 13 layers, 3 checkpoints, 2 seeds
    python bench/bench_shards_vs_pairwise.py --samples 64 --iterations 50 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from invariance.core.cka import linear_cka
from invariance.config import InversionConfig, ModelConfig, TokenPolicy
from invariance.core.cost import inversion_flops
from invariance.io.data import EvalImages
from invariance.core.inversion import InversionResult, invert, start_noise
from invariance.core.models import FeatureModel, load_model
from invariance.core.shards import ShardContext, batched_features
from invariance.io.synthetic import make_shapes

# (checkpoint, ref_model, ref_layer, target_model, target_layer, seed)
StirKey = tuple[int, str, int, str, int, int]


@dataclass(frozen=True)
class BenchSettings:
    """The tiny ViT (timm vit_tiny_patch16_224 resized), the grid and the inversion settings."""

    depth: int = 12
    embed_dim: int = 32
    num_heads: int = 2
    img_size: int = 32
    patch_size: int = 8
    samples: int = 16
    iterations: int = 20  # at 10 the per-shard STIR evaluation of a tiny model holds the wall ratio near 20x
    step_size: float = 0.5
    checkpoints: int = 3
    seeds: int = 2
    ft_noise: float = 0.02  # checkpoint c = pt + N(0, (ft_noise * c)^2) on every parameter
    token_policy: TokenPolicy = "flatten"

    @property
    def layers(self) -> list[int]:
        """0..depth-1 are blocks, depth is the pre-logits: depth + 1 layers."""
        return list(range(self.depth + 1))

    def pairwise_inversions(self) -> int:
        n_layers = len(self.layers)
        return self.checkpoints * self.seeds * n_layers * n_layers * 2

    def shard_inversions(self) -> int:
        n_layers = len(self.layers)
        return n_layers * self.seeds + self.checkpoints * n_layers * self.seeds


@dataclass
class MethodResult:
    """What one method did: inversions run, their FLOPs, wall time (all of it, and the part
    spent inside ``invert``) and the STIR values (biased, debiased) it produced."""

    name: str
    inversions: int = 0
    inversion_flops: int = 0
    inversion_s: float = 0.0
    wall_s: float = 0.0
    stir: dict[StirKey, tuple[float, float]] = field(default_factory=dict, repr=False)


class FullDepthForward(FeatureModel):
    """The reference scripts' forward: every block and the pre-logits head run whatever layer
    is asked (their model returns all latents and the loss picks layer j). Shares the network."""

    def __init__(self, model: FeatureModel) -> None:
        super().__init__(model.network, model.mean.flatten().tolist(), model.std.flatten().tolist())
        self.to(model.mean.device)  # the new mean/std buffers start on the CPU

    def layer_features(
        self, images: torch.Tensor, layers: Sequence[int], token_policy: TokenPolicy = "flatten"
    ) -> dict[int, torch.Tensor]:
        outputs = super().layer_features(images, [*layers, self.depth], token_policy)
        return {layer: outputs[layer] for layer in layers}


def build_models(settings: BenchSettings) -> tuple[FeatureModel, list[FeatureModel]]:
    """The 'pretrained' tiny ViT (seed 0 random init) and ``checkpoints`` 'finetuned' copies,
    checkpoint c moved by Gaussian noise of std ``ft_noise * c`` on every parameter."""
    kwargs = {
        "img_size": settings.img_size,
        "patch_size": settings.patch_size,
        "embed_dim": settings.embed_dim,
        "depth": settings.depth,
        "num_heads": settings.num_heads,
    }
    torch.manual_seed(0)
    pretrained = load_model(ModelConfig(arch="vit_tiny_patch16_224", kwargs=kwargs), None)
    finetuned = []
    for checkpoint in range(1, settings.checkpoints + 1):
        model = copy.deepcopy(pretrained)
        generator = torch.Generator().manual_seed(1000 + checkpoint)
        with torch.no_grad():
            for parameter in model.network.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * settings.ft_noise * checkpoint)
        finetuned.append(model)
    return pretrained, finetuned


def eval_images(settings: BenchSettings) -> EvalImages:
    images = make_shapes(settings.samples, size=settings.img_size, seed=5).images
    return EvalImages(images=images, indices=torch.arange(settings.samples))


def inversion_config(settings: BenchSettings) -> InversionConfig:
    # fixed micro-batch: both methods split the samples identically (exact either way)
    return InversionConfig(
        iterations=settings.iterations, step_size=settings.step_size, micro_batch=64, bf16=False, compile=False
    )


class _FlopTable:
    """Inversion FLOPs per (forward kind, layer), counted once: pt and ft share the architecture."""

    def __init__(self, settings: BenchSettings, model: FeatureModel) -> None:
        self._settings = settings
        self._models = {"truncated": model, "full": FullDepthForward(model)}
        self._cache: dict[tuple[str, int], int] = {}

    def __call__(self, kind: str, layer: int) -> int:
        if (kind, layer) not in self._cache:
            s = self._settings
            model = self._models[kind]
            self._cache[kind, layer] = inversion_flops(model, layer, s.samples, s.iterations, s.token_policy)
        return self._cache[kind, layer]


def _timed(result: MethodResult, inversion: Callable[[], InversionResult]) -> InversionResult:
    began = time.perf_counter()
    inverted = inversion()
    result.inversion_s += time.perf_counter() - began
    result.inversions += 1
    return inverted


def run_pairwise(settings: BenchSettings, pretrained: FeatureModel, finetuned: list[FeatureModel],
                 data: EvalImages, flops: _FlopTable, progress: bool = False) -> MethodResult:  # fmt: skip
    """(a): a full-depth inversion per (checkpoint, seed, i, j, direction), then one STIR.

    Features on the clean X are computed once per model and reused, which the reference code
    does not do: it only makes this baseline faster, never the comparison more favourable."""
    result = MethodResult("pairwise (reference scripts)")
    config, policy, layers = inversion_config(settings), settings.token_policy, settings.layers
    shape = tuple(data.images.shape[1:])
    began = time.perf_counter()
    clean = {id(m): batched_features(m, data.images, layers, policy) for m in [pretrained, *finetuned]}
    full_pt = FullDepthForward(pretrained)
    for checkpoint, ft in enumerate(finetuned):
        full_ft = FullDepthForward(ft)
        for seed in range(settings.seeds):
            noise = start_noise(seed, data.indices, shape)
            for target_layer in layers:
                for ref_layer in layers:
                    directions = (("pt", full_pt, "ft", ft), ("ft", full_ft, "pt", pretrained))
                    for ref_name, ref_full, target_name, target in directions:
                        inverted = _timed(
                            result, lambda: invert(ref_full, ref_layer, data.images, noise, config, policy)
                        )
                        result.inversion_flops += flops("full", ref_layer)
                        features = batched_features(target, inverted.images, [target_layer], policy)[target_layer]
                        reference = clean[id(target)][target_layer]
                        key = (checkpoint, ref_name, ref_layer, target_name, target_layer, seed)
                        result.stir[key] = (
                            linear_cka(reference, features),
                            linear_cka(reference, features, debiased=True),
                        )
            if progress:
                elapsed = time.perf_counter() - began
                print(f"  pairwise: checkpoint {checkpoint + 1}/{len(finetuned)} seed {seed}: "
                      f"{result.inversions} inversions, {elapsed:.1f} s", flush=True)  # fmt: skip
    result.wall_s = time.perf_counter() - began
    return result


def run_shards(settings: BenchSettings, pretrained: FeatureModel, finetuned: list[FeatureModel],
               data: EvalImages, flops: _FlopTable, progress: bool = False) -> MethodResult:  # fmt: skip
    """(b): a ShardContext per checkpoint; pt inversions once per (j, seed) for all checkpoints,
    ft inversions once per (j, seed) per checkpoint; each gives STIR rows for both models, all i."""
    result = MethodResult("shards (invariance)")
    config, policy, layers = inversion_config(settings), settings.token_policy, settings.layers
    began = time.perf_counter()
    pretrained_inversions: dict[tuple[int, int], InversionResult] = {}
    for checkpoint, ft in enumerate(finetuned):
        context = ShardContext({"pt": pretrained, "ft": ft}, data, layers, policy, config)
        for seed in range(settings.seeds):
            for ref_layer in layers:
                if (ref_layer, seed) not in pretrained_inversions:
                    pretrained_inversions[ref_layer, seed] = _timed(
                        result, lambda: context.invert("pt", ref_layer, seed)
                    )
                    result.inversion_flops += flops("truncated", ref_layer)
                finetuned_inversion = _timed(result, lambda: context.invert("ft", ref_layer, seed))
                result.inversion_flops += flops("truncated", ref_layer)
                rows = context.stir_rows("pt", ref_layer, seed, inverted=pretrained_inversions[ref_layer, seed])
                rows += context.stir_rows("ft", ref_layer, seed, inverted=finetuned_inversion)
                for row in rows:
                    key = (checkpoint, row["ref_model"], ref_layer, row["target_model"], row["target_layer"], seed)
                    result.stir[key] = (row["stir"], row["stir_debiased"])
        if progress:
            elapsed = time.perf_counter() - began
            print(f"  shards: checkpoint {checkpoint + 1}/{len(finetuned)}: {result.inversions} inversions, "
                  f"{elapsed:.1f} s", flush=True)  # fmt: skip
    result.wall_s = time.perf_counter() - began
    return result


@dataclass(frozen=True)
class BenchResult:
    settings: BenchSettings
    pairwise: MethodResult
    shards: MethodResult
    shared_pairs: int
    max_abs_diff_stir: float
    max_abs_diff_stir_debiased: float

    @property
    def wall_ratio(self) -> float:
        return self.pairwise.wall_s / self.shards.wall_s

    @property
    def inversion_time_ratio(self) -> float:
        return self.pairwise.inversion_s / self.shards.inversion_s

    @property
    def flop_ratio(self) -> float:
        return self.pairwise.inversion_flops / self.shards.inversion_flops

    @property
    def inversion_count_ratio(self) -> float:
        return self.pairwise.inversions / self.shards.inversions

    def summary(self) -> dict:
        methods = {
            m.name: {k: v for k, v in asdict(m).items() if k not in ("stir", "name")}
            for m in (self.pairwise, self.shards)
        }
        return {
            "settings": asdict(self.settings),
            "methods": methods,
            "ratios": {
                "inversions": self.inversion_count_ratio,
                "inversion_flops": self.flop_ratio,
                "inversion_s": self.inversion_time_ratio,
                "wall_s": self.wall_ratio,
            },
            "shared_pairs": self.shared_pairs,
            "max_abs_diff_stir": self.max_abs_diff_stir,
            "max_abs_diff_stir_debiased": self.max_abs_diff_stir_debiased,
        }


def run_benchmark(settings: BenchSettings, progress: bool = False) -> BenchResult:
    """Both methods on the same models, images and noise; STIR compared on every pair (a) computes."""
    pretrained, finetuned = build_models(settings)
    data = eval_images(settings)
    flops = _FlopTable(settings, pretrained)
    # warm-up (allocator, lazy init, thread pools) so that neither method pays it
    invert(pretrained, 0, data.images[:2], start_noise(99, data.indices[:2], tuple(data.images.shape[1:])),
           inversion_config(settings).model_copy(update={"iterations": 2}), settings.token_policy)  # fmt: skip
    pairwise = run_pairwise(settings, pretrained, finetuned, data, flops, progress)
    shards = run_shards(settings, pretrained, finetuned, data, flops, progress)
    missing = set(pairwise.stir) - set(shards.stir)
    if missing:
        raise RuntimeError(f"shards lack {len(missing)} pairs the pairwise loop computed, e.g. {sorted(missing)[:3]}")
    diffs = [(abs(v[0] - shards.stir[k][0]), abs(v[1] - shards.stir[k][1])) for k, v in pairwise.stir.items()]
    return BenchResult(
        settings=settings,
        pairwise=pairwise,
        shards=shards,
        shared_pairs=len(diffs),
        max_abs_diff_stir=max(d[0] for d in diffs),
        max_abs_diff_stir_debiased=max(d[1] for d in diffs),
    )


def format_table(result: BenchResult) -> str:
    rows = [
        ("method", "inversions", "inv TFLOPs", "inv s", "wall s"),
        *[
            (m.name, f"{m.inversions}", f"{m.inversion_flops / 1e12:.4f}", f"{m.inversion_s:.1f}", f"{m.wall_s:.1f}")
            for m in (result.pairwise, result.shards)
        ],
        (
            "ratio pairwise / shards",
            f"{result.inversion_count_ratio:.1f}x",
            f"{result.flop_ratio:.1f}x",
            f"{result.inversion_time_ratio:.1f}x",
            f"{result.wall_ratio:.1f}x",
        ),
    ]
    return markdown_table(rows)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the header first) as a Markdown table with padded columns."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchSettings, argparse.Namespace]:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=defaults.depth, help="transformer blocks (layers = depth + 1)")
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--img-size", type=int, default=defaults.img_size)
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size)
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--checkpoints", type=int, default=defaults.checkpoints)
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: tiny models on a shared 2-core box time best and steadiest on one)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    settings = BenchSettings(
        depth=args.depth,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        img_size=args.img_size,
        patch_size=args.patch_size,
        samples=args.samples,
        iterations=args.iterations,
        checkpoints=args.checkpoints,
        seeds=args.seeds,
    )
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    n_layers = len(settings.layers)
    print(
        f"tiny ViT: depth {settings.depth} ({n_layers} layers incl. pre-logits), width {settings.embed_dim}, "
        f"{settings.img_size}px / patch {settings.patch_size}; {settings.samples} samples, "
        f"{settings.iterations} iterations; {settings.checkpoints} checkpoints, {settings.seeds} seeds; "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}",
        flush=True,
    )
    print(
        f"inversions: pairwise = {settings.checkpoints} x {settings.seeds} x {n_layers} x {n_layers} x 2 = "
        f"{settings.pairwise_inversions()}; shards = {n_layers} x {settings.seeds} + {settings.checkpoints} x "
        f"{n_layers} x {settings.seeds} = {settings.shard_inversions()}",
        flush=True,
    )
    result = run_benchmark(settings, progress=True)
    print()
    print(format_table(result))
    print()
    print(
        f"STIR agreement on the {result.shared_pairs} (checkpoint, direction, i, j, seed) values both compute: "
        f"max |diff| = {result.max_abs_diff_stir:.3g} (biased), {result.max_abs_diff_stir_debiased:.3g} (debiased)"
    )
    print(
        f"speed-up: {result.wall_ratio:.1f}x wall, {result.inversion_time_ratio:.1f}x inversion time, "
        f"{result.flop_ratio:.1f}x inversion FLOPs (= {result.inversion_count_ratio:.1f}x fewer inversions "
        f"x {result.flop_ratio / result.inversion_count_ratio:.2f}x cheaper forward that stops at the layer)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.summary(), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
