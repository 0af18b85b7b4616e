"""The report a person opens: ``reports/index.html`` per output prefix; a study adds a page per run,
``reports/runs/<run>.html``, that its index summarises and links.

A page reads as the paper's figures, in order, each with a two-line caption saying what it shows and
how to read it (what a high value means, what the diagonal means); then its tables, every column
shown explained beneath, wide ones cut to the columns that matter with the full table one click away
(a fold). Figures that summarise what a page covers across epochs are embedded as data URIs; figures
of one epoch (heatmaps, weight paths) stay the files the reducer wrote under ``plots/``, shown one at
a time by a selector (a ``<select>`` and an ``<img>``) over relative links: no network, no script
beyond the selector's one line, so the page opens from a local folder and from an S3 static listing
alike, and stays small at hundreds of epochs. The inversions' quality closes it, with a visible
warning where they did not converge. The page holds no time stamp: rebuilt from unchanged results
it is the same bytes, so the reducer rewrites it only when its content changes.
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
# rows of a table shown before "more rows in the Parquet table"
MAX_ROWS = 60
# runs shown side by side in a study's per-layer table (the rest in its fold)
MAX_SIDE_BY_SIDE = 6

# Two lines per figure: what it shows; how to read it (high values, the diagonal, the shading).
CAPTIONS: dict[str, tuple[str, str]] = {
    "layer_curves": (
        "Per layer (x), one line per checkpoint epoch: forgetting STIR(pt|pt) - STIR(ft|pt), the pretrained "
        "layer's invariances the finetuned one lost; learning STIR(ft|ft) - STIR(pt|ft), invariances it gained; "
        "CKA divergence 1 - CKA(ft, pt), how far its representation moved.",
        "Higher: more change at that layer (0: none). Shaded: the 95% interval over seeds; a hollow marker is not "
        "above the noise floor (not told apart from 0).",
    ),
    "dynamics": (
        "The same three metrics across checkpoint epochs, one line per layer; where the run has finetuning metrics, "
        "its clean and corrupted test accuracy per epoch on the right, and the LP stage (only the head trains) "
        "shaded grey.",
        "Rising lines: the layer keeps changing; flat: it has settled. A layer whose forgetting rises while the "
        "corrupted accuracy falls is where robustness goes.",
    ),
    "flow": (
        "Invariance flow at one checkpoint: STIR(ft[j]|pt[i]) - STIR(ft[i]|pt[i]) for pretrained layer i (rows) "
        "and finetuned layer j (columns), one colour range for every epoch; choose the epoch above the image.",
        "The diagonal is 0 by definition (outlined). Red (> 0) left of it: pt[i]'s invariance now sits at an "
        "earlier finetuned layer (compression); red right of it: at a later one (expansion); blue: less than in place.",
    ),
    "cka": (
        "Linear CKA between every pretrained layer i (rows) and finetuned layer j (columns) at one checkpoint "
        "(1: the same representation up to rotation and scale; 0: unrelated); choose the epoch above the image.",
        "The diagonal compares each layer with its own pretrained self: high means it kept its representation. "
        "High off the diagonal: finetuned layer j now represents what pretrained layer i did.",
    ),
    "procrustes": (
        "Orthogonal Procrustes distance between every pretrained layer i (rows) and finetuned layer j (columns) "
        "at one checkpoint (0: the same up to a rotation; at most 2); choose the epoch above the image.",
        "Low on the diagonal: the layer kept its representation; higher: it changed (more sensitive than CKA to "
        "which layers were retrained). Low off the diagonal: layer j took over what layer i held.",
    ),
    "measure": (
        "Your measure between every pretrained layer i (rows) and finetuned layer j (columns) at one checkpoint; "
        "choose the epoch above the image.",
        "Read it as your function defines it: the diagonal compares each layer with its own pretrained self, "
        "off-diagonal cells other pairs.",
    ),
    "interpolation": (
        "Forgetting, learning and CKA divergence along the weight path (1 - alpha) pt + alpha ft of one checkpoint, "
        "from alpha 0 (the pretrained model: 0 by definition) to alpha 1 (the checkpoint), one line per layer.",
        "A metric that rises only near alpha 1 changes late on the path (non-linearly); a straight rise spreads "
        "the change along it. Shaded: the 95% interval over seeds.",
    ),
    "knn_layers": (
        "Weighted kNN top-1 accuracy (DINO's probe) of each layer's features on the eval images: the pretrained "
        "model and each checkpoint.",
        "Higher: the layer's features separate the classes better; above the pretrained line, finetuning made the "
        "layer more class-discriminative.",
    ),
    "knn_alpha": (
        "kNN top-1 accuracy along the weight path, from alpha 0 (the pretrained model) to alpha 1 (the checkpoint), "
        "one line per layer.",
        "Where it rises on the path shows where the class information appears; a dip in the middle: the two ends "
        "are not linearly connected.",
    ),
    "robustness": (
        "The robustness link (the paper's Fig. 6): left, the spread of forgetting across layers (std over layers, "
        "blue) and the mean corrupted accuracy (red) per epoch; right, one against the other with Pearson r.",
        "A negative r: epochs whose forgetting is spread unevenly over the layers are the less robust ones. An r "
        "from few epochs is weak evidence: its 95% interval is in the legend.",
    ),
    "runs_compared": (
        "The runs of the study side by side across epochs: mean corrupted accuracy (left, where a run has "
        "finetuning metrics) and the spread of forgetting across layers (right), one colour per run.",
        "A run whose spread grows while its accuracy falls loses robustness as it finetunes; compare runs at the "
        "same epoch.",
    ),
    "other": (
        "A figure of the reduce (its title says what it shows).",
        "Shaded bands are the 95% intervals the tables hold; hollow markers are not above the noise floor.",
    ),
}

# What each column of a table means (every column shown is explained beneath its table).
COLUMNS: dict[str, str] = {
    "run": "the finetuning run (a study's {run} folder; empty for a single run)",
    "page": "the run's own page (its figures per epoch and its tables)",
    "checkpoint": "the checkpoint's name",
    "checkpoints": "how many checkpoints the run has",
    "epoch": "the checkpoint's finetuning epoch",
    "epochs": "the epochs of the run's checkpoints",
    "complete_epochs": "the epochs whose shards are all computed (in the figures and tables)",
    "incomplete": "epochs still missing shards, with how many",
    "alpha": "place on the weight path (1 - alpha) pt + alpha ft (1: the checkpoint itself)",
    "model": "pt: the pretrained model; ft: the finetuned model at that point",
    "layer": "the analysed layer (its index among the model's blocks; the last may be the pre-logits)",
    "forgetting": "mean over seeds [95% interval] of STIR(pt|pt) - STIR(ft|pt); * marks a value above the noise floor",
    "learning": "mean over seeds [95% interval] of STIR(ft|ft) - STIR(pt|ft); * marks a value above the noise floor",
    "forgetting_mean": "forgetting STIR(pt|pt) - STIR(ft|pt), mean over seeds",
    "learning_mean": "learning STIR(ft|ft) - STIR(pt|ft), mean over seeds",
    "cka_divergence": "1 - linear CKA(ft, pt) of the layer (one value per checkpoint)",
    "cka_divergence_mean": "1 - linear CKA(ft, pt) of the layer (one value per checkpoint)",
    "subspace_similarity": "subspace similarity of ft and pt at the layer (Ramasesh et al., top 10 directions; 1: same)",
    "forgetting_debiased": "forgetting from the debiased STIR (stir_debiased: chance agreement removed)",
    "learning_debiased": "learning from the debiased STIR (stir_debiased: chance agreement removed)",
    "learning_noise_floor": "the noise floor of learning (its seeds' spread on the finetuned model)",
    "settings": "the settings hash the rows were computed under",
    "p_value": "the two-sided p of r (Student t with n_epochs - 2 degrees of freedom), uncorrected",
    "combination": "which metric or combination of forgetting and learning (sum, difference) the hypothesis uses",
    "layer_set": "the layers it is over: one layer, the first n or the last n",
    "layers": "the layers of the set",
    "aggregation": "how the layers' values are combined: mean, std, min, max (value: a single layer)",
    "target": "what it is correlated with: mean (the mean corrupted accuracy) or one severity",
    "up_to_epoch": "the last epoch of the first n epochs the r is over",
    "noise_floor": "the largest |STIR difference| two seeds of the same model give: smaller values are noise",
    "n_seeds": "how many seeds the mean and interval are over",
    "last_epoch": "the run's last complete epoch (the values of this row are at it)",
    "clean_accuracy": "the finetuned model's test accuracy on clean images at that epoch (the run's metrics)",
    "corrupted_accuracy": "its mean test accuracy over the corrupted test sets at that epoch (the run's metrics)",
    "corrupted_accuracy_mean": "mean test accuracy over the corrupted test sets (the run's metrics)",
    "corrupted_loss_mean": "mean test loss over the corrupted test sets (the run's metrics)",
    "forgetting_std_across_layers": "std over layers of forgetting at that epoch: how unevenly forgetting is spread",
    "forgetting_mean_over_layers": "forgetting averaged over the layers at the last epoch",
    "forgetting_max_layer": "the layer that forgets most at the last epoch, and its forgetting",
    "learning_mean_over_layers": "learning averaged over the layers at the last epoch",
    "cka_divergence_mean_over_layers": "CKA divergence averaged over the layers at the last epoch",
    "n_layers": "how many layers the spread is over",
    "pearson_r": "Pearson correlation over epochs of the forgetting spread with the mean corrupted accuracy",
    "pearson_r_loss": "Pearson correlation over epochs of the forgetting spread with the mean corrupted loss "
                      "(the score of runs without accuracy, e.g. reconstruction)",
    "n_epochs": "how many epochs the correlation is over",
    "hypothesis": "which summary of the per-layer metrics is correlated with the mean corrupted accuracy",
    "family": "the metrics the hypothesis is built from (stir, cka, subspace)",
    "p_bonferroni": "the two-sided p of r times the number of hypotheses tested (Bonferroni; capped at 1)",
    "n_hypotheses": "how many hypotheses were tested for that run (the Bonferroni factor)",
    "min_epochs": "n_min: the epochs needed for r = 0.9 to reach Bonferroni p < 0.05 among that many hypotheses",
    "enough_epochs": "whether n_epochs >= min_epochs (below it, r is not evidence)",
    "k": "the number of neighbours of the kNN probe",
    "top1": "kNN top-1 accuracy on the eval images' test split",
    "top5": "kNN top-5 accuracy",
    "n_train": "images the kNN probe indexes",
    "n_test": "images the kNN probe classifies",
    "ref_model": "the model whose layer was inverted (pt, ft)",
    "ref_layer": "the layer inverted",
    "final_loss_mean": "relative L2 loss ||m[j](X') - m[j](X)|| / ||m[j](X)|| at the end, mean over seeds and checkpoints",
    "final_loss_worst": "the same, worst over samples, seeds and checkpoints",
    "self_stir": "STIR(m[j] | m[j]): 1 when X' is indistinguishable from X at the layer it was made for",
    "iterations": "inversion iterations",
    "converged": f"mean final loss at most {CONVERGED_LOSS}",
}
_SUFFIXES = {
    "_mean": "mean over seeds of", "_std": "std over seeds of", "_ci_low": "lower end of the 95% interval over seeds of",
    "_ci_high": "upper end of the 95% interval over seeds of", "_above_noise": "whether it is above the noise floor:",
    "_n_seeds": "seeds behind",
}  # fmt: skip


def explain(column: str) -> str:
    """What ``column`` means ("" where no explanation is known)."""
    if column in COLUMNS:
        return COLUMNS[column]
    for suffix, words in _SUFFIXES.items():
        if column.endswith(suffix) and (base := column[: -len(suffix)]) in COLUMNS | {"stir": ""}:
            return f"{words} {base.replace('_', ' ')}"
    return ""


@dataclass
class Figure:
    """One figure of a page: embedded (``png``) or files next to the page chosen by a selector
    (``choices``: (label, relative URL, the image's description), the last shown), with its
    two-line caption."""

    title: str
    kind: str  # a key of CAPTIONS
    png: bytes | None = None
    choices: list[tuple[str, str, str]] = field(default_factory=list)
    alt: str = ""  # the embedded image's description (default: the title)
    note: str = ""  # a line after the caption (a link to the files, a run's page)


@dataclass
class Table:
    """One table of a page: ``frame`` shown, ``full`` (when given) in a fold under it; ``columns``
    explains columns that COLUMNS does not."""

    title: str
    frame: pl.DataFrame
    note: str = ""
    full: pl.DataFrame | None = None
    full_note: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    max_rows: int = MAX_ROWS
    html_columns: tuple[str, ...] = ()  # columns whose cells are trusted HTML (links)


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
    plots: dict[str, bytes] = field(default_factory=dict)  # title -> PNG (figures without a kind: embedded)
    flow_plots: dict[int, bytes] = field(default_factory=dict)  # epoch -> PNG (embedded when no figure shows flow)
    robustness_correlation: pl.DataFrame = field(default_factory=pl.DataFrame)
    robustness_search: pl.DataFrame = field(default_factory=pl.DataFrame)
    extra_tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # title -> table (kNN, interpolation, ...)
    # per run ("" without {run}): run, checkpoints, epochs, complete_epochs, incomplete (epoch: missing shards)
    runs: pl.DataFrame = field(default_factory=pl.DataFrame)
    # weight-path points left out until computed: {"epoch 2 alpha 0.5": missing shards}
    incomplete_path_points: dict[str, int] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)  # in the paper's order
    tables: list[Table] = field(default_factory=list)  # after the per-layer table
    title: str = "invariance report"
    links: list[tuple[str, str]] = field(default_factory=list)  # (label, relative URL) under the title
    study: bool = False  # a study's index: curves of several runs, side by side


def _ranges(values: list[int]) -> str:
    """``1-4, 7, 9-12``: sorted integers with their consecutive runs joined."""
    values = sorted(set(values))
    spans: list[list[int]] = []
    for value in values:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return _ranges(value)
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _rows_html(frame: pl.DataFrame, digits: int, max_rows: int, html_columns: tuple[str, ...] = ()) -> str:
    shown = frame.head(max_rows)
    head = "".join(f"<th>{html.escape(column)}</th>" for column in shown.columns)
    trusted = [column in html_columns for column in shown.columns]
    rows = []
    for row in shown.iter_rows():
        cells = "".join(f"<td>{_cell(v, digits) if raw else html.escape(_cell(v, digits))}</td>"
                        for v, raw in zip(row, trusted))  # fmt: skip
        rows.append(f"<tr>{cells}</tr>")
    more = (f"<p class='muted'>{frame.height - max_rows} more rows in the Parquet table</p>"
            if frame.height > max_rows else "")  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def _glossary(columns: list[str], extra: dict[str, str] | None = None) -> str:
    """The columns of a table explained, one line each."""
    items = "".join(f"<li><b>{html.escape(c)}</b>: {html.escape((extra or {}).get(c) or explain(c) or c)}</li>" for c in columns)
    return f"<ul class='columns'>{items}</ul>"


def _table(frame: pl.DataFrame, digits: int = 4, max_rows: int = MAX_ROWS, columns: dict[str, str] | None = None,
           html_columns: tuple[str, ...] = ()) -> str:  # fmt: skip
    """A table with its columns explained beneath ("none" when empty)."""
    if frame.is_empty():
        return "<p class='muted'>none</p>"
    return (f"<div class='table'>{_rows_html(frame, digits, max_rows, html_columns)}</div>"
            + _glossary(frame.columns, columns))  # fmt: skip


def _full_table(frame: pl.DataFrame, note: str = "", digits: int = 4) -> str:
    """The whole table in a fold (scrolling inside it where it is wide)."""
    if frame.is_empty():
        return ""
    return (f"<details class='full'><summary>Full table ({frame.height} rows, {frame.width} columns){html.escape(note)}"
            f"</summary><div class='scroll'>{_rows_html(frame, digits, MAX_ROWS * 4)}</div>"
            f"{_glossary(frame.columns)}</details>")  # fmt: skip


def _render_table(table: Table) -> str:
    note = f"<p>{html.escape(table.note)}</p>" if table.note else ""
    full = _full_table(table.full, table.full_note) if table.full is not None else ""
    shown = "" if table.frame.is_empty() and full else _table(table.frame, max_rows=table.max_rows, columns=table.columns,
                                                             html_columns=table.html_columns)  # fmt: skip
    return f"<h2>{html.escape(table.title)}</h2>{note}{shown}{full}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _image(png: bytes, alt: str) -> str:
    return f"<img src='{data_uri(png)}' alt='{html.escape(alt)}'>"


def figure_id(number: int) -> str:
    return f"fig{number}"


def _figure(number: int, figure: Figure) -> str:
    """``<figure>`` with its number, title, image (or selector and image) and two-line caption."""
    alt = figure.alt or figure.title
    if figure.choices:
        last = len(figure.choices) - 1
        options = "".join(
            f"<option value='{html.escape(url)}' title='{html.escape(shown)}'{' selected' if position == last else ''}>"
            f"{html.escape(label)}</option>"
            for position, (label, url, shown) in enumerate(figure.choices)
        )
        _, last_url, last_alt = figure.choices[-1]
        # the one line of script: the chosen file into the figure's image
        picker = (f"<label>show <select onchange=\"var i=this.parentNode.parentNode.parentNode.querySelector('img');"
                  f"i.src=this.value;i.alt=this.options[this.selectedIndex].title\">{options}</select></label> "
                  f"<span class='muted'>({len(figure.choices)} file{'s' if len(figure.choices) != 1 else ''} "
                  "next to this page)</span>")  # fmt: skip
        body = f"<div class='picker'>{picker}</div><img src='{html.escape(last_url)}' alt='{html.escape(last_alt)}'>"
    elif figure.png is not None:
        body = _image(figure.png, alt)
    else:
        body = "<p class='muted'>not drawn yet</p>"
    what, how = CAPTIONS.get(figure.kind, CAPTIONS["other"])
    note = f"<br><span class='muted'>{figure.note}</span>" if figure.note else ""
    return (f"<figure id='{figure_id(number)}'><h2>Figure {number}. {html.escape(figure.title)}</h2>{body}"
            f"<figcaption>{html.escape(what)}<br><b>How to read it:</b> {html.escape(how)}{note}</figcaption></figure>")


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


def _with_interval(metric: str) -> pl.Expr:
    """``0.123 [0.05, 0.2]*``: the mean, its 95% interval where defined, * where above the noise floor."""
    def text(column: str) -> pl.Expr:
        return pl.col(column).map_elements(lambda v: f"{v:.3g}", return_dtype=pl.String)

    interval = pl.concat_str([pl.lit(" ["), text(f"{metric}_ci_low"), pl.lit(", "), text(f"{metric}_ci_high"), pl.lit("]")])
    above = pl.when(pl.col(f"{metric}_above_noise")).then(pl.lit("*")).otherwise(pl.lit(""))
    return pl.concat_str([text(f"{metric}_mean"), interval.fill_null(""), above.fill_null("")]).alias(metric)


def layer_summary(curves: pl.DataFrame) -> pl.DataFrame:
    """Per row of ``curves`` (a checkpoint's layers): layer, forgetting and learning as
    ``mean [95% interval]*``, CKA divergence, subspace similarity, noise floor (those present)."""
    columns: list[Any] = [c for c in ("run", "epoch") if c in curves.columns] + ["layer"]
    for metric in ("forgetting", "learning"):
        if {f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_above_noise"} <= set(curves.columns):
            columns.append(_with_interval(metric))
        elif f"{metric}_mean" in curves.columns:
            columns.append(f"{metric}_mean")
    if "cka_divergence_mean" in curves.columns:
        columns.append(pl.col("cka_divergence_mean").alias("cka_divergence"))
    columns += [c for c in ("subspace_similarity", "noise_floor") if c in curves.columns]
    return curves.select(columns)


def _last_checkpoint(curves: pl.DataFrame, study: bool) -> list[str]:
    """The per-layer table of the last checkpoint (a study: each run's, runs side by side)."""
    if study:
        last = curves.filter(pl.col("epoch") == pl.col("epoch").max().over("run")).sort("run", "layer")
        summary = layer_summary(last)
        runs = list(dict.fromkeys(last["run"].to_list()))
        metric = "forgetting" if "forgetting" in summary.columns else summary.columns[-1]
        side = (summary.filter(pl.col("run").is_in(runs[:MAX_SIDE_BY_SIDE]))
                .with_columns(pl.concat_str([pl.col("run"), pl.lit(" (epoch "), pl.col("epoch").cast(pl.String), pl.lit(")")]).alias("column"))
                .pivot(on="column", index="layer", values=metric, sort_columns=False))  # fmt: skip
        more = f"; the first {MAX_SIDE_BY_SIDE} of {len(runs)} runs (all in the full table)" if len(runs) > MAX_SIDE_BY_SIDE else ""
        named = {c: f"{metric} of the run at its last epoch: mean over seeds [95% interval], * above the noise floor"
                 for c in side.columns if c != "layer"}  # fmt: skip
        return [f"<h2>Each run's last checkpoint: {metric} per layer, runs side by side</h2>"
                f"<p>Mean and 95% interval over seeds{html.escape(more)}.</p>",
                _table(side, columns=named), _full_table(last.select([c for c in last.columns if c != "settings"]),
                                                         " of every column, each run's last epoch")]  # fmt: skip
    last = curves.filter(pl.col("epoch") == curves["epoch"].max())
    return [f"<h2>Last checkpoint (epoch {last['epoch'][0]}): per layer, mean and 95% interval over seeds</h2>",
            _table(layer_summary(last).drop([c for c in ("run", "epoch") if c in last.columns])),
            _full_table(last.select([c for c in last.columns if c != "settings"]), " of every column")]  # fmt: skip


def search_tables(search: pl.DataFrame, n: int = 5) -> str:
    """The robustness search's strongest hypotheses per run (``robustness_search.strongest``): those
    from enough epochs first, those from too few listed apart, never at the top."""
    from invariance.analysis import robustness_search

    top = robustness_search.strongest(search, n=n)
    if top.is_empty():
        return ""
    shown = top.with_columns(
        pl.struct(top.columns).map_elements(robustness_search.describe, return_dtype=pl.String).alias("hypothesis")
    )
    columns = [c for c in ("run", "hypothesis", "family", "n_epochs", "min_epochs", "pearson_r", "p_bonferroni",
                           "n_hypotheses") if c in shown.columns]  # fmt: skip
    if not (shown["run"] != "").any():
        columns.remove("run")
    enough, few = shown.filter(pl.col("enough_epochs")), shown.filter(~pl.col("enough_epochs"))
    parts = ["<h2>Robustness search: strongest hypotheses (mean corrupted accuracy)</h2>",
             f"<p>{html.escape(robustness_search.rule_text(int(shown['n_hypotheses'].max())))}. Sorted by "
             "robustness_search.strongest: hypotheses from enough epochs first, by Bonferroni p.</p>"]  # fmt: skip
    parts.append(_table(enough.select(columns)) if not enough.is_empty()
                 else "<p class='muted'>No run has enough epochs for the test: no hypothesis is evidence yet.</p>")  # fmt: skip
    if not few.is_empty():
        parts.append("<details><summary>From too few epochs (n_epochs &lt; min_epochs): not evidence, listed apart "
                     f"({few.height})</summary>{_table(few.select(columns))}</details>")  # fmt: skip
    return "".join(parts)


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1240px;padding:0 16px;color:#222;"
    "overflow-wrap:anywhere}"
    "img{max-width:100%;height:auto;display:block}figure{margin:1.5em 0}"
    "figcaption{font-size:13px;color:#333;max-width:1100px}h2{font-size:1.15em;margin:1.4em 0 .4em}"
    "table{border-collapse:collapse;font-size:12.5px;margin:.4em 0;max-width:100%}"
    "td,th{border:1px solid #ccc;padding:2px 5px;text-align:right}th{background:#f3f3f3}"
    ".table{max-width:100%;overflow-x:auto}.scroll{max-width:100%;overflow-x:auto}"
    ".columns{font-size:12px;color:#555;margin:.2em 0 .8em;padding-left:1.2em;columns:2 440px}"
    ".warning{background:#fff3cd;border:1px solid #e0b000;padding:.6em}.muted{color:#777}"
    "details{margin:.4em 0}summary{cursor:pointer;color:#245}nav ol{columns:2 420px;font-size:14px}"
    ".picker{margin:.3em 0}"
)


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
        incomplete = (f"<p class='warning'>Incomplete (missing shards): {html.escape(listed)}. Rerun "
                      "<code>invariance run CONFIG</code> to compute them.</p>")  # fmt: skip
    if inputs.incomplete_path_points:
        listed = ", ".join(f"{point}: {n} shard{'s' if n != 1 else ''}" for point, n in inputs.incomplete_path_points.items())
        incomplete += (f"<p class='warning'>Weight-path points left out until computed (missing shards): "
                       f"{html.escape(listed)}. Rerun <code>invariance run CONFIG</code> to compute them.</p>")  # fmt: skip
    links = " &middot; ".join(f"<a href='{html.escape(url)}'>{html.escape(label)}</a>" for label, url in inputs.links)
    figures = list(inputs.figures)
    figures += [Figure(title, "other", png=png) for title, png in inputs.plots.items()]
    if inputs.flow_plots and not any(f.kind == "flow" for f in figures):
        last = max(inputs.flow_plots)
        figures.append(Figure(f"Invariance flow at epoch {last}", "flow", png=inputs.flow_plots[last]))
    parts = [
        f"<h1>{html.escape(inputs.title)}</h1>",
        f"<p>{links}</p>" if links else "",
        f"<p>Settings <code>{html.escape(inputs.settings_hash)}</code>; {status}"
        + (f" ({epoch_span(epochs)})" if epochs else "") + ".</p>",
        incomplete,
    ]
    if not inputs.runs.is_empty():
        html_columns = ("page",) if "page" in inputs.runs.columns else ()
        parts.append("<h2>Runs and epochs</h2>" + _table(inputs.runs, max_rows=500, html_columns=html_columns))
    parts.append("<details><summary>Settings that change the numbers</summary><pre>"
                 + html.escape(json.dumps(inputs.settings, indent=1, sort_keys=True)) + "</pre></details>")
    if figures:
        contents = "".join(f"<li><a href='#{figure_id(n)}'>{html.escape(f.title)}</a></li>" for n, f in enumerate(figures, 1))
        parts.append(f"<nav><h2>Figures</h2><ol>{contents}</ol></nav>")
        parts += [_figure(number, figure) for number, figure in enumerate(figures, 1)]
    if not inputs.curves.is_empty():
        study = inputs.study or ("run" in inputs.curves.columns and inputs.curves["run"].n_unique() > 1)
        parts += _last_checkpoint(inputs.curves, study)
    if not inputs.robustness_correlation.is_empty():
        parts.append("<h2>Robustness link: forgetting spread against corrupted accuracy, per run</h2>"
                     + _table(inputs.robustness_correlation))  # fmt: skip
    if not inputs.robustness_search.is_empty():
        parts.append(search_tables(inputs.robustness_search))
    parts += [_render_table(table) for table in inputs.tables]
    for title, table in inputs.extra_tables.items():
        wide = table.width > 8 or table.height > 20  # a fold: the figures show it, the rows are one click away
        parts.append(_render_table(Table(title, pl.DataFrame(), full=table) if wide else Table(title, table)))
    parts.append(_inversion_section(inputs.inversion_quality))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(inputs.title)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    # credentials in any URL a table or title shows (a presigned pretrained URL, s3://KEY:SECRET@...)
    return redact(page).encode("utf-8")
