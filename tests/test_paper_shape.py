"""The shape users run: the cluster guide's example config (cluster/run.example.yaml: ViT-B/32, `layers:
all`, 12 blocks and the pre-logits = 13 layers) through `invariance run` on a local Ray, with only what
cannot run offline swapped (a tiny width and image, local files, few iterations, 2 seeds).

Two checkpoints, one of them surgical (blocks below SURGICAL_FROM identical to the pretrained
model), STIR + CKA + subspace similarity + kNN + Procrustes, reduced. Every CKA shard failed at this shape
(`subspace_similarity` inferred as Null from its first 100 rows), so no curve was ever reduced."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml
from safetensors.torch import save_file

from invariance.config import ModelConfig, parse_config
from invariance.core.models import build_network
from jobs.run import run
from tests.helpers import perturbed, write_shapes_splits
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "cluster" / "run.example.yaml"
LAYERS = 13  # ViT-B/32: blocks 0..11 and the pre-logits 12
SURGICAL_FROM = 6  # epoch 1 changes blocks >= 6 (and the final norm and head) only
N_SAMPLES = 24


def example_at_tiny_width(tmp: Path) -> dict:
    """cluster/run.example.yaml with its model at a tiny width (depth and layers as written) and its
    paths on local files; every other key as the example has it."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert raw["model"]["arch"] == "vit_base_patch32_224" and raw["layers"] == "all"
    raw.pop("storage_options")
    raw["model"]["kwargs"].update(img_size=16, patch_size=8, embed_dim=16, num_heads=2)  # depth stays 12
    torch_state = build_network(ModelConfig(**raw["model"])).state_dict()
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    save_file(torch_state, str(ckpt / "pretrained.safetensors"))
    save_file(perturbed(torch_state, 0.05, seed=1, from_block=SURGICAL_FROM), str(ckpt / "epoch=01.safetensors"))
    save_file(perturbed(torch_state, 0.05, seed=2, from_block=0), str(ckpt / "epoch=02.safetensors"))
    data = write_shapes_splits(tmp / "data", n_train=48, n_test=N_SAMPLES)
    raw.update(output=str(tmp / "out"), pretrained=str(ckpt / "pretrained.safetensors"),
               checkpoints=str(ckpt / "epoch={epoch}.safetensors"), seeds=[0, 1], interpolation=None)  # fmt: skip
    raw["data"] = {"format": "parquet", "path": str(data), "split": "test", "n_samples": N_SAMPLES, "image_size": 16}
    raw["knn"].update(train={"format": "parquet", "path": str(data), "split": "train", "n_samples": 48}, k=[5])  # the example's label_column: label
    raw["inversion"].update(iterations=5, micro_batch=N_SAMPLES, bf16=False)
    raw["resources"] = {"num_gpus": 0, "num_cpus": 1}
    return raw


@pytest.fixture(scope="module")
def paper_shape_run(tmp_path_factory: pytest.TempPathFactory, local_ray: None):
    tmp = tmp_path_factory.mktemp("paper_shape")
    result = run(parse_config(example_at_tiny_width(tmp)), progress=False)
    return tmp / "out", result


def test_every_unit_completes_and_both_checkpoints_reduce(paper_shape_run) -> None:
    _, result = paper_shape_run
    assert result.execution.failures == []
    # pt inversions 13 x 2 seeds; per checkpoint 2 ref models x 13 x 2 STIR shards + 1 CKA; kNN: pt + 2
    assert result.execution.completed == 26 + 2 * (52 + 1 + 1 + 1) + 3  # per checkpoint: STIR, CKA, subspace, Procrustes
    assert result.reduced.complete_epochs == [1, 2]


def test_curves_flow_and_knn_cover_all_13_layers(paper_shape_run) -> None:
    out, _ = paper_shape_run
    curves = pl.read_parquet(out / "reduced" / "curves.parquet")
    assert curves.group_by("epoch").agg(pl.col("layer").sort()).sort("epoch")["layer"].to_list() == [list(range(LAYERS))] * 2
    assert curves.select(pl.col("forgetting_mean", "learning_mean", "cka_divergence_mean").is_null().any()).row(0) == (False,) * 3
    assert curves.schema["subspace_similarity"] == pl.Float64
    flow = pl.read_parquet(out / "reduced" / "flow.parquet")
    assert flow.height == 2 * LAYERS * LAYERS
    procrustes = pl.read_parquet(out / "reduced" / "procrustes.parquet")
    assert procrustes.height == 2 * 4 * LAYERS * LAYERS and procrustes["procrustes"].is_finite().all()
    knn = pl.read_parquet(out / "reduced" / "knn.parquet")
    assert knn.group_by("model", "epoch").len().sort("epoch", nulls_last=False)["len"].to_list() == [LAYERS] * 3


def test_the_surgical_checkpoint_changes_nothing_below_its_first_changed_block(paper_shape_run) -> None:
    """Blocks below SURGICAL_FROM are the pretrained ones, and the inversions start from the same
    noise for pt and ft: forgetting, learning and CKA divergence are exactly 0 there, and the
    subspaces are the same; the changed blocks do move."""
    out, _ = paper_shape_run
    curves = pl.read_parquet(out / "reduced" / "curves.parquet").filter(pl.col("epoch") == 1).sort("layer")
    below = curves.filter(pl.col("layer") < SURGICAL_FROM)
    for column in ("forgetting_mean", "learning_mean", "cka_divergence_mean"):
        assert below[column].abs().max() < 1e-9, column
    assert (below["subspace_similarity"] - 1.0).abs().max() < 1e-6
    above = curves.filter(pl.col("layer") >= SURGICAL_FROM)
    assert above["cka_divergence_mean"].max() > 1e-4
    assert (above["subspace_similarity"] < 1.0 - 1e-6).any()
    # Procrustes: 0 between pt[i] and ft[i] below the first changed block, more than 0 above it
    procrustes = pl.read_parquet(out / "reduced" / "procrustes.parquet").filter(
        (pl.col("epoch") == 1) & (pl.col("model_a") == "pt") & (pl.col("model_b") == "ft") & (pl.col("layer_a") == pl.col("layer_b")))
    assert procrustes.filter(pl.col("layer_a") < SURGICAL_FROM)["procrustes"].abs().max() < 1e-9
    assert procrustes.filter(pl.col("layer_a") >= SURGICAL_FROM)["procrustes"].min() > 1e-6
