"""The report's page: ``reports/index.html`` assembled from a reduce's tables, figures and the
measures' report sections (``analysis/report.py`` renders it)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import polars as pl

from invariance.analysis import metrics, report
from invariance.engine.plan import Plan
from invariance.errors import StorageError
from invariance.io.layout import (
    REDUCED_ROBUSTNESS_CORRELATION, REDUCED_ROBUSTNESS_SEARCH, REPORT, ROBUSTNESS_PLOT, RUNS_COMPARED_PLOT, dynamics_plot_key,
    layer_curves_plot_key,
)  # fmt: skip
from invariance.io.storage import Store, redact
from invariance.measures.base import run_title

if TYPE_CHECKING:
    from invariance.engine.reduce import ReduceResult

log = logging.getLogger(__name__)


def _stored_table(store: Store, key: str) -> pl.DataFrame:
    """A reduced table written before, or an empty frame when there is none (or it is unreadable)."""
    try:
        return store.read_parquet([key]) if store.exists(key) else pl.DataFrame()
    except StorageError as exc:
        log.warning("report: %s left out (%s)", key, exc)
        return pl.DataFrame()


def write_report(store: Store, plan: Plan, result: "ReduceResult", outputs: dict[str, bytes], settings: dict) -> list[str]:
    """``reports/index.html`` from this reduce's tables and plots; written only when it changed. A
    study shows the runs compared first, then each run's curves and dynamics, then each measure's
    figures (a study: each run's last)."""
    pngs: dict[str, bytes | None] = {}
    if plan.is_study and store.exists(RUNS_COMPARED_PLOT) and not result.runs_compared.is_empty():
        pngs["Runs compared: mean corrupted accuracy and the spread of forgetting across layers (the paper's Fig. 6)"] = (
            store.get(RUNS_COMPARED_PLOT))  # fmt: skip
    for run in dict.fromkeys(run for run, _ in result.complete_checkpoints):
        title = run_title(run)
        pngs[f"{title}Forgetting, learning and CKA divergence per layer"] = outputs.get(layer_curves_plot_key(run))
        pngs[f"{title}Dynamics across checkpoint epochs"] = outputs.get(dynamics_plot_key(run))
    robustness_png = store.get(ROBUSTNESS_PLOT) if result.complete_epochs and store.exists(ROBUSTNESS_PLOT) else None
    if robustness_png is not None:
        pngs["Robustness link"] = robustness_png
    pngs.update(result.path_plots)
    extra_tables = dict(result.extra_tables)
    if plan.is_study:
        extra_tables = {"Runs compared per epoch (reduced/robustness.parquet where a run has metrics)": result.runs_compared,
                        **extra_tables}  # fmt: skip
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
        plots={title: png for title, png in pngs.items() if png is not None},
        robustness_correlation=_stored_table(store, REDUCED_ROBUSTNESS_CORRELATION) if result.complete_epochs else pl.DataFrame(),
        robustness_search=_stored_table(store, REDUCED_ROBUSTNESS_SEARCH) if result.complete_epochs else pl.DataFrame(),
        extra_tables=extra_tables,
        runs=runs_listing(plan),
    )
    for name, value in result.report_fields.items():  # what the measures show (inversion quality, flow heatmaps)
        setattr(inputs, name, value)
    return [REPORT] if store.put_if_changed(REPORT, report.render(inputs)) else []


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
