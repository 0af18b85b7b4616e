"""The finetuning paper's metrics as Polars functions over STIR and CKA rows.

pt = pretrained, ft = a finetuning checkpoint; i = target layer, j = reference layer.
- forgetting(ft[i] | pt[j]) = STIR(pt[i] | pt[j]) - STIR(ft[i] | pt[j])
- learning(ft[i] | pt[j])   = STIR(ft[i] | ft[j]) - STIR(pt[i] | ft[j])
- cka_divergence(ft[i], pt[j]) = CKA(pt[i], pt[j]) - CKA(ft[i], pt[j])
- flow(ft[j], pt[i]) = STIR(ft[j] | pt[i]) - STIR(ft[i] | pt[i])
Curves take i = j; mean and std (ddof=1, null for one seed) are over seeds.
Rows are keyed by (run, checkpoint, epoch, alpha): ``alpha`` places ft on the weight path
(1: the checkpoint itself), ``run`` the finetuning run of a sweep (empty for one run); rows
without these columns (shards of older releases) take alpha 1 and run "".
All functions accept DataFrames or LazyFrames and return the same kind.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import polars as pl

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)
Estimator = Literal["stir", "stir_debiased"]
CHECKPOINT_KEYS = ["run", "checkpoint", "epoch", "alpha"]
_PAIR_KEYS = [*CHECKPOINT_KEYS, "ref_layer", "target_layer", "seed"]


def with_path_columns(frame: Frame) -> Frame:
    """``frame`` with ``run`` ("") and ``alpha`` (1.0, the checkpoint itself) where it lacks them
    or holds nulls there."""
    names = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    return frame.with_columns(
        pl.col("run").fill_null("") if "run" in names else pl.lit("").alias("run"),
        pl.col("alpha").cast(pl.Float64).fill_null(1.0) if "alpha" in names else pl.lit(1.0).alias("alpha"),
    )


def _targets_side_by_side(stir: Frame, ref_model: str, value: Estimator) -> Frame:
    """Rows of one reference model with the pt and ft targets as columns ``pt`` and ``ft``."""
    rows = with_path_columns(stir).filter(pl.col("ref_model") == ref_model)
    by_target = {
        name: rows.filter(pl.col("target_model") == name).select(*_PAIR_KEYS, pl.col(value).alias(name))
        for name in ("pt", "ft")
    }
    return by_target["pt"].join(by_target["ft"], on=_PAIR_KEYS, how="inner")


def forgetting(stir: Frame, value: Estimator = "stir") -> Frame:
    """Per (checkpoint, epoch, ref_layer j, target_layer i, seed): ``forgetting``."""
    paired = _targets_side_by_side(stir, "pt", value)
    return paired.select(*_PAIR_KEYS, (pl.col("pt") - pl.col("ft")).alias("forgetting"))


def learning(stir: Frame, value: Estimator = "stir") -> Frame:
    """Per (checkpoint, epoch, ref_layer j, target_layer i, seed): ``learning``."""
    paired = _targets_side_by_side(stir, "ft", value)
    return paired.select(*_PAIR_KEYS, (pl.col("ft") - pl.col("pt")).alias("learning"))


def cka_divergence(cka: Frame, value: Literal["cka", "cka_debiased"] = "cka") -> Frame:
    """Per (checkpoint, epoch, ft_layer i, pt_layer j): ``cka_divergence``."""
    against_pt = with_path_columns(cka).filter(pl.col("model_b") == "pt")
    keys = [*CHECKPOINT_KEYS, "layer_a", "layer_b"]
    pt = against_pt.filter(pl.col("model_a") == "pt").select(*keys, pl.col(value).alias("pt"))
    ft = against_pt.filter(pl.col("model_a") == "ft").select(*keys, pl.col(value).alias("ft"))
    return pt.join(ft, on=keys, how="inner").select(
        *CHECKPOINT_KEYS,
        pl.col("layer_a").alias("ft_layer"),
        pl.col("layer_b").alias("pt_layer"),
        (pl.col("pt") - pl.col("ft")).alias("cka_divergence"),
    )


def flow(stir: Frame, value: Estimator = "stir") -> Frame:
    """Per (checkpoint, epoch, pt_layer i, ft_layer j, seed): ``flow`` = STIR(ft[j]|pt[i]) - STIR(ft[i]|pt[i]).

    j < i with flow > 0: compression; j > i: expansion; the diagonal is 0.
    """
    ft_given_pt = with_path_columns(stir).filter((pl.col("ref_model") == "pt") & (pl.col("target_model") == "ft"))
    diagonal = ft_given_pt.filter(pl.col("target_layer") == pl.col("ref_layer")).select(
        *CHECKPOINT_KEYS, "ref_layer", "seed", pl.col(value).alias("diagonal")
    )
    return ft_given_pt.join(diagonal, on=[*CHECKPOINT_KEYS, "ref_layer", "seed"], how="inner").select(
        *CHECKPOINT_KEYS,
        pl.col("ref_layer").alias("pt_layer"),
        pl.col("target_layer").alias("ft_layer"),
        "seed",
        (pl.col(value) - pl.col("diagonal")).alias("flow"),
    )


# the interval over seeds: Student's t, two-sided
CONFIDENCE = 0.95
# a curve value is above the inversions' noise when it exceeds this many noise floors (and its
# interval over seeds excludes 0)
NOISE_MULTIPLE = 2.0


def t_critical(n_seeds: int) -> float | None:
    """Student's t quantile of the CONFIDENCE interval of a mean of ``n_seeds`` values; None below 2.
    ``scipy.special.stdtrit`` is what ``scipy.stats.t.ppf`` computes, without importing
    ``scipy.stats`` (1.5 s of every reduce's process)."""
    from scipy import special

    return float(special.stdtrit(n_seeds - 1, 0.5 + CONFIDENCE / 2)) if n_seeds >= 2 else None


def _interval(value: str) -> list[pl.Expr]:
    """``{value}_ci_low``/``_ci_high`` from ``_mean``, ``_std`` and ``n_seeds`` (null for one seed)."""
    critical = pl.col("n_seeds").map_elements(t_critical, return_dtype=pl.Float64)
    half = critical * pl.col(f"{value}_std") / pl.col("n_seeds").cast(pl.Float64).sqrt()
    return [(pl.col(f"{value}_mean") - half).alias(f"{value}_ci_low"), (pl.col(f"{value}_mean") + half).alias(f"{value}_ci_high")]


def over_seeds(frame: Frame, value: str, by: list[str]) -> Frame:
    """``value`` -> ``{value}_mean``, ``{value}_std`` (ddof=1) and the 95% t-interval of the mean,
    ``{value}_ci_low`` / ``{value}_ci_high``, over seeds, grouped by ``by``; ``n_seeds``."""
    names = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    # summed in seed order: joins and group_by hand rows over in no fixed order, and a sum in
    # another order differs in its last bits (a rerun must write byte-identical tables)
    values = pl.col(value).sort_by("seed") if "seed" in names else pl.col(value)
    return (
        frame.group_by(by)
        .agg(
            values.mean().alias(f"{value}_mean"),
            values.std(ddof=1).alias(f"{value}_std"),
            pl.len().alias("n_seeds"),
        )
        .with_columns(_interval(value))
    )


def _diagonal_curve(matrix: Frame, value: str, suffix: str = "") -> Frame:
    curve = matrix.filter(pl.col("ref_layer") == pl.col("target_layer")).rename({"target_layer": "layer"})
    stats = over_seeds(curve, value, [*CHECKPOINT_KEYS, "layer"])
    return stats.select(
        *CHECKPOINT_KEYS, "layer",
        *(pl.col(f"{value}_{stat}").alias(f"{value}{suffix}_{stat}") for stat in ("mean", "std", "ci_low", "ci_high")),
        *(["n_seeds"] if not suffix else []),
    )  # fmt: skip


def noise_floor(stir: Frame, value: Estimator = "stir") -> Frame:
    """Per layer: ``noise_floor``, the standard deviation over seeds of STIR(pt[i] | pt[i]).

    The pretrained model measured against its own inversions: what changes from seed to seed is
    the inversion alone (the start noise), not the model, so this spread is how far apart two
    measurements of one and the same model fall. Taken from the pt-reference shards already
    computed (identical for every checkpoint)."""
    own = stir.filter(
        (pl.col("ref_model") == "pt") & (pl.col("target_model") == "pt") & (pl.col("ref_layer") == pl.col("target_layer"))
    )
    return (
        own.group_by("target_layer", "seed")
        .agg(pl.col(value).first())
        .group_by("target_layer")
        # in seed order: a std summed in another order differs in its last bits, and a rerun must
        # write byte-identical tables (group_by hands the groups' rows over in no fixed order)
        .agg(pl.col(value).sort_by("seed").std(ddof=1).alias("noise_floor"))
        .rename({"target_layer": "layer"})
    )


def learning_noise_floor(stir: Frame, value: Estimator = "stir") -> Frame:
    """Per (checkpoint, layer): ``learning_noise_floor``, the standard deviation over seeds of
    STIR(ft[i] | ft[i]), the finetuned model against its own inversions (learning's own term)."""
    own = with_path_columns(stir).filter(
        (pl.col("ref_model") == "ft") & (pl.col("target_model") == "ft") & (pl.col("ref_layer") == pl.col("target_layer"))
    )
    return (
        own.group_by(*CHECKPOINT_KEYS, "target_layer")
        .agg(pl.col(value).sort_by("seed").std(ddof=1).alias("learning_noise_floor"))
        .rename({"target_layer": "layer"})
    )


def _above_noise(value: str, floor: str = "noise_floor") -> pl.Expr:
    """``{value}_above_noise``: |mean| above NOISE_MULTIPLE noise floors, and (with 2+ seeds) the
    interval over seeds excludes 0; null where the noise floor is unknown (one seed)."""
    beyond_floor = pl.col(f"{value}_mean").abs() > NOISE_MULTIPLE * pl.col(floor)
    excludes_zero = (pl.col(f"{value}_ci_low") > 0) | (pl.col(f"{value}_ci_high") < 0)
    return (beyond_floor & excludes_zero.fill_null(True)).alias(f"{value}_above_noise")


def subspace_curve(cka: Frame) -> Frame:
    """Per (checkpoint, epoch, layer): ``subspace_similarity`` of ft[i] and pt[i] on X (Ramasesh
    et al.; core/subspace.py), from the CKA shards; null where it is not defined or the shards
    predate it."""
    keys = [*CHECKPOINT_KEYS, "layer"]
    same_layer = with_path_columns(cka).filter((pl.col("model_a") == "ft") & (pl.col("model_b") == "pt") & (pl.col("layer_a") == pl.col("layer_b")))
    value = pl.col("subspace_similarity") if "subspace_similarity" in cka.collect_schema().names() else pl.lit(None)
    return same_layer.select(*CHECKPOINT_KEYS, pl.col("layer_a").alias("layer"), value.cast(pl.Float64).alias("subspace_similarity")).unique(keys)


def stir_curves(stir: Frame) -> Frame:
    """Per (checkpoint, epoch, layer): forgetting and learning (biased and debiased STIR), each
    ``_mean``, ``_std`` and the 95% t-interval ``_ci_low``/``_ci_high`` over seeds, ``n_seeds``;
    ``noise_floor`` of the layer (pt's own STIR spread), ``learning_noise_floor`` (ft's) and
    ``forgetting_above_noise`` / ``learning_above_noise``."""
    keys = [*CHECKPOINT_KEYS, "layer"]
    parts = [
        _diagonal_curve(forgetting(stir), "forgetting"),
        _diagonal_curve(learning(stir), "learning").drop("n_seeds"),
        _diagonal_curve(forgetting(stir, "stir_debiased"), "forgetting", "_debiased"),
        _diagonal_curve(learning(stir, "stir_debiased"), "learning", "_debiased"),
    ]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.join(part, on=keys, how="left")
    return (
        joined.join(noise_floor(stir), on="layer", how="left")
        .join(learning_noise_floor(stir), on=keys, how="left")
        .with_columns(_above_noise("forgetting"), _above_noise("learning", "learning_noise_floor"))
        .sort(keys)
    )


def cka_curves(cka: Frame) -> Frame:
    """Per (checkpoint, epoch, layer): ``cka_divergence`` of ft[i] from pt[i] as ``_mean``, with
    ``_std`` 0 and a zero-width interval (CKA has no seed)."""
    return (
        cka_divergence(cka)
        .filter(pl.col("ft_layer") == pl.col("pt_layer"))
        .select(
            *CHECKPOINT_KEYS,
            pl.col("ft_layer").alias("layer"),
            pl.col("cka_divergence").alias("cka_divergence_mean"),
            pl.lit(0.0).alias("cka_divergence_std"),
            pl.col("cka_divergence").alias("cka_divergence_ci_low"),
            pl.col("cka_divergence").alias("cka_divergence_ci_high"),
        )
    )


def curves(stir: Frame, cka: Frame) -> Frame:
    """Per (checkpoint, epoch, layer): ``stir_curves`` (forgetting, learning, noise floors), then
    ``cka_curves`` (CKA divergence) and ``subspace_similarity`` (the CKA shards' column, where
    older shards hold it): the reduced curves of a run, as the reducer joins its measures'
    columns."""
    keys = [*CHECKPOINT_KEYS, "layer"]
    return (
        stir_curves(stir).join(cka_curves(cka), on=keys, how="left").join(subspace_curve(cka), on=keys, how="left").sort(keys)
    )


def plain(frame: Frame) -> Frame:
    """The rows of the checkpoints themselves (alpha 1): what the per-epoch plots and the
    robustness link read."""
    names = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    if "alpha" not in names or (isinstance(frame, pl.DataFrame) and frame.is_empty()):
        return frame
    return frame.filter(pl.col("alpha") == 1.0)


def flow_table(stir: Frame) -> Frame:
    """Per (checkpoint, epoch, pt_layer, ft_layer): ``flow`` (mean over seeds), ``flow_std`` and
    the 95% t-interval ``flow_ci_low`` / ``flow_ci_high``."""
    keys = [*CHECKPOINT_KEYS, "pt_layer", "ft_layer"]
    return (
        over_seeds(flow(stir), "flow", keys)
        .select(*keys, pl.col("flow_mean").alias("flow"), "flow_std", "flow_ci_low", "flow_ci_high", "n_seeds")
        .sort(keys)
    )
