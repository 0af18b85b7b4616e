"""Weight-interpolation paths (issue 15): theta(alpha) = (1 - alpha) * pt + alpha * ft, in process."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from invariance.config import ModelConfig, parse_config
from invariance.core.interpolation import interpolate_state, interpolated_model, pretrained_name
from invariance.core.models import FeatureModel, load_model
from invariance.engine.execute import execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from invariance.errors import ConfigError, DataError
from invariance.io.layout import KNN_ALPHA_PLOT, KNN_LAYERS_PLOT, REDUCED_KNN, KnnUnit, StirUnit, interpolation_plot_key
from invariance.io.storage import Store
from tests.helpers import GOLDEN_TOLERANCE, TINY_MODEL, tiny_config, write_checkpoints, write_eval_parquet, open_in_process

GOLDEN = Path(__file__).resolve().parent / "data"
KNN = {"train": {"format": "parquet", "path": "", "n_samples": 24}, "k": [3]}


def _config(tmp_path: Path, **overrides):
    knn = overrides.pop("knn", None)
    if knn is not None:  # a bank of the eval images' bytes in its own folder: the eval files are refused as a bank
        if not (tmp_path / "knn_bank").exists() and (tmp_path / "data").exists():
            import shutil

            shutil.copytree(tmp_path / "data", tmp_path / "knn_bank")
        knn = {**knn, "train": {**knn["train"], "path": str(tmp_path / "knn_bank")}}
        overrides["knn"] = knn
    return parse_config(tiny_config(tmp_path, str(tmp_path / "out"), **overrides))


def test_alpha_zero_measures_nothing_alpha_one_is_the_checkpoint_and_a_new_alpha_computes_only_itself(
    tmp_path: Path, torch_single_thread
) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    plain_plan = make_plan(_config(tmp_path), Store(str(tmp_path / "out")))
    config = _config(tmp_path, interpolation={"alphas": [0.0, 1.0]}, knn=KNN)
    store, plan, spec = open_in_process(config)
    # alpha 1 is the checkpoint itself: the same units under the same keys as without interpolation
    assert plan.settings_hash == plain_plan.settings_hash
    plain_keys = {plain_plan.data_key(u) for u in [*plain_plan.of_type(StirUnit), *plain_plan.units["cka"]]}
    assert plain_keys <= {plan.data_key(u) for u in [*plan.of_type(StirUnit), *plan.units["cka"]]}
    assert {u.alpha for u in plan.of_type(StirUnit) if u.epoch == 1} == {1.0}  # epochs: last (2) gets the path
    assert [u for u in plan.units["knn"] if u.model == "pt"] == [KnnUnit(-1, "pt")]
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert summary.failures == [] and summary.completed == len(plan.work())
    plan.refresh(store)
    result = reduce_plan(plan, store)
    curves = result.curves
    assert set(curves["alpha"].unique()) == {0.0, 1.0} and set(curves["run"].unique()) == {""}
    at_zero = curves.filter(pl.col("alpha") == 0.0)
    assert at_zero["epoch"].unique().to_list() == [2] and len(at_zero) == len(plan.layers)
    for metric in ("forgetting_mean", "learning_mean", "cka_divergence_mean", "forgetting_debiased_mean"):
        assert at_zero[metric].to_list() == [0.0] * len(plan.layers), metric
    assert curves.filter(pl.col("alpha") == 1.0)["forgetting_mean"].abs().max() > 1e-4  # the checkpoints moved
    # alpha 1 rows equal the pinned rows of the same run without interpolation
    stir = store.read_parquet([plan.data_key(u) for u in plan.of_type(StirUnit)])
    assert {"run", "alpha"} <= set(stir.columns)
    plain_stir = stir.filter(pl.col("alpha") == 1.0)
    keys = ["epoch", "ref_model", "ref_layer", "target_model", "target_layer", "seed"]
    golden = pl.read_csv(GOLDEN / "golden_stir.csv")
    joined = golden.join(plain_stir, on=keys, how="left", suffix="_now")
    assert len(joined) == len(plain_stir) == len(golden)
    assert (joined["stir"] - joined["stir_now"]).abs().max() < GOLDEN_TOLERANCE["stir"]
    # flow and kNN tables carry alpha too; plots against alpha and per layer were written
    assert set(result.flow["alpha"].unique()) == {0.0, 1.0}
    knn = pl.read_parquet(store.path(REDUCED_KNN))
    assert knn.columns == ["run", "checkpoint", "epoch", "alpha", "model", "layer", "k", "top1", "top5", "n_train",
                           "n_test", "settings"]  # fmt: skip
    assert knn["top1"].is_between(0.0, 1.0).all() and knn["top5"].is_null().all()  # 3 classes: no top-5
    assert (knn["n_train"].unique().to_list(), knn["n_test"].unique().to_list()) == ([24], [12])
    pretrained = knn.filter(pl.col("model") == "pt").sort("layer")
    # ft at alpha 0 holds the pretrained weights (one module, extra: keep): the same kNN accuracy
    zero = knn.filter((pl.col("model") == "ft") & (pl.col("alpha") == 0.0)).sort("layer")
    assert zero["top1"].to_list() == pretrained["top1"].to_list()
    for key in (KNN_LAYERS_PLOT, KNN_ALPHA_PLOT, interpolation_plot_key(2), "reports/index.html"):
        assert store.exists(key), key
    # status.json names the kNN table's settings: a table of other settings is visible as such
    assert json.loads(store.get("reduced/status.json"))["knn_settings"] == plan.hashes["knn"] == knn["settings"][0]
    assert "Along the weight path" in store.get("reports/index.html").decode()

    # a point of the path missing one shard (its record gone, as after a failed unit): left out of the
    # tables, while the checkpoint's own rows (alpha 1) stay
    lost = next(u for u in plan.of_type(StirUnit) if u.alpha == 0.0)
    saved_record = store.get(plan.record_key(lost))
    store.fs.rm_file(store.path(plan.record_key(lost)))
    plan.refresh(store)
    assert plan.incomplete_checkpoints() == {} and plan.incomplete_points() == {("", 2, 0.0)}
    partial = reduce_plan(plan, store)
    assert partial.complete_checkpoints == [("", 1), ("", 2)]
    assert set(partial.curves["alpha"].unique()) == {1.0} and sorted(partial.curves["epoch"].unique()) == [1, 2]
    # said, not silent: status.json and the report name the point left out
    assert partial.incomplete_path_points == {"epoch 2 alpha 0": 1}
    assert json.loads(store.get("reduced/status.json"))["incomplete_path_points"] == {"epoch 2 alpha 0": 1}
    assert "Weight-path points left out until computed (missing shards): epoch 2 alpha 0: 1 shard" in store.get(
        "reports/index.html").decode()
    store.put(plan.record_key(lost), saved_record)
    plan.refresh(store)

    # a rerun adding alpha 0.5 computes its own units only; pt kNN stays computed once per run
    wider = _config(tmp_path, interpolation={"alphas": [0.0, 0.5, 1.0]}, knn=KNN)
    store, plan, spec = open_in_process(wider)
    work = [unit for unit, _ in plan.work()]
    assert work and {getattr(u, "alpha", None) for u in work} == {0.5}
    assert len(work) == 2 * len(plan.layers) * len(wider.seeds) + 1 + 1 + 1  # STIR, CKA, subspace, kNN of epoch 2 at 0.5
    assert {(getattr(u, "model", "ft"), u.epoch) for u in work} == {("ft", 2)}
    assert execute_in_process(plan, spec, Workspace("cpu")).failures == []
    plan.refresh(store)
    assert plan.work() == []
    reduce_plan(plan, store, make_plots=False)
    knn = pl.read_parquet(store.path(REDUCED_KNN))
    assert len(knn.filter(pl.col("model") == "pt")) == len(plan.layers)
    assert sorted(knn.filter(pl.col("epoch") == 2)["alpha"].unique().to_list()) == [0.0, 0.5, 1.0]
    assert len(store.list("knn")) == 1 + 2 + 2  # pretrained once; epochs 1, 2 at 1; epoch 2 at 0, 0.5
    # the guide's recipe (docs/recipes.md): the first alpha above x, one row per checkpoint with a path (epoch 2 only)
    from tests.test_readme import doc_section

    page, recipes = doc_section("Polars recipes")
    recipe = "x = 0.05" + recipes.split("```python\nx = 0.05", 1)[1].split("```", 1)[0]
    scope = {"pl": pl, "out": store.path("")}
    exec(compile(recipe.replace("print(first_alpha)", ""), str(page), "exec"), scope)  # noqa: S102
    first = scope["first_alpha"]
    assert first.select("run", "epoch").rows() == [("", 2)]
    early = scope["early"].filter(pl.col("epoch") == 2).sort("alpha")
    above = early.filter(pl.col("forgetting") > 0.05)["alpha"].to_list()
    assert first["first_alpha_above_x"][0] == (above[0] if above else None)


def test_interpolated_state_is_exact_at_the_ends() -> None:
    generator = torch.Generator().manual_seed(0)
    pretrained = {"w": torch.randn(4, 3, generator=generator), "steps": torch.tensor(5)}
    finetuned = {"w": torch.randn(4, 3, generator=generator), "steps": torch.tensor(9), "head": torch.randn(2, generator=generator)}
    assert torch.equal(interpolate_state(pretrained, finetuned, 0.0)["w"], pretrained["w"])
    assert torch.equal(interpolate_state(pretrained, finetuned, 1.0)["w"], finetuned["w"])
    middle = interpolate_state(pretrained, finetuned, 0.25, "keep")
    assert torch.allclose(middle["w"], 0.75 * pretrained["w"] + 0.25 * finetuned["w"])
    assert torch.equal(middle["head"], finetuned["head"]) and int(middle["steps"]) == 5
    assert torch.equal(interpolate_state(pretrained, finetuned, 0.25, "scale")["head"], 0.25 * finetuned["head"])
    with pytest.raises(ConfigError, match="interpolation.extra"):
        interpolate_state({"w": torch.zeros(3)}, {"w": torch.zeros(4)}, 0.5, "keep")


def test_an_adapter_checkpoint_scaled_to_alpha_zero_gives_the_base_features_exactly(torch_single_thread) -> None:
    pytest.importorskip("peft")
    torch.manual_seed(0)
    base_config = ModelConfig(factory="tests.helpers:tiny_factory")
    adapted_config = ModelConfig(factory="tests.helpers:lora_vit_factory")
    base = load_model(base_config, None)
    adapted = load_model(adapted_config, None)
    # the finetuned adapter model: the base weights moved, LoRA's B (zero at init) trained away from 0
    state = adapted.network.state_dict()
    for key, value in base.network.state_dict().items():
        wrapped = key.replace("qkv.", "qkv.base_layer.")
        state[wrapped] = value + 0.1 * torch.randn_like(value)
    for key in [k for k in state if "lora_B" in k]:
        state[key] = torch.randn_like(state[key])
    adapted.network.load_state_dict(state)
    images = torch.rand(4, 3, 16, 16)
    layers = range(base.n_layers)
    expected = base.layer_features(images, layers)
    scaled = interpolated_model(base, adapted, 0.0, "scale").layer_features(images, layers)
    kept = interpolated_model(base, adapted, 0.0, "keep").layer_features(images, layers)
    for layer in layers:
        assert torch.equal(scaled[layer], expected[layer]), layer
    assert max((kept[layer] - expected[layer]).abs().max() for layer in layers) > 1e-3  # keep: LoRA stays on
    assert max((adapted.layer_features(images, layers)[layer] - expected[layer]).abs().max() for layer in layers) > 1e-3


def test_faults_name_their_key(tmp_path: Path, torch_single_thread) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"interpolation\.alphas.*\[1\.5\]"):
        _config(tmp_path, interpolation={"alphas": [0.0, 1.5]})
    with pytest.raises(ConfigError, match=r"knn\.k: 30 neighbours"):
        _config(tmp_path, knn={**KNN, "k": [30]})
    # a finetuned module whose head has another shape: no path under extra: keep, before any task
    other_head = {**TINY_MODEL, "kwargs": {**TINY_MODEL["kwargs"], "num_classes": 5}}
    config = _config(tmp_path, finetuned_model=other_head, interpolation={"alphas": [0.5]})
    with pytest.raises(ConfigError, match=r"interpolation\.extra: keep.*head\.weight"):
        make_plan(config, Store(config.output))
    # a bank without labels
    (tmp_path / "bank").mkdir()
    import pyarrow.parquet as pq

    table = pq.read_table(next((tmp_path / "data").glob("*.parquet"))).drop(["label"])
    pq.write_table(table, tmp_path / "bank" / "test.parquet")
    config = _config(tmp_path, knn={**KNN, "train": {"format": "parquet", "path": "", "n_samples": 24}})
    config = config.model_copy(update={"knn": config.knn.model_copy(update={"train": config.knn.train.model_copy(
        update={"path": str(tmp_path / "bank")})})})  # fmt: skip
    # found before any task (the schema, no image loaded): every kNN shard would fail, and stop the STIR shards
    with pytest.raises(DataError, match=r"^knn\.train \(the kNN probe needs class labels; knn\.label_column 'label'\): "
                                        r".*no column 'label'"):
        make_plan(config, Store(config.output))
    assert not (tmp_path / "out").exists()
    # a bank file that is not Parquet: named, not a pyarrow traceback
    good_bytes = (tmp_path / "bank" / "test.parquet").read_bytes()
    (tmp_path / "bank" / "test.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"^knn\.train .*test\.parquet: not a readable Parquet file"):
        make_plan(config, Store(config.output))
    (tmp_path / "bank" / "test.parquet").write_bytes(good_bytes)
    # eval images without labels, and an image folder without class subfolders, likewise
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(b"not read")
    loose = config.model_copy(update={"knn": config.knn.model_copy(update={"train": config.knn.train.model_copy(
        update={"path": str(tmp_path / "loose"), "format": "imagefolder"})})})  # fmt: skip
    with pytest.raises(DataError, match=r"^knn\.train .*one subfolder per class"):
        make_plan(loose, Store(config.output))
    unlabelled_eval = _config(tmp_path, knn=KNN)
    unlabelled_eval = unlabelled_eval.model_copy(update={"data": unlabelled_eval.data.model_copy(update={"path": str(tmp_path / "bank")})})
    with pytest.raises(DataError, match=r"^data \(the kNN probe needs class labels"):
        make_plan(unlabelled_eval, Store(config.output))
    # a knn.token_policy the model cannot give
    no_cls = {**TINY_MODEL, "kwargs": {**TINY_MODEL["kwargs"], "class_token": False, "global_pool": "avg"}}
    with pytest.raises(ConfigError, match=r"^knn\.token_policy: 'cls' needs a model with a class token"):
        make_plan(_config(tmp_path, model=no_cls, knn={**KNN, "token_policy": "cls"}), Store(config.output))
    with pytest.raises(ConfigError, match=r"^knn\.token_policy: 'cls' needs a model with a class token"):  # the checkpoints' module
        make_plan(_config(tmp_path, finetuned_model=no_cls, token_policy="mean", knn={**KNN, "token_policy": "cls"}),
                  Store(config.output))  # fmt: skip


def test_scale_moves_an_adapters_update_linearly_in_alpha() -> None:
    """LoRA adds (alpha_lora / r) B A: scaling only B (zero at init) gives alpha times the update;
    scaling A too would give alpha squared. Likewise a bottleneck's up, not its down."""
    generator = torch.Generator().manual_seed(0)
    pretrained = {"qkv.weight": torch.randn(6, 4, generator=generator)}
    finetuned = {
        "qkv.base_layer.weight": pretrained["qkv.weight"].clone(),
        "qkv.lora_A.default.weight": torch.randn(2, 4, generator=generator),
        "qkv.lora_B.default.weight": torch.randn(6, 2, generator=generator),
        "blocks.0.mlp.1.down.weight": torch.randn(3, 4, generator=generator),
        "blocks.0.mlp.1.up.weight": torch.randn(4, 3, generator=generator),
    }
    full = finetuned["qkv.lora_B.default.weight"] @ finetuned["qkv.lora_A.default.weight"]
    half = interpolate_state(pretrained, finetuned, 0.5, "scale")
    torch.testing.assert_close(half["qkv.lora_B.default.weight"] @ half["qkv.lora_A.default.weight"], 0.5 * full)
    assert torch.equal(half["blocks.0.mlp.1.down.weight"], finetuned["blocks.0.mlp.1.down.weight"])
    torch.testing.assert_close(half["blocks.0.mlp.1.up.weight"], 0.5 * finetuned["blocks.0.mlp.1.up.weight"])
    # "0" is a wrapper segment only right after `mlp` (this package's AfterMLP), not in a new head
    assert pretrained_name("blocks.0.mlp.0.fc1.weight", {"blocks.0.mlp.fc1.weight": 0}) == "blocks.0.mlp.fc1.weight"
    assert pretrained_name("head.0.weight", {"head.weight": 0}) is None


def test_a_knn_bank_replaced_in_place_is_planned_anew_and_a_missing_one_is_named(tmp_path: Path) -> None:
    """The kNN hash takes the listing of the bank's files (issue 13: inputs are fingerprinted):
    the same config over a changed bank keys new kNN shards; the STIR/CKA hash stays."""
    import shutil

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    shutil.copytree(tmp_path / "data", tmp_path / "bank")
    config = _config(tmp_path, knn=KNN)
    config = config.model_copy(update={"knn": config.knn.model_copy(update={"train": config.knn.train.model_copy(
        update={"path": str(tmp_path / "bank")})})})  # fmt: skip
    store = Store(config.output)
    before = make_plan(config, store)
    assert make_plan(config, store).hashes["knn"] == before.hashes["knn"]  # nothing changed: the same hash
    bank_file = next((tmp_path / "bank").glob("*.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(bank_file)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), bank_file)  # other bytes, same name and count
    after = make_plan(config, store)
    assert after.hashes["knn"] != before.hashes["knn"]
    assert after.settings_hash == before.settings_hash  # STIR and CKA shards are kept
    (tmp_path / "bank" / "extra.parquet").write_bytes(bank_file.read_bytes())  # a file added
    assert make_plan(config, store).hashes["knn"] not in (before.hashes["knn"], after.hashes["knn"])
    # the eval images' labels rewritten in place, images untouched: the kNN queries' truth changed
    eval_file = next((tmp_path / "data").glob("*.parquet"))
    eval_table = pq.read_table(eval_file)
    labels = eval_table.column("label").to_pylist()
    relabelled = eval_table.set_column(eval_table.schema.get_field_index("label"), "label",
                                       pa.array(labels[1:] + labels[:1], type=eval_table.schema.field("label").type))  # fmt: skip
    before_labels = make_plan(config, store)
    pq.write_table(relabelled, eval_file)
    after_labels = make_plan(config, store)
    assert after_labels.settings_hash == before_labels.settings_hash  # the images are the same
    assert after_labels.hashes["knn"] != before_labels.hashes["knn"]
    # the bank is resized as the eval images are: another size for it alone is refused
    sized = config.model_copy(update={"knn": config.knn.model_copy(update={"train": config.knn.train.model_copy(
        update={"image_size": 32})})})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^knn\.train\.image_size: 32, but the model is fed 16x16 images"):
        make_plan(sized, store)
    shutil.rmtree(tmp_path / "bank")
    with pytest.raises(DataError, match=r"knn\.train\.path"):
        make_plan(config, store)
