"""The run's kNN probe (core/knn_probe.py): DINO's vote on a model's features at every layer."""

from __future__ import annotations

import pytest
import torch

from invariance.config import DataConfig, KnnProbeConfig
from invariance.core.knn_probe import knn_rows, knn_token_policy
from invariance.core.shards import batched_features
from tests.test_knn import direct_knn

BANK = DataConfig(format="parquet", path="unused", n_samples=30)


def test_the_probe_equals_the_formula_on_the_models_own_features(tiny_vit, torch_single_thread) -> None:
    generator = torch.Generator().manual_seed(3)
    bank_labels = torch.randint(0, 6, (30,), generator=generator)
    test_labels = torch.randint(0, 6, (10,), generator=generator)
    tint = torch.rand(6, 3, 1, 1, generator=generator)  # planted: each class a colour, plus noise
    bank = (tint[bank_labels] + 0.3 * torch.rand(30, 3, 32, 32, generator=generator)).clamp(0, 1)
    test = (tint[test_labels] + 0.3 * torch.rand(10, 3, 32, 32, generator=generator)).clamp(0, 1)
    knn = KnnProbeConfig(train=BANK, k=[1, 5], temperature=0.1)
    assert knn_token_policy(tiny_vit, knn) == "cls"  # a ViT: its class token
    layers = [0, 2, tiny_vit.depth]
    rows = knn_rows(tiny_vit, bank, bank_labels, test, test_labels, layers, knn)
    assert [(r["layer"], r["k"]) for r in rows] == [(layer, k) for layer in layers for k in (1, 5)]
    bank_features = batched_features(tiny_vit, bank, layers, "cls")
    test_features = batched_features(tiny_vit, test, layers, "cls")
    for row in rows:
        expected = direct_knn(bank_features[row["layer"]], bank_labels, test_features[row["layer"]], test_labels,
                              row["k"], 0.1, 6)  # fmt: skip
        assert row["top1"] == pytest.approx(expected[0]) and row["top5"] == pytest.approx(expected[1])
        assert (row["n_train"], row["n_test"]) == (30, 10)


def test_a_separable_planted_set_scores_one(tiny_vit, torch_single_thread) -> None:
    labels = torch.arange(24) % 3
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[:, :, None, None]
    images = colours[labels].expand(24, 3, 32, 32).clone()
    knn = KnnProbeConfig(train=BANK.model_copy(update={"n_samples": 24}), k=[3], token_policy="mean")
    rows = knn_rows(tiny_vit, images, labels, images[:9], labels[:9], [1, tiny_vit.depth], knn)
    assert [row["top1"] for row in rows] == [1.0, 1.0]
    assert all(row["top5"] is None for row in rows)  # 3 classes


def test_labels_are_aligned_by_name_and_classes_counted_as_present() -> None:
    """issue 25: a bank [cat, dog, fox] and eval [dog, fox] index dog alike; integer labels {0, 7}
    are 2 classes (no top-5, where max + 1 = 8 reported a top-5 of 2 classes)."""
    import pytest

    from invariance.core.knn_probe import align_labels
    from invariance.errors import DataError

    bank, test, classes = align_labels(torch.tensor([0, 1, 2]), ["cat", "dog", "fox"], torch.tensor([0, 1]), ["dog", "fox"])
    assert (bank.tolist(), test.tolist(), classes) == ([0, 1, 2], [1, 2], 3)
    bank, test, classes = align_labels(torch.tensor([0, 7, 7]), None, torch.tensor([7, 0]), None)
    assert (bank.tolist(), test.tolist(), classes) == ([0, 1, 1], [1, 0], 2)
    with pytest.raises(DataError, match="knn.train labels its classes by name and data by integer"):
        align_labels(torch.tensor([0]), ["cat"], torch.tensor([0]), None)
