"""The reducer: Polars over the completed shards -> curves, flow, status and plots.

Only checkpoints whose every shard is complete are reduced; the others are reported as
incomplete rather than averaged over what happens to be there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import polars as pl

from invariance import metrics, plots, robustness
from invariance.layout import PLOTS, REDUCED_CURVES, REDUCED_FLOW, REDUCED_STATUS, flow_plot_key
from invariance.plan import Plan
from invariance.storage import Store, parquet_bytes


@dataclass
class ReduceResult:
    """The reduced tables and what they cover."""

    curves: pl.DataFrame
    flow: pl.DataFrame
    complete_epochs: list[int]
    incomplete_epochs: dict[int, int]
    written: list[str] = field(default_factory=list)


def reduce_plan(plan: Plan, store: Store, make_plots: bool = True) -> ReduceResult:
    """Build ``reduced/`` and ``plots/`` from the complete checkpoints of ``plan``."""
    incomplete = plan.incomplete_epochs()
    complete = [c.epoch for c in plan.checkpoints if c.epoch not in incomplete]
    stir = store.read_parquet([u.data_key(plan.settings) for u in plan.stir if u.epoch in complete])
    cka = store.read_parquet([u.data_key(plan.settings) for u in plan.cka if u.epoch in complete])
    if complete:
        # shards are keyed by epoch; the name is the plan's, so that rows written under another
        # naming (an older release) still group with their epoch
        names = {c.epoch: c.name for c in plan.checkpoints}
        stir, cka = (
            frame.with_columns(pl.col("epoch").replace_strict(names, return_dtype=pl.String).alias("checkpoint"))
            for frame in (stir, cka)
        )
        # the settings hash on every reduced row: a table left from other settings is visible
        settings = pl.lit(plan.settings).alias("settings")
        curves = metrics.curves(stir, cka).with_columns(settings)
        flow = metrics.flow_table(stir).with_columns(settings)
    else:
        curves, flow = pl.DataFrame(), pl.DataFrame()
    result = ReduceResult(curves, flow, complete, incomplete)
    outputs: dict[str, bytes] = {}
    if complete:
        outputs[REDUCED_CURVES] = parquet_bytes(curves)
        outputs[REDUCED_FLOW] = parquet_bytes(flow)
    if complete and make_plots:
        outputs[f"{PLOTS}/layer_curves.png"] = plots.layer_curves_png(curves)
        outputs[f"{PLOTS}/dynamics.png"] = plots.dynamics_png(curves)
        outputs.update({flow_plot_key(epoch): plots.flow_heatmap_png(flow, epoch) for epoch in complete})
    # only what changed is written: a rerun with nothing new leaves every file as it was
    result.written += [key for key, data in outputs.items() if store.put_if_changed(key, data)]
    if complete:  # finetuning runs with metrics/ beside their checkpoints: the robustness link
        result.written += robustness.reduce_robustness(store, curves, plan.checkpoints, plan.depth, make_plots)
    status = {
        "settings": plan.settings,
        "complete_epochs": complete,
        "incomplete_epochs": {str(k): v for k, v in sorted(incomplete.items())},
    }
    if result.written or _stored_status(store) != status:
        stamped = {**status, "reduced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        store.put(REDUCED_STATUS, json.dumps(stamped, indent=1).encode())
        result.written.append(REDUCED_STATUS)
    return result


def _stored_status(store: Store) -> dict | None:
    """``reduced/status.json`` without its time stamp, or None when absent or unreadable."""
    try:
        stored = json.loads(store.get(REDUCED_STATUS))
    except (FileNotFoundError, ValueError):
        return None
    stored.pop("reduced_at", None)
    return stored
