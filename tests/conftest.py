"""Shared fixtures of the library's unit tests: a tiny timm ViT built in the test, no network."""

from __future__ import annotations

import os

# Every Ray the tests start (ray.init, `ray start --head`, ray.cluster_utils.Cluster, and the
# processes they spawn) stays on 127.0.0.1: without this Ray swaps it for the machine's outward
# address and listens on every interface. Set before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# the plan's CPU throughput cache (~/.cache/invariance/cpu_throughput.json): the tests' own, never the user's
if "INVARIANCE_TESTS_CACHE" not in os.environ:
    import tempfile

    os.environ["INVARIANCE_TESTS_CACHE"] = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="invariance-tests-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from invariance.config import ModelConfig
from invariance.core.models import FeatureModel, load_model

# 32x32 images, 8x8 patches: 16 patch tokens + CLS, width 32, 4 blocks (layers 0..4, 4 = pre-logits).
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}


@pytest.fixture(scope="session")
def tiny_vit_config() -> ModelConfig:
    return ModelConfig(arch="vit_tiny_patch16_224", kwargs=dict(TINY_VIT_KWARGS))


@pytest.fixture
def tiny_vit(tiny_vit_config: ModelConfig) -> FeatureModel:
    """The tiny ViT with a fixed random init (the same weights in every test)."""
    torch.manual_seed(0)
    return load_model(tiny_vit_config, None)


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread: on a 2-core runner shared with other processes, OpenMP threads of
    tiny models oversubscribe the cores and run many times slower (measured 2 s -> 60 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
