"""Issue 25: inputs that gave silently wrong numbers (or failed only in the workers) now give the
right result or a named error before any task: kNN label spaces across bank and eval, a bank that
is the eval images, a bank too small, empty weights files, and user factory code in the hash."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from invariance.config import parse_config
from invariance.engine.plan import make_plan
from invariance.errors import CheckpointError, ConfigError, DataError
from invariance.io.storage import Store
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

FACTORY_SOURCE = '''
import timm


def make(pool="token"):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                             depth=2, num_heads=2, num_classes=3, global_pool=pool)
'''


def _factory_run(tmp_path: Path, module: str, pool: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / f"{module}.py").write_text(textwrap.dedent(FACTORY_SOURCE).replace('pool="token"', f'pool="{pool}"'))
    monkeypatch.syspath_prepend(str(code))
    return tiny_config(tmp_path, str(tmp_path / "out"), model={"factory": f"{module}:make"}, seeds=[0])


def test_editing_the_factory_code_changes_the_settings_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          torch_single_thread) -> None:  # fmt: skip
    """The factory's pooling edited in its file: the plan said 0 units to compute (old shards reused)."""
    import sys

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    raw = _factory_run(tmp_path, "issue25_factory_a", "token", monkeypatch)
    before = make_plan(parse_config(raw), Store(raw["output"]))
    (tmp_path / "code" / "issue25_factory_a.py").write_text(
        textwrap.dedent(FACTORY_SOURCE).replace('pool="token"', 'pool="avg"'))  # fmt: skip
    sys.modules.pop("issue25_factory_a", None)  # a new process imports the edited file
    after = make_plan(parse_config(raw), Store(raw["output"]))
    assert after.settings_hash != before.settings_hash and after.hashes["inversion"] != before.hashes["inversion"]
    # the same file again: the same hash (the fingerprint is of the source, not of the import)
    assert make_plan(parse_config(raw), Store(raw["output"])).settings_hash == after.settings_hash
    # finetuned_model.factory likewise
    raw_ft = {**raw, "model": {"arch": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 8,
              "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3}}, "finetuned_model": raw["model"]}  # fmt: skip
    ft_before = parse_config(raw_ft).numbers_settings()
    (tmp_path / "code" / "issue25_factory_a.py").write_text(textwrap.dedent(FACTORY_SOURCE) + "\n# edited\n")
    ft_after = parse_config(raw_ft).numbers_settings()
    assert ft_before["finetuned_model"] != ft_after["finetuned_model"] and ft_before["model"] == ft_after["model"]


def test_a_factory_that_does_not_import_is_named_by_its_key(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, str(tmp_path / "out"), model={"arch": "vit_tiny_patch16_224"},
                      finetuned_model={"factory": "no_such_module_issue25:make"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^finetuned_model\.factory: cannot import module 'no_such_module_issue25'"):
        parse_config(raw).numbers_settings()


def test_empty_weights_files_are_refused_before_any_task(tmp_path: Path) -> None:
    """A 0-byte pretrained file was found only by the workers (every shard failed)."""
    pretrained, folder = write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out")))
    good = pretrained.read_bytes()
    pretrained.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^pretrained: .*pretrained\.safetensors is empty \(0 bytes\)"):
        make_plan(config, Store(config.output))
    pretrained.write_bytes(good)
    (folder / "epoch=02.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^checkpoints: .*epoch=02\.safetensors is empty \(0 bytes\)"):
        make_plan(config, Store(config.output))
    assert not (tmp_path / "out").exists()


# --- the kNN bank -------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _image_folder(root: Path, classes: dict[str, list[int]]) -> Path:
    """``root/<class>/<seed>.png``: one distinct noise image per seed."""
    for name, seeds in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (root / name / f"{seed:03d}.png").write_bytes(_png(seed))
    return root


def _knn_top1(config) -> dict[int, float]:
    """{layer: top-1} of the pretrained model's kNN shard, computed in process."""
    import polars as pl

    from invariance.engine.steps import RunSpec, Workspace, run_unit
    from invariance.io.layout import KnnUnit

    store = Store(config.output)
    plan = make_plan(config, store)
    record = run_unit(RunSpec.from_plan(config, store, plan), KnnUnit(-1, "pt"), Workspace("cpu"))
    assert record
    frame = pl.read_parquet(store.path(plan.data_key(KnnUnit(-1, "pt"))))
    return dict(zip(frame["layer"].to_list(), frame["top1"].to_list()))


def test_image_folder_classes_are_matched_by_name_across_bank_and_eval(tmp_path: Path, torch_single_thread) -> None:
    """The bank holds cat, dog and fox, the eval images dog and fox, each an exact copy of a bank
    image: k = 1 must score 1. Each folder indexed its own classes (dog 1 in the bank, 0 in eval): 0.5."""
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    _image_folder(tmp_path / "bank", {"cat": [0, 1, 2, 3], "dog": [4, 5, 6, 7], "fox": [8, 9, 10, 11]})
    _image_folder(tmp_path / "eval", {"dog": [4, 5, 6, 7], "fox": [8, 9, 10, 11]})
    raw = tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0],
                      data={"format": "imagefolder", "path": str(tmp_path / "eval"), "n_samples": 8},
                      knn={"train": {"format": "imagefolder", "path": str(tmp_path / "bank"), "n_samples": 12}, "k": [1]})  # fmt: skip
    top1 = _knn_top1(parse_config(raw))
    assert set(top1.values()) == {1.0}, top1


def test_string_labels_in_parquet_are_matched_by_name(tmp_path: Path, torch_single_thread) -> None:
    """Parquet label columns of class names (failed: 'class labels must be integers'): by name too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_checkpoints(tmp_path / "ckpt", epochs=[1])

    def table(rows: list[tuple[str, int]]) -> pa.Table:
        return pa.table({"image": [{"bytes": _png(seed), "path": f"{seed}.png"} for _, seed in rows],
                         "label": [name for name, _ in rows]})  # fmt: skip

    (tmp_path / "bank").mkdir()
    (tmp_path / "eval").mkdir()
    pq.write_table(table([("cat", 0), ("cat", 1), ("dog", 2), ("dog", 3), ("fox", 4), ("fox", 5)]),
                   tmp_path / "bank" / "train.parquet")  # fmt: skip
    pq.write_table(table([("dog", 2), ("dog", 3), ("fox", 4), ("fox", 5)]), tmp_path / "eval" / "test.parquet")
    raw = tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0],
                      data={"format": "parquet", "path": str(tmp_path / "eval"), "n_samples": 4},
                      knn={"train": {"format": "parquet", "path": str(tmp_path / "bank"), "split": "train", "n_samples": 6},
                           "k": [1]})  # fmt: skip
    assert set(_knn_top1(parse_config(raw)).values()) == {1.0}
    # names on one side, integers on the other: refused before any task
    write_eval_parquet(tmp_path / "ints")
    mixed = {**raw, "data": {"format": "parquet", "path": str(tmp_path / "ints"), "n_samples": 4}}
    with pytest.raises(DataError, match=r"knn\.train labels its classes by name .* and data by integer"):
        make_plan(parse_config(mixed), Store(raw["output"]))


def test_a_bank_that_is_the_eval_images_is_refused(tmp_path: Path) -> None:
    """knn.train without split took the eval split (test): every query found its own copy in the
    bank (top-1 0.667 against 0.396 with the train split as the bank)."""
    from tests.helpers import write_shapes_splits

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_shapes_splits(tmp_path / "data", n_train=48, n_test=24)
    bank = {"format": "parquet", "path": str(tmp_path / "data"), "n_samples": 24}
    raw = tiny_config(tmp_path, str(tmp_path / "out"), knn={"train": bank, "k": [3]})
    with pytest.raises(ConfigError, match=r"^knn\.train\.split: the kNN bank would be the eval images \(knn\.train\.split "
                                          r"is left out, so it is 'test', as data\.split.*splits found in .*: \['test', 'train'\]"):
        make_plan(parse_config(raw), Store(raw["output"]))
    explicit = {**raw, "knn": {"train": {**bank, "split": "test"}, "k": [3]}}
    with pytest.raises(ConfigError, match=r"^knn\.train\.split: .*'test' and data\.split 'test' name the same files"):
        make_plan(parse_config(explicit), Store(raw["output"]))
    # the one Parquet file of the eval split named as the bank's path: the same file
    single = {**raw, "knn": {"train": {**bank, "path": str(tmp_path / "data" / "test-00000-of-00001.parquet")}, "k": [3]}}
    with pytest.raises(ConfigError, match=r"^knn\.train\.split: the kNN bank would be the eval images"):
        make_plan(parse_config(single), Store(raw["output"]))
    assert not (tmp_path / "out").exists()
    train = {**raw, "knn": {"train": {**bank, "split": "train"}, "k": [3]}}
    assert make_plan(parse_config(train), Store(raw["output"])).hashes["knn"]
    # image folders with split folders likewise
    _image_folder(tmp_path / "folders" / "test", {"a": [0, 1, 2], "b": [3, 4, 5]})
    _image_folder(tmp_path / "folders" / "train", {"a": [6, 7, 8], "b": [9, 10, 11]})
    folders = {"format": "imagefolder", "path": str(tmp_path / "folders")}
    raw = {**raw, "data": {**folders, "n_samples": 6}, "knn": {"train": {**folders, "n_samples": 6}, "k": [1]}}
    with pytest.raises(ConfigError, match=r"^knn\.train\.split: .*splits found in .*\['test', 'train'\]"):
        make_plan(parse_config(raw), Store(raw["output"]))


def test_a_bank_smaller_than_its_settings_is_found_by_the_plan(tmp_path: Path) -> None:
    """knn.train without n_samples takes DataConfig's default, 500: a bank of 48 images passed the
    plan and failed every kNN shard ('data.n_samples is 500 but ... holds only 48 images')."""
    from tests.helpers import write_shapes_splits

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_shapes_splits(tmp_path / "data", n_train=48, n_test=24)
    bank = {"format": "parquet", "path": str(tmp_path / "data"), "split": "train"}
    raw = tiny_config(tmp_path, str(tmp_path / "out"), knn={"train": bank, "k": [3]})
    with pytest.raises(DataError, match=r"^knn\.train\.n_samples is 500 \(the default: knn\.train\.n_samples is left "
                                        r"out\) but .* \(train\) holds only 48 images: set knn\.train\.n_samples to at most 48"):
        make_plan(parse_config(raw), Store(raw["output"]))
    raw["knn"]["train"]["n_samples"] = 60
    with pytest.raises(DataError, match=r"^knn\.train\.n_samples is 60 but .*holds only 48 images"):
        make_plan(parse_config(raw), Store(raw["output"]))
    # an image-folder bank: counted from its listing
    _image_folder(tmp_path / "small", {"a": [0, 1], "b": [2, 3]})
    raw["knn"] = {"train": {"format": "imagefolder", "path": str(tmp_path / "small"), "n_samples": 5}, "k": [3]}
    with pytest.raises(DataError, match=r"^knn\.train\.n_samples is 5 but .*holds only 4 images"):
        make_plan(parse_config(raw), Store(raw["output"]))
    assert not (tmp_path / "out").exists()


def test_bad_parquet_labels_are_found_by_the_plan(tmp_path: Path) -> None:
    """Negative or fractional labels failed in the workers (or were truncated: 1.5 read as 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    (tmp_path / "bank").mkdir()
    rows = [{"bytes": _png(seed), "path": f"{seed}.png"} for seed in range(4)]
    raw = tiny_config(tmp_path, str(tmp_path / "out"),
                      knn={"train": {"format": "parquet", "path": str(tmp_path / "bank"), "n_samples": 4}, "k": [1]})  # fmt: skip
    for labels, message in (([0, 1, -1, 0], r"must be integers >= 0; row 2 .* holds -1"),
                            ([0.0, 1.5, 1.0, 0.0], r"must be integers >= 0 or strings \(class names\); row 0 .* holds 0\.0")):  # fmt: skip
        pq.write_table(pa.table({"image": rows, "label": labels}), tmp_path / "bank" / "test.parquet")
        with pytest.raises(DataError, match=r"^knn\.train \(the kNN probe needs class labels.*" + message):
            make_plan(parse_config(raw), Store(raw["output"]))
