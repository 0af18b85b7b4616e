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
from invariance.errors import DataError


def knn_label_error(key: str, label_column: str, error: DataError) -> DataError:
    """The error of a kNN input (``knn.train``, ``data``) without class labels, naming the key."""
    return DataError(f"{key} (the kNN probe needs class labels; knn.label_column {label_column!r}): {error}")


def align_labels(
    bank_labels: torch.Tensor,
    bank_classes: Sequence[str] | None,
    test_labels: torch.Tensor,
    test_classes: Sequence[str] | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The bank's and the queries' labels in one label space, and its number of classes.

    Names (``*_classes``: label k is ``classes[k]``; image folders, Parquet strings) are matched
    by name: the sorted union of both sets, one index each (a bank with classes [cat, dog, fox]
    and eval images with [dog, fox] gave dog 1 and 0: top-1 0.5 where every query had its exact
    copy in the bank). Integer labels (CIFAR, Parquet integers) are the same class in both. The
    number of classes is that of the distinct labels the two hold (labels {0, 7} are 2 classes:
    no top-5), and labels are renumbered 0..classes-1 in their order, which changes no vote.
    A DataError when one side has names and the other integers."""
    if (bank_classes is None) != (test_classes is None):
        named, numbered = ("knn.train", "data") if bank_classes is not None else ("data", "knn.train")
        raise DataError(f"{named} labels its classes by name and {numbered} by integer: the kNN probe cannot tell "
                        "which integer is which class; give both the same kind of labels (image folders, or Parquet "
                        "columns of class names, or integer columns on both)")  # fmt: skip
    if bank_classes is not None and test_classes is not None:
        names = sorted(set(bank_classes) | set(test_classes))
        index = {name: position for position, name in enumerate(names)}
        bank_map = torch.tensor([index[name] for name in bank_classes], dtype=torch.long, device=bank_labels.device)
        test_map = torch.tensor([index[name] for name in test_classes], dtype=torch.long, device=test_labels.device)
        bank_labels, test_labels = bank_map[bank_labels.long()], test_map[test_labels.long()]
    both = torch.cat([bank_labels.long().flatten(), test_labels.long().to(bank_labels.device).flatten()])
    present, inverse = torch.unique(both, sorted=True, return_inverse=True)
    return inverse[: len(bank_labels)], inverse[len(bank_labels) :].to(test_labels.device), len(present)


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
    bank_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (layer, k): ``top1``, ``top5`` (None with fewer than 5 classes), ``n_train``,
    ``n_test``. Images ``[n, 3, S, S]`` in [0, 1]; labels ``[n]`` integers >= 0, with the names of
    the labels where they are names (``align_labels``: the same class by name in both)."""
    bank_labels, test_labels, classes = align_labels(bank_labels, bank_classes, test_labels, test_classes)
    policy = knn_token_policy(model, knn)
    bank = batched_features(model, bank_images, layers, policy)
    queries = batched_features(model, test_images, layers, policy)
    rows = []
    for layer in layers:
        scores = knn_accuracy(bank[layer], bank_labels, queries[layer], test_labels, ks=knn.k,
                              temperature=knn.temperature, num_classes=classes)  # fmt: skip
        for k, (top1, top5) in scores.items():
            rows.append({"layer": layer, "k": k, "top1": top1, "top5": top5,
                         "n_train": len(bank_labels), "n_test": len(test_labels)})  # fmt: skip
    return rows
