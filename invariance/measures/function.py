"""A user's own measure: ``measures: [{function: "lab_measures:my_similarity"}]``.

The function takes the features of pt and of ft at one layer each on the same n eval images, as
NumPy float64 arrays ``[n, d_a]`` and ``[n, d_b]`` (tokens flattened, as ``token_policy`` gives
them), and returns a float. ``per: layer`` (the default) calls it once per layer, f(pt[i], ft[i]);
``per: pair`` once per layer pair, f(pt[i], ft[j]). It runs on the workers like the built-ins (its
module must be importable there: in the job's working_dir or installed), one shard per point.

Its shards are keyed by a hash of the run's settings, its name, ``per`` and a fingerprint of its
module's source (editing the function computes anew). A function that raises or returns something
other than a finite number fails its shard with a MeasureError naming it: nothing is written or
marked done. Reduced: ``reduced/<name>.parquet`` and a pt x ft heatmap per checkpoint.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any, Callable, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from invariance.config import factory_fingerprint
from invariance.core.workspace import RunSpec, Workspace
from invariance.errors import ConfigError, MeasureError
from invariance.io.layout import Unit, reduced_table_key
from invariance.measures.base import (
    FUNCTION_ENTRY, MEASURES, NAME_PATTERN, Measure, MeasureOutputs, PlanSetup, ReduceContext, check_finite_features,
    write_shard,
)  # fmt: skip
from invariance.measures.pairwise import heatmap_figures, pair_schema, pair_table


class FunctionEntry(BaseModel):
    """An entry ``{function: "module:fn", name: ..., per: layer | pair}`` of ``measures:``."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    name: str | None = None  # the measure's name: its shards' folder, column and table; default: the function's
    per: Literal["layer", "pair"] = "layer"


def load_function(spec: str, where: str) -> Callable[..., Any]:
    """The callable ``module:function``; ConfigError naming ``where`` when it cannot be imported."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: named, never a raw traceback
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); it must be "
                          "importable where the run starts and on every worker (the job's working_dir, or installed)") from None  # fmt: skip
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{where}: module {module_name!r} has no function {attribute!r}")
    return function


class FunctionMeasure(Measure):
    """A measure computed by a user's function of two feature matrices."""

    def __init__(self, entry: dict[str, Any] | None = None, where: str = "measures") -> None:
        try:
            parsed = FunctionEntry.model_validate(entry or {})
        except ValidationError as exc:
            details = "; ".join(f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{details} (an entry of measures: {{function: 'module:fn', name: ..., per: layer | pair}})") from None
        name = parsed.name or parsed.function.rpartition(":")[2].lower()
        if not NAME_PATTERN.match(name):
            raise ConfigError(f"{where}.name: {name!r} is not a measure name (lowercase letters, digits and _, "
                              "starting with a letter, at most 40); give name: ...")  # fmt: skip
        if name in MEASURES:
            raise ConfigError(f"{where}.name: {name!r} is a built-in measure's name; give your function another (name: ...)")
        self.name = name
        self.description = f"{name} shards ({parsed.function}, per {parsed.per})"
        self.function, self.per = parsed.function, parsed.per
        self.schema = pair_schema(name)
        super().__init__(parsed.model_dump(), where)

    def settings(self) -> dict[str, Any]:
        return {"function": self.function, "per": self.per}

    def hashes(self, setup: PlanSetup) -> dict[str, str]:
        """Its settings and the fingerprint of its module's source: editing the function computes anew."""
        load_function(self.function, f"{self.where}.function")  # importable where the run starts
        source = factory_fingerprint(self.function, f"{self.where}.function")
        from invariance.config import settings_hash

        return {self.name: settings_hash({"run": setup.run_hash, "measure": self.name, "settings": self.settings(),
                                          "source": source})}  # fmt: skip

    def priority(self, unit: Unit) -> int:
        return 60

    def rows(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> list[dict[str, Any]]:
        function = load_function(self.function, f"{self.where}.function")
        context = workspace.context(spec, unit.checkpoint_url, unit.alpha, unit.extra, unit.checkpoint_fingerprint)
        features = {}
        for model in ("pt", "ft"):
            found = context.clean_features(model)
            for layer, value in found.items():
                check_finite_features(unit, layer, value)
            features[model] = {layer: value.flatten(1).double().cpu().numpy() for layer, value in found.items()}
        pairs = [(i, i) for i in context.layers] if self.per == "layer" else \
            [(i, j) for i in context.layers for j in context.layers]  # fmt: skip
        return [{"model_a": "pt", "layer_a": i, "model_b": "ft", "layer_b": j,
                 self.name: self.call(function, features["pt"][i], features["ft"][j], i, j), "n_samples": context.n_samples}
                for i, j in pairs]  # fmt: skip

    def call(self, function: Callable[..., Any], a: np.ndarray, b: np.ndarray, layer_a: int, layer_b: int) -> float:
        """``function(a, b)`` as a finite float; MeasureError naming the measure, the function and the layers."""
        where = f"measure {self.name} ({self.function}) at pt layer {layer_a}, ft layer {layer_b}"
        try:
            value = function(a, b)
        except Exception as exc:  # noqa: BLE001 - the user's code: named, never a raw traceback
            raise MeasureError(f"{where} raised {type(exc).__name__}: {exc} (features [n, d]: {a.shape} and {b.shape}); "
                               "nothing of this shard is written") from None  # fmt: skip
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MeasureError(f"{where} returned {type(value).__name__} {str(value)[:80]!r}, not a number") from None
        if not math.isfinite(number):
            raise MeasureError(f"{where} returned {number}, not a finite number; nothing of this shard is written")
        return number

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        started = time.time()
        return write_shard(spec, self, unit, self.rows(spec, unit, workspace), started, function=self.function)

    def tables(self, context: ReduceContext) -> dict[str, pl.DataFrame]:
        return {reduced_table_key(self.name): pair_table(context.rows[self.name], [self.name], context.plan.hashes[self.name])}

    def reduce(self, context: ReduceContext) -> MeasureOutputs:
        what = f"{self.name} between pretrained and finetuned layers" if self.per == "pair" else \
            f"{self.name} of pretrained and finetuned layer i"  # fmt: skip
        table = context.tables.get(reduced_table_key(self.name), pl.DataFrame())
        return MeasureOutputs(figures=heatmap_figures(context, self.name, table, self.name, f"{self.name} ({self.function})", what))


FUNCTION_ENTRY["function"] = FunctionMeasure
