"""Measures as plug-ins: one module per measure, registered by name; the engine iterates the registry."""

from invariance.measures.base import MEASURES, Measure, active_measures, measure_of, register_measure

# the built-ins register themselves on import, in the order the engine iterates them
from invariance.measures import stir, cka, subspace, knn, procrustes, function  # noqa: E402,F401  isort: skip

__all__ = ["MEASURES", "Measure", "active_measures", "measure_of", "register_measure"]
