"""Checkpoint formats, refusal of code-carrying pickles, and {epoch} discovery."""

from __future__ import annotations

import json
import os
import pickle
import shlex

import pytest
import torch
from safetensors.torch import save_file

from invariance.io.checkpoints import Checkpoint, discover_checkpoints, load_state_dict, parse_state_dict
from invariance.errors import CheckpointError
from invariance.core.models import load_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def finetuned_state(tiny_vit_config) -> dict[str, torch.Tensor]:
    """Weights that differ from the random init of any test model (seed 1, not 0)."""
    torch.manual_seed(1)
    state = load_model(tiny_vit_config, None).network.state_dict()
    return {key: value.clone().contiguous() for key, value in state.items()}


def assert_weights_equal(model, state: dict[str, torch.Tensor]) -> None:
    loaded = model.network.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def write_format(path_stem, state, kind: str) -> str:
    if kind == "safetensors":
        path = f"{path_stem}.safetensors"
        save_file(state, path)
        return path
    payload = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3, "best_acc": 0.9},
        "model": {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.001}]}, "epoch": 3},
        "ddp": {f"module.{key}": value for key, value in state.items()},
        "ddp_in_state_dict": {"state_dict": {f"module.{key}": value for key, value in state.items()}},
        "compiled": {f"_orig_mod.{key}": value for key, value in state.items()},
    }[kind]
    path = f"{path_stem}.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "kind", ["safetensors", "plain", "state_dict", "model", "ddp", "ddp_in_state_dict", "compiled"]
)
def test_every_supported_format_loads_identical_weights(tmp_path, tiny_vit_config, finetuned_state, kind):
    url = write_format(tmp_path / f"epoch=01-{kind}", finetuned_state, kind)
    model = load_model(tiny_vit_config, url)
    assert_weights_equal(model, finetuned_state)
    # the same through a file:// URL
    assert_weights_equal(load_model(tiny_vit_config, f"file://{url}"), finetuned_state)


class WritesMarker:
    """A pickle payload: unpickling it runs a shell command that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("wrapping", ["torch.save", "legacy torch.save", "raw pickle"])
def test_pickle_carrying_code_is_refused_and_does_not_run(tmp_path, finetuned_state, wrapping):
    marker = tmp_path / "payload-ran"
    payload = {"state_dict": finetuned_state, "hook": WritesMarker(str(marker))}
    path = tmp_path / "epoch=1.pt"
    if wrapping == "raw pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(wrapping == "torch.save"))

    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(str(path))
    assert not marker.exists()

    # control: the payload is live, an unrestricted unpickler does run it
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(WritesMarker(str(control))))
    assert control.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_nan_or_inf_weights_are_refused(tmp_path, finetuned_state, suffix):
    for bad_value in (float("nan"), float("inf")):
        state = dict(finetuned_state)
        broken = state["blocks.1.mlp.fc1.weight"].clone()
        broken[0, 0] = bad_value
        state["blocks.1.mlp.fc1.weight"] = broken
        path = str(tmp_path / f"bad{suffix}")
        if suffix == ".safetensors":
            save_file(state, path)
        else:
            torch.save(state, path)
        with pytest.raises(CheckpointError, match="NaN or inf") as error:
            load_state_dict(path)
        assert "blocks.1.mlp.fc1.weight" in str(error.value)


def test_strict_mismatch_lists_missing_and_unexpected_keys(tmp_path, tiny_vit_config, finetuned_state):
    state = dict(finetuned_state)
    del state["head.weight"]
    state["decoder.conv.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "epoch=1.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_vit_config, path)
    message = str(error.value)
    assert "missing keys (1)" in message and "head.weight" in message
    assert "unexpected keys (1)" in message and "decoder.conv.weight" in message
    assert path in message

    # strict: false loads what matches (a new head, an extra decoder), keeping the rest
    lenient = load_model(tiny_vit_config.model_copy(update={"strict": False}), path)
    assert torch.equal(lenient.network.state_dict()["blocks.2.attn.qkv.weight"], finetuned_state["blocks.2.attn.qkv.weight"])


def test_shape_mismatch_is_refused_even_when_not_strict(tmp_path, tiny_vit_config, finetuned_state):
    state = dict(finetuned_state)
    state["head.weight"] = torch.zeros(10, 32)  # a 10-class head on a 1000-class model
    path = str(tmp_path / "epoch=1.safetensors")
    save_file(state, path)
    for strict in (True, False):
        with pytest.raises(CheckpointError, match="shape mismatches \\(1\\)"):
            load_model(tiny_vit_config.model_copy(update={"strict": strict}), path)


def test_unreadable_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(str(tmp_path / "absent.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(str(tmp_path / "garbage.safetensors"))
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 truncated")
    with pytest.raises(CheckpointError):
        load_state_dict(str(tmp_path / "garbage.pt"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_state_dict(str(tmp_path / "no_tensors.pt"))


def test_parse_state_dict_strips_prefixes_from_bytes(finetuned_state):
    import io

    buffer = io.BytesIO()
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in finetuned_state.items()}}, buffer)
    state = parse_state_dict(buffer.getvalue(), "mem.pth")
    assert set(state) == set(finetuned_state)


def test_discover_checkpoints_by_epoch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ["epoch=07.safetensors", "epoch=10.safetensors", "epoch=2.safetensors", "epoch=0.safetensors"]:
        (run / name).write_bytes(b"x")
    # files that must be ignored: another suffix, a non-integer epoch, another name, a temp file
    for name in ["epoch=3.pt", "epoch=last.safetensors", "final.safetensors", "epoch=4.safetensors.tmp", "epoch=.safetensors"]:
        (run / name).write_bytes(b"x")

    found = discover_checkpoints(f"{run}/epoch={{epoch}}.safetensors")
    assert [c.epoch for c in found] == [0, 2, 7, 10]
    assert [c.name for c in found] == ["epoch=0", "epoch=2", "epoch=07", "epoch=10"]
    assert all(isinstance(c, Checkpoint) and os.path.exists(c.url) for c in found)
    assert found[2].url == f"{run}/epoch=07.safetensors"

    via_url = discover_checkpoints(f"file://{run}/epoch={{epoch}}.safetensors")
    assert [c.epoch for c in via_url] == [0, 2, 7, 10]
    assert discover_checkpoints(f"{tmp_path}/empty/epoch={{epoch}}.safetensors") == []


def test_checkpoint_names_tell_epochs_apart_whatever_the_layout(tmp_path):
    for epoch in (1, 2):
        (tmp_path / "nested" / f"epoch={epoch}").mkdir(parents=True)
        (tmp_path / "nested" / f"epoch={epoch}" / "model.safetensors").write_bytes(b"x")
        (tmp_path / "dotted").mkdir(exist_ok=True)
        (tmp_path / "dotted" / f"ckpt.epoch{epoch}.pt").write_bytes(b"x")
    nested = discover_checkpoints(f"{tmp_path}/nested/epoch={{epoch}}/model.safetensors")
    assert [c.name for c in nested] == ["epoch=1/model", "epoch=2/model"]
    dotted = discover_checkpoints(f"{tmp_path}/dotted/ckpt.epoch{{epoch}}.pt")
    assert [c.name for c in dotted] == ["ckpt.epoch1", "ckpt.epoch2"]


def test_discover_checkpoints_rejects_a_pattern_without_one_epoch(tmp_path):
    for pattern in (f"{tmp_path}/final.safetensors", f"{tmp_path}/{{epoch}}/epoch={{epoch}}.pt"):
        with pytest.raises(CheckpointError, match=r"\{epoch\}"):
            discover_checkpoints(pattern)


def test_discover_checkpoints_rejects_two_files_for_one_epoch(tmp_path):
    (tmp_path / "epoch=3.safetensors").write_bytes(b"x")
    (tmp_path / "epoch=03.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="epoch 3 matches two files"):
        discover_checkpoints(f"{tmp_path}/epoch={{epoch}}.safetensors")


# ---- the per-user cache of local checkpoints' content hashes (issue 28) ----


@pytest.fixture
def fingerprint_cache(tmp_path, monkeypatch):
    """A cache of this test's own; files count as settled at once (SETTLED_NS 0: a test's files are
    younger than the 2 s a real one waits out)."""
    from invariance.io import fingerprint_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint_cache, "SETTLED_NS", 0)
    return fingerprint_cache.fingerprint_cache_path()


@pytest.fixture
def opened(monkeypatch):
    """The paths fingerprint_file opens (io/storage.py's ``open``)."""
    from invariance.io import storage

    paths: list[str] = []

    def counting_open(path, *args, **kwargs):
        paths.append(os.path.basename(str(path)))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(storage, "open", counting_open, raising=False)
    return paths


def test_a_second_plan_does_not_read_unchanged_checkpoints(tmp_path, fingerprint_cache, opened):
    from invariance.io.checkpoints import weights_fingerprint

    for epoch in (1, 2, 3):
        save_file({"w": torch.full((64,), float(epoch))}, str(tmp_path / f"epoch={epoch}.safetensors"))
    pattern = f"{tmp_path}/epoch={{epoch}}.safetensors"
    first = [c.fingerprint for c in discover_checkpoints(pattern)]
    assert sorted(opened) == [f"epoch={e}.safetensors" for e in (1, 2, 3)] and fingerprint_cache.is_file()
    opened.clear()
    assert [c.fingerprint for c in discover_checkpoints(pattern)] == first
    assert weights_fingerprint(str(tmp_path / "epoch=2.safetensors")) == first[1]  # a worker's check: the same cache
    assert opened == []
    # epoch 2 retrained: other bytes of the same size, a new modification time
    path = tmp_path / "epoch=2.safetensors"
    size = path.stat().st_size
    save_file({"w": torch.full((64,), 9.0)}, str(path))
    assert path.stat().st_size == size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = [c.fingerprint for c in discover_checkpoints(pattern)]
    assert opened == ["epoch=2.safetensors"]
    assert again[0] == first[0] and again[2] == first[2] and again[1] != first[1]
    # the hash is the file's content, cached or not: a fresh cache gives the same
    fingerprint_cache.unlink()
    assert [c.fingerprint for c in discover_checkpoints(pattern)] == again


def test_a_file_written_just_before_it_is_hashed_is_not_cached(tmp_path, monkeypatch, opened):
    # SETTLED_NS as shipped: a write in the same timestamp tick as the hash could leave the stat unchanged
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_file({"w": torch.zeros(8)}, str(tmp_path / "epoch=1.safetensors"))
    pattern = f"{tmp_path}/epoch={{epoch}}.safetensors"
    discover_checkpoints(pattern)
    discover_checkpoints(pattern)
    assert opened == ["epoch=1.safetensors"] * 2


def test_a_corrupt_or_concurrently_written_cache_is_harmless(tmp_path, fingerprint_cache, opened):
    from invariance.io.fingerprint_cache import FingerprintCache

    for epoch in (1, 2):
        save_file({"w": torch.full((8,), float(epoch))}, str(tmp_path / f"epoch={epoch}.safetensors"))
    pattern = f"{tmp_path}/epoch={{epoch}}.safetensors"
    fingerprint_cache.parent.mkdir(parents=True)
    for garbage in ("{not json", '{"format": 1, "entries": []}', '{"format": 1, "entries": {"x": 5}}', "[]"):
        fingerprint_cache.write_text(garbage)
        expected = [c.fingerprint for c in discover_checkpoints(pattern)]
    opened.clear()
    assert [c.fingerprint for c in discover_checkpoints(pattern)] == expected and opened == []
    # a cache entry for this path but another stat (the file replaced) is not used
    entries = json.loads(fingerprint_cache.read_text())["entries"]
    entry = entries[str(tmp_path / "epoch=1.safetensors")]
    entry[5] = "0" * 16
    entry[3] -= 1
    fingerprint_cache.write_text(json.dumps({"format": 1, "entries": entries}))
    assert [c.fingerprint for c in discover_checkpoints(pattern)] == expected
    # two processes saving at once: the file stays whole, the last writer merges what the first wrote
    one, two = FingerprintCache(fingerprint_cache), FingerprintCache(fingerprint_cache)
    status = os.stat(tmp_path / "epoch=1.safetensors")
    one.put("/elsewhere/a", status, "a" * 16, max(status.st_mtime_ns, status.st_ctime_ns) + 1)
    two.put("/elsewhere/b", status, "b" * 16, max(status.st_mtime_ns, status.st_ctime_ns) + 1)
    one.save()
    two.save()
    merged = FingerprintCache(fingerprint_cache)
    assert merged.get("/elsewhere/a", status) == "a" * 16 and merged.get("/elsewhere/b", status) == "b" * 16
    assert not [p for p in fingerprint_cache.parent.iterdir() if p.name.endswith(".tmp")]
