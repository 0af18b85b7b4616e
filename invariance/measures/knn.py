"""The kNN probe (DINO's weighted kNN vote, ``core/knn.py``): the frozen features of one model at
every run layer, a labelled bank (``knn.train``) against the run's eval images with their labels.

On with the run config's ``knn`` section. Units: the pretrained model once (shared by every run of
a study), every checkpoint at every alpha of its weight path; keyed by the kNN hash (the run's
settings, the knn section, the bank's and the eval data's file listings). Reduced:
``reduced/knn.parquet``, top-1 per layer and against alpha per run, and the report's table.
"""

from __future__ import annotations

import logging
import time

import polars as pl

from invariance import __version__
from invariance.analysis import plots
from invariance.config import RunConfig, knn_settings_hash
from invariance.core.knn_probe import knn_label_error, knn_rows
from invariance.core.models import FeatureModel, load_model
from invariance.core.workspace import RunSpec, Workspace
from invariance.errors import ConfigError, DataError
from invariance.io.data import SplitSummary, check_labelled, describe_split, source_fingerprint
from invariance.io.layout import PLAIN_ALPHA, REDUCED_KNN, KnnUnit, Unit, knn_alpha_plot_key, knn_layers_plot_key
from invariance.io.schemas import KNN_SCHEMA
from invariance.io.storage import redact
from invariance.measures.base import (
    Figure, Measure, MeasureOutputs, PlanSetup, ReduceContext, register_measure, run_title, write_shard,
)  # fmt: skip

log = logging.getLogger(__name__)

KNN_TABLE_COLUMNS = ("run", "checkpoint", "epoch", "alpha", "model", "layer", "k", "top1", "top5", "n_train", "n_test",
                     "settings")  # fmt: skip


@register_measure
class Knn(Measure):
    name = "knn"
    description = "kNN shards"
    section = "knn"
    schema = KNN_SCHEMA
    nullable = frozenset({"top5", "alpha"})  # top-5: undefined with fewer than 5 classes; alpha: null for pt

    def hashes(self, setup: PlanSetup) -> dict[str, str]:
        """The kNN hash: the run's settings, the knn section and the listings of the bank's and the
        eval data's files (not loaded here: often thousands of images), after checking them."""
        if "knn" not in setup.checked:  # checked before with the same inputs: the verdict holds the fingerprint
            assert setup.model is not None
            setup.checked["knn"] = check_knn_inputs(setup.config, setup.model)
        return {self.name: knn_settings_hash(setup.run_hash, setup.config, setup.checked["knn"])}

    def units(self, setup: PlanSetup) -> list[Unit]:
        units: list[Unit] = [KnnUnit(-1, "pt")]  # shared by every run of a study
        return units + [KnnUnit(c.epoch, "ft", c.name, c.url, c.fingerprint, alpha, setup.extra_at(alpha), run=c.run) for c, alpha in setup.points]  # fmt: skip

    def point(self, unit: Unit) -> tuple[str, int, float] | None:
        return (unit.run, unit.epoch, unit.alpha) if isinstance(unit, KnnUnit) and unit.model == "ft" else None

    def priority(self, unit: Unit) -> int:
        return 30

    def unit_kind(self, unit: Unit) -> tuple[str, str]:
        return "kNN shards", "done"

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        """One kNN shard: the pretrained model (once per run) or a checkpoint at one alpha, every run
        layer, the ``knn.train`` bank against the eval images with their labels."""
        assert isinstance(unit, KnnUnit)
        started = time.time()
        config = spec.config
        if config.knn is None:
            raise ConfigError("knn: a kNN unit was planned, but the config has no knn section")
        knn_hash = spec.hash_of(self.name)
        pretrained = workspace.pretrained_model(spec)
        model = pretrained if unit.model == "pt" else workspace.path_model(spec, unit.checkpoint_url, unit.alpha, unit.extra,
                                                                          unit.checkpoint_fingerprint)  # fmt: skip
        size = config.data.image_size or pretrained.input_size
        bank = workspace.labelled_images(config.knn.train, size, config.knn.label_column, config.storage_options,
                                         "knn.train", knn_hash)  # fmt: skip
        queries = workspace.labelled_images(config.data, size, config.knn.label_column, config.storage_options, "data",
                                            knn_hash)  # fmt: skip
        if spec.eval_fingerprint and queries.fingerprint != spec.eval_fingerprint:
            raise DataError(f"data.path {redact(config.data.path)}: the eval images changed since the run was planned; "
                            "rerun to plan them anew")  # fmt: skip
        if max(config.knn.k) > len(bank.labels):
            raise ConfigError(f"knn.k: {max(config.knn.k)} neighbours asked of a bank of {len(bank.labels)} images (knn.train)")
        # classes matched by name across bank and eval (image folders, Parquet strings): core/knn_probe.align_labels
        rows = knn_rows(model, bank.images, bank.labels, queries.images, queries.labels, spec.layers, config.knn,
                        bank.classes, queries.classes)  # fmt: skip
        ft = unit.model == "ft"
        identity = {"settings": knn_hash, "run": unit.run, "checkpoint": unit.checkpoint, "epoch": unit.epoch if ft else None,
                    "alpha": float(unit.alpha) if ft else None, "model": unit.model, "version": __version__,
                    "checkpoint_fingerprint": unit.checkpoint_fingerprint}  # fmt: skip
        return write_shard(spec, self, unit, rows, started, identity=identity, model=unit.model, knn_hash=knn_hash)

    def normalize(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The pretrained model's rows keep epoch and alpha null (not on a weight path)."""
        return frame.with_columns(pl.col("run").fill_null(""))

    def tables(self, context: ReduceContext) -> dict[str, pl.DataFrame]:
        table = knn_table(context.rows[self.name], context.plan.hashes[self.name])
        return {REDUCED_KNN: table} if not table.is_empty() else {}

    def order_table(self, key: str, table: pl.DataFrame) -> pl.DataFrame:
        return table.sort("model", "run", "epoch", "alpha", "layer", "k", descending=[True, False, False, False, False, False],
                          nulls_last=False)  # fmt: skip

    def reduce(self, context: ReduceContext) -> MeasureOutputs:
        out = MeasureOutputs(status={"knn_settings": context.plan.hashes[self.name]})  # reduced/knn.parquet is of these settings
        table = context.tables.get(REDUCED_KNN, pl.DataFrame())
        if table.is_empty():
            return out
        k = table["k"].min() if 20 not in table["k"].to_list() else 20
        out.report_tables[f"kNN accuracy per layer (k = {k}; pt: the pretrained model)"] = (
            table.filter(pl.col("k") == k).select("run", "checkpoint", "model", "epoch", "alpha", "layer", "top1", "top5",
                                                  "n_train", "n_test")  # fmt: skip
        )
        if not context.make_plots:
            return out
        names = context.plan.layer_names
        for run in dict.fromkeys(table.filter(pl.col("model") == "ft")["run"].to_list()):
            # each run's checkpoints beside the pretrained model's rows (shared by every run)
            rows = table.filter((pl.col("model") == "pt") | (pl.col("run") == run))
            out.figures.append(Figure(knn_layers_plot_key(run), rows, lambda rows=rows: plots.knn_layers_png(rows, layer_names=names),
                                      title=f"{run_title(run)}kNN top-1 per layer"))  # fmt: skip
            if not rows.filter(pl.col("alpha") != PLAIN_ALPHA).is_empty():
                out.figures.append(Figure(knn_alpha_plot_key(run), rows, lambda rows=rows: plots.knn_alpha_png(rows, layer_names=names),
                                          title=f"{run_title(run)}kNN top-1 against alpha"))  # fmt: skip
        return out


def knn_table(rows: pl.DataFrame, knn_hash: str) -> pl.DataFrame:
    """``reduced/knn.parquet``: pt once (epoch and alpha null), each checkpoint at each alpha of its
    path, with the kNN hash that keyed them."""
    if rows.is_empty():
        return pl.DataFrame()
    return (
        rows.with_columns(pl.lit(knn_hash).alias("settings"))
        .select(KNN_TABLE_COLUMNS)
        .sort("model", "run", "epoch", "alpha", "layer", "k", descending=[True, False, False, False, False, False],
              nulls_last=False)  # fmt: skip
    )


def check_knn_inputs(config: RunConfig, model: FeatureModel) -> str:
    """Before any task, a ``knn`` section that cannot work: a bank missing, a bank or eval images
    without class labels (from the files' schemas and folders, no image loaded), a
    ``knn.token_policy`` the model cannot give, a ``knn.train.image_size`` the model is not fed.
    Otherwise every kNN shard would fail, and stop the run's STIR shards too. Returns the
    fingerprint of the bank's and the eval data's files (``source_fingerprint``: the eval labels
    are the queries' truth, and the eval fingerprint holds the images only)."""
    assert config.knn is not None
    size = config.data.image_size or model.input_size
    if config.knn.train.image_size not in (None, size):
        raise ConfigError(f"knn.train.image_size: {config.knn.train.image_size}, but the model is fed "
                          f"{size}x{size} images (data.image_size or its input size); leave it out: the bank is "
                          "resized as the eval images are")  # fmt: skip
    # the bank's files and the eval data's (their labels are the queries' truth): missing ones named
    inputs = "|".join(source_fingerprint(data, config.storage_options, f"{key}.path")
                      for key, data in (("knn.train", config.knn.train), ("data", config.data)))  # fmt: skip
    summaries: dict[str, SplitSummary] = {}
    for key, data in (("knn.train", config.knn.train), ("data", config.data)):
        try:
            check_labelled(data, config.knn.label_column, config.storage_options)
            summaries[key] = describe_split(data, config.knn.label_column, config.storage_options)
        except DataError as exc:
            raise knn_label_error(key, config.knn.label_column, exc) from None
    inputs += check_knn_bank(config, summaries["knn.train"], summaries["data"])
    if config.knn.token_policy is not None:
        try:
            model.check(config.knn.token_policy, size)
            if config.finetuned_model is not None:  # the checkpoints' module must give it too
                load_model(config.finetuned_model, None, modules=config.layer_modules).check(config.knn.token_policy, size)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(f"knn.{message}" if message.startswith("token_policy:") else f"knn.token_policy: {message}") from None
    return inputs


def check_knn_bank(config: RunConfig, bank: SplitSummary, queries: SplitSummary) -> str:
    """Before any task, a bank that would give wrong numbers or fail every kNN shard: the eval
    images themselves (same files: every query finds its own copy), fewer images than
    ``knn.train.n_samples``, labels of another kind than the eval labels (names vs integers).
    Returns what of the label space enters the kNN hash: "" when the bank and the eval data
    index their classes alike (as before), else a marker (class names matched by name since
    issue 25: shards of such a pair computed before are recomputed)."""
    assert config.knn is not None
    train = config.knn.train
    shared = set(bank.files) & set(queries.files)
    if shared:
        left_out = "split" not in train.model_fields_set
        how = (f"knn.train.split is left out, so it is {train.split!r}, as data.split" if left_out
               else f"knn.train.split {train.split!r} and data.split {config.data.split!r} name the same files")  # fmt: skip
        found = f"splits found in {redact(train.path)}: {list(bank.splits)}" if bank.splits else \
            f"{redact(train.path)} has no split folders or files"  # fmt: skip
        raise ConfigError(f"knn.train.split: the kNN bank would be the eval images ({how}; {len(shared)} of the bank's "
                          f"files are data's, e.g. {redact(sorted(shared)[0])}): every query would find its own copy "
                          f"in the bank. Set knn.train.split to a split other than the eval images' ({found}), or "
                          "knn.train.path to another dataset")  # fmt: skip
    if train.n_samples > bank.count:
        default = "" if "n_samples" in train.model_fields_set else " (the default: knn.train.n_samples is left out)"
        raise DataError(f"knn.train.n_samples is {train.n_samples}{default} but {redact(train.path)} ({train.split}) "
                        f"holds only {bank.count} images: set knn.train.n_samples to at most {bank.count}")  # fmt: skip
    if (bank.classes is None) != (queries.classes is None):
        named, numbered = ("knn.train", "data") if bank.classes is not None else ("data", "knn.train")
        raise DataError(f"{named} labels its classes by name ({list((bank.classes or queries.classes or ())[:5])}...) "
                        f"and {numbered} by integer: the kNN probe cannot tell which integer is which class; give "
                        "both the same kind of labels (image folders, or Parquet columns of class names, or integer "
                        "columns on both)")  # fmt: skip
    if bank.classes is not None and queries.classes is not None:
        unknown = sorted(set(queries.classes) - set(bank.classes))
        if unknown:
            log.warning("knn: the eval images have classes the bank (knn.train) lacks, never predicted: %s", unknown[:10])
        return "" if bank.classes == queries.classes else "|labels-by-name"
    if bank.integer_labels is not None and queries.integer_labels is not None:
        unknown = sorted(set(queries.integer_labels) - set(bank.integer_labels))
        if unknown:
            log.warning("knn: the eval labels %s are not in the bank (knn.train): never predicted", unknown[:10])
    return ""
