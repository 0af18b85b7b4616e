"""Frames built from Python rows are typed by the project's schemas, never by inference: a CKA shard
of a model analysed at 25 layers (ViT-L: 24 blocks and the pre-logits) is written and read back."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from invariance.config import ModelConfig, parse_config
from invariance.core.models import build_network
from invariance.engine.steps import Workspace, run_unit
from invariance.measures.subspace import SUBSPACE_SCHEMA
from invariance.io.schemas import CKA_SCHEMA, STIR_SCHEMA, conform, rows_frame
from tests.helpers import open_in_process, perturbed, write_eval_parquet

# ViT-L's layer count at a tiny width: 24 blocks + the pre-logits = 25 analysed layers
VIT_L_SHAPE = {"arch": "vit_tiny_patch16_224",
               "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 24, "num_heads": 2, "num_classes": 3}}  # fmt: skip


def test_a_cka_shard_at_25_layers_is_written_with_its_declared_types(tmp_path: Path, torch_single_thread) -> None:
    torch.manual_seed(0)
    pretrained = build_network(ModelConfig(**VIT_L_SHAPE)).state_dict()
    (tmp_path / "ckpt").mkdir()
    save_file(pretrained, str(tmp_path / "ckpt" / "pretrained.safetensors"))
    save_file(perturbed(pretrained, 0.05, seed=1), str(tmp_path / "ckpt" / "epoch=01.safetensors"))
    write_eval_parquet(tmp_path / "data", n=16)  # more samples than subspace similarity's 10 components
    config = parse_config({
        "output": str(tmp_path / "out"), "model": VIT_L_SHAPE, "pretrained": str(tmp_path / "ckpt" / "pretrained.safetensors"),
        "checkpoints": str(tmp_path / "ckpt" / "epoch={epoch}.safetensors"),
        "data": {"format": "parquet", "path": str(tmp_path / "data"), "n_samples": 16}, "layers": "all", "seeds": [0],
        "inversion": {"iterations": 1}, "resources": {"num_cpus": 1},
    })  # fmt: skip
    store, plan, spec = open_in_process(config)
    assert plan.layers == list(range(25))
    (cka_unit,) = plan.units["cka"]
    run_unit(spec, cka_unit, Workspace("cpu"))  # raised ComputeError: the first 625 rows' subspace is null

    shard = store.read_parquet([plan.data_key(cka_unit)])
    assert shard.schema == pl.Schema(CKA_SCHEMA)
    assert shard.height == 4 * 25 * 25
    assert shard["subspace_similarity"].null_count() == shard.height  # the subspace measure's own shard holds it
    (subspace_unit,) = plan.units["subspace"]
    run_unit(spec, subspace_unit, Workspace("cpu"))
    subspace = store.read_parquet([plan.data_key(subspace_unit)])
    assert subspace.schema == pl.Schema(SUBSPACE_SCHEMA) and subspace["layer"].to_list() == list(range(25))
    assert subspace["subspace_similarity"].is_between(0.0, 1.0 + 1e-9).all()


def test_rows_of_all_null_leading_values_keep_their_declared_type() -> None:
    row = {name: None for name in STIR_SCHEMA}
    rows = [row] * 150 + [{**row, "stir": 0.5, "seed": 3, "ref_model": "pt"}]
    frame = rows_frame(rows, STIR_SCHEMA)
    assert frame.schema == pl.Schema(STIR_SCHEMA)
    assert frame.row(-1, named=True)["stir"] == 0.5
    assert rows_frame([], STIR_SCHEMA).schema == pl.Schema(STIR_SCHEMA)


def test_a_row_that_does_not_match_its_schema_names_the_columns() -> None:
    row = {name: 1.0 for name in CKA_SCHEMA}
    with pytest.raises(ValueError, match=r"extra columns \['cka_typo'\], missing columns \['cka'\]"):
        rows_frame([{**{k: v for k, v in row.items() if k != "cka"}, "cka_typo": 1.0}], CKA_SCHEMA)


def test_shards_of_older_releases_conform_to_the_schema() -> None:
    """Shards written before runs and weight paths lack run, alpha and checkpoint_fingerprint."""
    old = pl.DataFrame({"settings": ["s"], "checkpoint": ["epoch=01"], "epoch": [1], "model_a": ["pt"], "layer_a": [0],
                        "model_b": ["ft"], "layer_b": [0], "cka": [0.9], "cka_debiased": [0.8],
                        "subspace_similarity": [None], "n_samples": [16], "version": ["0.0.9"]})  # fmt: skip
    frame = conform(old, CKA_SCHEMA)
    assert frame.schema == pl.Schema(CKA_SCHEMA)
    assert frame.row(0, named=True) == {**old.row(0, named=True), "run": None, "alpha": None, "checkpoint_fingerprint": None}
