"""STIR/CKA shards on tiny ViTs and the finetuning metrics computed from their rows."""

from __future__ import annotations

import copy

import numpy as np

import polars as pl
from polars.testing import assert_frame_equal
import pytest
import torch

from invariance.analysis import metrics
from invariance.core.cka import linear_cka
from invariance.config import InversionConfig
from invariance.io.data import EvalImages
from invariance.core.models import FeatureModel, load_model
from invariance.core.shards import ShardContext
from invariance.io.schemas import CKA_SCHEMA, STIR_SCHEMA, rows_frame

LAYERS = list(range(5))  # blocks 0..3 and the pre-logits (4)
CHANGED_FROM = 2  # the "finetuned" model differs from the pretrained one in blocks >= 2
SEEDS = (0, 1)
CHECKPOINT = {"settings": "s", "run": "", "checkpoint": "epoch=01", "epoch": 1, "alpha": 1.0, "version": "v",
              "checkpoint_fingerprint": "f"}  # fmt: skip


def redraw_blocks(model: FeatureModel, blocks, seed: int, std: float = 2.0) -> None:
    """Fresh weights ~ N(0, std^2 / fan_in) for the matrices of ``blocks``.

    timm's init (std 0.02) leaves the blocks of a random ViT close to the identity, so changing
    them barely moves STIR (measured: forgetting <= 4e-5 at perturbed blocks); blocks with
    O(1) gain make the layers distinct functions, as in a trained network.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks:
            for parameter in model.network.blocks[block].parameters():
                if parameter.ndim == 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std / parameter.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def pretrained(tiny_vit_config, torch_single_thread) -> FeatureModel:
    torch.manual_seed(0)
    model = load_model(tiny_vit_config, None)
    redraw_blocks(model, range(model.depth), seed=1)
    return model


@pytest.fixture(scope="module")
def eval_images() -> EvalImages:
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return EvalImages(images, torch.arange(16))


def shard_tables(pt: FeatureModel, ft: FeatureModel, eval_images: EvalImages) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every STIR shard (r, j, seed) and the CKA shard of one checkpoint, as the jobs would write them."""
    context = ShardContext(
        {"pt": pt, "ft": ft}, eval_images, LAYERS, "flatten", InversionConfig(iterations=50, bf16=False)
    )
    stir_rows = [
        row
        for ref_model in ("pt", "ft")
        for ref_layer in LAYERS
        for seed in SEEDS
        for row in context.stir_rows(ref_model, ref_layer, seed)
    ]
    stir = rows_frame(({**CHECKPOINT, **row} for row in stir_rows), STIR_SCHEMA)
    cka = rows_frame(({**CHECKPOINT, **row} for row in context.cka_rows()), CKA_SCHEMA)
    return stir, cka


@pytest.fixture(scope="module")
def identical_tables(pretrained, eval_images):
    return shard_tables(pretrained, copy.deepcopy(pretrained), eval_images)


@pytest.fixture(scope="module")
def changed_tables(pretrained, eval_images):
    finetuned = copy.deepcopy(pretrained)
    redraw_blocks(finetuned, range(CHANGED_FROM, finetuned.depth), seed=2)
    return shard_tables(pretrained, finetuned, eval_images)


CURVE_VALUES = [
    "forgetting_mean", "learning_mean", "forgetting_debiased_mean", "learning_debiased_mean", "cka_divergence_mean",
]  # fmt: skip


def test_identical_models_have_exactly_zero_forgetting_learning_and_divergence(identical_tables):
    curves = metrics.curves(*identical_tables)
    assert curves["layer"].to_list() == LAYERS
    assert curves["n_seeds"].to_list() == [len(SEEDS)] * len(LAYERS)
    for column in [*CURVE_VALUES, "forgetting_std", "learning_std"]:
        assert curves[column].to_list() == [0.0] * len(LAYERS), column


def test_changed_blocks_show_up_only_at_and_after_the_change(changed_tables):
    curves = metrics.curves(*changed_tables)
    before = curves.filter(pl.col("layer") < CHANGED_FROM)
    after = curves.filter(pl.col("layer") >= CHANGED_FROM)
    assert len(before) == CHANGED_FROM and len(after) == len(LAYERS) - CHANGED_FROM
    # unchanged layers: the same computation on the same inputs (measured exactly 0.0)
    for column in CURVE_VALUES:
        assert before[column].abs().max() < 1e-6, column
    # changed layers 2, 3, 4 (measured): forgetting 0.041 0.076 0.255, learning 0.068 0.111 0.293,
    # debiased forgetting 0.35 0.43 0.50, debiased learning 0.27 0.44 0.61, CKA divergence 0.045 0.062 0.33
    assert after["forgetting_mean"].min() > 0.02
    assert after["learning_mean"].min() > 0.02
    assert after["forgetting_debiased_mean"].min() > 0.1
    assert after["learning_debiased_mean"].min() > 0.1
    assert after["cka_divergence_mean"].min() > 0.02


def test_flow_diagonal_is_zero(identical_tables, changed_tables):
    for stir, _ in (identical_tables, changed_tables):
        table = metrics.flow_table(stir)
        assert len(table) == len(LAYERS) ** 2
        assert table["n_seeds"].unique().to_list() == [len(SEEDS)]
        diagonal = table.filter(pl.col("pt_layer") == pl.col("ft_layer"))
        assert diagonal["flow"].to_list() == [0.0] * len(LAYERS)
        off_diagonal = table.filter(pl.col("pt_layer") != pl.col("ft_layer"))
        assert off_diagonal["flow"].abs().max() > 1e-3  # a non-trivial matrix around the zero diagonal


def test_stir_rows_of_a_shard(changed_tables):
    stir, _ = changed_tables
    assert stir.columns == list(STIR_SCHEMA)  # the rows and the identity fill the schema exactly
    # one row per (ref model, ref layer, seed, target model, target layer)
    assert len(stir) == 2 * len(LAYERS) * len(SEEDS) * 2 * len(LAYERS)
    assert stir["n_samples"].unique().to_list() == [16]
    assert stir["inv_iterations"].unique().to_list() == [50]
    # the inversion diagnostics belong to (ref model, ref layer, seed), not to the target
    per_inversion = stir.group_by("ref_model", "ref_layer", "seed").agg(pl.col("inv_loss_mean").n_unique())
    assert per_inversion["inv_loss_mean"].to_list() == [1] * len(per_inversion)
    assert (stir["inv_loss_median"] <= stir["inv_loss_max"]).all()
    self_stir = stir.filter(
        (pl.col("ref_model") == pl.col("target_model")) & (pl.col("ref_layer") == pl.col("target_layer"))
    )
    # STIR(m[i] | m[i]) is near 1 where the inversion matched the layer (measured 0.93..0.98 biased)
    assert self_stir["stir"].min() > 0.85
    assert stir["stir"].is_between(-1e-9, 1 + 1e-9).all()


def test_cka_rows_of_a_shard(changed_tables, pretrained, eval_images):
    _, cka = changed_tables
    assert cka.columns == list(CKA_SCHEMA)
    assert len(cka) == 4 * len(LAYERS) ** 2
    same = cka.filter((pl.col("model_a") == pl.col("model_b")) & (pl.col("layer_a") == pl.col("layer_b")))
    assert (same["cka"] - 1.0).abs().max() < 1e-12
    assert (same["cka_debiased"] - 1.0).abs().max() < 1e-12
    # an entry equals linear CKA of the clean features computed directly
    with torch.no_grad():
        features = pretrained.layer_features(eval_images.images, [1, 3])
    row = cka.filter(
        (pl.col("model_a") == "pt") & (pl.col("layer_a") == 1) & (pl.col("model_b") == "pt") & (pl.col("layer_b") == 3)
    ).row(0, named=True)
    assert row["cka"] == pytest.approx(linear_cka(features[1], features[3]), abs=1e-12)
    assert row["cka_debiased"] == pytest.approx(linear_cka(features[1], features[3], debiased=True), abs=1e-12)


# --- the formulas on hand-made rows ------------------------------------------------------------


def stir_row(ref_model, ref_layer, target_model, target_layer, seed, stir):
    return {
        **CHECKPOINT, "ref_model": ref_model, "ref_layer": ref_layer, "target_model": target_model,
        "target_layer": target_layer, "seed": seed, "stir": stir, "stir_debiased": stir - 0.5,
    }  # fmt: skip


def hand_made_stir() -> pl.DataFrame:
    """Layers 0 and 1, seeds 0 and 1; values chosen so every metric has a known answer."""
    values = {
        # (ref_model, ref_layer, target_model, target_layer): (seed 0, seed 1)
        ("pt", 0, "pt", 0): (0.9, 0.8), ("pt", 0, "ft", 0): (0.6, 0.7),
        ("pt", 0, "pt", 1): (0.5, 0.5), ("pt", 0, "ft", 1): (0.75, 0.65),
        ("pt", 1, "pt", 1): (1.0, 1.0), ("pt", 1, "ft", 1): (0.9, 0.9),
        ("pt", 1, "pt", 0): (0.3, 0.3), ("pt", 1, "ft", 0): (0.4, 0.2),
        ("ft", 0, "ft", 0): (0.95, 0.85), ("ft", 0, "pt", 0): (0.5, 0.45),
        ("ft", 1, "ft", 1): (0.7, 0.7), ("ft", 1, "pt", 1): (0.8, 0.8),
    }  # fmt: skip
    return pl.DataFrame([stir_row(*key, seed, value[seed]) for key, value in values.items() for seed in (0, 1)])


def hand_made_cka() -> pl.DataFrame:
    rows = []
    for model_a in ("pt", "ft"):
        for model_b in ("pt", "ft"):
            for layer_a in (0, 1):
                for layer_b in (0, 1):
                    same = model_a == model_b and layer_a == layer_b
                    value = 1.0 if same else 0.5 + 0.1 * layer_a + 0.05 * layer_b
                    if model_a == "ft" and model_b == "pt" and layer_a == layer_b:
                        value = 0.75 if layer_a == 0 else 0.6
                    rows.append({**CHECKPOINT, "model_a": model_a, "layer_a": layer_a, "model_b": model_b,
                                 "layer_b": layer_b, "cka": value, "cka_debiased": value - 0.1})  # fmt: skip
    return pl.DataFrame(rows)


def test_metric_formulas_and_signs_on_hand_made_rows():
    curves = metrics.curves(hand_made_stir(), hand_made_cka()).sort("layer")
    # forgetting = STIR(pt|pt) - STIR(ft|pt): layer 0 seeds (0.3, 0.1), layer 1 (0.1, 0.1)
    assert curves["forgetting_mean"].to_list() == pytest.approx([0.2, 0.1])
    assert curves["forgetting_std"].to_list() == pytest.approx([0.1414213562, 0.0], abs=1e-9)  # ddof=1
    # learning = STIR(ft|ft) - STIR(pt|ft): layer 0 (0.45, 0.40), layer 1 (-0.1, -0.1)
    assert curves["learning_mean"].to_list() == pytest.approx([0.425, -0.1])
    # the debiased columns use stir_debiased (here stir - 0.5: the differences are the same)
    assert curves["forgetting_debiased_mean"].to_list() == pytest.approx([0.2, 0.1])
    # cka divergence = CKA(pt[i], pt[i]) - CKA(ft[i], pt[i]) = 1 - (0.75, 0.6)
    assert curves["cka_divergence_mean"].to_list() == pytest.approx([0.25, 0.4])
    assert curves["n_seeds"].to_list() == [2, 2]


def test_flow_formula_on_hand_made_rows():
    # flow(ft[j], pt[i]) = STIR(ft[j] | pt[i]) - STIR(ft[i] | pt[i])
    table = metrics.flow_table(hand_made_stir())
    flow = {(r["pt_layer"], r["ft_layer"]): r["flow"] for r in table.iter_rows(named=True)}
    assert flow[(0, 0)] == 0.0 and flow[(1, 1)] == 0.0
    assert flow[(0, 1)] == pytest.approx(((0.75 - 0.6) + (0.65 - 0.7)) / 2)  # expansion side, j > i
    assert flow[(1, 0)] == pytest.approx(((0.4 - 0.9) + (0.2 - 0.9)) / 2)  # compression side, j < i


def test_metrics_accept_lazy_frames():
    lazy = metrics.curves(hand_made_stir().lazy(), hand_made_cka().lazy())
    assert isinstance(lazy, pl.LazyFrame)
    # equal up to rounding: Polars may aggregate the std in another order (measured 4e-17 apart)
    assert_frame_equal(lazy.collect(), metrics.curves(hand_made_stir(), hand_made_cka()), abs_tol=1e-12)
    assert isinstance(metrics.flow_table(hand_made_stir().lazy()), pl.LazyFrame)


def test_one_seed_gives_a_null_std():
    one_seed = hand_made_stir().filter(pl.col("seed") == 0)
    curves = metrics.curves(one_seed, hand_made_cka())
    assert curves["forgetting_std"].null_count() == len(curves)
    assert curves["n_seeds"].to_list() == [1, 1]


def planted_stir(forgetting_by_seed: dict[int, list[float]], pt_self: dict[int, list[float]]) -> pl.DataFrame:
    """pt-reference rows of one layer-diagonal: STIR(pt[l]|pt[l]) per seed from ``pt_self`` and
    STIR(ft[l]|pt[l]) = that minus the planted forgetting; the ft-reference rows equal (learning 0)."""
    rows = []
    for layer, values in forgetting_by_seed.items():
        for seed, value in enumerate(values):
            own = pt_self[layer][seed]
            for ref_model in ("pt", "ft"):
                for target_model, stir in (("pt", own), ("ft", own - value if ref_model == "pt" else own)):
                    rows.append({**CHECKPOINT, "ref_model": ref_model, "ref_layer": layer, "target_model": target_model,
                                 "target_layer": layer, "seed": seed, "stir": stir, "stir_debiased": stir})  # fmt: skip
    return pl.DataFrame(rows)


def test_intervals_are_students_t_over_seeds_and_the_noise_floor_flags_real_values():
    from scipy import stats

    forgetting = {0: [0.001, 0.003, 0.002], 1: [0.30, 0.32, 0.31], 2: [0.05, -0.04, 0.02]}
    pt_self = {0: [0.90, 0.91, 0.92], 1: [0.80, 0.81, 0.79], 2: [0.7, 0.7, 0.7]}
    stir = planted_stir(forgetting, pt_self)
    cka = pl.DataFrame([{**CHECKPOINT, "model_a": a, "layer_a": layer, "model_b": "pt", "layer_b": layer,
                         "cka": 1.0 if a == "pt" else 0.9, "cka_debiased": 1.0}
                        for a in ("pt", "ft") for layer in forgetting])  # fmt: skip
    curves = metrics.curves(stir, cka).sort("layer")
    for row in curves.iter_rows(named=True):
        values = forgetting[row["layer"]]
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert (row["forgetting_ci_low"], row["forgetting_ci_high"]) == pytest.approx((low, high), abs=1e-12)
        assert row["noise_floor"] == pytest.approx(np.std(pt_self[row["layer"]], ddof=1), abs=1e-12)
        assert row["cka_divergence_ci_low"] == row["cka_divergence_ci_high"] == pytest.approx(0.1)
    # layer 0: tiny forgetting under a noise floor of 0.01; layer 1: far above it; layer 2: an
    # interval straddling 0 (and a floor of 0, so only the interval decides)
    assert curves["forgetting_above_noise"].to_list() == [False, True, False]
    assert curves["learning_above_noise"].to_list() == [False, False, False]


def test_one_seed_has_no_interval_and_no_noise_floor():
    curves = metrics.curves(hand_made_stir().filter(pl.col("seed") == 0), hand_made_cka())
    assert curves["forgetting_ci_low"].null_count() == len(curves)
    assert curves["noise_floor"].null_count() == len(curves)
    assert curves["forgetting_above_noise"].null_count() == len(curves)


def test_subspace_similarity_is_one_for_identical_models_and_drops_only_where_blocks_changed(
    identical_tables, changed_tables, pretrained, eval_images
):
    from invariance.core.shards import batched_features
    from invariance.core.subspace import subspace_similarity

    from invariance.measures.subspace import SUBSPACE_SCHEMA, Subspace, subspace_rows

    def curve(finetuned: FeatureModel) -> pl.DataFrame:
        """The subspace measure's rows of a checkpoint and the column they give the curves."""
        context = ShardContext({"pt": pretrained, "ft": finetuned}, eval_images, LAYERS, "flatten", InversionConfig())
        rows = rows_frame(({**CHECKPOINT, **row} for row in subspace_rows(context)), SUBSPACE_SCHEMA)
        return Subspace().curve_columns({"subspace": rows}).sort("layer")

    same = curve(copy.deepcopy(pretrained))
    assert same["subspace_similarity"].to_list() == pytest.approx([1.0] * len(LAYERS), abs=1e-9)
    finetuned = copy.deepcopy(pretrained)
    redraw_blocks(finetuned, range(CHANGED_FROM, finetuned.depth), seed=2)
    values = curve(finetuned)["subspace_similarity"].to_list()
    assert values[:CHANGED_FROM] == pytest.approx([1.0] * CHANGED_FROM, abs=1e-9)
    assert all(v < 0.999 for v in values[CHANGED_FROM:])
    cka = changed_tables[1]  # CKA shards leave the column to the subspace measure
    assert cka["subspace_similarity"].null_count() == cka.height
    # the shard's value is the core function on the layer's features (16 images, k = 10)
    layer = LAYERS[-1]
    direct = subspace_similarity(batched_features(finetuned, eval_images.images, [layer], "flatten")[layer],
                                 batched_features(pretrained, eval_images.images, [layer], "flatten")[layer])  # fmt: skip
    assert values[-1] == pytest.approx(direct, abs=1e-12)


def test_the_interval_quantile_is_scipys_student_t_without_importing_scipy_stats() -> None:
    """t_critical is scipy.stats.t.ppf's number (bit for bit) from scipy.special, whose import a
    reduce's process pays instead of scipy.stats' (1.5 s of every scheduled tick)."""
    import subprocess
    import sys

    from scipy import stats

    from invariance.analysis.metrics import CONFIDENCE, t_critical

    assert t_critical(1) is None
    for n_seeds in range(2, 64):
        assert t_critical(n_seeds) == float(stats.t.ppf(0.5 + CONFIDENCE / 2, n_seeds - 1))
    code = ("import sys, polars as pl; from invariance.analysis import metrics; "
            "rows = metrics.over_seeds(pl.DataFrame({'k': [1, 1], 'v': [0.1, 0.3]}), 'v', ['k']); "
            "print(rows['v_ci_high'][0] > 0.3, 'scipy.stats' in sys.modules)")  # fmt: skip
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.split() == ["True", "False"], printed
