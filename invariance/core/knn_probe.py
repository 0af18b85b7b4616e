"""The kNN probe of a run: DINO's weighted kNN (``core/knn.py``) on the frozen features of one
model at every run layer, a labelled bank (``knn.train``) against the run's eval images.

Rows are plain dicts; the shard's columns and types are KNN_SCHEMA (``invariance.io.schemas``; README.md,
"Output schema")."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from invariance.config import KnnProbeConfig, TokenPolicy
from invariance.core.knn import knn_accuracy
from invariance.core.models import FeatureModel
from invariance.core.shards import batched_features


def knn_token_policy(model: FeatureModel, knn: KnnProbeConfig) -> TokenPolicy:
    """``knn.token_policy``, else ``cls`` where the model has a class token and ``mean`` elsewhere."""
    if knn.token_policy is not None:
        return knn.token_policy
    return "cls" if getattr(model.reader, "has_class_token", False) else "mean"


@torch.no_grad()
def knn_rows(
    model: FeatureModel,
    bank_images: torch.Tensor,
    bank_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    layers: Sequence[int],
    knn: KnnProbeConfig,
) -> list[dict[str, Any]]:
    """One row per (layer, k): ``top1``, ``top5`` (None with fewer than 5 classes), ``n_train``,
    ``n_test``. Images ``[n, 3, S, S]`` in [0, 1]; labels ``[n]`` integers >= 0."""
    policy = knn_token_policy(model, knn)
    bank = batched_features(model, bank_images, layers, policy)
    queries = batched_features(model, test_images, layers, policy)
    classes = int(max(bank_labels.max(), test_labels.max())) + 1
    rows = []
    for layer in layers:
        scores = knn_accuracy(bank[layer], bank_labels, queries[layer], test_labels, ks=knn.k,
                              temperature=knn.temperature, num_classes=classes)  # fmt: skip
        for k, (top1, top5) in scores.items():
            rows.append({"layer": layer, "k": k, "top1": top1, "top5": top5,
                         "n_train": len(bank_labels), "n_test": len(test_labels)})  # fmt: skip
    return rows
