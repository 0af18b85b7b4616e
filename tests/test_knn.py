"""DINO's weighted kNN classifier (invariance.core.knn) against the formula written out directly."""

from __future__ import annotations

import math

import pytest
import torch

from invariance.core.knn import knn_accuracy


def direct_knn(bank, bank_labels, queries, query_labels, k, temperature, classes):
    """The formula, one query at a time in float64: cosine similarity, top-k, exp(sim / T) votes."""
    top1 = top5 = 0
    for query, label in zip(queries.double(), query_labels.tolist()):
        sims = [
            float(query @ row.double()) / (float(query.norm()) * float(row.double().norm()))
            for row in bank
        ]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * classes
        for i in nearest:
            votes[int(bank_labels[i])] += math.exp(sims[i] / temperature)
        ranked = sorted(range(classes), key=lambda c: -votes[c])
        top1 += ranked[0] == label
        top5 += label in [c for c in ranked[:5] if votes[c] > 0]  # DINO: only classes a neighbour voted for
    n = len(queries)
    return top1 / n, (top5 / n if classes >= 5 else None)


@pytest.mark.parametrize(("classes", "temperature"), [(7, 0.07), (3, 0.5)])
def test_matches_the_formula_on_planted_features(classes, temperature) -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, 6, generator=generator)
    bank_labels = torch.randint(0, classes, (60,), generator=generator)
    bank = centres[bank_labels] + 1.2 * torch.randn(60, 6, generator=generator)
    query_labels = torch.randint(0, classes, (25,), generator=generator)
    queries = centres[query_labels] + 1.2 * torch.randn(25, 6, generator=generator)
    ks = (1, 5, 20)
    got = knn_accuracy(bank, bank_labels, queries, query_labels, ks=ks, temperature=temperature, chunk_size=7,
                       num_classes=classes)  # fmt: skip
    for k in ks:
        expected = direct_knn(bank, bank_labels, queries, query_labels, k, temperature, classes)
        assert got[k][0] == pytest.approx(expected[0])
        assert (got[k][1] is None) == (expected[1] is None)
        if expected[1] is not None:
            assert got[k][1] == pytest.approx(expected[1])
    # noisy clusters: neither trivial nor hopeless, so the comparison above means something
    assert 0.2 < got[20][0] < 1.0


def test_separable_set_scores_one_and_chunking_changes_nothing() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 4
    directions = torch.eye(8)[:4] * 5
    bank = directions[labels] + 0.05 * torch.randn(40, 8, generator=generator)
    queries = directions[labels[:12]] + 0.05 * torch.randn(12, 8, generator=generator)
    whole = knn_accuracy(bank, labels, queries, labels[:12], ks=(10, 200))
    assert whole == {10: (1.0, None), 200: (1.0, None)}  # 4 classes: no top-5; k > N uses the bank
    assert knn_accuracy(bank, labels, queries, labels[:12], ks=(10,), chunk_size=5) == {10: (1.0, None)}
    wrong = knn_accuracy(bank, labels, queries, (labels[:12] + 1) % 4, ks=(10,))
    assert wrong == {10: (0.0, None)}


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="features must be"):
        knn_accuracy(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="ks must be"):
        knn_accuracy(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 3), torch.zeros(2), ks=(0,))


def test_top5_counts_only_classes_a_neighbour_voted_for() -> None:
    """With k = 1 one class gets a vote: top-5 is top-1 (DINO's correct.narrow(1, 0, min(5, k))),
    not filled up with classes nobody voted for."""
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(10, 16, generator=generator)
    queries = torch.randn(200, 16, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)
    (top1, top5), = knn_accuracy(bank, torch.arange(10), queries, labels, ks=(1,)).values()
    assert top5 == top1
    assert direct_knn(bank, torch.arange(10), queries, labels, 1, 0.07, 10) == (top1, top5)


def test_a_small_temperature_votes_as_dinos_exact_formula() -> None:
    """issue 25: T = 0.01 made exp(sim / T) overflow float32 (exp(99) = inf): the right class's single
    near neighbour (sim 0.99) and the wrong class's two (sim 0.95) both summed to inf, and the tie
    went to the wrong class (top-1 0 where the exact vote, e^99 > 2 e^95, gives 1)."""

    def unit(sim: float, sign: float = 1.0) -> torch.Tensor:
        return torch.tensor([sim, sign * math.sqrt(1 - sim * sim)])

    bank = torch.stack([unit(0.99), unit(0.95), unit(0.95, -1.0), torch.tensor([-1.0, 0.0])])
    labels = torch.tensor([1, 0, 0, 1])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # an independent float64 computation of DINO's vote
    exact = direct_knn(bank, labels, query, truth, 3, 0.01, 2)
    assert exact == (1.0, None)
    assert knn_accuracy(bank, labels, query, truth, ks=(3,), temperature=0.01, num_classes=2) == {3: exact}
    # planted clusters at tiny temperatures: the same top-1 / top-5 as the float64 formula
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 5, generator=generator)
    bank_labels = torch.randint(0, 6, (50,), generator=generator)
    bank = centres[bank_labels] + 1.0 * torch.randn(50, 5, generator=generator)
    query_labels = torch.randint(0, 6, (20,), generator=generator)
    queries = centres[query_labels] + 1.0 * torch.randn(20, 5, generator=generator)
    for temperature in (0.01, 0.003):
        got = knn_accuracy(bank, bank_labels, queries, query_labels, ks=(10,), temperature=temperature, num_classes=6)
        expected = direct_knn(bank, bank_labels, queries, query_labels, 10, temperature, 6)
        assert got[10] == pytest.approx(expected), temperature
