"""Steps: each computes one unit of work and writes it once, with its completion record.

Steps know nothing of the executor (Ray or a plain loop calls them alike); the executor knows
nothing of the science, and this module nothing of any measure: the unit names its measure
(``unit.measure``), the run's measures (``invariance.measures``) compute it. A ``Workspace``
(``core/workspace.py``) caches what is costly to load for the life of one worker process.
"""

from __future__ import annotations

from invariance.core.workspace import InversionCache, RunSpec, Workspace
from invariance.io.layout import Unit
from invariance.measures import active_measures, measure_of

__all__ = ["InversionCache", "RunSpec", "Workspace", "run_unit"]


def run_unit(spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
    """Compute ``unit`` and write it once with its completion record; returns the record key."""
    return measure_of(active_measures(spec.config), unit).compute(spec, unit, workspace)
