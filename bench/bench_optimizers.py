"""Inversion quality per step: the reference normalized gradient step against Adam.

On a fixture (``vit``: bench_shards_vs_pairwise's 13-layer tiny ViT; ``cnn``: timm's
``test_resnet``, 6 layers), the same images and start noise, for each reference layer j: the mean
relative loss after k steps for every k of a grid, for ``optimizer: reference`` (step 0.5) and
``optimizer: adam`` at a few learning rates (its schedule over the k steps, so each k is its own
run); the steps each needs to reach the reference's loss at each budget B of the grid; Adam at a
quarter of B against the reference at B (issue 28: lower at every layer); the seconds per step of
each (the same forward and backward, so the same FLOPs); and how far the STIR values
STIR(t[i] | pt[j]) (t in {pt, ft}, every i) that each gives at its budget are from those of two
long runs (default 1,000 steps): the reference's, and Adam's.

    python bench/bench_optimizers.py                                 # vit then cnn, ~10 min on 1 thread
    python bench/bench_optimizers.py --fixtures vit --layers 0 3 6 9 12 --long 2000 --json opt.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_shards_vs_pairwise import BenchSettings, build_models, eval_images  # noqa: E402

from invariance.config import DEFAULT_STEP_SIZE, InversionConfig, ModelConfig  # noqa: E402
from invariance.core.models import FeatureModel, load_model  # noqa: E402
from invariance.core.inversion import invert, start_noise  # noqa: E402
from invariance.core.shards import ShardContext  # noqa: E402

REFERENCE_BUDGET = 500
FIXTURES = ("vit", "cnn")
# the layers analysed when none are given: the ViT's first, middle and pre-logits; all of the CNN's
DEFAULT_LAYERS = {"vit": (0, 6, 12), "cnn": (0, 1, 2, 3, 4, 5)}
CNN_ARCH = "test_resnet"  # timm's tiny test ResNet: act1, layer1..layer4, pre-logits


@dataclass(frozen=True)
class OptimizerBenchSettings:
    samples: int = 16
    layers: tuple[int, ...] = (0, 6, 12)
    steps: tuple[int, ...] = (25, 50, 100, 125, 200, 500)
    adam_step_sizes: tuple[float, ...] = (0.05, 0.1)
    long: int = 1000  # the long runs the STIR values are compared with
    depth: int = 12  # the ViT's blocks (the CNN's depth is its own)
    seed: int = 0
    fixture: str = "vit"

    def __post_init__(self) -> None:
        if REFERENCE_BUDGET not in self.steps:
            raise ValueError(f"steps must include the reference budget {REFERENCE_BUDGET}")
        if self.fixture not in FIXTURES:
            raise ValueError(f"fixture must be one of {FIXTURES}, got {self.fixture!r}")

    def quarter_budgets(self) -> list[int]:
        """The reference budgets B of the grid whose quarter B / 4 is in the grid too."""
        return [b for b in sorted(self.steps) if b % 4 == 0 and b // 4 in self.steps]


@dataclass
class Curve:
    """One optimizer at one step size on one layer: mean relative loss after each step count."""

    optimizer: str
    step_size: float
    loss: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    steps_run: int = 0

    @property
    def name(self) -> str:
        return f"{self.optimizer} {self.step_size:g}"

    def steps_to_reach(self, target: float) -> int | None:
        """The fewest steps of the grid whose mean loss is at most ``target`` (None: none did)."""
        reached = [k for k, value in sorted(self.loss.items()) if value <= target]
        return reached[0] if reached else None


@dataclass
class LayerResult:
    layer: int
    curves: list[Curve]
    # "<run> vs <long run>": max |STIR - STIR of the long run| over t in {pt, ft} and every target layer i
    stir_diff: dict[str, float]
    long_loss: dict[str, float]


@dataclass
class OptimizerBenchResult:
    settings: OptimizerBenchSettings
    layers: list[LayerResult]

    def curve_names(self) -> list[str]:
        return [curve.name for curve in self.layers[0].curves]

    def reference_loss(self, layer: LayerResult, budget: int = REFERENCE_BUDGET) -> float:
        return layer.curves[0].loss[budget]

    def steps_to_reference(self, layer: LayerResult, name: str) -> dict[int, int | None]:
        """Per reference budget B of the grid: the fewest steps of ``name`` to reach the reference's loss at B."""
        curve = next(c for c in layer.curves if c.name == name)
        return {b: curve.steps_to_reach(self.reference_loss(layer, b)) for b in sorted(self.settings.steps)}

    def quarter_budget(self, name: str) -> list[dict]:
        """Per layer and reference budget B: the reference's loss at B, ``name``'s at B / 4, and whether it is lower."""
        rows = []
        for layer in self.layers:
            curve = next(c for c in layer.curves if c.name == name)
            for budget in self.settings.quarter_budgets():
                reference, adam = self.reference_loss(layer, budget), curve.loss[budget // 4]
                rows.append({"layer": layer.layer, "budget": budget, "reference": reference, "adam": adam,
                             "lower": adam < reference})  # fmt: skip
        return rows

    def worst_steps_to_reach(self, name: str) -> int | None:
        """Over the layers, the most steps ``name`` needs to reach the reference's 500-step loss."""
        needed = []
        for layer in self.layers:
            curve = next(c for c in layer.curves if c.name == name)
            steps = curve.steps_to_reach(self.reference_loss(layer))
            if steps is None:
                return None
            needed.append(steps)
        return max(needed)

    def max_stir_diff(self, name: str, long_name: str) -> float | None:
        """Over the layers and budgets, the largest |STIR diff| of ``name`` against the long ``long_name`` run."""
        values = [v for r in self.layers for k, v in r.stir_diff.items() if k.startswith(name + " ") and f" vs {long_name}@" in k]
        return max(values) if values else None

    def seconds_per_step(self, name: str) -> float:
        curves = [c for layer in self.layers for c in layer.curves if c.name == name]
        return sum(c.seconds for c in curves) / sum(c.steps_run for c in curves)

    def summary(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "layers": [
                {"layer": r.layer, "long_loss": r.long_loss, "stir_diff": r.stir_diff,
                 "curves": [{"name": c.name, "loss": c.loss, "seconds": c.seconds, "steps_run": c.steps_run}
                            for c in r.curves]}
                for r in self.layers
            ],
            "worst_steps_to_reach": {name: self.worst_steps_to_reach(name) for name in self.curve_names()},
            "seconds_per_step": {name: self.seconds_per_step(name) for name in self.curve_names()},
            "steps_to_reference": {name: {r.layer: self.steps_to_reference(r, name) for r in self.layers}
                                   for name in self.curve_names()},
            "quarter_budget": {name: self.quarter_budget(name) for name in self.curve_names()[1:]},
        }  # fmt: skip


def _config(optimizer: str, step_size: float, iterations: int) -> InversionConfig:
    return InversionConfig(
        optimizer=optimizer, step_size=step_size, iterations=iterations, micro_batch=64, bf16=False, compile=False
    )


def build_cnn(ft_noise: float = 0.02) -> tuple[FeatureModel, FeatureModel]:
    """timm's test ResNet (seed 0 random init) and a 'finetuned' copy moved by N(0, ft_noise^2)."""
    torch.manual_seed(0)
    pretrained = load_model(ModelConfig(arch=CNN_ARCH), None)
    finetuned = copy.deepcopy(pretrained)
    generator = torch.Generator().manual_seed(1001)
    with torch.no_grad():
        for parameter in finetuned.network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * ft_noise)
    return pretrained, finetuned


def run_benchmark(settings: OptimizerBenchSettings, progress: bool = False) -> OptimizerBenchResult:
    model_settings = BenchSettings(depth=settings.depth, samples=settings.samples, checkpoints=1)
    if settings.fixture == "vit":
        pretrained, (finetuned,) = build_models(model_settings)
    else:
        pretrained, finetuned = build_cnn()
    data = eval_images(model_settings)
    noise = start_noise(settings.seed, data.indices, tuple(data.images.shape[1:]))
    all_layers = list(range(pretrained.n_layers))
    context = ShardContext({"pt": pretrained, "ft": finetuned}, data, all_layers, "flatten", _config("reference", 0.5, 1))
    optimizers = [("reference", DEFAULT_STEP_SIZE["reference"])] + [("adam", lr) for lr in settings.adam_step_sizes]
    results = []
    for layer in settings.layers:
        began = time.perf_counter()
        long_rows, long_loss = {}, {}
        for optimizer in ("reference", "adam"):
            long_run = invert(pretrained, layer, data.images, noise,
                              _config(optimizer, DEFAULT_STEP_SIZE[optimizer], settings.long))  # fmt: skip
            long_rows[optimizer] = context.stir_rows("pt", layer, settings.seed, long_run)
            long_loss[optimizer] = float(long_run.final_loss.mean())
        curves, stir_diff = [], {}
        for optimizer, step_size in optimizers:
            curve = Curve(optimizer, step_size)
            for steps in settings.steps:
                started = time.perf_counter()
                inverted = invert(pretrained, layer, data.images, noise, _config(optimizer, step_size, steps))
                curve.seconds += time.perf_counter() - started
                curve.steps_run += steps
                curve.loss[steps] = float(inverted.final_loss.mean())
                # the reference at its 500-step budget; Adam at a quarter of it and at 1/5
                if (optimizer == "reference" and steps == REFERENCE_BUDGET) or (
                    optimizer == "adam" and steps in (REFERENCE_BUDGET // 4, REFERENCE_BUDGET // 5)
                ):
                    rows = context.stir_rows("pt", layer, settings.seed, inverted)
                    for long_name, reference_rows in long_rows.items():
                        stir_diff[f"{curve.name} @{steps} vs {long_name}@{settings.long}"] = max(
                            abs(row["stir"] - other["stir"]) for row, other in zip(rows, reference_rows, strict=True)
                        )
            curves.append(curve)
        results.append(LayerResult(layer, curves, stir_diff, long_loss))
        if progress:
            print(f"  layer {layer}: {time.perf_counter() - began:.1f} s", flush=True)
    return OptimizerBenchResult(settings, results)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_report(result: OptimizerBenchResult) -> str:
    settings = result.settings
    parts = [f"fixture {settings.fixture}"]
    for layer in result.layers:
        header = ["optimizer", *[f"{k} steps" for k in settings.steps], "steps to ref@500"]
        target = result.reference_loss(layer)
        rows = [[c.name, *[f"{c.loss[k]:.4f}" for k in settings.steps], str(c.steps_to_reach(target) or "not reached")]
                for c in layer.curves]  # fmt: skip
        long = ", ".join(f"{name} {value:.4f}" for name, value in layer.long_loss.items())
        parts.append(f"layer {layer.layer}: mean relative loss (long runs, {settings.long} steps: {long})")
        parts.append(_table(header, rows))
        parts.append("max |STIR - STIR of a long run| over t in {pt, ft}, every i: "
                     + "; ".join(f"{name}: {value:.4f}" for name, value in layer.stir_diff.items()))  # fmt: skip
        budgets = sorted(settings.steps)
        parts.append("steps to the reference's loss at each budget:")
        parts.append(_table(["optimizer", *[f"ref@{b}" for b in budgets]],
                            [[c.name, *[str(result.steps_to_reference(layer, c.name)[b] or "not reached") for b in budgets]]
                             for c in layer.curves]))  # fmt: skip
        parts.append("")
    for name in result.curve_names()[1:]:
        rows = [[str(r["layer"]), str(r["budget"]), f"{r['reference']:.4f}", f"{r['adam']:.4f}", "yes" if r["lower"] else "NO"]
                for r in result.quarter_budget(name)]  # fmt: skip
        parts.append(f"{name} at a quarter of the reference's steps:")
        parts.append(_table(["layer", "reference steps B", "reference @B", f"{name} @B/4", "lower"], rows))
        parts.append("")
    reference_seconds = result.seconds_per_step(result.curve_names()[0])
    rows = []
    for name in result.curve_names():
        worst = result.worst_steps_to_reach(name)
        diffs = []
        for long_name in ("reference", "adam"):
            stir = [value for r in result.layers for key, value in r.stir_diff.items()
                    if key.startswith(name + " ") and f" vs {long_name}@" in key]  # fmt: skip
            diffs.append(f"{max(stir):.4f}" if stir else "-")
        rows.append([
            name, str(worst or "not reached"),
            f"{REFERENCE_BUDGET / worst:.1f}x" if worst else "-",
            f"{result.seconds_per_step(name) / reference_seconds:.2f}",
            *diffs,
        ])  # fmt: skip
    parts.append("over all layers:")
    parts.append(_table(["optimizer", "steps to ref@500 (worst layer)", "fewer steps", "time/step vs reference",
                         "max |STIR diff| vs long reference", "vs long adam"], rows))  # fmt: skip
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> tuple[list[OptimizerBenchSettings], argparse.Namespace]:
    defaults = OptimizerBenchSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", nargs="+", choices=FIXTURES, default=list(FIXTURES))
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--layers", type=int, nargs="+", help="default: the ViT's 0 6 12, every layer of the CNN")
    parser.add_argument("--steps", type=int, nargs="+", default=list(defaults.steps), help="step counts (must include 500)")
    parser.add_argument("--adam-step-sizes", type=float, nargs="+", default=list(defaults.adam_step_sizes))
    parser.add_argument("--long", type=int, default=defaults.long, help="steps of the long reference run")
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    settings = [OptimizerBenchSettings(
        samples=args.samples, layers=tuple(args.layers or DEFAULT_LAYERS[fixture]), steps=tuple(sorted(args.steps)),
        adam_step_sizes=tuple(args.adam_step_sizes), long=args.long, depth=args.depth, fixture=fixture,
    ) for fixture in args.fixtures]  # fmt: skip
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    all_settings, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    summaries = []
    for settings in all_settings:
        model = f"tiny ViT depth {settings.depth}" if settings.fixture == "vit" else CNN_ARCH
        print(f"{model}, {settings.samples} samples, layers {list(settings.layers)}; torch {torch.__version__}, "
              f"{args.threads} thread(s), {platform.processor() or platform.machine()}", flush=True)  # fmt: skip
        result = run_benchmark(settings, progress=True)
        print()
        print(format_report(result))
        print()
        summaries.append(result.summary())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summaries, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
