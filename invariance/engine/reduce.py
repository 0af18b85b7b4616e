"""The reducer: Polars over the completed shards -> curves, flow, status and plots.

Only checkpoints whose every shard is complete are reduced; the others are reported as
incomplete rather than averaged over what happens to be there.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl

from invariance.analysis import metrics, plots, robustness, robustness_search
from invariance.engine.plan import Plan
from invariance.engine.reduce_paths import checkpoint_names, path_outputs
from invariance.engine.report_pages import write_report
from invariance.errors import StorageError
from invariance.io.checkpoints import Checkpoint, run_folders
from invariance.io.compacted import member_rows
from invariance.io.layout import (
    REDUCED_CURVES, REDUCED_FLOW, REDUCED_KNN, REDUCED_ROBUSTNESS, REDUCED_ROBUSTNESS_CORRELATION, REDUCED_ROBUSTNESS_EARLY,
    REDUCED_INDEX, REDUCED_ROBUSTNESS_SEARCH, REDUCED_STATUS, ROBUSTNESS_PLOT, PLOTS, RUNS_COMPARED_PLOT, Unit, dynamics_plot_key,
    compaction_record_key, is_compacted, layer_curves_plot_key,
)  # fmt: skip
from invariance.io.run_metrics import metrics_fingerprint, read_run_metrics
from invariance.io.schemas import Schema, conform
from invariance.io.storage import Store, parquet_bytes, redact
from invariance.measures import Measure
from invariance.measures.base import Figure, ReduceContext, partition_key, run_title

log = logging.getLogger(__name__)


@dataclass
class ReduceResult:
    """The reduced tables and what they cover."""

    curves: pl.DataFrame
    complete_epochs: list[int]
    incomplete_epochs: dict[int, int]
    written: list[str] = field(default_factory=list)
    unreadable: list[Unit] = field(default_factory=list)  # shards found unreadable: missing again
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # storage key -> a measure's reduced table
    path_plots: dict[str, bytes] = field(default_factory=dict)  # report title -> PNG (weight paths, measures)
    extra_tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # report title -> table
    # (run, epoch) of each checkpoint: what tells a study's checkpoints apart (run "" without {run})
    complete_checkpoints: list[tuple[str, int]] = field(default_factory=list)
    incomplete_checkpoints: dict[tuple[str, int], int] = field(default_factory=dict)
    # weight-path points (alpha < 1) left out of the tables: {"epoch 2 alpha 0.5": missing shards}
    incomplete_path_points: dict[str, int] = field(default_factory=dict)
    runs_compared: pl.DataFrame = field(default_factory=pl.DataFrame)  # a study's Fig. 6 view, per run and epoch
    report_fields: dict = field(default_factory=dict)  # what measures give the report (inversion quality, flow)
    robustness_summary: str = ""  # the robustness search in a few lines (robustness_search.summary), for stdout
    figure_keys: dict[str, str] = field(default_factory=dict)  # report title -> the figure's storage key

    @property
    def flow(self) -> pl.DataFrame:
        """``reduced/flow.parquet`` as written by this reduce (empty without a complete checkpoint)."""
        return self.tables.get(REDUCED_FLOW, pl.DataFrame())

    @property
    def knn(self) -> pl.DataFrame:
        """``reduced/knn.parquet`` as written by this reduce (empty without a knn section)."""
        return self.tables.get(REDUCED_KNN, pl.DataFrame())


def _read_shards(plan: Plan, store: Store, units: list[Unit], schema: Schema) -> tuple[pl.DataFrame, list[Unit]]:
    """The rows of ``units``' shards, typed by ``schema`` (older shards lack run, alpha), and the
    units whose data object is not readable Parquet (a truncated or overwritten file): all read at
    once, one by one only to find the bad ones. A shard a compacted file holds is read from it
    (each file once, only the rows of the shards asked for)."""
    if not units:
        return pl.DataFrame(schema=dict(schema)), []
    by_source: dict[str, list[Unit]] = {}
    for unit in units:
        by_source.setdefault(plan.source(unit), []).append(unit)
    try:
        blobs = store.get_many(list(by_source))
        frames = [_source_rows(plan, store, key, blobs[key], members) for key, members in by_source.items()]
        return conform(pl.concat(frames, how="diagonal_relaxed"), schema), []
    except Exception:  # noqa: BLE001 - an unreadable object (or store): found one by one below
        pass
    frames, unreadable = [], []
    for key, members in by_source.items():
        try:
            data = store.get(key)  # a StorageError here (unreachable store) is not the shard's fault
        except FileNotFoundError:  # deleted since the plan listed it: missing, recomputed next run
            log.warning("%s: gone since the plan listed it; its shards are recomputed by the next run", store.url(key))
            unreadable += members
            continue
        try:
            frames.append(_source_rows(plan, store, key, data, members))
        except Exception as exc:  # noqa: BLE001 - polars raises several types for a bad file
            log.warning("%s: not a readable Parquet file (%s: %s); its shards are recomputed by the next run",
                        store.url(key), type(exc).__name__, exc)  # fmt: skip
            unreadable += members
            if is_compacted(key):  # its name would count its shards as done again: gone with its record
                store.remove([key, compaction_record_key(key)])
    try:
        return (conform(pl.concat(frames, how="diagonal_relaxed"), schema) if frames else pl.DataFrame()), unreadable
    except pl.exceptions.PolarsError as exc:
        raise StorageError(f"Parquet files under {store.url('')} do not share one schema: {exc}") from exc


def _source_rows(plan: Plan, store: Store, key: str, data: bytes, units: list[Unit]) -> pl.DataFrame:
    """The rows of ``units`` in the object ``key`` (``data``): a raw shard's, or theirs of a compacted file."""
    if not is_compacted(key):
        return pl.read_parquet(io.BytesIO(data))
    try:
        return member_rows(data, {posixpath.basename(plan.data_key(unit)) for unit in units}, store.url(key))
    except StorageError as exc:
        raise ValueError(str(exc)) from exc  # a bad file, not an unreachable store


def _wanted(plan: Plan, measure: Measure, unit: Unit, complete: set[tuple[str, int]],
            partial: set[tuple[str, int, float]]) -> bool:  # fmt: skip
    """Whether the reducer reads ``unit``'s rows: done, with rows, and (for a measure that gates its
    checkpoint) of a complete checkpoint and a point with every gating shard."""
    if not plan.is_done(unit) or not measure.has_rows(unit):
        return False
    point = measure.point(unit)
    if not measure.gates_checkpoint or point is None:
        return True
    return (point[0], point[1]) in complete and point not in partial


def _read_rows(plan: Plan, store: Store, partitions: set[str]) -> tuple[dict[str, pl.DataFrame], list[Unit]]:
    """{measure: its rows of ``partitions``} as the reducer reads them, and the shards found
    unreadable (their completion records removed: missing again, recomputed by the next run; their
    checkpoints, or points, then count as incomplete). Each measure's rows are normalized (older
    shards) and carry the plan's name of their checkpoint: rows written under another naming still
    group."""

    def in_partitions(measure: Measure, unit: Unit) -> bool:
        point = measure.point(unit)
        return (partition_key(point[0], point[1]) if point else partition_key("", None)) in partitions

    def read() -> tuple[dict[str, pl.DataFrame], list[Unit]]:
        incomplete = plan.incomplete_checkpoints()
        complete = {c.key for c in plan.checkpoints if c.key not in incomplete}
        partial = plan.incomplete_points()
        frames, bad = {}, []
        for measure in plan.measures:
            units = [u for u in plan.units[measure.name]
                     if _wanted(plan, measure, u, complete, partial) and in_partitions(measure, u)]  # fmt: skip
            frames[measure.name], unreadable = _read_shards(plan, store, units, measure.schema)
            bad += unreadable
        return frames, bad

    frames, unreadable = read()
    if unreadable:
        _forget(plan, store, unreadable)
        frames, _ = read()  # the rest again, without the checkpoints and points that lost a shard
    names = checkpoint_names(plan)
    return {name: _named(plan.measure_named(name).normalize(frame), names) for name, frame in frames.items()}, unreadable


def _named(frame: pl.DataFrame, names: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the plan's name of each row's checkpoint (by run and epoch), where it has one."""
    if frame.is_empty() or not {"run", "epoch", "checkpoint"} <= set(frame.columns):
        return frame
    return (
        frame.join(names.rename({"checkpoint": "_plan_checkpoint"}), on=["run", "epoch"], how="left")
        .with_columns(pl.col("_plan_checkpoint").fill_null(pl.col("checkpoint")).alias("checkpoint"))
        .drop("_plan_checkpoint")
    )


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


# the reducer's and the figures' code: a change to any of these rebuilds every table and figure once
_CODE_MODULES = ("invariance.analysis.metrics", "invariance.analysis.plots", "invariance.analysis.robustness",
                 "invariance.engine.reduce", "invariance.engine.reduce_paths")  # fmt: skip


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the source of the reducer, the metrics, the figures and every measure module, as
    this process first read them (the code it runs, not a later edit on disk)."""
    import importlib
    import inspect

    import invariance.measures as measures_package

    digest = hashlib.sha256(f"polars {pl.__version__}".encode())  # row hashes are stable within a Polars version
    names = [*_CODE_MODULES, *sorted(f"invariance.measures.{m}" for m in _measure_modules(measures_package))]
    for name in names:
        digest.update(inspect.getsource(importlib.import_module(name)).encode())
    return digest.hexdigest()[:16]


def _measure_modules(package: object) -> list[str]:
    import pkgutil

    return [info.name for info in pkgutil.iter_modules(package.__path__)]  # type: ignore[attr-defined]


_PARTITION = pl.concat_str([pl.col("run").fill_null(""), pl.lit("\t"), pl.col("epoch").cast(pl.String).fill_null("")])


def _partitions(plan: Plan) -> dict[str, str]:
    """{partition: a hash of what the reducer reads of it}: the completion records of its units
    that are read (done, and of gating measures only once the checkpoint is complete) and the
    plan's name of the checkpoint. A partition whose hash is unchanged since the last reduce is
    not read again."""
    incomplete = plan.incomplete_checkpoints()
    complete = {c.key for c in plan.checkpoints if c.key not in incomplete}
    partial = plan.incomplete_points()
    names = {c.key: c.name for c in plan.checkpoints}
    members: dict[str, list[str]] = {}
    for measure in plan.measures:
        for unit in plan.units[measure.name]:
            if _wanted(plan, measure, unit, complete, partial):
                point = measure.point(unit)
                key = partition_key(point[0], point[1]) if point else partition_key("", None)
                members.setdefault(key, []).append(plan.record_key(unit))
    hashes = {}
    for key, records in members.items():
        run, _, epoch = key.partition("\t")
        name = names.get((run, int(epoch)), "") if epoch else ""
        hashes[key] = hashlib.sha256("\n".join([name, *sorted(records)]).encode()).hexdigest()[:16]
    return hashes


def reduce_is_stale(plan: Plan, store: Store) -> str | None:
    """None when ``reduced/`` is of every shard ``plan`` finds done (its index names each
    checkpoint's shards, the settings and this code), else a hash of what a reduce would read:
    every shard done but a run that stopped before its reduce, or a new release. One read."""
    index = _read_index(store)
    partitions = _partitions(plan)
    current = (index.get("partitions") == partitions and index.get("code") == code_version()
               and index.get("settings") == plan.settings_hash and index.get("hashes") == plan.hashes)  # fmt: skip
    if current or not partitions:
        return None
    return hashlib.sha256(json.dumps(partitions, sort_keys=True).encode()).hexdigest()[:16]


def _frame_hash(frame: pl.DataFrame, *extra: str) -> str:
    """A hash of ``frame``'s rows (in order), columns and types, and of ``extra``."""
    digest = hashlib.sha256("|".join([*extra, *(f"{name}:{dtype}" for name, dtype in frame.schema.items())]).encode())
    if frame.height:
        digest.update(frame.hash_rows(seed=0).to_numpy().tobytes())  # stable within a Polars version: in code_version
    return digest.hexdigest()[:16]


def _merge(old: pl.DataFrame | None, new: pl.DataFrame | None, dirty: set[str]) -> pl.DataFrame:
    """``old``'s rows of the partitions not in ``dirty``, then ``new``'s rows."""
    frames = []
    if old is not None and not old.is_empty():
        frames.append(old.filter(~_PARTITION.is_in(sorted(dirty))) if dirty else old)
    if new is not None and not new.is_empty():
        frames.append(new)
    frames = [frame for frame in frames if not frame.is_empty()]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


class _Pngs(Mapping):
    """{name: PNG bytes} of figures by their keys: drawn in this reduce, or read back from the store
    only when the report asks for one."""

    def __init__(self, store: Store, drawn: dict[str, bytes], keys: dict) -> None:
        self.store, self.drawn, self.keys = store, drawn, dict(keys)

    def __getitem__(self, name: object) -> bytes:
        key = self.keys[name]
        if key not in self.drawn:
            self.drawn[key] = self.store.get(key)
        return self.drawn[key]

    def __contains__(self, name: object) -> bool:  # without reading the figure
        return name in self.keys

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _read_index(store: Store) -> dict:
    """``reduced/index.json``, what the last reduce read and wrote, or {} (none, unreadable)."""
    try:
        return json.loads(store.get(REDUCED_INDEX))
    except (FileNotFoundError, ValueError):
        return {}


def _stored(store: Store, key: str) -> pl.DataFrame | None:
    try:
        return pl.read_parquet(io.BytesIO(store.get(key)))
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - an unreadable table is rebuilt
        log.warning("%s unreadable (%s): rebuilt from the shards", store.url(key), type(exc).__name__)
        return None


def reduce_plan(
    plan: Plan, store: Store, make_plots: bool = True, settings: dict | None = None, compare_epochs: int | None = None
) -> ReduceResult:
    """Build ``reduced/``, ``plots/`` and (with ``make_plots``) ``reports/index.html`` from the
    complete checkpoints of ``plan``; ``settings`` (the config's numbers settings) are shown in the
    report; ``compare_epochs`` (the config's): a study's runs compared over each run's first N epochs.

    Incremental: ``reduced/index.json`` records, per checkpoint, a hash of the shards the last reduce
    read, and per table and figure a hash of its content. Only the shards of checkpoints whose hash
    changed are read; their rows replace theirs in the stored tables; a figure is drawn only when
    the rows it draws (and the figures' code) changed; nothing unchanged is written. Without an
    index (older outputs), with other settings or another version of this code, everything is
    rebuilt once.

    A checkpoint is (run, epoch): a study (``{run}`` in ``checkpoints``) reduces every run's
    complete checkpoints into the same tables (``run`` column), with plots per run under
    ``plots/runs/<run>/`` and the runs compared in ``plots/runs_compared.png``.

    A shard whose data is unreadable counts as missing: its completion record is removed (the
    next run recomputes it), its checkpoint (or point of a weight path) is incomplete, and
    ``result.unreadable`` lists it. A weight-path point with a shard missing is left out of the
    tables; its checkpoint's own rows are not."""
    code = code_version()
    index = _read_index(store)
    fresh = index.get("code") == code and index.get("settings") == plan.settings_hash and index.get("hashes") == plan.hashes
    # the tables as the last reduce wrote them (a constant number of reads, whatever the history); one
    # missing or unreadable (deleted by hand, a partial copy): everything is rebuilt from the shards
    old = {key: _stored(store, key) for key in index.get("files", {})
           if key.startswith("reduced/") and key.endswith(".parquet")} if fresh else {}  # fmt: skip
    if any(table is None for table in old.values()):
        log.info("%s: a reduced table is gone or unreadable; rebuilding every table from the shards", store.url(REDUCED_INDEX))
        fresh, old = False, {}
    stored_files: dict[str, str] = index.get("files", {}) if fresh else {}
    before: dict[str, str] = index.get("partitions", {}) if fresh else {}
    partitions = _partitions(plan)
    changed = {key for key, value in partitions.items() if before.get(key) != value}
    rows, unreadable = _read_rows(plan, store, changed)
    if unreadable:  # their checkpoints lost a shard: read again what is left of them
        partitions = _partitions(plan)
        changed = {key for key, value in partitions.items() if before.get(key) != value}
    dirty = changed | (set(before) - set(partitions))
    incomplete = plan.incomplete_checkpoints()
    complete = [c.key for c in plan.checkpoints if c.key not in incomplete]
    keys = [*metrics.CHECKPOINT_KEYS, "layer"]
    # the changed checkpoints' per-layer columns, each measure's joined onto the first's rows
    new_curves = None
    parts = [part for measure in plan.measures if (part := measure.curve_columns(rows)) is not None]
    if parts and not parts[0].is_empty():
        new_curves = parts[0]
        for part in parts[1:]:
            new_curves = new_curves.join(part, on=keys, how="left")
        # the settings hash on every reduced row: a table left from other settings is visible
        new_curves = new_curves.with_columns(pl.lit(plan.settings_hash).alias("settings"))
    curves = _merge(old.get(REDUCED_CURVES), new_curves, dirty)
    curves = curves.sort(keys) if not curves.is_empty() else curves
    context = ReduceContext(plan, store, rows, curves, complete, make_plots)
    tables: dict[str, pl.DataFrame] = {}
    order: dict[str, Measure] = {}
    for measure in plan.measures:
        for key, table in measure.tables(context).items():
            tables[key], order[key] = table, measure
    for key in sorted(set(tables) | (set(old) - {REDUCED_CURVES})):
        merged = _merge(old.get(key), tables.get(key), dirty)  # the stored rows stay in order: new rows need ordering
        tables[key] = order[key].order_table(key, merged) if key in order and not merged.is_empty() else merged
    context.tables = tables
    complete_epochs = sorted({epoch for _, epoch in complete}) if plan.is_study else [epoch for _, epoch in complete]
    result = ReduceResult(curves, complete_epochs, plan.incomplete_epochs(), unreadable=unreadable,
                          complete_checkpoints=complete, incomplete_checkpoints=incomplete,
                          incomplete_path_points=plan.incomplete_path_points())  # fmt: skip
    result.tables = {key: table for key, table in tables.items() if not table.is_empty()}
    files: dict[str, str] = {}  # key -> content hash, for the index

    def write_table(key: str, table: pl.DataFrame) -> None:
        digest = _frame_hash(table)
        files[key] = digest
        if stored_files.get(key) != digest or not fresh:
            if store.put_if_changed(key, parquet_bytes(table)):
                result.written.append(key)

    if complete and not curves.is_empty():
        write_table(REDUCED_CURVES, curves)
    for key, table in result.tables.items():
        write_table(key, table)
    figures: list[Figure] = []
    metrics_seen = _metrics_fingerprints(plan, store) if complete else {}
    sources = _run_sources(plan.checkpoints)
    if complete and make_plots:  # per checkpoint: its own rows (alpha 1); the weight paths have their plots
        for run in dict.fromkeys(run for run, _ in complete):  # one set of plots per run of a study
            run_curves = metrics.plain(curves.filter(pl.col("run") == run))
            title = run_title(run).rstrip(": ")
            figures.append(Figure(layer_curves_plot_key(run), run_curves, lambda c=run_curves, t=title: plots.layer_curves_png(
                c, title=t, layer_names=plan.layer_names)))  # fmt: skip
            # with the run's clean and corrupted accuracy and its stages, read when drawn: drawn again
            # when the curves or the metrics' listing change
            figures.append(Figure(dynamics_plot_key(run), run_curves, lambda c=run_curves, t=title, f=sources[run][1]: (
                plots.dynamics_png(c, title=t, layer_names=plan.layer_names, run_metrics=_run_metrics_or_none(f, store))),
                extra=metrics_seen.get(run, "")))  # fmt: skip
    paths = path_outputs(curves, make_plots, plan.layer_names)
    figures += paths.figures
    result.extra_tables = paths.tables
    measure_status: dict = {}
    for measure in plan.measures:
        reduced = measure.reduce(context)
        figures += reduced.figures
        result.extra_tables.update(reduced.report_tables)
        result.report_fields.update(reduced.report)
        measure_status.update(reduced.status)
    plot_keys: set[str] = set()  # one listing of plots/ for the figures and the report: filled by the first _draw
    drawn = _draw(store, figures, stored_files, files, code, result, partitions, plot_keys)
    titled = {figure.title: figure.key for figure in figures if figure.title}
    result.path_plots = _Pngs(store, drawn, titled)  # type: ignore[assignment]
    result.figure_keys = titled
    if isinstance(result.report_fields.get("flow_plots"), dict):  # {epoch: key}: bytes only when the report asks
        result.report_fields["flow_plots"] = _Pngs(store, drawn, result.report_fields["flow_plots"])
    outputs = _Pngs(store, drawn, {figure.key: figure.key for figure in figures})
    if compare_epochs is not None and not plan.is_study:
        log.warning("compare_epochs: %d ignored: it limits a study's runs compared, and these checkpoints are one "
                    "run (no {run} in checkpoints): remove compare_epochs from the config", compare_epochs)  # fmt: skip
    if complete and (not fresh or dirty or metrics_seen != index.get("metrics")):
        # finetuning runs with metrics/ beside their checkpoints: the robustness link
        robustness_keys, table, result.robustness_summary = _robustness(store, metrics.plain(curves), plan.checkpoints,
                                                                        plan.depth, make_plots, plan.layer_names)  # fmt: skip
        result.written += robustness_keys
        if plot_keys:  # the report finds the robustness figure in the listing it shares
            plot_keys.update(key for key in robustness_keys if key.startswith(f"{PLOTS}/"))
    else:
        table = _stored(store, REDUCED_ROBUSTNESS) if complete and index.get("robustness") else None
        table = table if table is not None else pl.DataFrame()
    if complete and plan.is_study:
        result.runs_compared = runs_compared(metrics.plain(curves), table, plan.depth, compare_epochs, plan.runs)
        if make_plots and not result.runs_compared.is_empty():
            compared = result.runs_compared
            drawn.update(_draw(store, [Figure(RUNS_COMPARED_PLOT, compared, lambda: plots.runs_compared_png(
                compared, robustness.spread_layers(plan.depth)))], stored_files, files, code, result, listed=plot_keys))  # fmt: skip
    status = {
        "settings": plan.settings_hash,
        "complete_epochs": result.complete_epochs,
        "incomplete_epochs": {str(k): v for k, v in sorted(result.incomplete_epochs.items())},
    }
    if result.incomplete_path_points:  # left out of the tables until a rerun computes them
        status["incomplete_path_points"] = result.incomplete_path_points
    status.update(measure_status)  # e.g. the hash the kNN table is of
    if plan.incomplete_measures():  # measures that do not gate a checkpoint: their units still to compute
        status["incomplete_measures"] = plan.incomplete_measures()
    if plan.is_study:  # a study: each run's epochs, which are complete, and the shards missing of the others
        status["runs"] = {
            run: {"epochs": epochs,
                  "complete_epochs": [epoch for done_run, epoch in complete if done_run == run],
                  "incomplete_epochs": {str(epoch): count for (missing_run, epoch), count in sorted(incomplete.items())
                                        if missing_run == run}}  # fmt: skip
            for run, epochs in plan.runs.items()
        }
    status_changed = _stored_status(store) != status
    if make_plots:  # rewritten only when its bytes change (the settings shown may change alone)
        result.written += write_report(store, plan, result, outputs, settings or {}, plot_keys or None)
    if result.written or status_changed:
        stamped = {**status, "reduced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        store.put(REDUCED_STATUS, json.dumps(stamped, indent=1).encode())
        result.written.append(REDUCED_STATUS)
    new_index = {"code": code, "settings": plan.settings_hash, "hashes": plan.hashes, "partitions": partitions,
                 "files": files, "metrics": metrics_seen, "robustness": bool(result.written and
                 REDUCED_ROBUSTNESS in result.written) or bool(index.get("robustness") and fresh),
                 "report": make_plots or bool(index.get("report") and fresh)}  # fmt: skip
    if new_index != index:
        store.put(REDUCED_INDEX, json.dumps(new_index, indent=1, sort_keys=True).encode())
    plan.keep_checks(store)
    return result


def _draw(store: Store, figures: list[Figure], stored: dict[str, str], files: dict[str, str], code: str,
          result: ReduceResult, partitions: dict[str, str] | None = None, listed: set[str] | None = None) -> dict[str, bytes]:  # fmt: skip
    """Draw and write the figures whose rows (or code) changed since they were drawn, or whose file
    is gone; record every figure's hash in ``files``. A figure of one checkpoint (``partition``) is
    keyed by its checkpoint's shard hash instead of its rows (its rows derive from those shards
    alone): no hash over the rows of every old epoch. ``listed``: the keys under ``plots/``, listed
    here when empty (one listing per reduce), the figures written added. Returns {key: PNG} of those drawn."""
    present = set() if listed is None else listed
    if figures and not present:
        present.update(store.list(PLOTS))
    drawn = {}
    for figure in figures:
        if figure.partition and partitions and figure.partition in partitions:
            digest = hashlib.sha256("|".join([partitions[figure.partition], figure.extra, code]).encode()).hexdigest()[:16]
        else:
            digest = _frame_hash(figure.rows() if callable(figure.rows) else figure.rows, figure.extra, code)
        files[figure.key] = digest
        if stored.get(figure.key) == digest and figure.key in present:
            continue
        drawn[figure.key] = figure.render()
        if store.put_if_changed(figure.key, drawn[figure.key]):
            result.written.append(figure.key)
        present.add(figure.key)
    return drawn


def _run_metrics_or_none(folder: str, store: Store) -> pl.DataFrame | None:
    """The finetuning metrics of the run at ``folder`` for its dynamics figure, or None (none, or
    unreadable: logged; the robustness link names the problem)."""
    try:
        return read_run_metrics(folder, store.storage_options)
    except StorageError as exc:
        log.warning("dynamics drawn without the finetuning metrics of %s: %s", redact(folder), redact(str(exc)))
        return None


def _metrics_fingerprints(plan: Plan, store: Store) -> dict[str, str]:
    """{run: a fingerprint of its finetuning metrics' listing} (one listing per run): the robustness
    link is recomputed when a run's metrics change, not read on every reduce."""
    return {label: metrics_fingerprint(folder, store.storage_options) for label, (_, folder, _) in _run_sources(plan.checkpoints).items()}


def runs_compared(
    curves: pl.DataFrame, robustness_table: pl.DataFrame, depth: int, first_epochs: int | None = None,
    run_epochs: dict[str, list[int]] | None = None,
) -> pl.DataFrame:
    """The paper's Fig. 6 view of a study, per (run, epoch): ``forgetting_std_across_layers`` (the
    robustness link's spread, layers 2..depth) and, where the run has finetuning metrics,
    ``corrupted_accuracy_mean``; each run's complete epochs among its first ``first_epochs``
    checkpoint epochs (``run_epochs``: every run's epochs, complete or not; None: all epochs)."""
    if curves.is_empty():
        return pl.DataFrame()
    spread = pl.concat([
        robustness.forgetting_spread(rows, depth).with_columns(pl.lit(run[0]).alias("run"))
        for run, rows in curves.group_by("run", maintain_order=True)
    ])  # fmt: skip
    if robustness_table.is_empty():
        accuracy = pl.DataFrame(schema={"run": pl.String, "epoch": pl.Int64, "corrupted_accuracy_mean": pl.Float64})
    else:
        accuracy = robustness_table.select("run", "epoch", "corrupted_accuracy_mean")
    return (
        spread.join(accuracy, on=["run", "epoch"], how="left")
        .select("run", "epoch", "checkpoint", "forgetting_std_across_layers", "corrupted_accuracy_mean", "n_layers")
        .filter(pl.struct("run", "epoch").is_in(_first_epochs(curves, first_epochs, run_epochs)))
        .sort("run", "epoch")
    )


def _first_epochs(curves: pl.DataFrame, first_epochs: int | None, run_epochs: dict[str, list[int]] | None) -> pl.Series:
    """(run, epoch) of each run's first ``first_epochs`` checkpoint epochs (complete or not, so that
    runs line up by epoch); every (run, epoch) of ``curves`` when ``first_epochs`` is None."""
    if run_epochs is None:
        run_epochs = {run[0]: rows["epoch"].to_list() for run, rows in curves.group_by("run")}
    kept = [{"run": run, "epoch": epoch} for run, epochs in run_epochs.items()
            for epoch in sorted(set(epochs))[:first_epochs]]  # fmt: skip
    return pl.Series(kept, dtype=pl.Struct({"run": pl.String, "epoch": pl.Int64}))


def _run_sources(checkpoints: list[Checkpoint]) -> dict[str, tuple[str, str, list[int]]]:
    """{run: (run, run folder, epochs)}; the run is its name in a study (``{run}``), else "" (one
    run: the checkpoint pattern's fixed folder), as in every other reduced table."""
    sources: dict[str, tuple[str, str, list[int]]] = {}
    for checkpoint in checkpoints:
        folder = run_folders([checkpoint])[0]
        sources.setdefault(checkpoint.run, (checkpoint.run, folder, []))[2].append(checkpoint.epoch)
    return sources


# what the robustness link reads of a finetuning run's metrics (invariance finetune writes them all)
ROBUSTNESS_METRICS = ("epoch", "clean_accuracy", "corrupted_accuracy", "corrupted_loss")


def _readable_run_metrics(sources: dict[str, tuple[str, str, list[int]]], storage_options: dict) -> dict[str, pl.DataFrame]:
    """{run label: its finetuning metrics} for the runs that have them; an unreadable metrics
    file is reported and its run skipped, so that it never stops the rest of the reduce."""
    found = {}
    for label, (_, folder, _) in sources.items():
        try:
            run_metrics = read_run_metrics(folder, storage_options)
        except StorageError as exc:
            log.warning("robustness link skipped for %s: %s", redact(folder), redact(str(exc)))
            continue
        if run_metrics is None:
            continue
        missing = [column for column in ROBUSTNESS_METRICS if column not in run_metrics.columns]
        if missing:
            log.warning("robustness link skipped for %s: its finetuning metrics (metrics/epoch=NN.parquet) lack the columns "
                        "%s; write them with invariance finetune, or give each file the columns %s", redact(folder), missing,
                        list(ROBUSTNESS_METRICS))  # fmt: skip
            continue
        found[label] = run_metrics
    return found


def _robustness(
    store: Store, curves: pl.DataFrame, checkpoints: list[Checkpoint], depth: int, make_plots: bool,
    layer_names: list[str] | None = None,
) -> tuple[list[str], pl.DataFrame, str]:
    """The robustness table, its correlation and plot, and the search over hypotheses, for the runs
    with finetuning metrics: (the keys written, the robustness table, the search's summary)."""
    curves = metrics.with_path_columns(curves)
    sources = _run_sources(checkpoints)
    run_metrics = _readable_run_metrics(sources, store.storage_options)
    # each run's own curve rows: a study's runs share epochs
    run_curves = {
        label: curves.filter((pl.col("run") == sources[label][0]) & pl.col("epoch").is_in(sources[label][2]))
        for label in run_metrics
    }
    try:
        tables = [robustness.robustness_table(run_curves[label], frame, depth, label) for label, frame in run_metrics.items()]
        table = pl.concat(tables) if tables else pl.DataFrame()
        if table.is_empty():
            return [], table, ""
        correlation = robustness.robustness_correlation(table)
        outputs = {REDUCED_ROBUSTNESS: parquet_bytes(table), REDUCED_ROBUSTNESS_CORRELATION: parquet_bytes(correlation)}
        search = _robustness_search(run_curves, run_metrics)
        if not search.is_empty():
            outputs[REDUCED_ROBUSTNESS_SEARCH] = parquet_bytes(search)
            outputs[REDUCED_ROBUSTNESS_EARLY] = parquet_bytes(pl.concat([
                robustness_search.early_epochs(run_curves[run], frame, run, robustness_search.strongest(search.filter(
                    pl.col("run") == run), n=3)) for run, frame in run_metrics.items()]))  # fmt: skip
    except pl.exceptions.PolarsError as exc:  # metrics of an unexpected shape (a per-corruption column, types)
        log.warning("robustness link skipped: the finetuning metrics do not have the expected form (%s); each "
                    "metrics/epoch=NN.parquet needs one row with the numeric columns %s", exc, list(ROBUSTNESS_METRICS))  # fmt: skip
        return [], pl.DataFrame(), ""
    if make_plots:
        outputs[ROBUSTNESS_PLOT] = robustness.robustness_png(table, correlation, depth, layer_names=layer_names)
    summary = robustness_search.summary(search, where=store.url(REDUCED_ROBUSTNESS_SEARCH)) if not search.is_empty() else ""
    return [key for key, data in outputs.items() if store.put_if_changed(key, data)], table, summary


def _robustness_search(run_curves: dict[str, pl.DataFrame], run_metrics: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """The paper's search over hypotheses, per run (empty without runs)."""
    searches = [robustness_search.search(run_curves[run], metrics, run) for run, metrics in run_metrics.items()]
    return pl.concat(searches) if searches else pl.DataFrame()


def _stored_status(store: Store) -> dict | None:
    """``reduced/status.json`` without its time stamp, or None when absent or unreadable."""
    try:
        stored = json.loads(store.get(REDUCED_STATUS))
    except (FileNotFoundError, ValueError):
        return None
    stored.pop("reduced_at", None)
    return stored
