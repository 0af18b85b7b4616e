"""The features of a shard's two models on X: a STIR shard (ref model, ref layer, seed) and a CKA shard.

A STIR shard inverts r[j] once and evaluates BOTH models at ALL target layers on X and X',
giving STIR(t[i] | r[j]) for t in {pt, ft} and every i, biased and debiased.
A CKA shard gives CKA(a[i], b[j]) on X for a, b in {pt, ft}. Rows are plain dicts; the shard's
columns and their types are STIR_SCHEMA / CKA_SCHEMA (``invariance.io.schemas``; README.md,
"Output schema").
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from invariance.core.cka import cka_from_grams, normalized_grams
from invariance.config import InversionConfig, TokenPolicy
from invariance.io.data import EvalImages
from invariance.core.inversion import InversionResult, invert, start_noise
from invariance.core.models import FeatureModel

ModelName = Literal["pt", "ft"]
MODEL_NAMES: tuple[ModelName, ModelName] = ("pt", "ft")
FEATURE_BATCH = 128


@torch.no_grad()
def batched_features(
    model: FeatureModel, images: torch.Tensor, layers: Sequence[int], token_policy: TokenPolicy
) -> dict[int, torch.Tensor]:
    """``images: [n, 3, H, W]`` -> {layer: ``[n, d]``}, computed in batches of FEATURE_BATCH."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for begin in range(0, len(images), FEATURE_BATCH):
        batch = model.layer_features(images[begin : begin + FEATURE_BATCH], layers, token_policy)
        for layer in layers:
            parts[layer].append(batch[layer].float())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


class ShardContext:
    """Both models, the eval images and the settings; features on X computed once and reused.

    ``models``: {"pt": ..., "ft": ...} (ft may be absent for pretrained-only inversions).
    ``eval_images.images``: ``[n, 3, S, S]`` on the models' device.
    """

    def __init__(
        self,
        models: dict[str, FeatureModel],
        eval_images: EvalImages,
        layers: Sequence[int],
        token_policy: TokenPolicy,
        inversion: InversionConfig,
    ) -> None:
        self.models = models
        self.eval_images = eval_images
        self.layers = list(layers)
        self.token_policy = token_policy
        self.inversion = inversion
        # only the Grams of the features on X are kept: the features themselves (n x d per layer,
        # ~1 GB per model at ViT-B/32 with `flatten`) are dropped once both Grams exist
        self._clean_grams: dict[tuple[str, bool], torch.Tensor] = {}

    @property
    def n_samples(self) -> int:
        return len(self.eval_images.images)

    def clean_features(self, model_name: str) -> dict[int, torch.Tensor]:
        """Features of ``model_name`` on X at every layer: {layer: ``[n, d]``}, computed anew (not kept)."""
        return batched_features(self.models[model_name], self.eval_images.images, self.layers, self.token_policy)

    def clean_grams(self, model_name: str, debiased: bool) -> torch.Tensor:
        """Normalized centered Grams of the features on X, ``[len(layers), n, n]`` float64, cached.

        The first call for a model computes its features once and both Grams (biased and
        debiased) from them; the features are then released."""
        key = (model_name, debiased)
        if key not in self._clean_grams:
            features = self.clean_features(model_name)
            per_layer = [features[layer] for layer in self.layers]
            for both in (False, True):
                self._clean_grams[model_name, both] = normalized_grams(per_layer, both)
            del features, per_layer
        return self._clean_grams[key]

    def held_bytes(self) -> int:
        """Bytes of tensors this context keeps beyond the models and the eval images (the Grams)."""
        return sum(gram.numel() * gram.element_size() for gram in self._clean_grams.values())

    def invert(self, ref_model: str, ref_layer: int, seed: int) -> InversionResult:
        """X' for r[j] from the (seed, sample)-keyed start noise."""
        images = self.eval_images.images
        noise = start_noise(seed, self.eval_images.indices, tuple(images.shape[1:]))
        return invert(self.models[ref_model], ref_layer, images, noise, self.inversion, self.token_policy)

    def stir_rows(
        self, ref_model: str, ref_layer: int, seed: int, inverted: InversionResult | None = None
    ) -> list[dict[str, Any]]:
        """STIR(t[i] | r[j]) for t in {pt, ft}, i in layers; inverts unless ``inverted`` is given."""
        if inverted is None:
            inverted = self.invert(ref_model, ref_layer, seed)
        images_inv = inverted.images.to(self.eval_images.images.device)
        loss = inverted.final_loss.double().cpu()
        diagnostics = {
            "inv_loss_mean": float(loss.mean()),
            "inv_loss_median": float(loss.median()),
            "inv_loss_max": float(loss.max()),
            "inv_iterations": inverted.iterations_run,
        }
        rows = []
        for target_model in MODEL_NAMES:
            inv = batched_features(self.models[target_model], images_inv, self.layers, self.token_policy)
            # STIR(t[i] | r[j]) = CKA(t[i](X), t[i](X')): the X side's Grams are shared by every shard
            stir = {
                debiased: (self.clean_grams(target_model, debiased)
                           * normalized_grams([inv[k] for k in self.layers], debiased)).sum(dim=(1, 2))
                for debiased in (False, True)
            }  # fmt: skip
            for position, target_layer in enumerate(self.layers):
                rows.append(
                    {
                        "ref_model": ref_model,
                        "ref_layer": ref_layer,
                        "target_model": target_model,
                        "target_layer": target_layer,
                        "seed": seed,
                        "stir": float(stir[False][position]),
                        "stir_debiased": float(stir[True][position]),
                        **diagnostics,
                        "n_samples": self.n_samples,
                    }
                )
        return rows

    def cka_rows(self) -> list[dict[str, Any]]:
        """CKA(a[i], b[j]) on X for a, b in {pt, ft} and all layer pairs; one Gram per layer.
        ``subspace_similarity`` is null: the subspace measure has its own shards since issue 26
        (CKA shards of older releases hold it there)."""
        grams = {(name, debiased): self.clean_grams(name, debiased) for name in MODEL_NAMES for debiased in (False, True)}
        rows = []
        for model_a in MODEL_NAMES:
            for model_b in MODEL_NAMES:
                biased = cka_from_grams(grams[model_a, False], grams[model_b, False])
                debiased = cka_from_grams(grams[model_a, True], grams[model_b, True])
                for a, layer_a in enumerate(self.layers):
                    for b, layer_b in enumerate(self.layers):
                        rows.append(
                            {
                                "model_a": model_a,
                                "layer_a": layer_a,
                                "model_b": model_b,
                                "layer_b": layer_b,
                                "cka": float(biased[a, b]),
                                "cka_debiased": float(debiased[a, b]),
                                "subspace_similarity": None,
                                "n_samples": self.n_samples,
                            }
                        )
        return rows
