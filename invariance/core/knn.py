"""The weighted k-nearest-neighbour classifier of DINO (Caron et al. 2021), on frozen features.

Features are L2-normalised; each test feature's cosine similarities to a labelled bank give
its top-k neighbours, and each neighbour votes for its class with weight ``exp(sim / T)``
(T = 0.07, as DINO's ``eval_knn.py``). The class with the largest summed vote is the top-1
prediction; the five largest give top-5. Used by the finetuning runs' per-epoch kNN score
and by the run's kNN probe, so both report the same number.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_TEMPERATURE = 0.07


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (20,),
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
    num_classes: int | None = None,
) -> dict[int, tuple[float, float | None]]:
    """``{k: (top1, top5)}`` of the weighted kNN vote, accuracies in [0, 1].

    ``train_features: [N, d]`` with ``train_labels: [N]`` (integers >= 0) form the bank;
    ``test_features: [n, d]`` with ``test_labels: [n]`` are scored against it, ``chunk_size``
    test rows at a time (memory ``O(chunk_size * N)``). Computed in float32 on the features'
    device; the votes in float64 with each query's largest similarity subtracted in the
    exponent, ``exp((sim - max_sim) / T)``: the same factor ``exp(-max_sim / T)`` on every vote of
    a query, so the ranking is DINO's, without ``exp(1 / 0.01)`` overflowing float32 to inf (a
    tie of infs). ``k`` larger than ``N`` uses the whole bank. ``top5`` is None with fewer than 5
    classes (``num_classes``, default: the largest label + 1).
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be [N, d] and [n, d], got {tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("one label per feature row")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("the bank and the test set need at least one row each")
    device = train_features.device
    bank = torch.nn.functional.normalize(train_features.float(), dim=1)
    bank_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    classes = num_classes or int(max(bank_labels.max(), test_labels.max())) + 1
    largest_k = min(max(ks), len(bank))
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for begin in range(0, len(test_features), chunk_size):
        queries = torch.nn.functional.normalize(test_features[begin : begin + chunk_size].to(device).float(), dim=1)
        targets = test_labels[begin : begin + chunk_size]
        similarity, index = (queries @ bank.T).topk(largest_k, dim=1)  # sorted, largest first
        neighbour_labels = bank_labels[index]  # [c, largest_k]
        # float64, max subtracted per query (column 0: topk sorts largest first): finite for any T > 0
        similarity = similarity.double()
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        for k in ks:
            kk = min(k, largest_k)
            votes = torch.zeros(len(queries), classes, device=device, dtype=torch.float64)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            # which classes a neighbour voted for: a far neighbour's weight may underflow to 0 at a
            # tiny T, and is still a vote (DINO's exact vote is exp(sim / T) > 0)
            voters = torch.zeros(len(queries), classes, device=device)
            voters.scatter_add_(1, neighbour_labels[:, :kk], torch.ones_like(weights[:, :kk], dtype=voters.dtype))
            # ties (equal votes) go to the voted class first, then the lower label: a stable sort of
            # (votes, voted) rather than of votes alone
            order = torch.argsort(voters > 0, dim=1, descending=True, stable=True)
            order = order.gather(1, torch.argsort(votes.gather(1, order), dim=1, descending=True, stable=True))
            ranked = order
            correct1[k] += int((ranked[:, 0] == targets).sum())
            if classes >= 5:
                # only classes a neighbour voted for (at most min(5, k), as DINO's narrow(1, 0, min(5, k))):
                # a class nobody voted for is no prediction, whatever the order of the ties at 0
                voted = (ranked[:, :5] == targets[:, None]) & (voters.gather(1, ranked[:, :5]) > 0)
                correct5[k] += int(voted.any(dim=1).sum())
    n = len(test_features)
    return {k: (correct1[k] / n, correct5[k] / n if classes >= 5 else None) for k in ks}
