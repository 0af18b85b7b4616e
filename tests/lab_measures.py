"""A lab's own measures, as a user writes them (``measures: [{function: "tests.lab_measures:..."}]``):
functions of two feature matrices ``[n, d_a]``, ``[n, d_b]`` (NumPy float64) returning a float."""

from __future__ import annotations

import numpy as np


def gram_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """RSA-style: the Pearson correlation of the two centred Gram matrices' entries."""
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return float(np.corrcoef((a @ a.T).ravel(), (b @ b.T).ravel())[0, 1])


def broken(a: np.ndarray, b: np.ndarray) -> float:
    raise ValueError("the lab's measure has a bug")


def undefined(a: np.ndarray, b: np.ndarray) -> float:
    return float("nan")
