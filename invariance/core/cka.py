"""Linear CKA (Kornblith et al. 2019), biased and debiased, in float64 on centered features.

Features are ``[n, ...]`` tensors or arrays; everything after the first axis is flattened.
Centering the features before forming Gram matrices, in float64, keeps the error of
float32 inputs with large offsets far below 1e-6 (raw-Gram centering in float32 does not).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def _as_centered_float64(features: ArrayLike) -> torch.Tensor:
    """``[n, ...]`` -> ``[n, d]`` float64, each column centered over the n samples."""
    tensor = torch.as_tensor(features).detach()
    if tensor.ndim < 2:
        raise ValueError(f"CKA features must be [n, ...] with n samples, got shape {tuple(tensor.shape)}")
    flat = tensor.reshape(tensor.shape[0], -1).to(dtype=torch.float64)
    return flat - flat.mean(dim=0, keepdim=True)


def centered_gram(features: ArrayLike, debiased: bool = False) -> torch.Tensor:
    """``[n, ...]`` features -> ``[n, n]`` centered linear Gram matrix in float64.

    Biased: ``H K H`` (the features are centered, so this is ``X X^T``).
    Debiased: U-centering of Song et al. 2012, whose inner products give unbiased HSIC.
    """
    centered = _as_centered_float64(features)
    gram = centered @ centered.T
    if not debiased:
        return gram
    n = gram.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples, got {n}")
    gram = gram.clone()
    gram.fill_diagonal_(0.0)
    means = gram.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    gram.fill_diagonal_(0.0)
    return gram


def _normalized(gram: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(gram)  # Frobenius
    if norm == 0:
        return torch.full_like(gram, float("nan"))
    return gram / norm


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA between ``x: [n, ...]`` and ``y: [n, ...]`` over all n samples.

    Returns a Python float: 1 for identical inputs, invariant to isotropic scaling and
    orthogonal transforms of either side, symmetric. NaN when one side is constant.
    """
    if torch.as_tensor(x).shape[0] != torch.as_tensor(y).shape[0]:
        raise ValueError("CKA needs the same number of samples on both sides")
    gram_x = _normalized(centered_gram(x, debiased))
    gram_y = _normalized(centered_gram(y, debiased))
    return float((gram_x * gram_y).sum())


def normalized_grams(features: Sequence[ArrayLike], debiased: bool = False) -> torch.Tensor:
    """One centered Gram per feature set, Frobenius-normalized: ``[len(features), n, n]`` float64."""
    return torch.stack([_normalized(centered_gram(f, debiased)) for f in features])


def cka_from_grams(grams_a: torch.Tensor, grams_b: torch.Tensor) -> torch.Tensor:
    """``[A, n, n]`` x ``[B, n, n]`` normalized Grams -> ``[A, B]`` CKA matrix."""
    return torch.einsum("aij,bij->ab", grams_a, grams_b)


def cka_matrix(
    features_a: Sequence[ArrayLike], features_b: Sequence[ArrayLike], debiased: bool = False
) -> torch.Tensor:
    """CKA of every pair: ``[len(a), len(b)]`` float64 with entry (i, j) = CKA(a[i], b[j]).

    Each layer's Gram matrix is formed once, so the cost is one ``[n, d]`` product per
    layer plus an ``[n, n]`` inner product per pair.
    """
    return cka_from_grams(normalized_grams(features_a, debiased), normalized_grams(features_b, debiased))
