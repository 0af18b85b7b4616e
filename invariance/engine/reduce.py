"""The reducer: Polars over the completed shards -> curves, flow, status and plots.

Only checkpoints whose every shard is complete are reduced; the others are reported as
incomplete rather than averaged over what happens to be there.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field

import polars as pl

from invariance.analysis import metrics, plots, report, robustness, robustness_search
from invariance.engine.plan import Plan
from invariance.engine.reduce_paths import path_outputs, plain
from invariance.errors import StorageError
from invariance.io.checkpoints import Checkpoint, run_folders
from invariance.io.layout import (
    DYNAMICS_PLOT, LAYER_CURVES_PLOT, REDUCED_CURVES, REDUCED_FLOW, REDUCED_ROBUSTNESS,
    REDUCED_ROBUSTNESS_CORRELATION, REDUCED_ROBUSTNESS_EARLY, REDUCED_ROBUSTNESS_SEARCH, REDUCED_STATUS,
    REPORT, ROBUSTNESS_PLOT, flow_plot_key,
)  # fmt: skip
from invariance.io.layout import Unit
from invariance.io.run_metrics import read_run_metrics
from invariance.io.storage import Store, parquet_bytes

log = logging.getLogger(__name__)


@dataclass
class ReduceResult:
    """The reduced tables and what they cover."""

    curves: pl.DataFrame
    flow: pl.DataFrame
    complete_epochs: list[int]
    incomplete_epochs: dict[int, int]
    written: list[str] = field(default_factory=list)
    unreadable: list[Unit] = field(default_factory=list)  # shards found unreadable: missing again
    knn: pl.DataFrame = field(default_factory=pl.DataFrame)  # reduced/knn.parquet (a knn section)
    path_plots: dict[str, bytes] = field(default_factory=dict)  # report title -> PNG (weight paths, kNN)
    extra_tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # report title -> table


def _read_shards(plan: Plan, store: Store, units: list[Unit]) -> tuple[pl.DataFrame, list[Unit]]:
    """The rows of ``units``' shards, and the units whose data object is not readable Parquet
    (a truncated or overwritten file): all read at once, one by one only to find the bad ones."""
    keys = [plan.data_key(u) for u in units]
    try:
        return store.read_parquet(keys, how="diagonal_relaxed"), []  # older shards lack run, alpha
    except StorageError:
        pass
    frames, unreadable = [], []
    for unit, key in zip(units, keys):
        data = store.get(key)  # a StorageError here (unreachable store) is not the shard's fault
        try:
            frames.append(pl.read_parquet(io.BytesIO(data)))
        except Exception as exc:  # noqa: BLE001 - polars raises several types for a bad file
            log.warning("%s: not a readable Parquet file (%s: %s); its shard is recomputed by the next run",
                        store.url(key), type(exc).__name__, exc)  # fmt: skip
            unreadable.append(unit)
    try:
        return (pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()), unreadable
    except pl.exceptions.PolarsError as exc:
        raise StorageError(f"Parquet files under {store.url('')} do not share one schema: {exc}") from exc


def _forget(plan: Plan, store: Store, units: list[Unit]) -> None:
    """Remove the completion records of ``units`` (their data is unreadable): missing again."""
    for unit in units:
        try:
            store.fs.rm_file(store.path(plan.record_key(unit)))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot remove {store.url(plan.record_key(unit))}: {type(exc).__name__}: {exc}") from exc
        plan.done.discard(plan.record_key(unit))


def reduce_plan(plan: Plan, store: Store, make_plots: bool = True, settings: dict | None = None) -> ReduceResult:
    """Build ``reduced/``, ``plots/`` and (with ``make_plots``) ``reports/index.html`` from the
    complete checkpoints of ``plan``; ``settings`` (the config's numbers settings) are shown in the report.

    A shard whose data is unreadable counts as missing: its completion record is removed (the
    next run recomputes it), its checkpoint is incomplete, and ``result.unreadable`` lists it."""
    incomplete = plan.incomplete_epochs()
    complete = [c.epoch for c in plan.checkpoints if c.epoch not in incomplete]
    stir, bad_stir = _read_shards(plan, store, [u for u in plan.stir if u.epoch in complete])
    cka, bad_cka = _read_shards(plan, store, [u for u in plan.cka if u.epoch in complete])
    unreadable: list[Unit] = [*bad_stir, *bad_cka]
    if unreadable:
        _forget(plan, store, unreadable)
        incomplete = plan.incomplete_epochs()
        complete = [c.epoch for c in plan.checkpoints if c.epoch not in incomplete]
        stir = stir.filter(pl.col("epoch").is_in(complete)) if not stir.is_empty() else stir
        cka = cka.filter(pl.col("epoch").is_in(complete)) if not cka.is_empty() else cka
    if complete:
        # shards are keyed by epoch; the name is the plan's, so that rows written under another
        # naming (an older release) still group with their epoch
        names = {c.epoch: c.name for c in plan.checkpoints}
        stir, cka = (
            metrics.with_path_columns(frame.with_columns(pl.col("epoch").replace_strict(names, return_dtype=pl.String)
                                                         .alias("checkpoint")))  # fmt: skip
            for frame in (stir, cka)
        )
        # the settings hash on every reduced row: a table left from other settings is visible
        settings_column = pl.lit(plan.settings_hash).alias("settings")
        curves = metrics.curves(stir, cka).with_columns(settings_column)
        flow = metrics.flow_table(stir).with_columns(settings_column)
    else:
        curves, flow = pl.DataFrame(), pl.DataFrame()
    result = ReduceResult(curves, flow, complete, incomplete, unreadable=unreadable)
    outputs: dict[str, bytes] = {}
    if complete:
        outputs[REDUCED_CURVES] = parquet_bytes(curves)
        outputs[REDUCED_FLOW] = parquet_bytes(flow)
    if complete and make_plots:  # per checkpoint: its own rows (alpha 1); the weight paths have their plots
        outputs[LAYER_CURVES_PLOT] = plots.layer_curves_png(plain(curves))
        outputs[DYNAMICS_PLOT] = plots.dynamics_png(plain(curves))
        outputs.update({flow_plot_key(epoch): plots.flow_heatmap_png(plain(flow), epoch) for epoch in complete})
    paths = path_outputs(plan, store, curves, make_plots)
    result.knn, result.path_plots, result.extra_tables = paths.knn, paths.plots, paths.tables
    outputs.update(paths.files)
    # only what changed is written: a rerun with nothing new leaves every file as it was
    result.written += [key for key, data in outputs.items() if store.put_if_changed(key, data)]
    if complete:  # finetuning runs with metrics/ beside their checkpoints: the robustness link
        result.written += _reduce_robustness(store, plain(curves), plan.checkpoints, plan.depth, make_plots)
    if make_plots:
        result.written += _write_report(store, plan, result, stir, outputs, settings or {})
    status = {
        "settings": plan.settings_hash,
        "complete_epochs": complete,
        "incomplete_epochs": {str(k): v for k, v in sorted(incomplete.items())},
    }
    if result.written or _stored_status(store) != status:
        stamped = {**status, "reduced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        store.put(REDUCED_STATUS, json.dumps(stamped, indent=1).encode())
        result.written.append(REDUCED_STATUS)
    return result


def _readable_run_metrics(checkpoints: list[Checkpoint], storage_options: dict) -> dict[str, pl.DataFrame]:
    """{run folder: its finetuning metrics} for the runs that have them; an unreadable metrics
    file is reported and its run skipped, so that it never stops the rest of the reduce."""
    found = {}
    for folder in run_folders(checkpoints):
        try:
            run_metrics = read_run_metrics(folder, storage_options)
        except StorageError as exc:
            log.warning("robustness link skipped for %s: %s", folder, exc)
            continue
        if run_metrics is not None:
            found[folder] = run_metrics
    return found


def _reduce_robustness(
    store: Store, curves: pl.DataFrame, checkpoints: list[Checkpoint], depth: int, make_plots: bool
) -> list[str]:
    """Write the robustness table, its correlation and plot for the runs with metrics; the keys written."""
    run_metrics = _readable_run_metrics(checkpoints, store.storage_options)
    run_epochs = {
        folder: [c.epoch for c in checkpoints if c.url.startswith(folder + "/")] for folder in run_metrics
    }
    try:
        table, correlation = robustness.robustness_tables(curves, run_metrics, run_epochs, depth)
    except pl.exceptions.PolarsError as exc:  # a metrics file without the expected columns
        log.warning("robustness link skipped: the finetuning metrics do not have the expected columns (%s)", exc)
        return []
    if table.is_empty():
        return []
    outputs = {REDUCED_ROBUSTNESS: parquet_bytes(table), REDUCED_ROBUSTNESS_CORRELATION: parquet_bytes(correlation)}
    outputs.update(_robustness_search(curves, run_metrics, run_epochs))
    if make_plots:
        outputs[ROBUSTNESS_PLOT] = robustness.robustness_png(table, correlation, depth)
    return [key for key, data in outputs.items() if store.put_if_changed(key, data)]


def _robustness_search(
    curves: pl.DataFrame, run_metrics: dict[str, pl.DataFrame], run_epochs: dict[str, list[int]]
) -> dict[str, bytes]:
    """The paper's search over hypotheses per run, its early-epoch view; the strongest logged."""
    searches, early = [], []
    for run, metrics in run_metrics.items():
        run_curves = curves.filter(pl.col("epoch").is_in(run_epochs.get(run, [])))
        table = robustness_search.search(run_curves, metrics, run)
        searches.append(table)
        early.append(robustness_search.early_epochs(run_curves, metrics, run, robustness_search.strongest(table, n=3)))
    if not searches:
        return {}
    search = pl.concat(searches)
    for row in robustness_search.strongest(search, n=5).iter_rows(named=True):
        log.info("robustness search %s: %s of %s over %s: r = %.3f (n = %d epochs), Bonferroni p = %.3g of %d tested",
                 row["run"], row["aggregation"], row["combination"], row["layer_set"], row["pearson_r"],
                 row["n_epochs"], row["p_bonferroni"], row["n_hypotheses"])  # fmt: skip
    return {REDUCED_ROBUSTNESS_SEARCH: parquet_bytes(search), REDUCED_ROBUSTNESS_EARLY: parquet_bytes(pl.concat(early))}


def _stored_status(store: Store) -> dict | None:
    """``reduced/status.json`` without its time stamp, or None when absent or unreadable."""
    try:
        stored = json.loads(store.get(REDUCED_STATUS))
    except (FileNotFoundError, ValueError):
        return None
    stored.pop("reduced_at", None)
    return stored


def _stored_table(store: Store, key: str) -> pl.DataFrame:
    """A reduced table written before, or an empty frame when there is none (or it is unreadable)."""
    try:
        return store.read_parquet([key]) if store.exists(key) else pl.DataFrame()
    except StorageError as exc:
        log.warning("report: %s left out (%s)", key, exc)
        return pl.DataFrame()


def _write_report(
    store: Store, plan: Plan, result: ReduceResult, stir: pl.DataFrame, outputs: dict[str, bytes], settings: dict
) -> list[str]:
    """``reports/index.html`` from this reduce's tables and plots; written only when it changed."""
    pngs = {"Forgetting, learning and CKA divergence per layer": outputs.get(LAYER_CURVES_PLOT),
            "Dynamics across checkpoint epochs": outputs.get(DYNAMICS_PLOT)}  # fmt: skip
    robustness_png = store.get(ROBUSTNESS_PLOT) if result.complete_epochs and store.exists(ROBUSTNESS_PLOT) else None
    if robustness_png is not None:
        pngs["Robustness link"] = robustness_png
    pngs.update(result.path_plots)
    inputs = report.ReportInputs(
        settings_hash=plan.settings_hash,
        settings=settings,
        checkpoints=[(c.epoch, c.name) for c in plan.checkpoints],
        complete_epochs=result.complete_epochs,
        incomplete_epochs=result.incomplete_epochs,
        curves=plain(result.curves),
        inversion_quality=report.inversion_quality(stir) if result.complete_epochs else pl.DataFrame(),
        plots={title: png for title, png in pngs.items() if png is not None},
        flow_plots={epoch: outputs[flow_plot_key(epoch)] for epoch in result.complete_epochs if flow_plot_key(epoch) in outputs},
        robustness_correlation=_stored_table(store, REDUCED_ROBUSTNESS_CORRELATION) if result.complete_epochs else pl.DataFrame(),
        robustness_search=_stored_table(store, REDUCED_ROBUSTNESS_SEARCH) if result.complete_epochs else pl.DataFrame(),
        extra_tables=result.extra_tables,
    )
    return [REPORT] if store.put_if_changed(REPORT, report.render(inputs)) else []
