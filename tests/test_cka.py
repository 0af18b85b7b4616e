"""Linear CKA against textbook float64 formulas, its invariances, and its numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invariance.core.cka import cka_matrix, linear_cka, normalized_grams


# --- independent references, written from the papers in plain numpy float64 -------------------


def hsic_biased(gram_k: np.ndarray, gram_l: np.ndarray) -> float:
    """Gretton et al. 2005: tr(K H L H) / (n - 1)^2 with the explicit centering matrix H."""
    n = gram_k.shape[0]
    centering = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(gram_k @ centering @ gram_l @ centering)) / (n - 1) ** 2


def hsic_unbiased(gram_k: np.ndarray, gram_l: np.ndarray) -> float:
    """Song et al. 2012, eq. (5): the unbiased HSIC estimator on diagonal-free Grams."""
    n = gram_k.shape[0]
    k, l = gram_k.copy(), gram_l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    value = (
        np.trace(k @ l)
        + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (ones @ k @ l @ ones)
    )
    return float(value) / (n * (n - 3))


def reference_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """CKA from linear Grams of the raw (uncentered) features; the estimators do the centering."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    hsic = hsic_unbiased if debiased else hsic_biased
    gram_x, gram_y = x @ x.T, y @ y.T
    return hsic(gram_x, gram_y) / np.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))


def kornblith_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space debiased CKA (``_debiased_dot_product_similarity_helper``)."""
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    n = x.shape[0]

    def helper(xty, rows_x, rows_y, norm_x, norm_y):
        return xty - n / (n - 2.0) * rows_x.dot(rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))

    rows_x, rows_y = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    norm_x, norm_y = rows_x.sum(), rows_y.sum()
    similarity = helper(np.linalg.norm(x.T @ y) ** 2, rows_x, rows_y, norm_x, norm_y)
    normalization_x = np.sqrt(helper(np.linalg.norm(x.T @ x) ** 2, rows_x, rows_x, norm_x, norm_x))
    normalization_y = np.sqrt(helper(np.linalg.norm(y.T @ y) ** 2, rows_y, rows_y, norm_y, norm_y))
    return similarity / (normalization_x * normalization_y)


def related_pair(rng: np.random.Generator, n: int = 24, dx: int = 40, dy: int = 30):
    """Two feature sets that share some structure (CKA well inside (0, 1)), with offsets."""
    x = rng.normal(size=(n, dx)) + rng.normal(size=dx) * 3
    y = x @ rng.normal(size=(dx, dy)) + 4.0 * rng.normal(size=(n, dy)) - 5.0
    return x, y


def random_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


# --- agreement with the formulas ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_biased_cka_equals_textbook_hsic_formula(seed):
    x, y = related_pair(np.random.default_rng(seed))
    expected = reference_cka(x, y)
    assert 0.05 < expected < 0.95  # a value that can be wrong in either direction
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_debiased_cka_equals_song_2012_and_kornblith(seed):
    x, y = related_pair(np.random.default_rng(seed))
    song = reference_cka(x, y, debiased=True)
    kornblith = kornblith_debiased_cka(x, y)
    assert song == pytest.approx(kornblith, abs=1e-10)  # the two references agree
    assert abs(song - reference_cka(x, y)) > 1e-3  # and differ from the biased value
    assert linear_cka(x, y, debiased=True) == pytest.approx(song, abs=1e-10)


def test_debiased_is_near_zero_for_independent_features_where_biased_is_not():
    # features >> samples: biased CKA of independent Gaussians is ~0.99 (measured), debiased ~0
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 5000)), rng.normal(size=(50, 5000))
    assert linear_cka(x, y) > 0.9
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


# --- invariances -------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_identical_inputs_give_one(debiased):
    x, _ = related_pair(np.random.default_rng(3))
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
    as_float32 = torch.as_tensor(x, dtype=torch.float32)
    assert linear_cka(as_float32, as_float32.clone(), debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_isotropic_scaling_and_orthogonal_transforms(debiased):
    rng = np.random.default_rng(4)
    x, y = related_pair(rng)
    base = linear_cka(x, y, debiased)
    q_x, q_y = random_orthogonal(rng, x.shape[1]), random_orthogonal(rng, y.shape[1])
    assert linear_cka(3.7 * x, y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 0.01 * y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x @ q_x, y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x @ q_x, 2.5 * (y @ q_y), debiased) == pytest.approx(base, abs=1e-12)
    # not invariant to a general (anisotropic) linear map: the test above can fail
    stretch = np.diag(np.linspace(0.1, 10.0, x.shape[1]))
    assert abs(linear_cka(x @ stretch, y, debiased) - base) > 1e-3


@pytest.mark.parametrize("debiased", [False, True])
def test_symmetric(debiased):
    x, y = related_pair(np.random.default_rng(5))
    assert linear_cka(x, y, debiased) == pytest.approx(linear_cka(y, x, debiased), abs=1e-14)


# --- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_float32_with_large_offsets_matches_float64(debiased):
    rng = np.random.default_rng(6)
    base_x, base_y = related_pair(rng, n=64, dx=300, dy=100)
    offset = 1e4
    x32 = (base_x + offset).astype(np.float32)
    y32 = (base_y + offset).astype(np.float32)
    # The exact float64 value of these float32 inputs: removing the offset in float64 is exact,
    # and CKA is translation invariant; this keeps the reference free of cancellation error.
    expected = reference_cka(x32.astype(np.float64) - offset, y32.astype(np.float64) - offset, debiased)
    assert abs(linear_cka(x32, y32, debiased) - expected) < 1e-6
    assert abs(linear_cka(torch.from_numpy(x32), torch.from_numpy(y32), debiased) - expected) < 1e-6
    if not debiased:
        # the naive float32 route (raw Grams, then H K H) is far off on these inputs: the
        # assertion above is not vacuous (measured error ~0.3)
        n = len(x32)
        centering = (np.eye(n) - np.ones((n, n)) / n).astype(np.float32)
        gram_x, gram_y = x32 @ x32.T, y32 @ y32.T

        def hsic(a, b):
            return np.trace(centering @ a @ centering @ b)

        naive = hsic(gram_x, gram_y) / np.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))
        assert not abs(naive - expected) < 1e-3


def test_accepts_numpy_and_torch_of_any_trailing_shape():
    rng = np.random.default_rng(7)
    x, y = related_pair(rng, n=12, dx=24, dy=30)
    expected = reference_cka(x, y)
    x_4d = torch.from_numpy(x).reshape(12, 2, 3, 4)  # [n, ...] is flattened per sample
    y_3d = y.reshape(12, 5, 6)
    assert linear_cka(x_4d, y_3d) == pytest.approx(expected, abs=1e-12)
    assert linear_cka(x_4d.float(), torch.from_numpy(y_3d).float()) == pytest.approx(expected, abs=1e-6)
    assert linear_cka(x_4d.requires_grad_(True), y) == pytest.approx(expected, abs=1e-12)
    assert isinstance(linear_cka(x, y), float)


def test_input_errors():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(rng.normal(size=(10, 3)), rng.normal(size=(11, 3)))
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), debiased=True)
    with pytest.raises(ValueError, match=r"\[n, \.\.\.\]"):
        linear_cka(rng.normal(size=10), rng.normal(size=10))
    # a constant side has no variance: CKA is undefined, reported as NaN (not 0, not 1)
    assert np.isnan(linear_cka(np.ones((10, 4)), rng.normal(size=(10, 4))))


# --- Gram matrices and the pairwise matrix -----------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_entries_equal_pairwise_linear_cka(debiased):
    rng = np.random.default_rng(9)
    n = 16
    base = rng.normal(size=(n, 10))
    layers_a = [base @ rng.normal(size=(10, d)) + rng.normal(size=(n, d)) for d in (8, 20, 5)]
    layers_b = [torch.from_numpy(base @ rng.normal(size=(10, d))).reshape(n, -1, 2) for d in (6, 12)]
    matrix = cka_matrix(layers_a, layers_b, debiased)
    assert matrix.shape == (3, 2) and matrix.dtype == torch.float64
    for i, features_a in enumerate(layers_a):
        for j, features_b in enumerate(layers_b):
            pairwise = linear_cka(features_a, features_b, debiased)
            assert float(matrix[i, j]) == pytest.approx(pairwise, abs=1e-12)
            assert float(matrix[i, j]) == pytest.approx(reference_cka(features_a, features_b.numpy(), debiased), abs=1e-10)
    diagonal = cka_matrix(layers_a, layers_a, debiased).diagonal()
    assert torch.allclose(diagonal, torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_normalized_grams_shape_and_properties():
    rng = np.random.default_rng(10)
    features = [rng.normal(size=(9, 7)) + 100.0, torch.randn(9, 2, 3, generator=torch.Generator().manual_seed(0))]
    grams = normalized_grams(features)
    assert grams.shape == (2, 9, 9) and grams.dtype == torch.float64
    assert torch.allclose(torch.linalg.matrix_norm(grams), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(grams, grams.transpose(1, 2), atol=1e-15)
    # biased: the features are centered, so every row of H K H sums to 0 (the offset of 100 is gone)
    assert grams.sum(dim=2).abs().max() < 1e-12
    debiased = normalized_grams(features, debiased=True)
    assert torch.all(debiased.diagonal(dim1=1, dim2=2) == 0)  # U-centering zeroes the diagonal
