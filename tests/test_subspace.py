"""Subspace similarity against principal components computed the direct way (d x d covariance)."""

from __future__ import annotations

import numpy as np
import pytest

from invariance.core.subspace import subspace_similarity


def direct(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Top-k eigenvectors of each covariance, then ||V_x^T V_y||_F^2 / k."""
    def top(a: np.ndarray) -> np.ndarray:
        centered = a - a.mean(axis=0)
        values, vectors = np.linalg.eigh(centered.T @ centered)
        return vectors[:, np.argsort(values)[::-1][:k]]

    return float(np.linalg.norm(top(x).T @ top(y), "fro") ** 2 / k)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_equals_the_direct_pca_formula(k: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) * np.linspace(3, 0.5, 12)  # distinct variances: a well-defined top k
    y = x @ np.linalg.qr(rng.normal(size=(12, 12)))[0] * 0.3 + rng.normal(size=(40, 12)) * np.linspace(2, 0.4, 12)
    assert subspace_similarity(x, y, k) == pytest.approx(direct(x, y, k), abs=1e-9)


def test_one_for_the_same_subspace_zero_for_orthogonal_ones_and_wide_features() -> None:
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(500, 6)))[0]  # d = 500 > n = 30: the Gram path
    codes = rng.normal(size=(30, 3)) * np.array([3.0, 2.0, 1.0])
    x = codes @ basis[:, :3].T
    rotated = (codes @ np.linalg.qr(rng.normal(size=(3, 3)))[0]) @ basis[:, :3].T * 5.0
    other = rng.normal(size=(30, 3)) * np.array([3.0, 2.0, 1.0]) @ basis[:, 3:].T
    assert subspace_similarity(x, rotated, k=3) == pytest.approx(1.0, abs=1e-9)
    assert subspace_similarity(x, other, k=3) == pytest.approx(0.0, abs=1e-9)


def test_too_few_directions_give_nan_and_bad_requests_name_the_problem() -> None:
    x = np.outer(np.arange(10.0), np.ones(8))  # rank 1 after centering
    assert np.isnan(subspace_similarity(x, x, k=3))
    with pytest.raises(ValueError, match="need at least 11 samples"):
        subspace_similarity(x, x, k=10)
    with pytest.raises(ValueError, match="shapes"):
        subspace_similarity(x, x[:, :4], k=2)


def test_scale_of_either_side_does_not_matter() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8)) * np.linspace(3, 0.5, 8)
    assert subspace_similarity(x, x * 1e7, k=3) == pytest.approx(1.0, abs=1e-9)
    assert subspace_similarity(x * 1e-6, x, k=3) == pytest.approx(1.0, abs=1e-9)
