"""Issue 13, the input side: inputs that used to change the numbers without saying so.

Each test reproduces one fault of the issue: it failed (or passed silently with a wrong
result) before the fix.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from invariance.io.layout import InversionUnit
from invariance.config import DataConfig, ModelConfig
from invariance.core.models import load_model
from invariance.errors import CheckpointError, DataError
from invariance.io.checkpoints import discover_checkpoints, glob_escape, weights_fingerprint
from invariance.io.data import load_eval_images
from invariance.io.storage import Store, redact
from tests.helpers import TINY_MODEL, tiny_state
from tests.test_data import assert_colors, constant_png, write_hf_parquet, write_image_folder

# --- data: 16-bit images ------------------------------------------------------------------------


def test_16_bit_png_is_scaled_by_its_bit_depth_not_saturated(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, size=(20, 20), dtype=np.uint16)
    (tmp_path / "ds" / "a").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "ds" / "a" / "0.png")
    assert Image.open(tmp_path / "ds" / "a" / "0.png").mode == "I;16"
    loaded = load_eval_images(DataConfig(format="imagefolder", path=str(tmp_path / "ds"), n_samples=1), image_size=20)
    expected = torch.from_numpy(values.astype(np.float32) / 65535.0)
    # before: convert("RGB") clipped to 255 -> mean 0.997 (every pixel white)
    torch.testing.assert_close(loaded.images[0], expected.expand(3, 20, 20), rtol=0, atol=1e-6)
    assert abs(float(loaded.images.mean()) - float(expected.mean())) < 1e-6


# --- data: splits by exact name ----------------------------------------------------------------


def test_parquet_split_is_matched_by_name_not_substring(tmp_path):
    write_hf_parquet(tmp_path / "test-00000-of-00001.parquet", first=0, count=3)
    write_hf_parquet(tmp_path / "latest-00000.parquet", first=50, count=3)  # "test" is a substring of "latest"
    loaded = load_eval_images(DataConfig(format="parquet", path=str(tmp_path), n_samples=3), image_size=8)
    assert_colors(loaded.images, [0, 1, 2])
    with pytest.raises(DataError, match="holds only 3"):  # before: 6 rows, the latest file's too
        load_eval_images(DataConfig(format="parquet", path=str(tmp_path), n_samples=4), image_size=8)
    # HF folder layouts: <split>/0000.parquet and a bare <split>.parquet
    write_hf_parquet(tmp_path / "other" / "validation" / "0000.parquet", first=10, count=2)
    write_hf_parquet(tmp_path / "other" / "test.parquet", first=20, count=2)
    val = load_eval_images(DataConfig(format="parquet", path=str(tmp_path / "other"), split="validation", n_samples=2),
                           image_size=8)  # fmt: skip
    assert_colors(val.images, [10, 11])
    test = load_eval_images(DataConfig(format="parquet", path=str(tmp_path / "other"), n_samples=2), image_size=8)
    assert_colors(test.images, [20, 21])


def test_a_split_typo_is_an_error_naming_the_splits_found(tmp_path):
    write_hf_parquet(tmp_path / "pq" / "test-00000-of-00001.parquet", first=0, count=3)
    write_hf_parquet(tmp_path / "pq" / "train-00000-of-00001.parquet", first=10, count=3)
    with pytest.raises(DataError, match=r"data.split 'tets'.*splits found: \['test', 'train'\]"):
        load_eval_images(DataConfig(format="parquet", path=str(tmp_path / "pq"), split="tets", n_samples=2), image_size=8)
    write_image_folder(tmp_path / "img" / "train", {"a": [0, 1, 2, 3]})
    write_image_folder(tmp_path / "img" / "test", {"a": [7], "b": [8]})
    # before: a split folder that does not exist fell back to every folder, train/ included
    with pytest.raises(DataError, match=r"data.split 'tets'.*splits found: \['test', 'train'\]"):
        load_eval_images(DataConfig(format="imagefolder", path=str(tmp_path / "img"), split="tets", n_samples=2),
                         image_size=8)  # fmt: skip
    # a folder of class folders (no splits) still serves any split name
    write_image_folder(tmp_path / "flat", {"cat": [0], "dog": [1]})
    flat = load_eval_images(DataConfig(format="imagefolder", path=str(tmp_path / "flat"), n_samples=2), image_size=8)
    assert_colors(flat.images, [0, 1])


# --- data: hidden files, null cells --------------------------------------------------------------


def test_macos_resource_forks_and_hidden_files_are_ignored(tmp_path):
    write_image_folder(tmp_path / "img", {"a": [0, 1]})
    (tmp_path / "img" / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image
    (tmp_path / "img" / ".hidden").mkdir()
    (tmp_path / "img" / ".hidden" / "x.png").write_bytes(constant_png(9))
    loaded = load_eval_images(DataConfig(format="imagefolder", path=str(tmp_path / "img"), n_samples=2), image_size=8)
    assert_colors(loaded.images, [0, 1])
    with pytest.raises(DataError, match="holds only 2"):
        load_eval_images(DataConfig(format="imagefolder", path=str(tmp_path / "img"), n_samples=3), image_size=8)
    write_hf_parquet(tmp_path / "pq" / "test-00000-of-00001.parquet", first=0, count=2)
    (tmp_path / "pq" / "._test-00000-of-00001.parquet").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert_colors(load_eval_images(DataConfig(format="parquet", path=str(tmp_path / "pq"), n_samples=2),
                                   image_size=8).images, [0, 1])  # fmt: skip


def test_a_null_parquet_image_cell_is_an_error_naming_the_row(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": constant_png(0), "path": "0.png"}, None, {"bytes": None, "path": "2.png"}]
    pq.write_table(pa.table({"image": pa.array(cells, type=image_type)}), tmp_path / "test.parquet")
    config = DataConfig(format="parquet", path=str(tmp_path), n_samples=2)
    with pytest.raises(DataError, match=r"row 1 of the split \(row 1 of .*test.parquet\) holds no image"):
        load_eval_images(config, image_size=8)
    # a struct whose bytes are null, in a second file: the row is counted across the split
    cells = [{"bytes": constant_png(1), "path": "1.png"}, {"bytes": None, "path": "2.png"}]
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"image": pa.array(cells, type=image_type)}), tmp_path / "b" / "test.parquet")
    pq.write_table(pa.table({"image": pa.array(cells[:1] * 2, type=image_type)}), tmp_path / "b" / "test-0.parquet")
    with pytest.raises(DataError, match=r"row 3 of the split \(row 1 of .*b/test.parquet\)"):
        load_eval_images(config.model_copy(update={"path": str(tmp_path / "b"), "n_samples": 4}), image_size=8)


# --- data: the eval images' fingerprint -----------------------------------------------------------


def test_eval_fingerprint_follows_the_content_not_the_path(tmp_path):
    write_image_folder(tmp_path / "a", {"x": [0, 1, 2]})
    write_image_folder(tmp_path / "b", {"x": [0, 1, 2]})
    config = DataConfig(format="imagefolder", path=str(tmp_path / "a"), n_samples=3)
    first = load_eval_images(config, image_size=8).fingerprint
    assert len(first) == 16
    assert load_eval_images(config.model_copy(update={"path": str(tmp_path / "b")}), image_size=8).fingerprint == first
    assert load_eval_images(config, image_size=16).fingerprint != first  # another input size
    # a file replaced in place, same name: another fingerprint
    (tmp_path / "a" / "x" / "001.png").write_bytes(constant_png(77, height=31, width=40))
    assert load_eval_images(config, image_size=8).fingerprint != first
    # a plot written into the dataset becomes an eval image: another fingerprint
    (tmp_path / "b" / "x" / "000-plot.png").write_bytes(constant_png(55))
    assert load_eval_images(config.model_copy(update={"path": str(tmp_path / "b")}), image_size=8).fingerprint != first


# --- checkpoints ---------------------------------------------------------------------------------


def test_a_bracket_in_a_folder_name_is_literal_not_a_glob(tmp_path):
    run = tmp_path / "sweep[lr=0.1]"
    run.mkdir()
    for epoch in (1, 2):
        save_file({"w": torch.zeros(2)}, str(run / f"epoch={epoch}.safetensors"))
    found = discover_checkpoints(f"{run}/epoch={{epoch}}.safetensors")
    assert [c.epoch for c in found] == [1, 2]  # before: "matches no file"
    assert glob_escape("a[b]*?") == "a[[]b][*][?]"


def test_only_ascii_digits_are_epochs(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "epoch=1.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "epoch=\uff12.safetensors"))  # fullwidth 2
    save_file({"w": torch.zeros(2)}, str(tmp_path / "epoch=\u0663.safetensors"))  # Arabic-Indic 3
    assert [c.epoch for c in discover_checkpoints(f"{tmp_path}/epoch={{epoch}}.safetensors")] == [1]


def test_an_epoch_beyond_int64_is_refused_at_discovery(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "epoch=1.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "epoch=12345678901234567890.safetensors"))
    with pytest.raises(CheckpointError, match="epoch 12345678901234567890 is beyond"):
        discover_checkpoints(f"{tmp_path}/epoch={{epoch}}.safetensors")
    (tmp_path / "epoch=12345678901234567890.safetensors").unlink()
    save_file({"w": torch.zeros(2)}, str(tmp_path / f"epoch={2**63 - 1}.safetensors"))
    assert [c.epoch for c in discover_checkpoints(f"{tmp_path}/epoch={{epoch}}.safetensors")] == [1, 2**63 - 1]


def test_checkpoint_fingerprint_changes_when_the_file_is_replaced(tmp_path):
    save_file(tiny_state(0), str(tmp_path / "epoch=1.safetensors"))
    pattern = f"{tmp_path}/epoch={{epoch}}.safetensors"
    before = discover_checkpoints(pattern)[0].fingerprint
    assert before and discover_checkpoints(pattern)[0].fingerprint == before
    assert weights_fingerprint(str(tmp_path / "epoch=1.safetensors")) == before
    save_file(tiny_state(1), str(tmp_path / "epoch=1.safetensors"))  # retrained epoch 1, same name and size
    assert discover_checkpoints(pattern)[0].fingerprint != before
    with pytest.raises(CheckpointError, match="pretrained: no file at"):
        weights_fingerprint(str(tmp_path / "missing.safetensors"))


def test_an_int8_checkpoint_is_refused_not_cast(tmp_path):
    state = tiny_state(0)
    quantized = {k: (v * 100).round().clamp(-128, 127).to(torch.int8) if v.is_floating_point() else v
                 for k, v in state.items()}  # fmt: skip
    save_file(quantized, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensors hold integers where the model has floats.*torch.int8"):
        load_model(ModelConfig(**TINY_MODEL), str(tmp_path / "int8.safetensors"))


# --- credentials in URLs -------------------------------------------------------------------------


def test_redact_hides_the_userinfo_of_every_url():
    text = "cannot read s3://AKIAKEY:SECRET123@bucket/x and http://user:TOKEN9@host:9000/y; s3://bucket/z"
    assert redact(text) == "cannot read s3://***@bucket/x and http://***@host:9000/y; s3://bucket/z"
    assert "SECRET123" not in Store("s3://AKIAKEY:SECRET123@bucket/out").url("stir/a.parquet")


def test_data_and_checkpoint_errors_hide_url_credentials(tmp_path):
    with pytest.raises(DataError) as error:
        load_eval_images(DataConfig(format="imagefolder", path="memory://user:SECRET456@host/none", n_samples=1), 8)
    assert "SECRET456" not in str(error.value)
    with pytest.raises(CheckpointError) as error:
        weights_fingerprint("memory://user:SECRET456@host/none.safetensors")
    assert "SECRET456" not in str(error.value)


# --- fingerprints in the plan: replaced inputs are never taken for done ----------------------------


def _plan(tmp_path, **overrides):
    from invariance.config import parse_config
    from invariance.engine.plan import make_plan
    from tests.helpers import tiny_config

    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], layers=[0, 2], **overrides))
    store = Store(config.output)
    return config, store, make_plan(config, store)


def test_an_output_inside_the_data_or_checkpoint_folder_is_refused(tmp_path):
    from invariance.config import parse_config
    from invariance.engine.plan import make_plan
    from invariance.errors import ConfigError
    from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    for output in (tmp_path / "data" / "results", tmp_path / "ckpt" / "ft" / "inv", f"file://{tmp_path}/data"):
        config = parse_config(tiny_config(tmp_path, str(output)))
        with pytest.raises(ConfigError, match=r"^output: .* lies inside the (data.path|checkpoints) folder"):
            make_plan(config, Store(config.output))
    assert not (tmp_path / "data" / "results").exists()
    make_plan(parse_config(tiny_config(tmp_path, str(tmp_path / "data-results"))), Store(str(tmp_path / "data-results")))
    # inside the kNN bank: its plots would become bank images
    (tmp_path / "bank").mkdir()
    raw = tiny_config(tmp_path, str(tmp_path / "bank" / "out"),
                      knn={"train": {"format": "parquet", "path": str(tmp_path / "bank"), "n_samples": 4}, "k": [2]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^output: .* lies inside the knn.train.path folder"):
        make_plan(parse_config(raw), Store(str(tmp_path / "bank" / "out")))


def test_replaced_pretrained_weights_or_eval_images_change_both_hashes(tmp_path):
    from tests.helpers import write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data", n=24)
    _, _, plan = _plan(tmp_path)
    assert set(plan.fingerprints) == {"pretrained", "eval_images"}
    assert _plan(tmp_path)[2].settings_hash == plan.settings_hash  # stable
    # the pretrained file replaced in place (same name, same size)
    save_file(tiny_state(7), str(tmp_path / "ckpt" / "pretrained.safetensors"))
    replaced = _plan(tmp_path)[2]
    assert replaced.settings_hash != plan.settings_hash and replaced.hashes["inversion"] != plan.hashes["inversion"]
    # other eval images under the same data config: the cached pt inversions of the old ones are not reused
    write_eval_parquet(tmp_path / "data", n=30)
    more = _plan(tmp_path)[2]
    assert more.hashes["inversion"] != replaced.hashes["inversion"] and more.settings_hash != replaced.settings_hash


def test_a_checkpoint_replaced_under_its_epoch_is_computed_anew(tmp_path, torch_single_thread):
    import polars as pl

    from invariance.engine.execute import execute_in_process
    from invariance.engine.reduce import reduce_plan
    from invariance.engine.steps import RunSpec, Workspace
    from tests.helpers import perturbed, write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    config, store, plan = _plan(tmp_path)
    spec = RunSpec.from_plan(config, store, plan)
    assert execute_in_process(plan, spec, Workspace("cpu")).failures == []
    plan.refresh(store)
    first = reduce_plan(plan, store, make_plots=False).curves
    # retrained epoch 2: same file name, other weights
    save_file(perturbed(tiny_state(0), 0.3, seed=99), str(tmp_path / "ckpt" / "ft" / "epoch=02.safetensors"))
    _, _, again = _plan(tmp_path)
    assert again.settings_hash == plan.settings_hash and again.hashes["inversion"] == plan.hashes["inversion"]
    assert again.missing_of_type(InversionUnit) == [] and again.incomplete_epochs() == {2: len(again.layers) * 2 + 1}
    assert execute_in_process(again, spec, Workspace("cpu")).failures == []
    again.refresh(store)
    second = reduce_plan(again, store, make_plots=False).curves
    epoch_of = lambda frame, e: frame.filter(pl.col("epoch") == e).sort("layer")  # noqa: E731
    assert epoch_of(second, 1).equals(epoch_of(first, 1))
    assert not epoch_of(second, 2)["forgetting_mean"].equals(epoch_of(first, 2)["forgetting_mean"])
    # both versions' rows stay in the hive layout; the fingerprint column tells them apart
    rows = pl.scan_parquet(f"{tmp_path}/out/stir/**/*.parquet", hive_partitioning=True).collect()
    assert rows.filter(pl.col("epoch") == 2)["checkpoint_fingerprint"].n_unique() == 2
    fingerprints = {c.epoch: c.fingerprint for c in again.checkpoints}
    assert set(rows.filter(pl.col("epoch") == 1)["checkpoint_fingerprint"]) == {fingerprints[1]}


def test_a_worker_refuses_eval_images_other_than_the_planned_ones(tmp_path):
    from invariance.engine.steps import Workspace
    from tests.helpers import write_eval_parquet

    write_eval_parquet(tmp_path / "data")
    config = DataConfig(format="parquet", path=str(tmp_path / "data"), n_samples=12)
    from invariance.config import parse_config
    from tests.helpers import tiny_config

    run_config = parse_config(tiny_config(tmp_path, str(tmp_path / "out")))
    planned = load_eval_images(config, 16).fingerprint
    assert Workspace("cpu").eval_images(run_config, 16, planned).fingerprint == planned
    with pytest.raises(DataError, match="the eval images changed since the run was planned"):
        Workspace("cpu").eval_images(run_config, 16, "0123456789abcdef")


# --- config files and values ---------------------------------------------------------------------


def test_a_duplicate_yaml_key_is_an_error_naming_key_and_line(tmp_path):
    from invariance.config import load_config
    from invariance.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("output: out\nseeds: [0, 1, 2]\ndata: {format: parquet, path: d}\nseeds: [0]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seeds' at line 4 \(first at line 2\)"):
        load_config(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a folder; give the path of the YAML run config file"),
    (lambda p: p.write_bytes(b"output: \xff\xfeout\n"), r"not UTF-8 text \(byte 8\)"),
])  # fmt: skip
def test_a_config_path_that_is_a_folder_or_not_utf8_is_a_config_error(tmp_path, make, message):
    from invariance.config import load_config
    from invariance.errors import ConfigError

    make(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=message):  # before: IsADirectoryError / UnicodeDecodeError tracebacks
        load_config(tmp_path / "run.yaml")


@pytest.mark.parametrize("key, value, message", [
    ("std", [0, 0, 0], "every std must be in"),
    ("std", [-0.2, 0.2, 0.2], "every std must be in"),
    ("std", [58.4, 57.1, 57.4], "every std must be in"),
    ("mean", [123.7, 116.3, 103.5], "every mean must be in"),
    ("std", [float("nan"), 0.2, 0.2], "must be finite"),
])  # fmt: skip
def test_impossible_normalizations_are_refused(key, value, message):
    from invariance.config import parse_config
    from invariance.errors import ConfigError

    raw = {"output": "o", "model": {"arch": "vit_tiny_patch16_224", key: value}, "pretrained": "p.safetensors",
           "checkpoints": "e={epoch}.pt", "data": {"format": "parquet", "path": "d"}}  # fmt: skip
    with pytest.raises(ConfigError, match=rf"model.{key}: .*{message}"):
        parse_config(raw)
    parse_config({**raw, "model": {"arch": "vit_tiny_patch16_224", "mean": [0.5] * 3, "std": [0.5] * 3}})


def test_a_failing_run_never_shows_url_credentials(tmp_path, capsys, caplog, torch_single_thread):
    """Credentials in URLs (s3://KEY:SECRET@bucket/..., http://user:TOKEN@host/...) stay out of
    errors, FAILED lines and log lines: a run over checkpoints behind such a URL, one of them corrupt."""
    import fsspec
    import logging

    from invariance.config import parse_config
    from invariance.engine.execute import execute_in_process
    from invariance.engine.plan import make_plan
    from invariance.engine.steps import RunSpec, Workspace
    from jobs.cli import main
    from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

    secret = "TOKEN7SECRET"
    base = f"memory://user:{secret}@host/{tmp_path.name}"
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/user:{secret}@host/{tmp_path.name}/ft/epoch=01.safetensors",
                 (tmp_path / "ckpt" / "ft" / "epoch=01.safetensors").read_bytes())  # fmt: skip
    fs.pipe_file(f"/user:{secret}@host/{tmp_path.name}/ft/epoch=02.safetensors", b"not a checkpoint")
    raw = tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], layers=[0],
                      checkpoints=f"{base}/ft/epoch={{epoch}}.safetensors")  # fmt: skip
    config = parse_config(raw)
    store = Store(config.output)
    plan = make_plan(config, store)
    assert secret in plan.checkpoints[0].url  # the URL itself is kept: it is how the file is read
    spec = RunSpec.from_plan(config, store, plan)
    with caplog.at_level(logging.INFO):
        summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert [unit for unit, _ in summary.failures] and all("epoch=02" in unit for unit, _ in summary.failures)
    assert "***@host" in summary.failures[0][1] and "FAILED" in caplog.text
    assert secret not in caplog.text and secret not in str(summary.failures)
    # the CLI: a pattern that matches nothing, with credentials in it -> exit 2, one line, no secret
    empty = dict(raw, checkpoints=f"{base}/none/epoch={{epoch}}.safetensors")
    (tmp_path / "run.yaml").write_text(__import__("yaml").safe_dump(empty))
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "run.yaml"), "--no-cost"]) == 2
    printed = capsys.readouterr()
    assert "matches no file" in printed.err and secret not in printed.err + printed.out


def test_a_worker_never_computes_a_replaced_checkpoint_under_its_planned_identity(tmp_path, torch_single_thread):
    """A checkpoint replaced after planning is refused by the worker (it would be filed under the
    old fingerprint); a worker that served the old file loads the new one for the new plan."""
    import polars as pl

    from invariance.engine.execute import execute_in_process
    from invariance.engine.steps import RunSpec, Workspace
    from tests.helpers import write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    config, store, plan = _plan(tmp_path)
    workspace = Workspace("cpu")
    assert execute_in_process(plan, RunSpec.from_plan(config, store, plan), workspace).failures == []
    replaced = tmp_path / "ckpt" / "ft" / "epoch=02.safetensors"
    save_file(tiny_state(9), str(replaced))  # retrained in place, after the next plan was made
    stale = plan  # planned before the file changed: its units carry the old fingerprint
    stale.done.clear()
    summary = execute_in_process(stale, RunSpec.from_plan(config, store, stale), Workspace("cpu"))
    epoch2 = [message for unit, message in summary.failures if "epoch=02" in unit]
    assert epoch2 and all("the file was replaced since the run was planned" in m for m in epoch2)
    # the same worker, a new plan: the new file's numbers, not the cached old model's
    _, _, fresh = _plan(tmp_path)
    assert execute_in_process(fresh, RunSpec.from_plan(config, store, fresh), workspace).failures == []
    from invariance.engine.plan import make_plan

    clean_config = config.model_copy(update={"output": str(tmp_path / "clean")})
    clean_store = Store(clean_config.output)
    clean_plan = make_plan(clean_config, clean_store)
    clean_spec = RunSpec.from_plan(clean_config, clean_store, clean_plan)
    assert execute_in_process(clean_plan, clean_spec, Workspace("cpu")).failures == []
    fingerprint = next(c.fingerprint for c in fresh.checkpoints if c.epoch == 2)
    keys = ["model_a", "layer_a", "model_b", "layer_b"]
    ours = (pl.read_parquet(store.path("cka") + "/**/*.parquet").filter(pl.col("checkpoint_fingerprint") == fingerprint)
            .sort(keys)["cka"].to_list())  # fmt: skip
    clean = pl.read_parquet(clean_store.path("cka") + "/**/*.parquet").filter(pl.col("epoch") == 2).sort(keys)["cka"].to_list()
    assert ours and ours == clean
