"""The ViT's inversion time per step through timm's feature API (``forward_intermediates``,
today's path) against the hand walk of ViT internals it replaced (patch_embed, _pos_embed,
blocks, norm), in the same process on the same model, inputs and settings; both give
bit-identical features (checked). Usage: python bench/bench_feature_api.py [--repeats 5]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from invariance.config import InversionConfig, ModelConfig, TokenPolicy  # noqa: E402
from invariance.core.inversion import invert, start_noise  # noqa: E402
from invariance.core.models import FeatureModel, load_model  # noqa: E402


class HandWalkViT(FeatureModel):
    """The pre-issue-14 path: a ViT walked through its private attributes (flatten policy)."""

    def __init__(self, model: FeatureModel) -> None:
        super().__init__(model.network, model.mean.flatten().tolist(), model.std.flatten().tolist())

    def layer_features(self, images: torch.Tensor, layers: Sequence[int], token_policy: TokenPolicy = "flatten") -> dict[int, torch.Tensor]:
        net, wanted, depth = self.network, set(layers), len(self.network.blocks)
        tokens = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed((images - self.mean) / self.std))))
        outputs = {}
        for index in range(min(max(wanted), depth - 1) + 1):
            tokens = net.blocks[index](tokens)
            if index in wanted:
                outputs[index] = tokens.flatten(1)
        if depth in wanted:
            outputs[depth] = net.forward_head(net.norm(tokens), pre_logits=True)
        return outputs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny",
                        help="tiny: make bench's 12-block width-32 ViT at 32 px, 16 samples; small: ViT-S/16 at 224, 4 samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "tiny":  # the shards-vs-pairwise benchmark's tiny ViT (make bench)
        config = ModelConfig(arch="vit_tiny_patch16_224",
                             kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 12, "num_heads": 2})
        samples, size = 16, 32
    else:  # a real ViT's shape: ViT-S/16 at 224 (197 tokens x 384), random init
        config, samples, size = ModelConfig(arch="vit_small_patch16_224"), 4, 224
    api = load_model(config, None)
    walk = HandWalkViT(api)
    images = torch.rand(samples, 3, size, size)
    noise = start_noise(0, torch.arange(samples), (3, size, size))
    settings = InversionConfig(iterations=args.iterations, bf16=False, micro_batch=samples)
    print(f"| layer | hand walk ms/step | forward_intermediates ms/step | ratio | same X' |")
    print("| --- | --- | --- | --- | --- |")
    for layer in (0, 6, 12):
        times: dict[str, list[float]] = {"walk": [], "api": []}
        results = {}
        for _ in range(args.repeats):  # interleaved: both paths see the same machine load
            for name, model in (("walk", walk), ("api", api)):
                began = time.perf_counter()
                results[name] = invert(model, layer, images, noise, settings)
                times[name].append((time.perf_counter() - began) / (args.iterations + 1) * 1e3)
        same = torch.equal(results["walk"].images, results["api"].images)
        best = {name: min(values) for name, values in times.items()}
        print(f"| {layer} | {best['walk']:.2f} | {best['api']:.2f} | {best['api'] / best['walk']:.3f} | {same} |")


if __name__ == "__main__":
    main()
