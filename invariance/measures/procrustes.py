"""Orthogonal Procrustes distance (Ding, Denain and Steinhardt 2021, "Grounding Representation
Similarity with Statistical Testing"): more sensitive than CKA to changes that matter, such as
which layers were retrained.

    d(X, Y) = ||X||_F^2 + ||Y||_F^2 - 2 ||X^T Y||_*  =  2 - 2 ||X^T Y||_*

for centred features (columns of mean 0) scaled to ||X||_F = ||Y||_F = 1 (``[n, d_a]``,
``[n, d_b]``, n images): the squared distance left after the best rotation of one onto the other,
0 for the same representation up to rotation, at most 2. Float64. With d >> n (a ViT block
flattened) the nuclear norm comes from n x n matrices: with ``X X^T = U diag(s) U^T`` and
``A_X = U diag(sqrt(s))``, ``X = A_X V^T`` for an orthonormal V, so ``||X^T Y||_* = ||A_X^T A_Y||_*``.

Listed in ``measures:`` (``measures: [procrustes]``); every layer pair of pt and ft as CKA.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl
import torch

from invariance.core.shards import MODEL_NAMES
from invariance.core.workspace import RunSpec, Workspace
from invariance.io.layout import Unit, reduced_table_key
from invariance.measures.base import Measure, MeasureOutputs, ReduceContext, check_finite_features, register_measure, write_shard
from invariance.measures.pairwise import heatmap_figures, pair_schema, pair_table


def procrustes_basis(features: torch.Tensor) -> torch.Tensor:
    """``A: [n, r]`` float64 with ``A A^T = X X^T`` for X, ``features [n, ...]`` centred and
    scaled to Frobenius norm 1 (r: the directions of non-zero variance)."""
    x = features.flatten(1).double()
    x = x - x.mean(dim=0, keepdim=True)
    norm = torch.linalg.matrix_norm(x)
    if float(norm) == 0.0:
        raise ValueError("Procrustes distance: the features do not vary across the images (all alike)")
    x = x / norm
    eigenvalues, eigenvectors = torch.linalg.eigh(x @ x.T)
    keep = eigenvalues > eigenvalues.max() * 1e-12
    return eigenvectors[:, keep] * eigenvalues[keep].sqrt()


def procrustes_distance_from_bases(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 - 2 ||A_X^T A_Y||_* for two ``procrustes_basis`` results."""
    return float(2.0 - 2.0 * torch.linalg.svdvals(a.T @ b).sum())


def procrustes_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The Procrustes distance between ``x: [n, d_a]`` and ``y: [n, d_b]`` (see the module)."""
    return procrustes_distance_from_bases(procrustes_basis(torch.as_tensor(x)), procrustes_basis(torch.as_tensor(y)))


@register_measure
class Procrustes(Measure):
    name = "procrustes"
    description = "Procrustes shards"
    listed = True
    schema = pair_schema("procrustes")

    def priority(self, unit: Unit) -> int:
        return 40

    def rows(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> list[dict[str, Any]]:
        """d(a[i], b[j]) for a, b in {pt, ft} and every layer pair; ``d(ft, pt)`` is ``d(pt, ft)``
        transposed (the distance is symmetric)."""
        context = workspace.context(spec, unit.checkpoint_url, unit.alpha, unit.extra, unit.checkpoint_fingerprint)
        bases = {}
        for model in MODEL_NAMES:  # one model's features at a time; the bases are n x n at most
            features = context.clean_features(model)
            for layer, value in features.items():
                check_finite_features(unit, layer, value)
            bases[model] = {layer: procrustes_basis(features[layer]) for layer in context.layers}
            del features
        distance: dict[tuple[str, int, str, int], float] = {}
        for model_a in MODEL_NAMES:
            for model_b in MODEL_NAMES:
                for layer_a in context.layers:
                    for layer_b in context.layers:
                        mirrored = (model_b, layer_b, model_a, layer_a)
                        distance[model_a, layer_a, model_b, layer_b] = distance[mirrored] if mirrored in distance else \
                            procrustes_distance_from_bases(bases[model_a][layer_a], bases[model_b][layer_b])  # fmt: skip
        return [{"model_a": a, "layer_a": i, "model_b": b, "layer_b": j, "procrustes": value, "n_samples": context.n_samples}
                for (a, i, b, j), value in distance.items()]  # fmt: skip

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        started = time.time()
        return write_shard(spec, self, unit, self.rows(spec, unit, workspace), started)

    def tables(self, context: ReduceContext) -> dict[str, pl.DataFrame]:
        return {reduced_table_key(self.name): pair_table(context.rows[self.name], ["procrustes"], context.plan.hashes[self.name])}

    def reduce(self, context: ReduceContext) -> MeasureOutputs:
        table = context.tables.get(reduced_table_key(self.name), pl.DataFrame())
        return MeasureOutputs(figures=heatmap_figures(
            context, self.name, table, "procrustes", "Procrustes distance (0: same up to rotation)",
            "Procrustes distance between pretrained and finetuned layers", low=0.0, cmap="magma_r"))  # fmt: skip

