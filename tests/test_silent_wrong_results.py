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
    assert after.settings_hash != before.settings_hash and after.inversion_hash != before.inversion_hash
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
