"""Subspace similarity (Ramasesh, Dyer and Raghu 2021, "Anatomy of Catastrophic Forgetting:
Hidden Representations and Task Semantics"), the finetuning paper's other representation
baseline beside CKA divergence.

    SubspaceSim_k(X, Y) = ||V_X^T V_Y||_F^2 / k

V_X: the top-k principal directions (``[d, k]``, orthonormal) of the centered features X
``[n, d]`` of one layer; likewise Y, the same layer of the other model on the same images. 1
when both span the same k-dimensional subspace, 0 when the subspaces are orthogonal.

With n samples and d >> n features (a ViT block flattened: 38,400 dims), the directions come
from the n x n Gram matrices instead of the d x d covariances: with ``X = U S V^T``,
``V_k = X^T U_k S_k^{-1}``, so ``V_X^T V_Y = S_X^{-1} U_X^T (X Y^T) U_Y S_Y^{-1}``: only
``X X^T``, ``Y Y^T`` and ``X Y^T`` are formed, in float64.
"""

from __future__ import annotations

import torch

from invariance.core.cka import ArrayLike, _as_centered_float64

DEFAULT_COMPONENTS = 10


def _top_components(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k ``[n, k]``, S_k ``[k]``): the top-k eigenvectors of a Gram and the singular values."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    top = torch.flip(torch.arange(len(eigenvalues)), dims=(0,))[:k]
    return eigenvectors[:, top], eigenvalues[top].clamp_min(0).sqrt()


def subspace_similarity(x: ArrayLike, y: ArrayLike, k: int = DEFAULT_COMPONENTS) -> float:
    """SubspaceSim_k between ``x: [n, d]`` and ``y: [n, d]`` (the same layer of two models on the
    same n images; anything after the first axis is flattened). NaN when either side has fewer
    than k directions of non-zero variance (k at most n - 1 after centering)."""
    centered_x, centered_y = _as_centered_float64(x), _as_centered_float64(y)
    if centered_x.shape != centered_y.shape:
        raise ValueError(f"subspace similarity compares one layer of two models: shapes "
                         f"{tuple(centered_x.shape)} and {tuple(centered_y.shape)} differ")  # fmt: skip
    if not 1 <= k <= centered_x.shape[0] - 1:
        raise ValueError(f"subspace similarity: k = {k} components need at least {k + 1} samples, got {centered_x.shape[0]}")
    u_x, s_x = _top_components(centered_x @ centered_x.T, k)
    u_y, s_y = _top_components(centered_y @ centered_y.T, k)
    # fewer than k directions of variance on a side, each measured against its own largest
    # (eigh of X X^T leaves ~1e-7 relative noise in the singular values)
    if any(float(s[-1]) <= 1e-6 * max(float(s[0]), 1e-300) for s in (s_x, s_y)):
        return float("nan")
    overlap = (u_x.T @ (centered_x @ centered_y.T) @ u_y) / s_x[:, None] / s_y[None, :]
    return float((overlap**2).sum() / k)
