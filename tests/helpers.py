"""Builders shared by the job tests: tiny ViTs, checkpoint series and eval data on disk."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

from invariance.config import ModelConfig
from invariance.core.models import build_network
from invariance.io.synthetic import make_shapes, to_parquet_bytes

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_module(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


# tests/data/golden_*.csv were computed on another CPU, whose float32 kernels sum in another order.
# CKA on X agrees to 5e-7; STIR goes through 15 normalised inversion steps, which carry that
# difference on (measured on an AMD EPYC: 5.5e-6 biased, 1.0e-5 debiased).
GOLDEN_TOLERANCE = {"stir": 5e-5, "cka": 1e-6}

TINY_MODEL: dict[str, Any] = {
    "arch": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3},
}


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_network(ModelConfig(**TINY_MODEL)).state_dict()


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int, from_block: int = 1) -> dict[str, torch.Tensor]:
    """A 'finetuned' state: blocks >= from_block, the final norm and head moved by ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        changed = key.startswith(("norm.", "head.")) or any(key.startswith(f"blocks.{b}.") for b in range(from_block, 64))
        noise = torch.randn(value.shape, generator=generator) * scale if changed else 0.0
        out[key] = (value + noise).contiguous()
    return out


def write_checkpoints(folder: Path, epochs: list[int], seed: int = 0) -> tuple[Path, Path]:
    """Writes pretrained.safetensors and ft/epoch=NN.safetensors; returns (pretrained, ft folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    pretrained = tiny_state(seed)
    save_file(pretrained, str(folder / "pretrained.safetensors"))
    (folder / "ft").mkdir(exist_ok=True)
    for epoch in epochs:
        write_epoch(folder, pretrained, epoch)
    return folder / "pretrained.safetensors", folder / "ft"


def write_epoch(folder: Path, pretrained: dict[str, torch.Tensor] | None, epoch: int) -> Path:
    pretrained = pretrained if pretrained is not None else tiny_state(0)
    path = folder / "ft" / f"epoch={epoch:02d}.safetensors"
    save_file(perturbed(pretrained, 0.05 * epoch, seed=epoch), str(path))
    return path


def write_eval_parquet(folder: Path, n: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test-00000-of-00001.parquet"
    path.write_bytes(to_parquet_bytes(make_shapes(n, size=16, seed=5), "texture"))
    return folder


def write_shapes_splits(folder: Path, n_train: int, n_test: int) -> Path:
    """``folder`` with a train and a test split of generated shapes (16 px, labelled by
    texture), as Hugging Face Parquet exports: the finetuning tests' data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-00000-of-00001.parquet").write_bytes(to_parquet_bytes(make_shapes(n_train, size=16, seed=1), "texture"))
    (folder / "test-00000-of-00001.parquet").write_bytes(to_parquet_bytes(make_shapes(n_test, size=16, seed=2), "texture"))
    return folder


def tiny_config(tmp: Path, output: str, **overrides: Any) -> dict[str, Any]:
    """A run config over the tiny model: 3 layers, 2 seeds, 12 samples, 15 iterations."""
    pretrained = tmp / "ckpt" / "pretrained.safetensors"
    config = {
        "output": output,
        "model": TINY_MODEL,
        "pretrained": str(pretrained),
        "checkpoints": str(tmp / "ckpt" / "ft" / "epoch={epoch}.safetensors"),
        "data": {"format": "parquet", "path": str(tmp / "data"), "n_samples": 12},
        "layers": "all",
        "seeds": [0, 1],
        "inversion": {"iterations": 15, "step_size": 0.5},
        "resources": {"num_cpus": 1},
    }
    config.update(overrides)
    return config


def tiny_factory(width: int = 16, depth: int = 2):
    """A user factory ("tests.helpers:tiny_factory"): a timm ViT with a custom head, built in code."""
    import timm
    from torch import nn

    network = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                embed_dim=width, depth=depth, num_heads=2, num_classes=0)  # fmt: skip
    network.head = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 3))
    return network


def write_job_dir(tmp: Path, epochs: list[int], **overrides: Any) -> Path:
    """Checkpoints, eval data and a folder holding only run.yaml: a `ray job submit --working-dir`."""
    import yaml

    write_checkpoints(tmp / "ckpt", epochs=epochs)
    write_eval_parquet(tmp / "data")
    job_dir = tmp / "job"
    job_dir.mkdir()
    (job_dir / "run.yaml").write_text(yaml.safe_dump(tiny_config(tmp, str(tmp / "out"), **overrides)))
    return job_dir


def hf_vit_factory(hidden_size: int = 32, layers: int = 2, image_size: int = 32):
    """A Hugging Face ``transformers`` ViT from a small config (random init, offline):
    "tests.helpers:hf_vit_factory" with ``layers: {modules: [encoder.layer.0, ...]}``."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=2 * hidden_size, image_size=image_size, patch_size=8)  # fmt: skip
    return ViTModel(config, add_pooling_layer=False)


def lora_vit_factory(rank: int = 4, **vit_kwargs: Any):
    """The tiny timm ViT of ``tiny_factory`` with a LoRA adapter (peft) on every attention's qkv;
    LoRA's B starts at zero, so before finetuning its features are the base model's."""
    from peft import LoraConfig, inject_adapter_in_model

    network = tiny_factory(**vit_kwargs)
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"]), network)


def open_in_process(config: Any) -> tuple[Any, Any, Any]:
    """(store, plan, spec) of a parsed run config, for the in-process executor."""
    from invariance.engine.plan import make_plan
    from invariance.engine.steps import RunSpec
    from invariance.io.storage import Store

    store = Store(config.output)
    plan = make_plan(config, store)
    return store, plan, RunSpec.from_plan(config, store, plan)
