"""The report's pages: ``reports/index.html`` assembled from a reduce's tables, figures and the
measures' report sections (``analysis/report.py`` renders them); a study adds ``reports/runs/<run>.html``
per run, which its index summarises side by side and links.

A page embeds the figures that summarise what it covers (a run's curves, dynamics, kNN; a study's
runs compared and robustness) and shows the figures of one epoch (flow, CKA and the other layer x
layer heatmaps, weight paths), and on a study's index each run's own figures, as the files the
reducer wrote under ``plots/``, by a selector over relative links: the HTML stays small at hundreds
of epochs, and opens from a local folder and from an S3 static listing alike. Which files exist is
read from one listing of ``plots/`` (one LIST request per 1,000 keys), never per epoch.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import quote

import polars as pl

from invariance.analysis import metrics, report
from invariance.analysis.report import Figure, Table
from invariance.engine.plan import Plan
from invariance.errors import StorageError
from invariance.io.layout import (
    PLAIN_ALPHA, PLOTS, REDUCED_ROBUSTNESS, REDUCED_ROBUSTNESS_CORRELATION, REDUCED_ROBUSTNESS_SEARCH, REPORT, ROBUSTNESS_PLOT,
    RUNS_COMPARED_PLOT, dynamics_plot_key, knn_alpha_plot_key, knn_layers_plot_key, layer_curves_plot_key, run_plots,
)  # fmt: skip
from invariance.io.storage import Store, redact
from invariance.measures.base import run_title

if TYPE_CHECKING:
    from invariance.engine.reduce import ReduceResult

log = logging.getLogger(__name__)

RUN_PAGES = "reports/runs"
# per-epoch figures: a folder of plots/ (a study's run: plots/runs/<run>/) holding epoch=<e>.png
_PER_EPOCH = re.compile(r"^(?P<folder>[^/]+)/epoch=(?P<epoch>\d+)\.png$")
# what a per-epoch folder shows, where its measure's title does not say (kinds: analysis.report.CAPTIONS)
FOLDERS = {
    "flow": ("Invariance flow", "flow"),
    "cka": ("CKA between pretrained and finetuned layers", "cka"),
    "procrustes": ("Procrustes distance between pretrained and finetuned layers", "procrustes"),
    "interpolation": ("Along the weight path: forgetting, learning and CKA divergence against alpha", "interpolation"),
}
LAYER_CURVES_TITLE = "Forgetting, learning and CKA divergence per layer"
DYNAMICS_TITLE = "Dynamics across checkpoint epochs"


def run_page_key(run: str) -> str:
    """``reports/runs/<run>.html``: a study's page of one run."""
    return f"{RUN_PAGES}/{run}.html"


def _page_link(run: str) -> str:
    """A link from the study's index to a run's page."""
    return "<a href='runs/" + quote(run, safe="=,") + ".html'>its page</a>"


def _stored_table(store: Store, key: str) -> pl.DataFrame:
    """A reduced table written before, or an empty frame when there is none (or it is unreadable)."""
    try:
        return store.read_parquet([key]) if store.exists(key) else pl.DataFrame()
    except StorageError as exc:
        log.warning("report: %s left out (%s)", key, exc)
        return pl.DataFrame()


class _Files:
    """The figures under ``plots/`` (one listing plus what this reduce wrote) and their bytes."""

    def __init__(self, store: Store, outputs: dict[str, bytes], listed: set[str] | None = None) -> None:
        self.store, self.outputs = store, outputs
        try:
            listed = store.list(PLOTS) if listed is None else listed
        except StorageError as exc:
            log.warning("report: plots/ not listed (%s); the figures of this reduce only", exc)
            listed = []
        self.keys = sorted(set(listed) | {key for key in outputs if key.startswith(f"{PLOTS}/")})

    def png(self, key: str) -> bytes | None:
        if key in self.outputs:
            return self.outputs[key]
        if key not in self.keys:
            return None
        try:
            return self.store.get(key)
        except (FileNotFoundError, StorageError):
            return None

    def per_epoch(self, run: str) -> dict[str, list[int]]:
        """{folder: epochs} of the run's per-epoch figures (``plots/<folder>/epoch=<e>.png``)."""
        prefix = f"{run_plots(run)}/"
        found: dict[str, list[int]] = {}
        for key in self.keys:
            if key.startswith(prefix) and (match := _PER_EPOCH.match(key[len(prefix):])):
                found.setdefault(match["folder"], []).append(int(match["epoch"]))
        return {folder: sorted(epochs) for folder, epochs in found.items() if not (run == "" and folder == "runs")}


def _href(key: str, depth: int) -> str:
    """The relative URL of storage key ``key`` from a page ``depth`` folders below the prefix."""
    return "../" * depth + quote(key, safe="/=,")


def _measure_titles(result: "ReduceResult", outputs: dict[str, bytes]) -> dict[str, str]:
    """{folder: what its heatmaps show} from the measures' report titles ("Procrustes distance
    between ... at epoch 2 (diagonal outlined)"), matched to the files they were drawn to."""
    titles = {}
    for title, key in result.figure_keys.items():  # no figure read: a title and its file's key
        folder = key.split("/")[-2] if key.endswith(".png") and "/epoch=" in key else ""
        what = re.sub(r"^run .*?: ", "", title) if title.startswith("run ") else title
        what = re.sub(r" at epoch \d+.*$", "", what)
        if folder and folder not in FOLDERS and what:
            titles[folder] = what
    return titles


def _folder_order(plan: Plan, folders: list[str]) -> list[str]:
    """The paper's order: flow, CKA, the other measures' heatmaps (the registry's order), then the weight path."""
    measures = [m.name for m in plan.measures]
    ranked = ["flow", "cka", *[n for n in measures if n not in ("cka",)], "interpolation"]
    return sorted(folders, key=lambda f: (ranked.index(f) if f in ranked else len(ranked), f))


def _run_metrics(store: Store) -> dict[str, pl.DataFrame]:
    """{run: epoch, clean_accuracy, corrupted_accuracy} of the runs with finetuning metrics, from the
    robustness link's table (``reduced/robustness.parquet``): one read, whatever the history."""
    table = _stored_table(store, REDUCED_ROBUSTNESS)
    if table.is_empty() or not {"run", "epoch", "clean_accuracy", "corrupted_accuracy_mean"} <= set(table.columns):
        return {}
    return {run: rows.select("epoch", "clean_accuracy", pl.col("corrupted_accuracy_mean").alias("corrupted_accuracy"))
            for (run,), rows in table.partition_by("run", as_dict=True).items()}  # fmt: skip


def _per_epoch_figures(plan: Plan, files: _Files, run: str, depth: int, titles: dict[str, str],
                       complete: list[int]) -> list[Figure]:  # fmt: skip
    """A selector figure per per-epoch folder of the run (the epochs complete in this reduce)."""
    figures = []
    per_epoch = files.per_epoch(run)
    for folder in _folder_order(plan, list(per_epoch)):
        epochs = [e for e in per_epoch[folder] if e in complete]
        if not epochs:
            continue
        what, kind = FOLDERS.get(folder, (titles.get(folder, f"{folder} between pretrained and finetuned layers"), "measure"))
        choices = [(f"epoch {e}", _href(f"{run_plots(run)}/{folder}/epoch={e}.png", depth), f"{run_title(run)}{what} at epoch {e}")
                   for e in epochs]  # fmt: skip
        figures.append(Figure(f"{run_title(run)}{what}, per checkpoint", kind, choices=choices))
    return figures


def _embedded(files: _Files, key: str, title: str, kind: str) -> list[Figure]:
    png = files.png(key)
    return [Figure(title, kind, png=png)] if png is not None else []


def _run_figures(plan: Plan, result: "ReduceResult", files: _Files, run: str, depth: int, titles: dict[str, str],
                 run_metrics: pl.DataFrame | None) -> list[Figure]:  # fmt: skip
    """A run's figures in the paper's order: curves per layer, dynamics (with its accuracy and
    stages), flow and the layer x layer heatmaps per checkpoint, the weight path, kNN."""
    title = run_title(run)
    figures = _embedded(files, layer_curves_plot_key(run), f"{title}{LAYER_CURVES_TITLE}", "layer_curves")
    # the reducer draws plots/dynamics.png with the run's accuracy and stages
    figures += _embedded(files, dynamics_plot_key(run), f"{title}{DYNAMICS_TITLE}", "dynamics")
    complete = [epoch for done_run, epoch in result.complete_checkpoints if done_run == run]
    figures += _per_epoch_figures(plan, files, run, depth, titles, complete)
    figures += _embedded(files, knn_layers_plot_key(run), f"{title}kNN top-1 per layer", "knn_layers")
    figures += _embedded(files, knn_alpha_plot_key(run), f"{title}kNN top-1 against alpha", "knn_alpha")
    return figures


def _study_figures(plan: Plan, result: "ReduceResult", files: _Files, titles: dict[str, str]) -> list[Figure]:
    """A study's index: the runs compared (embedded), then each of the runs' figures by a run
    selector (their files; each at the run's last epoch), the robustness link (embedded)."""
    runs = list(dict.fromkeys(run for run, _ in result.complete_checkpoints))
    figures = []
    if files.png(RUNS_COMPARED_PLOT) is not None and not result.runs_compared.is_empty():
        figures.append(Figure("Runs compared: mean corrupted accuracy and the spread of forgetting across layers "
                              "(the paper's Fig. 6)", "runs_compared", png=files.png(RUNS_COMPARED_PLOT)))  # fmt: skip

    def by_run(name: str, kind: str, key_of, label: str = "") -> None:
        choices = [(f"run {run}" + (f", {label.format(e=epoch)}" if label else ""), _href(key, 1),
                    f"{run_title(run)}{name}" + (f" at {label.format(e=epoch)}" if label else ""))
                   for run in runs for key, epoch in [key_of(run)] if key in files.keys]  # fmt: skip
        if choices:
            figures.append(Figure(f"Each run: {name}", kind, choices=choices,
                                  note="Every figure of a run, per epoch, is on its page (Runs and epochs: page)."))

    by_run(LAYER_CURVES_TITLE, "layer_curves", lambda run: (layer_curves_plot_key(run), None))
    by_run(DYNAMICS_TITLE, "dynamics", lambda run: (dynamics_plot_key(run), None))
    last = {run: max(epoch for done_run, epoch in result.complete_checkpoints if done_run == run) for run in runs}
    folders = sorted({folder for run in runs for folder in files.per_epoch(run)})
    for folder in _folder_order(plan, folders):
        what, kind = FOLDERS.get(folder, (titles.get(folder, f"{folder} between pretrained and finetuned layers"), "measure"))
        if folder == "interpolation":
            epoch_of = {run: max([e for e in files.per_epoch(run).get(folder, []) if e <= last[run]], default=last[run]) for run in runs}
        else:
            epoch_of = last
        by_run(what, kind, lambda run: (f"{run_plots(run)}/{folder}/epoch={epoch_of[run]}.png", epoch_of[run]),
               label="its last epoch {e}")
    by_run("kNN top-1 per layer", "knn_layers", lambda run: (knn_layers_plot_key(run), None))
    by_run("kNN top-1 against alpha", "knn_alpha", lambda run: (knn_alpha_plot_key(run), None))
    return figures


def _knn_table(title: str, table: pl.DataFrame) -> Table:
    """kNN top-1 at each checkpoint (alpha 1) and the pretrained model, one column per layer; every
    row (top-5, each alpha) in the fold."""
    shown = table.filter(pl.col("alpha").is_null() | (pl.col("alpha") == PLAIN_ALPHA)) if "alpha" in table.columns else table
    keys = [c for c in ("run", "model", "epoch") if c in shown.columns]
    if {"layer", "top1"} <= set(shown.columns) and not shown.is_empty():
        shown = (shown.with_columns(pl.format("top-1 layer {}", pl.col("layer")).alias("column"))
                 .pivot(on="column", index=keys, values="top1", sort_columns=False)
                 .sort([pl.col("model") != "pt", *[c for c in ("run", "epoch") if c in keys]], nulls_last=False))  # fmt: skip
        if "run" in shown.columns and not (shown["run"] != "").any():
            shown = shown.drop("run")
    named = {c: f"kNN top-1 accuracy of layer {c.rsplit(' ', 1)[-1]}" for c in shown.columns if c.startswith("top-1 layer")}
    return Table(title, shown, full=table, columns=named, note="Top-1 per layer at each checkpoint (alpha 1) and of "
                 "the pretrained model (pt); top-5 and the weight path's points in the full table.")  # fmt: skip


def _tables(result_tables: dict[str, pl.DataFrame], run: str | None) -> list[Table]:
    """The measures' and the weight path's tables (``run``: that run's rows and the pretrained model's)."""
    tables = []
    for title, table in result_tables.items():
        if run is not None and "run" in table.columns:
            keep = pl.col("run") == run
            if "model" in table.columns:
                keep = keep | (pl.col("model") == "pt")
            table = table.filter(keep)
        if table.is_empty():
            continue
        if title.startswith("kNN"):
            tables.append(_knn_table(title, table))
        else:  # long: the figures show it, its rows one click away
            tables.append(Table(title, pl.DataFrame(), full=table) if table.height > 20 or table.width > 8 else Table(title, table))
    return tables


def _runs_side_by_side(result: "ReduceResult", run_metrics: dict[str, pl.DataFrame], correlation: pl.DataFrame) -> Table:
    """One row per run: its last epoch's accuracies, forgetting, learning and CKA divergence over
    the layers, the robustness link's r, and its page."""
    curves = metrics.plain(result.curves)
    last = curves.filter(pl.col("epoch") == pl.col("epoch").max().over("run"))
    aggregations = [pl.col("epoch").first().alias("last_epoch")]
    if "forgetting_mean" in last.columns:
        aggregations += [
            pl.col("forgetting_mean").mean().alias("forgetting_mean_over_layers"),
            pl.format("layer {}: {}", pl.col("layer").sort_by("forgetting_mean").last(),
                      pl.col("forgetting_mean").max().round_sig_figs(3)).alias("forgetting_max_layer"),
        ]
    aggregations += [pl.col(f"{m}_mean").mean().alias(f"{m}_mean_over_layers") for m in ("learning", "cka_divergence")
                     if f"{m}_mean" in last.columns]  # fmt: skip
    table = last.group_by("run").agg(aggregations).sort("run")
    accuracy = [
        frame.filter(pl.col("epoch").is_in(table.filter(pl.col("run") == run)["last_epoch"].implode()))
        .select(pl.lit(run).alias("run"), *[c for c in ("clean_accuracy", "corrupted_accuracy") if c in frame.columns])
        .head(1)
        for run, frame in run_metrics.items()
    ]  # fmt: skip
    accuracy = [frame for frame in accuracy if not frame.is_empty()]
    if accuracy:
        table = table.join(pl.concat(accuracy, how="diagonal_relaxed"), on="run", how="left")
    if not correlation.is_empty() and "pearson_r" in correlation.columns:
        table = table.join(correlation.select("run", "pearson_r"), on="run", how="left")
    table = table.with_columns(
        pl.col("run").map_elements(lambda run: _page_link(run), return_dtype=pl.String)
        .alias("page"))  # fmt: skip
    first = ["run", "last_epoch", *[c for c in ("clean_accuracy", "corrupted_accuracy") if c in table.columns]]
    return Table("Runs side by side (each at its last complete epoch)", table.select(first + [c for c in table.columns if c not in first]),
                 html_columns=("page",),
                 note="One row per run; its figures per epoch and its tables are on its page.")  # fmt: skip


def _base_inputs(plan: Plan, result: "ReduceResult", settings: dict, store: Store) -> report.ReportInputs:
    inputs = report.ReportInputs(
        settings_hash=plan.settings_hash,
        # URLs in the settings may carry user:password@: never written to an output
        settings=json.loads(redact(json.dumps(settings))),
        checkpoints=[(c.epoch, f"{c.run}/{c.name}" if c.run else c.name) for c in plan.checkpoints],
        complete_epochs=[epoch for _, epoch in result.complete_checkpoints],
        incomplete_epochs=result.incomplete_epochs,
        incomplete_path_points=result.incomplete_path_points,
        curves=metrics.plain(result.curves),
        inversion_quality=pl.DataFrame(),
        robustness_correlation=_stored_table(store, REDUCED_ROBUSTNESS_CORRELATION) if result.complete_epochs else pl.DataFrame(),
        robustness_search=_stored_table(store, REDUCED_ROBUSTNESS_SEARCH) if result.complete_epochs else pl.DataFrame(),
        runs=runs_listing(plan),
    )
    for name, value in result.report_fields.items():  # what the measures show (inversion quality)
        if name != "flow_plots":  # flow is shown from its files, by a selector
            setattr(inputs, name, value)
    return inputs


def write_report(store: Store, plan: Plan, result: "ReduceResult", outputs: dict[str, bytes], settings: dict,
                 plot_keys: set[str] | None = None) -> list[str]:  # fmt: skip
    """``reports/index.html`` (and a study's ``reports/runs/<run>.html``) from this reduce's tables
    and figures; each written only when it changed. ``plot_keys``: the keys under ``plots/`` as the
    reduce listed them (with what it wrote); None: listed here. The keys written."""
    files = _Files(store, outputs, plot_keys)
    titles = _measure_titles(result, outputs)
    run_metrics = _run_metrics(store) if result.complete_checkpoints else {}
    robustness = _embedded(files, ROBUSTNESS_PLOT, "Robustness link: forgetting spread and corrupted accuracy",
                           "robustness") if result.complete_epochs else []  # fmt: skip
    pages: dict[str, bytes] = {}
    if not plan.is_study:
        inputs = _base_inputs(plan, result, settings, store)
        inputs.figures = _run_figures(plan, result, files, "", 1, titles, run_metrics.get("")) + robustness
        inputs.tables = _tables(result.extra_tables, None)
        pages[REPORT] = report.render(inputs)
    else:
        runs = list(dict.fromkeys(run for run, _ in result.complete_checkpoints))
        for run in runs:
            inputs = _base_inputs(plan, result, settings, store)
            inputs.title = f"invariance report: run {run}"
            inputs.links = [("the study's report", "../index.html")]
            inputs.curves = inputs.curves.filter(pl.col("run") == run)
            inputs.runs = inputs.runs.filter(pl.col("run") == run)
            inputs.checkpoints = [(c.epoch, c.name) for c in plan.checkpoints if c.run == run]
            inputs.complete_epochs = [epoch for done_run, epoch in result.complete_checkpoints if done_run == run]
            inputs.incomplete_epochs = {epoch: n for (missing_run, epoch), n in result.incomplete_checkpoints.items()
                                        if missing_run == run}  # fmt: skip
            for name in ("robustness_correlation", "robustness_search"):
                frame = getattr(inputs, name)
                setattr(inputs, name, frame.filter(pl.col("run") == run) if "run" in frame.columns else frame)
            inputs.figures = _run_figures(plan, result, files, run, 2, titles, run_metrics.get(run))
            inputs.tables = _tables(result.extra_tables, run)
            pages[run_page_key(run)] = report.render(inputs)
        inputs = _base_inputs(plan, result, settings, store)
        inputs.study = True
        pages_of = set(runs)
        inputs.runs = inputs.runs.with_columns(
            pl.col("run").map_elements(lambda run: _page_link(run)
                                       if run in pages_of else "", return_dtype=pl.String).alias("page"))  # fmt: skip
        inputs.figures = _study_figures(plan, result, files, titles) + robustness
        tables = []
        if not result.curves.is_empty():
            tables.append(_runs_side_by_side(result, run_metrics, inputs.robustness_correlation))
        if not result.runs_compared.is_empty():
            tables.append(Table("Runs compared per epoch (reduced/robustness.parquet where a run has metrics)",
                                pl.DataFrame(), full=result.runs_compared))  # fmt: skip
        inputs.tables = tables + _tables(result.extra_tables, None)
        pages[REPORT] = report.render(inputs)
    return [key for key, page in pages.items() if store.put_if_changed(key, page)]


def runs_listing(plan: Plan) -> pl.DataFrame:
    """Per run ("" without ``{run}``): its checkpoints, their epochs, the complete ones, and the
    incomplete ones with how many of their shards (STIR + CKA) are missing ("3: 12 shards")."""
    incomplete = plan.incomplete_checkpoints()
    return pl.DataFrame(
        [{"run": run, "checkpoints": len(epochs), "epochs": sorted(epochs),
          "complete_epochs": sorted(e for e in epochs if (run, e) not in incomplete),
          "incomplete": [f"{e}: {incomplete[run, e]} shards" for e in sorted(epochs) if (run, e) in incomplete]}
         for run, epochs in plan.runs.items()],  # fmt: skip
        schema={"run": pl.String, "checkpoints": pl.Int64, "epochs": pl.List(pl.Int64),
                "complete_epochs": pl.List(pl.Int64), "incomplete": pl.List(pl.String)},  # fmt: skip
    )
