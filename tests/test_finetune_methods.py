"""The finetuning methods researchers compare (issue 17): LP-FT, adapters (LoRA, bottleneck, FiLM)
and FLYP, each writing a checkpoint series `invariance run` analyses against its base."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from invariance.config import ModelConfig, parse_config
from invariance.core.models import FeatureModel, build_network
from invariance.engine.execute import execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import RunSpec, Workspace
from invariance.errors import ConfigError
from invariance.io.run_metrics import read_run_metrics
from invariance.io.storage import Store
from invariance.training.adapters import adapted_model, add_adapter, merged_state
from invariance.training.config import parse_finetune_config
from invariance.training.run import run_finetune
from tests.helpers import TINY_MODEL, write_shapes_splits

MODEL = {"arch": TINY_MODEL["arch"], "kwargs": {**TINY_MODEL["kwargs"], "num_classes": 4}}
NO_CORRUPTIONS = {"names": []}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_splits(tmp_path_factory.mktemp("shapes"), n_train=32, n_test=16)


def raw_config(data_dir: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    raw = {
        "output": str(output),
        "model": MODEL,
        "data": {"format": "parquet", "path": str(data_dir), "n_test": 16},
        "optimizer": "adamw",
        "lr": 0.01,
        "epochs": 2,
        "batch_size": 16,
        "corruptions": NO_CORRUPTIONS,
    }
    return {**raw, **overrides}


def encoder_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in state if not key.startswith("head.")]


# --- LP-FT -------------------------------------------------------------------------------------


def test_lp_ft_probes_with_a_frozen_encoder_then_finetunes(tmp_path, data_dir, torch_single_thread) -> None:
    raw = raw_config(data_dir, tmp_path / "lpft", method="lp_ft", lp_epochs=1, lp_lr=0.05, epochs=2,
                     model={**MODEL, "kwargs": {**MODEL["kwargs"], "drop_rate": 0.1}},
                     knn={"k": 5})  # fmt: skip
    result = run_finetune(parse_finetune_config(raw), on_epoch=None)
    initial, first, second = (load_file(tmp_path / "lpft" / name)
                              for name in ("initial.safetensors", "epoch=01.safetensors", "epoch=02.safetensors"))  # fmt: skip
    for key in encoder_keys(initial):  # stage lp: the encoder bitwise unchanged (dropout in eval mode too)
        assert torch.equal(initial[key], first[key]), key
    assert not torch.equal(initial["head.weight"], first["head.weight"])  # the head trained
    assert any(not torch.equal(first[key], second[key]) for key in encoder_keys(first))  # stage ft: all of it
    metrics = read_run_metrics(str(tmp_path / "lpft"))
    assert metrics["stage"].to_list() == ["lp", "ft"] and metrics["method"].to_list() == ["lp_ft"] * 2
    assert metrics["lr"].to_list() == pytest.approx([0.05, 0.01])  # each stage its own lr and schedule
    assert metrics["knn_k"].to_list() == [5, 5] and metrics["knn_top1"].is_between(0, 1).all()
    assert metrics["knn_top5"].is_null().all()  # 4 classes: no top-5
    assert result.epochs_run == 2


def test_linear_probe_trains_only_the_head(tmp_path, data_dir, torch_single_thread) -> None:
    raw = raw_config(data_dir, tmp_path / "lp", method="linear_probe", epochs=1)
    run_finetune(parse_finetune_config(raw), on_epoch=None)
    initial, first = load_file(tmp_path / "lp" / "initial.safetensors"), load_file(tmp_path / "lp" / "epoch=01.safetensors")
    assert all(torch.equal(initial[key], first[key]) for key in encoder_keys(initial))
    assert not torch.equal(initial["head.weight"], first["head.weight"])


# --- adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [{"kind": "lora", "rank": 2}, {"kind": "bottleneck", "reduction_factor": 4},
                                     {"kind": "film"}])  # fmt: skip
def test_adapters_at_init_give_the_base_features_exactly(adapter, torch_single_thread) -> None:
    torch.manual_seed(0)
    base = build_network(ModelConfig(**TINY_MODEL))
    adapted = add_adapter(copy.deepcopy(base), **adapter)
    # the run's factory rebuilds the same module: an unmerged checkpoint loads into it
    rebuilt = adapted_model(arch=TINY_MODEL["arch"], kwargs=TINY_MODEL["kwargs"], adapter=adapter)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in adapted.state_dict().items()}
    assert len(adapted.state_dict()) > len(base.state_dict())
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ours = FeatureModel(adapted, mean, std).layer_features(images, [0, 1, 2])
    theirs = FeatureModel(base, mean, std).layer_features(images, [0, 1, 2])
    for layer in (0, 1, 2):
        assert torch.equal(ours[layer], theirs[layer]), layer


@pytest.mark.parametrize(("arch", "body"), [("resnet18", ("layer",)), ("regnetx_002", ("s",)), ("convnext_atto", ("stages",)),
                                           ("densenet121", ("features.denseblock", "features.transition")),
                                           ("vgg11", ("features.", "pre_logits."))])  # fmt: skip
def test_lora_adapts_the_body_of_convolutional_families_and_merges_there(arch, body, torch_single_thread) -> None:
    """The default LoRA targets are the body's Linears and ungrouped convs (ResNets' layer1..4,
    RegNets' s1..s4, ConvNeXt's stages, DenseNet's dense blocks): not the image-facing conv, not
    the stem, not the classifier, not the depthwise convs; the adapted model is the base at init,
    and merging gives the unmerged outputs."""
    from invariance.training.adapters import default_lora_targets

    kwargs = {"num_classes": 4}
    torch.manual_seed(0)
    base = build_network(ModelConfig(arch=arch, kwargs=kwargs)).eval()
    targets = default_lora_targets(base)
    assert targets and all(t.startswith(body) for t in targets), targets[:5]
    modules = dict(base.named_modules())
    assert all(getattr(modules[t], "groups", 1) == 1 and getattr(modules[t], "in_channels", 0) != 3 for t in targets)
    assert not any("stem" in t or modules[t] is base.get_classifier() for t in targets)
    network = add_adapter(copy.deepcopy(base), "lora", rank=2).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(network(images), base(images))
        for name, parameter in network.named_parameters():
            if "lora_B" in name:  # a trained update
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        merged = build_network(ModelConfig(arch=arch, kwargs=kwargs)).eval()
        merged.load_state_dict(merged_state(network))
        torch.testing.assert_close(merged(images), network(images), atol=1e-4, rtol=1e-4)
        assert (merged(images) - base(images)).abs().max() > 1e-4


def test_lora_merged_weights_give_the_unmerged_outputs(torch_single_thread) -> None:
    torch.manual_seed(0)
    network = add_adapter(build_network(ModelConfig(**TINY_MODEL)), "lora", rank=2, alpha=4.0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_" in name:  # a trained update: B is no longer zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    merged = build_network(ModelConfig(**TINY_MODEL))
    merged.load_state_dict(merged_state(network))  # strict: the base architecture's keys exactly
    images = torch.rand(4, 3, 16, 16, generator=generator)
    network.eval(), merged.eval()
    with torch.no_grad():
        unmerged_out, merged_out, plain = network(images), merged(images), build_network(ModelConfig(**TINY_MODEL))(images)
    torch.testing.assert_close(merged_out, unmerged_out, atol=1e-5, rtol=1e-5)
    assert (merged_out - plain).abs().max() > 1e-2  # the update did change the outputs


def test_an_adapter_run_trains_the_adapter_and_head_only(tmp_path, data_dir, torch_single_thread) -> None:
    raw = raw_config(data_dir, tmp_path / "film", adapter={"kind": "film"}, epochs=1)
    run_finetune(parse_finetune_config(raw), on_epoch=None)
    initial, zero, first = (load_file(tmp_path / "film" / name)
                            for name in ("initial.safetensors", "epoch=00.safetensors", "epoch=01.safetensors"))  # fmt: skip
    adapter_keys = [key for key in first if ".film." in key]
    assert adapter_keys and all(torch.equal(zero[key], torch.zeros_like(zero[key])) for key in adapter_keys)
    assert any(not torch.equal(zero[key], first[key]) for key in adapter_keys)
    assert set(first) - set(adapter_keys) == set(initial)  # FiLM adds blocks.N.film.*, moves nothing
    for key in initial:  # the base: frozen
        if not key.startswith("head."):
            assert torch.equal(initial[key], first[key]), key
    assert not torch.equal(initial["head.weight"], first["head.weight"])


def test_config_errors_name_the_method_keys(tmp_path, data_dir) -> None:
    for change, key in [
        ({"method": "lp_ft"}, "lp_epochs"),
        ({"method": "lp_ft", "lp_epochs": 2}, "lp_epochs"),
        ({"adapter": {"kind": "film", "merge": True}}, "adapter.merge"),
        ({"adapter": {"kind": "prefix"}}, "adapter.kind"),
        ({"method": "linear_probe", "adapter": {"kind": "lora"}}, "adapter"),
        ({"task": "contrastive"}, "clip"),
        ({"knn": {"k": 0}}, "knn.k"),
        ({"sweep": {"weight_decy": [0.1, 0.01]}}, "'weight_decy' is not a finetune config key; did you mean weight_decay"),
    ]:
        with pytest.raises(ConfigError) as error:
            parse_finetune_config(raw_config(data_dir, tmp_path / "x", **change))
        assert key in str(error.value), (change, str(error.value))
    with pytest.raises(ConfigError, match="model: a contrastive run builds its model from clip"):
        parse_finetune_config(raw_config(data_dir, tmp_path / "c", task="contrastive", clip={"model_config": TINY_CLIP}))
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        run_finetune(parse_finetune_config(raw_config(data_dir, tmp_path / "t", adapter={"kind": "lora", "target_modules": ["nope"]})),
                     on_epoch=None)  # fmt: skip


def test_flyp_trains_with_the_papers_optimizer_unless_told_otherwise(tmp_path, data_dir) -> None:
    """task: contrastive defaults to FLYP's AdamW, lr 1e-5, weight decay 0.1, 500 warmup steps;
    what the config says wins; classification keeps SGD."""
    raw = {k: v for k, v in raw_config(data_dir, tmp_path / "f").items() if k not in ("model", "optimizer", "lr")}
    flyp = parse_finetune_config({**raw, "task": "contrastive", "clip": {"model_config": TINY_CLIP}})
    assert (flyp.optimizer, flyp.lr, flyp.weight_decay, flyp.warmup_steps) == ("adamw", 1e-5, 0.1, 500)
    told = parse_finetune_config({**raw, "task": "contrastive", "clip": {"model_config": TINY_CLIP},
                                  "optimizer": "sgd", "warmup_steps": 3})  # fmt: skip
    assert (told.optimizer, told.warmup_steps, told.lr) == ("sgd", 3, 1e-5)
    plain = parse_finetune_config({**raw, "model": MODEL})
    assert (plain.optimizer, plain.warmup_steps) == ("sgd", 0)


def test_sweeps_vary_method_and_adapter_keys(tmp_path, data_dir) -> None:
    raw = raw_config(data_dir, tmp_path / "out", epochs=3, adapter={"kind": "lora"},
                     sweep={"adapter.kind": ["lora", "film"], "adapter.rank": [2, 4], "lr": [0.01]})  # fmt: skip
    trials = parse_finetune_config(raw).trials()
    assert [name for name, _ in trials][:2] == ["adapter.kind-lora_adapter.rank-2_lr-0.01", "adapter.kind-lora_adapter.rank-4_lr-0.01"]
    assert [(t.adapter.kind, t.adapter.rank) for _, t in trials] == [("lora", 2), ("lora", 4), ("film", 2), ("film", 4)]
    methods = parse_finetune_config(raw_config(data_dir, tmp_path / "m", epochs=3, lp_epochs=1,
                                               sweep={"method": ["full", "lp_ft"], "lp_epochs": [1, 2]})).trials()  # fmt: skip
    assert [(t.method, t.lp_epochs) for _, t in methods] == [("full", 1), ("full", 2), ("lp_ft", 1), ("lp_ft", 2)]
    assert [t.stage(1) for _, t in methods] == ["ft", "ft", "lp", "lp"]  # lp_epochs is read by lp_ft only
    with pytest.raises(ConfigError, match="lp_epochs"):  # lp_epochs 3 is not < epochs 3: refused up front
        parse_finetune_config(raw_config(data_dir, tmp_path / "b", epochs=3, method="lp_ft", lp_epochs=1,
                                         sweep={"lp_epochs": [1, 3]}))  # fmt: skip


# --- analysed by `invariance run` --------------------------------------------------------------


def analyse(tmp_path: Path, run_dir: Path, data_dir: Path, name: str) -> tuple[pl.DataFrame, Any]:
    """The run config of ``run_dir/analysis.json``, run in process and reduced: the forgetting curves."""
    sections = json.loads((run_dir / "analysis.json").read_text())
    raw = {
        "output": str(tmp_path / name),
        **sections,
        "pretrained": str(run_dir / "initial.safetensors"),
        "checkpoints": str(run_dir / "epoch={epoch}.safetensors"),
        "data": {"format": "parquet", "path": str(data_dir), "n_samples": 8},
        "seeds": [0],
        "inversion": {"iterations": 5},
    }
    config = parse_config(raw)
    store = Store(config.output)
    plan = make_plan(config, store)
    spec = RunSpec.from_plan(config, store, plan)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert summary.failures == []
    plan.refresh(store)
    reduce_plan(plan, store, make_plots=False)
    return pl.read_parquet(tmp_path / name / "reduced" / "curves.parquet"), config


@pytest.mark.parametrize("adapter", [{"kind": "bottleneck", "reduction_factor": 4}, {"kind": "lora", "rank": 2, "merge": True},
                                     {"kind": "lora", "rank": 2}, {"kind": "film"}])  # fmt: skip
def test_an_adapter_series_is_analysed_against_its_base(adapter, tmp_path, data_dir, torch_single_thread) -> None:
    run_dir = tmp_path / "run"
    raw = raw_config(data_dir, run_dir, adapter=adapter, lr=0.05, corruptions={"names": ["contrast"], "severities": [1]})
    run_finetune(parse_finetune_config(raw), on_epoch=None)
    curves, config = analyse(tmp_path, run_dir, data_dir, "stir")
    assert (config.finetuned_model is None) == adapter.get("merge", False)  # merged LoRA: plain weights
    assert sorted(set(curves["epoch"])) == [0, 1, 2]
    at_init = curves.filter(pl.col("epoch") == 0)
    assert at_init["forgetting_mean"].to_list() == [0.0] * at_init.height  # the adapter at init is the base
    assert at_init["cka_divergence_mean"].abs().max() < 1e-9
    assert curves.filter(pl.col("epoch") == 2)["cka_divergence_mean"].abs().max() > 0  # and it trained


# --- FLYP --------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 2, "head_width": 8, "mlp_ratio": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 220)}


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of three plain colours (noisy), the class names its subfolders."""
    root = tmp_path_factory.mktemp("colours")
    generator = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 8)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = np.clip(np.array(rgb) + generator.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


def test_flyp_lowers_the_contrastive_loss_and_beats_chance(tmp_path, colour_folder, data_dir, torch_single_thread) -> None:
    pytest.importorskip("open_clip")
    run_dir = tmp_path / "flyp"
    raw = {
        "output": str(run_dir),
        "task": "contrastive",
        "clip": {"model_config": TINY_CLIP, "templates": ["a photo of a {}.", "a {} image."]},
        "data": {"format": "imagefolder", "path": str(colour_folder), "n_test": 24},
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.1,
        "warmup_steps": 2,
        "epochs": 6,
        "batch_size": 12,
        "corruptions": {"names": ["contrast"], "severities": [1]},
        "knn": {"k": 5},
    }
    run_finetune(parse_finetune_config(raw), on_epoch=None)
    metrics = read_run_metrics(str(run_dir))
    assert metrics["train_loss"][-1] < 0.8 * metrics["train_loss"][0]
    assert metrics["clean_accuracy"][-1] > 0.6  # chance: 1/3
    assert metrics["corrupted_accuracy"].is_not_null().all() and metrics["knn_top1"].is_not_null().all()
    assert metrics["lr"][0] == pytest.approx(0.003 / 3)  # the first warmup step
    # the image tower's checkpoints are a timm ViT: analysed end to end by timm name
    sections = json.loads((run_dir / "analysis.json").read_text())
    assert sections["model"]["arch"] == "vit_base_patch16_clip_224"
    curves, _ = analyse(tmp_path, run_dir, colour_folder_as_parquet(tmp_path, colour_folder), "flyp-stir")
    assert sorted(set(curves["epoch"])) == list(range(1, 7))
    assert curves["forgetting_mean"].is_not_null().all()


def colour_folder_as_parquet(tmp_path: Path, colour_folder: Path) -> Path:
    """The colour test images as a Parquet eval set (the run config's data)."""
    import io

    folder = tmp_path / "colour-parquet"
    folder.mkdir()
    rows = []
    for path in sorted((colour_folder / "test").rglob("*.png")):
        rows.append({"image": {"bytes": path.read_bytes(), "path": None}, "label": list(COLOURS).index(path.parent.name)})
    buffer = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buffer)
    (folder / "test-00000-of-00001.parquet").write_bytes(buffer.getvalue())
    return folder


def test_flyp_on_data_without_class_names_asks_for_them(tmp_path, data_dir, torch_single_thread) -> None:
    pytest.importorskip("open_clip")
    raw = {**raw_config(data_dir, tmp_path / "names", task="contrastive", clip={"model_config": TINY_CLIP})}
    raw.pop("model")
    with pytest.raises(ConfigError, match="clip.class_names: .* stores no class names"):
        run_finetune(parse_finetune_config(raw), on_epoch=None)


class Killed(Exception):
    pass


def test_a_killed_merged_lora_lp_ft_run_resumes_to_the_same_weights(tmp_path, data_dir, torch_single_thread) -> None:
    raw = raw_config(data_dir, tmp_path / "killed", method="lp_ft", lp_epochs=1, epochs=3,
                     adapter={"kind": "lora", "rank": 2, "merge": True})  # fmt: skip

    def kill(row: dict[str, Any]) -> None:
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run_finetune(parse_finetune_config(raw), on_epoch=kill)
    resumed = run_finetune(parse_finetune_config(raw), on_epoch=None)
    assert resumed.resumed_from == 2 and resumed.epochs_run == 1
    run_finetune(parse_finetune_config({**raw, "output": str(tmp_path / "whole")}), on_epoch=None)
    ours, theirs = load_file(tmp_path / "killed" / "epoch=03.safetensors"), load_file(tmp_path / "whole" / "epoch=03.safetensors")
    assert ours.keys() == theirs.keys() and not any("lora_" in key for key in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_film_modulates_the_residual_stream_after_the_attention_residual() -> None:
    """x = x + attn; x = x * (1 + gamma) + beta; x = x + mlp(norm2(x)), per block."""
    from invariance.training.adapters import add_adapter

    torch.manual_seed(0)
    base = build_network(ModelConfig(**TINY_MODEL)).eval()
    adapted = add_adapter(copy.deepcopy(base), "film").eval()
    block, plain = adapted.blocks[0], base.blocks[0]
    x = torch.randn(2, 5, plain.norm1.normalized_shape[0])
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(x))  # the identity at init
        block.film.gamma.fill_(0.5)
        block.film.beta.fill_(0.1)
        stream = x + plain.attn(plain.norm1(x))
        stream = stream * 1.5 + 0.1
        torch.testing.assert_close(block(x), stream + plain.mlp(plain.norm2(stream)))
