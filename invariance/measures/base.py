"""The surface of a measure, and the registry the engine iterates (as timm registers models).

A measure is one module of ``invariance/measures/`` holding a ``Measure`` subclass decorated with
``@register_measure``. It declares:

- ``name``: the folder of its shards and records (``<name>/settings=<hash>/...``), its name in
  ``measures:`` and in the report; how it is turned on: ``always`` (every run), ``section`` (a
  section of the run config, e.g. ``knn``) or ``listed`` (an entry of ``measures:``);
- what it needs: ``units(setup)``, the units it plans from the run's points (each checkpoint, and
  each point of a weight path: ``setup.points``), layers and seeds; ``hashes(setup)``, the hashes
  keying them (default: its own, from the run's settings hash and its own settings); what a unit
  waits for (``waits_for``: STIR's pt-reference shards wait for the pretrained inversion);
- ``schema``: the columns of its rows (``invariance.io.schemas``); ``rows(spec, unit, workspace)``
  computes one unit's rows (``compute`` writes them once with the completion record);
- how its rows reduce per (run, checkpoint, epoch, alpha): ``curve_columns`` (per-layer columns of
  ``reduced/curves.parquet``) and ``reduce`` (its own tables, figures, report sections).

The engine plans, runs, keys, records, reduces and reports every measure through this surface; it
never names one. A new measure is its module, its registration in ``invariance/measures/__init__``
and its tests.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import polars as pl

from invariance import __version__
from invariance.config import RunConfig, settings_hash
from invariance.core.models import FeatureModel
from invariance.core.workspace import RunSpec, Workspace
from invariance.errors import ConfigError, NumericsError
from invariance.io.checkpoints import Checkpoint
from invariance.io.layout import PLAIN_ALPHA, PointUnit, Unit
from invariance.io.schemas import Schema, rows_frame
from invariance.io.storage import Store

# a measure's name: the folder of its shards, a column value, a file name
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass
class PlanSetup:
    """What a measure plans its units from (``engine.plan.make_plan`` builds it once per plan)."""

    config: RunConfig
    model: FeatureModel | None  # the pretrained model as checked before any task; None: checked before (``checked``)
    checkpoints: list[Checkpoint]
    # every point: (checkpoint, alpha), the checkpoints themselves (alpha 1) first, then the points
    # of their weight paths (``interpolation``)
    points: list[tuple[Checkpoint, float]]
    extra: str  # interpolation.extra ("keep" without interpolation)
    layers: list[int]
    fingerprints: dict[str, str]  # {"pretrained": ..., "eval_images": ...}
    run_hash: str  # the settings hash of the run (every setting that changes STIR and CKA)
    # what measures' checks found ({"knn": the bank's fingerprint}), kept with the plan's verdict on
    # these inputs: a later plan of the same inputs reads it instead of checking again (``model`` None)
    checked: dict[str, Any] = field(default_factory=dict)

    def extra_at(self, alpha: float) -> str:
        """``interpolation.extra`` of a point of a weight path; "keep" for a checkpoint itself (alpha
        1, whose keys and units are the same with or without interpolation)."""
        return self.extra if alpha != PLAIN_ALPHA else "keep"


@dataclass
class ReduceContext:
    """What a measure reduces from.

    The reduce is incremental: a *partition* is one checkpoint (run, epoch), or (run "", epoch
    None) for the rows of no checkpoint (the pretrained kNN shard). ``rows``: every measure's rows
    of the partitions whose shards changed since the last reduce (a checkpoint's rows of gating
    measures once all its gating shards are complete), which ``Measure.tables`` turns into table
    rows; ``tables`` and ``curves``: the whole tables after the engine merged those rows into the
    stored ones, which ``Measure.reduce`` draws and reports from."""

    plan: Any  # engine.plan.Plan
    store: Store
    rows: dict[str, pl.DataFrame]
    curves: pl.DataFrame
    complete: list[tuple[str, int]]  # (run, epoch) of the complete checkpoints
    make_plots: bool
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # storage key -> the whole reduced table


@dataclass
class Figure:
    """A figure to draw, drawn only when what it draws changed: ``rows`` (and ``extra``, e.g. a
    colour range shared with other figures) are hashed with the plotting code's version; the
    reducer calls ``render`` only when that hash differs from the one recorded for ``key``.
    ``rows`` may be a function giving them: called only when they are hashed (a figure keyed by
    its ``partition`` never is), so that a figure per epoch costs nothing while its epoch is unchanged."""

    key: str  # where the PNG goes
    rows: pl.DataFrame | Callable[[], pl.DataFrame]
    render: Callable[[], bytes]
    title: str | None = None  # the report's title, for a figure the report shows
    extra: str = ""
    # the checkpoint whose shards alone its rows derive from (``partition_key``): then keyed by that
    # checkpoint's shard hash (with ``extra``), its rows not hashed
    partition: str = ""


@dataclass
class MeasureOutputs:
    """What a measure's reduce gives: figures to draw, what the report shows, what
    ``reduced/status.json`` says."""

    figures: list[Figure] = field(default_factory=list)
    report_tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # report title -> table
    report: dict[str, Any] = field(default_factory=dict)  # fields of analysis.report.ReportInputs
    status: dict[str, Any] = field(default_factory=dict)  # entries of reduced/status.json


class Measure:
    """A representation measure between the pretrained model and each point of the finetuning run."""

    name: str = ""
    description: str = ""  # one line: what its units are ("STIR shards", "Procrustes shards")
    always: ClassVar[bool] = False  # on in every run
    section: ClassVar[str | None] = None  # on when this section of the run config is set
    listed: ClassVar[bool] = False  # on when ``measures:`` lists it by name
    # its shards must be complete for a checkpoint (or a point of its path) to be reduced
    gates_checkpoint: ClassVar[bool] = False
    schema: ClassVar[Schema] = {}
    nullable: ClassVar[frozenset[str]] = frozenset()  # float columns that may hold null in a complete shard
    version: ClassVar[int] = 1  # in its own hash: raise it when its numbers change

    def __init__(self, entry: dict[str, Any] | None = None, where: str = "") -> None:
        self.entry = dict(entry or {})
        self.where = where or self.name  # the config key naming it in errors

    # --- planning ---------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What of its own configuration changes its numbers (in its hash)."""
        return {key: value for key, value in self.entry.items() if key != "name"}

    def hashes(self, setup: PlanSetup) -> dict[str, str]:
        """{hash name: hash} of the hashes keying its units: its own, from the run's settings
        hash, its name, version and settings."""
        return {self.name: settings_hash({"run": setup.run_hash, "measure": self.name, "version": self.version,
                                          "settings": self.settings()})}  # fmt: skip

    def units(self, setup: PlanSetup) -> list[Unit]:
        """One unit per point (each checkpoint, each point of its weight path)."""
        return [PointUnit(self.name, c.epoch, c.name, c.url, c.fingerprint, alpha, setup.extra_at(alpha), run=c.run)
                for c, alpha in setup.points]  # fmt: skip

    def hash_name(self, unit: Unit) -> str:
        """Which of its hashes keys ``unit``."""
        return self.name

    def point(self, unit: Unit) -> tuple[str, int, float] | None:
        """(run, epoch, alpha) of the point ``unit`` measures; None for a unit of no checkpoint."""
        return (unit.run, unit.epoch, unit.alpha) if isinstance(unit, PointUnit) else None

    def priority(self, unit: Unit) -> int:
        """Its place among the units of one point (lower first: a worker's cached features serve
        consecutive units)."""
        return 50

    def waits_for(self, unit: Unit) -> tuple[Unit, ...]:
        """Units that must be complete before ``unit`` runs."""
        return ()

    def unit_kind(self, unit: Unit) -> tuple[str, str]:
        """(what ``unit`` is, plural, and the word for done): the plan's summary counts per kind."""
        return f"{self.name} shards", "done"

    def has_rows(self, unit: Unit) -> bool:
        """Whether ``unit``'s data is a Parquet shard of ``schema`` (STIR's inversions are not)."""
        return True

    # --- computing --------------------------------------------------------------------------
    def rows(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> list[dict[str, Any]]:
        """One unit's rows: dicts of the columns of ``schema`` that are not the point's identity."""
        raise NotImplementedError

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        """Compute ``unit``, write its shard once and then its completion record; the record key."""
        started = time.time()
        return write_shard(spec, self, unit, self.rows(spec, unit, workspace), started)

    # --- reducing ---------------------------------------------------------------------------
    def normalize(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Its rows as read (older shards lack ``run``, ``alpha``): alpha 1 and run "" filled in."""
        from invariance.analysis.metrics import with_path_columns

        return with_path_columns(frame)

    def curve_columns(self, rows: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        """Per (run, checkpoint, epoch, alpha, layer): the columns it adds to ``reduced/curves.parquet``."""
        return None

    def tables(self, context: ReduceContext) -> dict[str, pl.DataFrame]:
        """{storage key: the rows of its reduced table} from ``context.rows`` (the changed
        partitions): each row carries ``run`` and ``epoch`` (its partition); the engine merges them
        into the stored table and orders it with ``order_table``."""
        return {}

    def order_table(self, key: str, table: pl.DataFrame) -> pl.DataFrame:
        """The merged table ``key`` in its order (a table reduced at once or epoch by epoch is the same)."""
        return table.sort("run", "epoch", "alpha", *[c for c in table.columns if c.endswith(("_a", "_b", "layer"))],
                          nulls_last=False)  # fmt: skip

    def reduce(self, context: ReduceContext) -> MeasureOutputs:
        """Its figures and report sections from the whole tables (``context.tables``)."""
        return MeasureOutputs()


MEASURES: dict[str, type[Measure]] = {}


def register_measure(cls: type[Measure]) -> type[Measure]:
    """Register a built-in measure under ``cls.name`` (decorator); the registry's order is the
    engine's: the order of the plan's lines, of the curves' columns, of the report's sections."""
    if not NAME_PATTERN.match(cls.name):
        raise ValueError(f"measure name {cls.name!r}: lowercase letters, digits and _, starting with a letter")
    if cls.name in MEASURES and MEASURES[cls.name] is not cls:
        raise ValueError(f"a measure named {cls.name!r} is registered already ({MEASURES[cls.name].__module__})")
    MEASURES[cls.name] = cls
    return cls


# the factory of an entry of ``measures:`` with ``function:`` (measures/function.py registers it)
FUNCTION_ENTRY: dict[str, type[Measure]] = {}


def _entry_measure(position: int, entry: Any) -> Measure:
    """The measure of ``measures[position]``: a registered name, ``{name: ..., <options>}`` or
    ``{function: "module:fn", ...}``."""
    where = f"measures[{position}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: give a measure's name (e.g. procrustes) or {{function: 'module:fn'}}, got {entry!r}")
    if "function" in entry:
        return FUNCTION_ENTRY["function"](entry, where)
    name = entry.get("name")
    listed = sorted(name for name, cls in MEASURES.items() if cls.listed)
    if name not in MEASURES or not MEASURES[name].listed:
        on_anyway = {n: ("every run" if c.always else f"the {c.section} section") for n, c in MEASURES.items() if not c.listed}
        hint = f" ({name} is on by {on_anyway[name]})" if name in on_anyway else ""
        raise ConfigError(f"{where}.name: unknown measure {name!r}{hint}; give one of {listed}, or "
                          "{function: 'module:fn'} for your own")  # fmt: skip
    return MEASURES[name](entry, where)


def active_measures(config: RunConfig) -> list[Measure]:
    """The measures of a run, in the registry's order: those on in every run, those whose config
    section is set, then the entries of ``measures:`` in their order. ConfigError names an entry
    that is not a measure, and two entries of one name."""
    measures = [cls() for cls in MEASURES.values() if cls.always or (cls.section and getattr(config, cls.section) is not None)]
    measures += [_entry_measure(position, entry) for position, entry in enumerate(config.measures)]
    seen: dict[str, str] = {}
    for measure in measures:
        if measure.name in seen:
            raise ConfigError(f"{measure.where}: a measure named {measure.name!r} is in the run already ({seen[measure.name]}); "
                              "give it another name (name: ...)")  # fmt: skip
        seen[measure.name] = measure.where
    return measures


def measure_of(measures: Iterable[Measure], unit: Unit) -> Measure:
    """The measure that computes ``unit`` (``unit.measure``) among ``measures``."""
    for measure in measures:
        if measure.name == unit.measure:
            return measure
    raise ConfigError(f"{unit}: no measure {unit.measure!r} in this run's config (measures:, its sections)")


# --- writing shards (every measure writes through these) --------------------------------------
def record_bytes(data_key: str, rows: int, started: float, **identity: Any) -> bytes:
    """A completion record: where the data is, how many rows, who wrote it and when."""
    record = {
        "data": data_key,
        "rows": rows,
        **identity,
        "version": __version__,
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(record, indent=1).encode()


NON_FINITE_HINT = ("check model.mean and model.std (a std of 0 divides by 0), the weights, and that the "
                   "eval images are not all alike; nothing of this shard is written")  # fmt: skip


def check_finite(unit: Unit, frame: pl.DataFrame, nullable: Iterable[str] = (), hint: str = NON_FINITE_HINT) -> None:
    """NumericsError naming the columns holding NaN or inf (or null, outside ``nullable``): such
    rows are never written, nor their unit marked done."""
    allowed = set(nullable)
    bad = {}
    for name, dtype in frame.schema.items():
        if dtype.is_float():
            undefined = pl.lit(False) if name in allowed else pl.col(name).is_null()  # null: not defined there
            count = frame.select((pl.col(name).is_nan() | pl.col(name).is_infinite() | undefined).sum()).item()
            if count:
                bad[name] = count
    if bad:
        described = ", ".join(f"{name} ({count} of {frame.height} rows)" for name, count in bad.items())
        error = NumericsError(f"non-finite values (NaN or inf) in {described}: {hint}")
        error.unit = unit  # type: ignore[attr-defined] - executors print the unit beside the message
        raise error


def check_finite_features(unit: Unit | None, layer: int, *features: Any) -> None:
    """NumericsError when a model's features at ``layer`` hold NaN or inf (a broken model, a std of
    0): a measure that turns them into "undefined" would write a null row and mark it done."""
    for tensor in features:
        if not bool(tensor.isfinite().all()):
            error = NumericsError(f"non-finite features (NaN or inf) at layer {layer}: {NON_FINITE_HINT}")
            error.unit = unit  # type: ignore[attr-defined]
            raise error


def point_identity(spec: RunSpec, unit: Any, settings: str) -> dict[str, Any]:
    """The identity columns of a shard of one point (``io.schemas.POINT_SCHEMA`` and provenance)."""
    return {"settings": settings, "checkpoint": unit.checkpoint, "epoch": unit.epoch, "version": __version__,
            "checkpoint_fingerprint": unit.checkpoint_fingerprint, "run": unit.run, "alpha": float(unit.alpha)}  # fmt: skip


def write_shard(spec: RunSpec, measure: Measure, unit: Any, rows: list[dict[str, Any]], started: float,
                identity: dict[str, Any] | None = None, **record_fields: Any) -> str:  # fmt: skip
    """Write ``rows`` (completed with the point's identity, typed by ``measure.schema``) once,
    then the completion record; returns the record key. Non-finite values: NumericsError, nothing
    written."""
    settings = spec.hash_of(measure.hash_name(unit))
    frame = rows_frame(({**(identity or point_identity(spec, unit, settings)), **row} for row in rows), measure.schema)
    check_finite(unit, frame, measure.nullable)
    data_key = unit.data_key(settings)
    spec.store.put_parquet(data_key, frame)
    record_key = unit.record_key(settings)
    fields = {"checkpoint": unit.checkpoint, "epoch": unit.epoch, "checkpoint_fingerprint": unit.checkpoint_fingerprint,
              "alpha": unit.alpha, **({"run": unit.run} if unit.run else {})}  # fmt: skip
    spec.store.put(record_key, record_bytes(data_key, len(rows), started, **fields, **record_fields))
    return record_key


def partition_key(run: str | None, epoch: int | None) -> str:
    """``run<TAB>epoch`` of a partition of the reduce (a checkpoint); ``<TAB>`` for rows of no checkpoint."""
    return f"{run or ''}\t{'' if epoch is None else epoch}"


def run_title(run: str) -> str:
    """``run <name>: `` before a study run's titles; empty for a single run."""
    return f"run {run}: " if run else ""
