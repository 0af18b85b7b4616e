"""Planning: which shards a config needs, which are done (one listing of the completion
records), and in what order the rest is submitted, with what each waits for. Pure: no Ray,
no computation of results."""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field

from invariance.io.checkpoints import Checkpoint, discover_checkpoints, empty_weights_error, pattern_root, weights_fingerprint
from invariance.config import RunConfig, knn_settings_hash, settings_hash
from invariance.errors import CheckpointError, ConfigError, DataError
from invariance.io.data import SplitSummary, check_labelled, describe_split, load_eval_images, source_fingerprint
from invariance.io.storage import is_inside, open_filesystem, redact
from invariance.io.layout import MANIFESTS, PLAIN_ALPHA, CkaUnit, InversionUnit, KnnUnit, StirUnit, Unit
from invariance.core.interpolation import check_interpolable
from invariance.core.models import FeatureModel, check_models, load_model
from invariance.io.storage import Store

REF_MODELS = ("pt", "ft")
log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Every unit of work of a config and which of them are already complete."""

    settings_hash: str
    inversion_hash: str
    checkpoints: list[Checkpoint]
    layers: list[int]
    depth: int
    input_size: int
    inversions: list[InversionUnit]
    stir: list[StirUnit]
    cka: list[CkaUnit]
    done: set[str] = field(default_factory=set)
    layer_names: list[str] = field(default_factory=list)  # what each layer index is ("blocks.3", "pre-logits")
    # what the numbers depend on beyond the config, in both hashes: {"pretrained": ..., "eval_images": ...}
    fingerprints: dict[str, str] = field(default_factory=dict)
    # kNN shards (``knn`` section): pt once, every checkpoint at every alpha of its path; their own hash
    knn: list[KnnUnit] = field(default_factory=list)
    knn_hash: str = ""

    def refresh(self, store: Store) -> None:
        """Re-read what is done, e.g. after an execution: one listing of the completion records
        and one of each kind's data folder. A unit is done when its record AND its data object
        exist; a record whose data is gone (a deleted shard) leaves the unit missing, to recompute."""
        records = set(store.list(MANIFESTS))
        units: list[Unit] = [*self.inversions, *self.stir, *self.cka, *self.knn]
        recorded = [u for u in units if self.record_key(u) in records]
        present: set[str] = set()
        for kind in {type(u) for u in recorded}:  # the folder all data keys of a kind share
            present.update(store.list(posixpath.commonpath([self.data_key(u) for u in recorded if type(u) is kind])))
        self.done = {self.record_key(u) for u in recorded if self.data_key(u) in present}
        lost = [u for u in recorded if self.data_key(u) not in present]
        if lost:
            log.warning("%d completion records without their data (e.g. %s): recomputing them",
                        len(lost), store.url(self.data_key(lost[0])))  # fmt: skip

    def _hash_of(self, unit: Unit) -> str:
        """The hash keying ``unit``: pt inversions and kNN shards have their own."""
        if isinstance(unit, InversionUnit):
            return self.inversion_hash
        return self.knn_hash if isinstance(unit, KnnUnit) else self.settings_hash

    def record_key(self, unit: Unit) -> str:
        """Where ``unit``'s completion record goes (pt inversions: under their own settings)."""
        return unit.record_key(self._hash_of(unit))

    def data_key(self, unit: Unit) -> str:
        """Where ``unit``'s data goes."""
        return unit.data_key(self._hash_of(unit))

    def is_done(self, unit: Unit) -> bool:
        return self.record_key(unit) in self.done

    @property
    def missing_keys(self) -> list[str]:
        """The completion records still to be written, sorted."""
        return sorted(self.record_key(u) for u in [*self.missing_inversions, *self.missing_stir, *self.missing_cka,
                                                   *self.missing_knn])  # fmt: skip

    @property
    def missing_inversions(self) -> list[InversionUnit]:
        return [u for u in self.inversions if not self.is_done(u)]

    @property
    def missing_stir(self) -> list[StirUnit]:
        return [u for u in self.stir if not self.is_done(u)]

    @property
    def missing_cka(self) -> list[CkaUnit]:
        return [u for u in self.cka if not self.is_done(u)]

    @property
    def missing_knn(self) -> list[KnnUnit]:
        return [u for u in self.knn if not self.is_done(u)]

    def incomplete_epochs(self) -> dict[int, int]:
        """{epoch: number of its shards (STIR + CKA) not yet complete} (a study: summed over its runs)."""
        missing: dict[int, int] = {}
        for (_, epoch), count in self.incomplete_checkpoints().items():
            missing[epoch] = missing.get(epoch, 0) + count
        return missing

    def missing_per_point(self) -> Counter[tuple[str, int, float]]:
        """{(run, epoch, alpha): its STIR + CKA shards not yet complete}, for every point (a
        checkpoint at alpha 1, or a point of its weight path) with one missing."""
        return Counter((u.run, u.epoch, u.alpha) for u in [*self.missing_stir, *self.missing_cka])

    def incomplete_checkpoints(self) -> dict[tuple[str, int], int]:
        """{(run, epoch): number of the checkpoint's own shards (STIR + CKA at alpha 1) not yet
        complete}. A point of its weight path that is missing a shard leaves the checkpoint
        complete (``incomplete_points``): its own curves are reduced, that point is not."""
        return {(run, epoch): n for (run, epoch, alpha), n in self.missing_per_point().items() if alpha == PLAIN_ALPHA}

    def incomplete_points(self) -> set[tuple[str, int, float]]:
        """(run, epoch, alpha) of every point with a STIR or CKA shard not yet complete."""
        return set(self.missing_per_point())

    def incomplete_path_points(self) -> dict[str, int]:
        """{"epoch 2 alpha 0.5" (a study: "run lr=0.1 epoch 2 alpha 0.5"): its missing STIR + CKA
        shards} for the weight-path points (alpha < 1) left out of the tables until computed."""
        return {f"{f'run {run} ' if run else ''}epoch {epoch} alpha {alpha:g}": n
                for (run, epoch, alpha), n in sorted(self.missing_per_point().items()) if alpha != PLAIN_ALPHA}

    @property
    def runs(self) -> dict[str, list[int]]:
        """{run: its checkpoint epochs}, runs in name order ({"": epochs} without ``{run}``)."""
        runs: dict[str, list[int]] = {}
        for checkpoint in self.checkpoints:
            runs.setdefault(checkpoint.run, []).append(checkpoint.epoch)
        return runs

    @property
    def is_study(self) -> bool:
        """Whether the checkpoints come from many runs (``{run}`` in the pattern)."""
        return any(c.run for c in self.checkpoints)

    def work(self) -> list[tuple[Unit, tuple[Unit, ...]]]:
        """The missing units in submission order, each with the missing units it waits for.

        Inversions first (pt-reference STIR shards read their X'); then checkpoint by
        checkpoint, so that a worker's cached models and features serve consecutive units:
        ft-reference shards, the CKA shard, the kNN shard, then the pt-reference shards, whose
        inversions have had the longest to finish; each point of a weight path (alpha) after the
        checkpoint itself. The pretrained kNN shard comes with the inversions.
        """
        missing_inversions = set(self.missing_inversions)
        order: list[tuple[Unit, tuple[Unit, ...]]] = [(unit, ()) for unit in self.missing_inversions]
        missing_stir, missing_cka, missing_knn = self.missing_stir, self.missing_cka, self.missing_knn
        order += [(u, ()) for u in missing_knn if u.model == "pt"]
        for checkpoint in self.checkpoints:
            own = [u for u in [*missing_stir, *missing_cka, *missing_knn]
                   if (u.run, u.epoch) == checkpoint.key and getattr(u, "model", "ft") == "ft"]  # fmt: skip
            alphas = sorted({u.alpha for u in own}, key=lambda alpha: (alpha != PLAIN_ALPHA, -alpha))
            for alpha in alphas:
                stir = [u for u in own if isinstance(u, StirUnit) and u.alpha == alpha]
                order += [(u, ()) for u in stir if u.ref_model == "ft"]
                order += [(u, ()) for u in own if isinstance(u, CkaUnit) and u.alpha == alpha]
                order += [(u, ()) for u in own if isinstance(u, KnnUnit) and u.alpha == alpha]
                for unit in (u for u in stir if u.ref_model == "pt"):
                    inversion = InversionUnit(unit.ref_layer, unit.seed)
                    order.append((unit, (inversion,) if inversion in missing_inversions else ()))
        return order


def knn_label_error(key: str, label_column: str, error: DataError) -> DataError:
    """The error of a kNN input (``knn.train``, ``data``) without class labels, naming the key."""
    return DataError(f"{key} (the kNN probe needs class labels; knn.label_column {label_column!r}): {error}")


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


def check_output_location(config: RunConfig) -> None:
    """ConfigError naming ``output`` when it lies inside the eval data, the kNN bank or the
    checkpoint folder: the run's own files (plots/*.png, shards) would become inputs."""
    checkpoint_folder = pattern_root(config.checkpoints)
    inputs = [("data.path", config.data.path), ("checkpoints", checkpoint_folder)]
    if config.knn is not None:
        inputs.append(("knn.train.path", config.knn.train.path))
    for key, folder in inputs:
        if folder and is_inside(config.output, folder, config.storage_options):
            raise ConfigError(
                f"output: {redact(config.output)} lies inside the {key} folder {redact(folder)}; the run's own "
                f"files (plots, shards) would be read as inputs: choose an output prefix outside it"
            )


def check_not_empty(url: str, key: str, storage_options: dict | None = None) -> None:
    """CheckpointError naming ``key`` and the file when the weights file at ``url`` holds 0 bytes (a
    failed save or a copy still being written): found here, not by every worker that loads it.
    Checkpoints are checked by discover_checkpoints, from the listing it already holds."""
    if url == "timm":
        return
    fs, path = open_filesystem(url, storage_options)
    try:
        size = fs.info(path).get("size")
    except FileNotFoundError:
        raise CheckpointError(f"{key}: no file at {redact(url)}") from None
    except Exception:  # noqa: BLE001 - unreadable: weights_fingerprint / the loader name it
        return
    if size == 0:
        raise empty_weights_error(key, url)


def input_fingerprints(config: RunConfig, input_size: int) -> dict[str, str]:
    """The identity of what the numbers depend on beyond the config: the pretrained weights (content
    hash, or ETag / size / mtime) and the eval images (their content, after selection). Reads the
    eval images once: a missing or unreadable dataset fails here, before any task."""
    check_not_empty(config.pretrained, "pretrained", config.storage_options)
    images = load_eval_images(config.data, config.data.image_size or input_size, config.storage_options)
    return {"pretrained": weights_fingerprint(config.pretrained, config.storage_options),
            "eval_images": images.fingerprint}  # fmt: skip


def path_checkpoints(config: RunConfig, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints that get a weight path (``interpolation.epochs``): the last (of each run of a
    study), all, or the listed epochs among those found (a listed epoch not found yet is logged and
    gets its path when a rerun finds it)."""
    if config.interpolation is None:
        return []
    epochs = config.interpolation.epochs
    if epochs == "last":
        last: dict[str, Checkpoint] = {}
        for checkpoint in checkpoints:
            if checkpoint.run not in last or checkpoint.epoch > last[checkpoint.run].epoch:
                last[checkpoint.run] = checkpoint
        return list(last.values())
    if epochs == "all":
        return list(checkpoints)
    found = [c for c in checkpoints if c.epoch in epochs]
    absent = sorted(set(epochs) - {c.epoch for c in checkpoints})
    if absent:
        log.warning("interpolation.epochs: no checkpoint of epochs %s yet; their paths come when a rerun finds them", absent)
    return found


def check_path_shapes(config: RunConfig, pretrained: FeatureModel) -> None:
    """Before any task: under ``interpolation.extra: keep`` the finetuned module (``finetuned_model``)
    must hold every tensor it shares with the pretrained one in the same shape (ConfigError)."""
    if config.interpolation is None or config.finetuned_model is None:
        return  # one module: every checkpoint that loads has the pretrained shapes
    finetuned = load_model(config.finetuned_model, None, modules=config.layer_modules)
    check_interpolable({k: v.shape for k, v in pretrained.network.state_dict().items()},
                       {k: v.shape for k, v in finetuned.network.state_dict().items()},
                       config.interpolation.extra, where=f"finetuned_model {finetuned.name}")  # fmt: skip


def make_plan(config: RunConfig, store: Store, checkpoints: list[Checkpoint] | None = None) -> Plan:
    """Discover checkpoints (unless given), enumerate the shards, read the completion records.

    The settings hash and the inversion hash take the fingerprints of the pretrained weights
    and of the eval images, the kNN hash the listings of the bank's and the eval data's files
    (labels included); each unit takes its
    checkpoint file's fingerprint: replacing any of them in place computes anew instead of
    reusing results of the old content."""
    check_output_location(config)
    if checkpoints is None:
        checkpoints = discover_checkpoints(config.checkpoints, config.storage_options)
    if not checkpoints:
        raise CheckpointError(
            f"checkpoints: the pattern {redact(config.checkpoints)!r} matches no file; check the folder "
            "and that {epoch} stands where the epoch number is in the file names"
        )
    # before any task: a model, image size or finetuned model that cannot work fails every shard alike
    model = check_models(config.model, config.finetuned_model, config.layer_modules, config.token_policy,
                         config.data.image_size)  # fmt: skip
    depth = model.depth
    layers = config.resolve_layers(depth)
    fingerprints = input_fingerprints(config, model.input_size)
    stir = [
        StirUnit(c.epoch, ref_model, layer, seed, c.name, c.url, c.fingerprint, run=c.run)
        for c in checkpoints
        for ref_model in REF_MODELS
        for layer in layers
        for seed in config.seeds
    ]
    cka = [CkaUnit(c.epoch, c.name, c.url, c.fingerprint, run=c.run) for c in checkpoints]
    # points of the weight paths: alpha 1 is the checkpoint itself (the units above)
    check_path_shapes(config, model)
    extra = config.interpolation.extra if config.interpolation else "keep"
    path = [(c, alpha) for c in path_checkpoints(config, checkpoints)
            for alpha in (config.interpolation.alphas if config.interpolation else []) if alpha != PLAIN_ALPHA]  # fmt: skip
    stir += [
        StirUnit(c.epoch, ref_model, layer, seed, c.name, c.url, c.fingerprint, alpha, extra, run=c.run)
        for c, alpha in path
        for ref_model in REF_MODELS
        for layer in layers
        for seed in config.seeds
    ]
    cka += [CkaUnit(c.epoch, c.name, c.url, c.fingerprint, alpha, extra, run=c.run) for c, alpha in path]
    knn: list[KnnUnit] = []
    if config.knn is not None:
        knn = [KnnUnit(-1, "pt")]  # shared by every run of a study
        knn += [KnnUnit(c.epoch, "ft", c.name, c.url, c.fingerprint, run=c.run) for c in checkpoints]
        knn += [KnnUnit(c.epoch, "ft", c.name, c.url, c.fingerprint, alpha, extra, run=c.run) for c, alpha in path]
    run_hash = settings_hash({**config.numbers_settings(), "fingerprints": fingerprints})
    knn_hash = ""
    if config.knn is not None:  # the bank's files by their listing: not loaded here (often thousands of images)
        knn_hash = knn_settings_hash(run_hash, config, check_knn_inputs(config, model))
    plan = Plan(
        settings_hash=run_hash,
        inversion_hash=settings_hash({**config.inversion_settings(), "fingerprints": fingerprints}),
        checkpoints=checkpoints,
        layers=layers,
        depth=depth,
        input_size=model.input_size,
        layer_names=model.layer_names(),
        inversions=[InversionUnit(layer, seed) for layer in layers for seed in config.seeds],
        stir=stir,
        cka=cka,
        fingerprints=fingerprints,
        knn=knn,
        knn_hash=knn_hash,
    )
    plan.refresh(store)
    return plan
