"""The report a person opens: one self-contained HTML page per output prefix.

Settings, the runs and epochs covered, the curves, dynamics and flow heatmaps (PNG embedded as
data URIs: no network, nothing beside the page needed), the robustness link and the strongest
hypotheses of the robustness search, and the inversions' quality, with a visible warning where
they did not converge. The page holds no time stamp: rebuilt from unchanged results it is the
same bytes, so the reducer rewrites it only when its content changes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from invariance.io.storage import redact

# Relative L2 loss of X' at the reference layer above which an inversion counts as not converged:
# then STIR(m[j] | m[j]) falls short of 1 and every STIR measured from it is a loose bound.
CONVERGED_LOSS = 0.1
# How fast Adam's mean loss falls with its iterations, loss ~ iterations**-ADAM_LOSS_EXPONENT: the
# slowest layer of bench/bench_optimizers.py (a CNN's first, 0.226 at 25 steps, 0.122 at 125) gives
# 0.38; the non-convergence warning sizes the iterations it asks for with 0.4 (about that).
ADAM_LOSS_EXPONENT = 0.4
# flow heatmaps embedded; with more epochs, evenly spaced ones (always the first and the last)
MAX_FLOW_HEATMAPS = 12


@dataclass
class ReportInputs:
    """What the page shows; frames may be empty where a result does not exist (yet)."""

    settings_hash: str
    settings: dict[str, Any]
    checkpoints: list[tuple[int, str]]  # (epoch, name), complete or not
    complete_epochs: list[int]
    incomplete_epochs: dict[int, int]
    curves: pl.DataFrame
    inversion_quality: pl.DataFrame
    plots: dict[str, bytes] = field(default_factory=dict)  # title -> PNG
    flow_plots: dict[int, bytes] = field(default_factory=dict)  # epoch -> PNG
    robustness_correlation: pl.DataFrame = field(default_factory=pl.DataFrame)
    robustness_search: pl.DataFrame = field(default_factory=pl.DataFrame)
    extra_tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # title -> table (kNN, interpolation, ...)
    # per run ("" without {run}): run, checkpoints, epochs, complete_epochs, incomplete (epoch: missing shards)
    runs: pl.DataFrame = field(default_factory=pl.DataFrame)
    # weight-path points left out until computed: {"epoch 2 alpha 0.5": missing shards}
    incomplete_path_points: dict[str, int] = field(default_factory=dict)


def inversion_quality(stir: pl.DataFrame) -> pl.DataFrame:
    """Per (ref_model, ref_layer): the final relative loss of its inversions (mean and worst over
    seeds and checkpoints), STIR(r[j] | r[j]) (1 when X' is indistinguishable at the layer it was
    made for), and ``converged`` (mean loss at most CONVERGED_LOSS)."""
    if stir.is_empty():
        return pl.DataFrame()
    own = (pl.col("target_model") == pl.col("ref_model")) & (pl.col("target_layer") == pl.col("ref_layer"))
    return (
        stir.group_by("ref_model", "ref_layer")
        .agg(
            pl.col("inv_loss_mean").mean().alias("final_loss_mean"),
            pl.col("inv_loss_max").max().alias("final_loss_worst"),
            pl.col("stir").filter(own).mean().alias("self_stir"),
            pl.col("inv_iterations").max().alias("iterations"),
        )
        .with_columns((pl.col("final_loss_mean") <= CONVERGED_LOSS).alias("converged"))
        .sort("ref_model", "ref_layer", descending=[True, False])
    )


def _table(frame: pl.DataFrame, digits: int = 4, max_rows: int = 60) -> str:
    if frame.is_empty():
        return "<p class='muted'>none</p>"
    shown = frame.head(max_rows)
    head = "".join(f"<th>{html.escape(column)}</th>" for column in shown.columns)
    rows = []
    for row in shown.iter_rows():
        cells = []
        for value in row:
            if isinstance(value, float):
                text = f"{value:.{digits}g}"
            elif isinstance(value, list):
                text = ", ".join(str(v) for v in value)
            else:
                text = "" if value is None else str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='muted'>{frame.height - max_rows} more rows in the Parquet table</p>" if frame.height > max_rows else ""
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{more}"


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'>"


def _chosen_flow_epochs(epochs: list[int]) -> list[int]:
    if len(epochs) <= MAX_FLOW_HEATMAPS:
        return epochs
    positions = sorted({round(k * (len(epochs) - 1) / (MAX_FLOW_HEATMAPS - 1)) for k in range(MAX_FLOW_HEATMAPS)})
    return [epochs[p] for p in positions]


def _inversion_section(quality: pl.DataFrame) -> str:
    """The inversions' quality table, with a warning naming the layers above CONVERGED_LOSS and the
    settings that bring them below it: ``inversion.optimizer: adam`` at the same iterations (what
    the reference step cannot reach in 4x its steps, Adam reaches in 1x: bench/RESULTS.md), and for
    a run already on Adam ``inversion.iterations: N``, N from the worst mean loss observed."""
    if quality.is_empty():
        return "<h2>Inversion quality</h2><p class='muted'>no complete checkpoint yet</p>"
    failing = quality.filter(~pl.col("converged"))
    warning = ""
    if not failing.is_empty():
        where = ", ".join(f"{m}[{j}]" for m, j in failing.select("ref_model", "ref_layer").iter_rows())
        worst = float(failing["final_loss_mean"].max())
        iterations = int(quality["iterations"].max() or 1)
        # loss ~ iterations**-ADAM_LOSS_EXPONENT: the iterations that take the worst layer to the
        # threshold, rounded up to 50 and at least twice those run
        needed = iterations * (worst / CONVERGED_LOSS) ** (1 / ADAM_LOSS_EXPONENT)
        suggested = max(2 * iterations, 50 * math.ceil(needed / 50))
        warning = (
            f"<p class='warning'>&#9888; Inversions did not converge at {html.escape(where)}: their mean final "
            f"relative loss is above {CONVERGED_LOSS} (worst {worst:.3g} after {iterations} iterations), so X' is "
            "not indistinguishable from X at that layer and the STIR values measured from it are loose. "
            "Set <code>inversion.optimizer: adam</code> in the run config and rerun: at the same iterations "
            "(the same cost) it ends below what the reference step reaches in four times as many. "
            f"If it is set already, set <code>inversion.iterations: {suggested}</code>.</p>"
        )
    return (
        "<h2>Inversion quality</h2><p>Final relative L2 loss ||m[j](X') - m[j](X)|| / ||m[j](X)|| per "
        "reference model and layer, and STIR(m[j] | m[j]) (1 when converged).</p>"
        + warning
        + _table(quality)
    )


def epoch_span(epochs: list[int]) -> str:
    """``epoch 3`` for one epoch, else ``epochs 1..12`` (first..last)."""
    unique = sorted(set(epochs))
    return f"epoch {unique[0]}" if len(unique) == 1 else f"epochs {unique[0]}..{unique[-1]}"


def render(inputs: ReportInputs) -> bytes:
    """The page as UTF-8 bytes (deterministic: the same inputs give the same bytes)."""
    epochs = [epoch for epoch, _ in inputs.checkpoints]
    status = (
        f"{len(inputs.complete_epochs)} of {len(inputs.checkpoints)} checkpoint"
        f"{'s' if len(inputs.checkpoints) != 1 else ''} complete"
    )
    incomplete = ""
    if inputs.incomplete_epochs:
        listed = ", ".join(f"epoch {e}: {n} shard{'s' if n != 1 else ''}" for e, n in sorted(inputs.incomplete_epochs.items()))
        incomplete = f"<p class='warning'>Incomplete (missing shards): {html.escape(listed)}</p>"
    if inputs.incomplete_path_points:
        listed = ", ".join(f"{point}: {n} shard{'s' if n != 1 else ''}" for point, n in inputs.incomplete_path_points.items())
        incomplete += (f"<p class='warning'>Weight-path points left out until computed (missing shards): "
                       f"{html.escape(listed)}</p>")  # fmt: skip
    parts = [
        "<h1>invariance report</h1>",
        f"<p>Settings <code>{html.escape(inputs.settings_hash)}</code>; {status}"
        + (f" ({epoch_span(epochs)})" if epochs else "") + ".</p>",
        incomplete,
        ("<h2>Runs and epochs</h2>" + _table(inputs.runs, max_rows=500)) if not inputs.runs.is_empty() else "",
        "<details><summary>Settings that change the numbers</summary><pre>"
        + html.escape(json.dumps(inputs.settings, indent=1, sort_keys=True)) + "</pre></details>",
    ]
    for title, png in inputs.plots.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_image(png, title)}")
    if inputs.flow_plots:
        chosen = _chosen_flow_epochs(sorted(inputs.flow_plots))
        note = "" if len(chosen) == len(inputs.flow_plots) else (
            f"<p class='muted'>{len(chosen)} of {len(inputs.flow_plots)} epochs shown; all are in plots/flow/.</p>"
        )
        images = "".join(f"<figure>{_image(inputs.flow_plots[e], f'flow epoch {e}')}</figure>" for e in chosen)
        parts.append(f"<h2>Invariance flow</h2><p>One colour range for every epoch.</p>{note}<div class='grid'>{images}</div>")
    if not inputs.curves.is_empty():
        # a study (runs named by {run}): each run's last checkpoint, with its run and epoch
        study = "run" in inputs.curves.columns and bool((inputs.curves["run"] != "").any())
        last = (inputs.curves.filter(pl.col("epoch") == pl.col("epoch").max().over("run")).sort("run", "layer") if study
                else inputs.curves.filter(pl.col("epoch") == inputs.curves["epoch"].max()))  # fmt: skip
        columns = [c for c in (*(("run", "epoch") if study else ()), "layer", "forgetting_mean", "forgetting_ci_low", "forgetting_ci_high", "forgetting_above_noise",
                               "learning_mean", "learning_ci_low", "learning_ci_high", "learning_above_noise",
                               "cka_divergence_mean", "subspace_similarity", "noise_floor") if c in last.columns]  # fmt: skip
        title = ("Each run's last checkpoint" if study else f"Last checkpoint (epoch {last['epoch'][0]})")
        parts.append(f"<h2>{title}: per layer, mean and 95% interval over seeds</h2>" + _table(last.select(columns)))
    if not inputs.robustness_correlation.is_empty():
        parts.append("<h2>Robustness link</h2>" + _table(inputs.robustness_correlation))
    if not inputs.robustness_search.is_empty():
        top = (
            inputs.robustness_search.filter((pl.col("target") == "mean") & pl.col("pearson_r").is_not_null())
            .sort("p_bonferroni", pl.col("pearson_r").abs(), descending=[False, True])
            .select("run", "family", "combination", "layer_set", "aggregation", "n_epochs", "pearson_r", "p_value",
                    "n_hypotheses", "p_bonferroni")  # fmt: skip
        )
        parts.append("<h2>Robustness search: strongest hypotheses (mean corrupted accuracy)</h2>" + _table(top, max_rows=10))
    for title, table in inputs.extra_tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>" + _table(table))
    parts.append(_inversion_section(inputs.inversion_quality))
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
        "img{max-width:100%;height:auto}table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
        ".warning{background:#fff3cd;border:1px solid #e0b000;padding:.6em}.muted{color:#777}"
        ".scroll{overflow-x:auto}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:8px}figure{margin:0}"
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>invariance report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    # credentials in any URL a table or title shows (a presigned pretrained URL, s3://KEY:SECRET@...)
    return redact(page).encode("utf-8")
