"""Planning: which shards a config needs, which are done (one listing of the completion
records), and in what order the rest is submitted, with what each waits for. Pure: no Ray,
no computation of results."""

from __future__ import annotations

import functools
import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from invariance.config import RunConfig, settings_hash
from invariance.core.interpolation import check_interpolable
from invariance.core.models import FeatureModel, check_models, load_model
from invariance.errors import CheckpointError, ConfigError
from invariance.io.checkpoints import Checkpoint, discover_checkpoints, empty_weights_error, pattern_root, weights_fingerprint
from invariance.io.data import load_eval_images, source_fingerprint
from invariance.io.layout import (
    COMPACTED_RECORDS, MANIFESTS, PLAIN_ALPHA, Unit, compacted_key, compaction_record_key, is_compacted,
)  # fmt: skip
from invariance.io.compacted import compacted_members
from invariance.io.storage import Store, is_inside, open_filesystem, redact
from invariance.measures import Measure, active_measures, measure_of
from invariance.measures.base import PlanSetup

log = logging.getLogger(__name__)

# a refresh of some units lists their folders one by one up to this many, else everything at once
PARTIAL_REFRESH_FOLDERS = 32


@dataclass
class Plan:
    """Every unit of work of a config, by measure, and which of them are already complete."""

    settings_hash: str  # the run's: every setting that changes the numbers
    checkpoints: list[Checkpoint]
    layers: list[int]
    depth: int
    input_size: int
    measures: list[Measure]  # the run's measures, in the registry's order
    units: dict[str, list[Unit]]  # {measure name: its units}
    hashes: dict[str, str]  # {hash name: hash}: each measure's, and the ones a measure keys some units by
    done: set[str] = field(default_factory=set)
    layer_names: list[str] = field(default_factory=list)  # what each layer index is ("blocks.3", "pre-logits")
    # what the numbers depend on beyond the config, in the hashes: {"pretrained": ..., "eval_images": ...}
    fingerprints: dict[str, str] = field(default_factory=dict)
    # (key, verdict) of the checks this plan made (``checks_key``), to keep once the run writes its
    # output (planning writes nothing); None when the plan read a kept verdict
    checks: tuple[str, dict] | None = None
    # the data keys the last refresh listed (raw shards, compacted files), and {shard key: the
    # compacted file holding it}
    present: set[str] = field(default_factory=set)
    holder: dict[str, str] = field(default_factory=dict)
    records: set[str] = field(default_factory=set)  # the keys under _manifests/ the last refresh listed
    # {unit: its record key}, {unit: its data key}: asked for on every check of every unit (is_done,
    # missing, the reducer's partitions), computed once per unit (the hashes are fixed once planned)
    _record_keys: dict[Unit, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _data_keys: dict[Unit, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # (the done set it was counted for, missing_per_point's counts): asked for ~8 times per reduce,
    # each a pass over every unit; counted again whenever ``done`` differs (refresh, _forget's discard)
    _missing_points: tuple[frozenset[str], Counter] | None = field(default=None, init=False, repr=False,
                                                                   compare=False)  # fmt: skip

    def keep_checks(self, store: Store) -> None:
        """Keep the verdict of this plan's checks, so that a later plan of the same inputs builds no
        model and reads no image (the reduce calls it)."""
        if self.checks is not None:
            key, verdict = self.checks
            try:
                store.put(key, json.dumps(verdict, indent=1, sort_keys=True).encode())
            except Exception as exc:  # noqa: BLE001 - the next plan checks again
                log.warning("the plan's checks were not kept at %s: %s", store.url(key), exc)
            self.checks = None

    def all_units(self) -> list[Unit]:
        """Every unit of every measure, measure by measure."""
        return [unit for units in self.units.values() for unit in units]

    def measure(self, unit: Unit) -> Measure:
        """The measure computing ``unit``."""
        return measure_of(self.measures, unit)

    def measure_named(self, name: str) -> Measure:
        """The run's measure called ``name``."""
        return next(measure for measure in self.measures if measure.name == name)

    def refresh(self, store: Store, units: Sequence[Unit] | None = None) -> None:
        """Re-read what is done, e.g. after an execution: one listing of the completion records
        and one of each kind's data folder. A unit is done when its record and its raw shard exist,
        or when a compacted file with its record holds it (the records of the shards it holds are
        removed then: ``invariance.engine.compact``). The file whose name is the hash of a folder's
        planned shards holds them all, known without a read; another compacted file of a folder
        (shards beyond the plan's) is opened, its footer only, while a planned shard of its folder
        is held by none. A record whose data is gone (a deleted shard) leaves the unit missing.

        ``units`` (e.g. those an execution just wrote): only their folders are listed again (their
        data folders, their records' folders, a compacted file's record), at most
        PARTIAL_REFRESH_FOLDERS of them, else everything; what else the last refresh found stands.
        Only for a plan whose other folders nobody changed since (the run holding the lease)."""
        if units is not None:
            data_folders = {posixpath.dirname(self.data_key(u)) for u in units}
            record_folders = {posixpath.dirname(self.record_key(u)) for u in units}
            if len(data_folders) + len(record_folders) <= PARTIAL_REFRESH_FOLDERS:
                self._refresh_folders(store, data_folders, record_folders)
                return
        records = set(store.list(MANIFESTS))
        folder_units = self.folder_units(smallest=1)  # a folder of one planned shard may hold a compacted file too
        present: set[str] = set()
        folders: dict[tuple[str, type], list[str]] = {}
        for unit in self.all_units():  # the folder all data folders of a kind share
            key = self.data_key(unit)
            if self.record_key(unit) in records or posixpath.dirname(key) in folder_units:
                folders.setdefault((unit.measure, type(unit)), []).append(posixpath.dirname(key))
        for keys in folders.values():
            present.update(store.list(posixpath.commonpath(keys)))
        self.records, self.present, self.holder = records, present, {}
        self._hold(store, folder_units)
        self.done = {self.record_key(u) for u in self.all_units() if self._listed_done(u, folder_units)}
        self._warn_lost(store, self.all_units())

    def _refresh_folders(self, store: Store, data_folders: set[str], record_folders: set[str]) -> None:
        """``refresh`` of the units whose data or record lies in these folders: each data folder
        listed once (a compacted file's record prefix only where its folder holds one); of a folder
        of records, the keys that begin as these units' do (one checkpoint's among all of theirs)."""
        def under(key: str, prefixes: set[str]) -> bool:
            return any(key.startswith(prefix) for prefix in prefixes)

        listed = {folder: store.list(folder) for folder in sorted(data_folders)}
        present = {key for keys in listed.values() for key in keys}
        data_prefixes = {f"{folder}/" for folder in data_folders}
        starts = {folder: [] for folder in record_folders}
        for unit in self.all_units():
            key = self.record_key(unit)
            if posixpath.dirname(key) in starts and under(self.data_key(unit), data_prefixes):
                starts[posixpath.dirname(key)].append(key)
        record_prefixes = {posixpath.commonprefix(keys) for keys in starts.values()}  # each holds its own units' keys
        record_prefixes |= {f"{COMPACTED_RECORDS}{folder}/" for folder, keys in listed.items() if any(map(is_compacted, keys))}
        records = {key for prefix in sorted(record_prefixes) for key in store.list_starting(prefix)}
        self.present = {key for key in self.present if not under(key, data_prefixes)} | present
        self.records = {key for key in self.records if not under(key, record_prefixes)} | records
        self.holder = {key: file for key, file in self.holder.items() if not under(key, data_prefixes)}
        every_folder = self.folder_units(smallest=1)
        self._hold(store, {folder: units for folder, units in every_folder.items() if folder in data_folders})
        affected = [u for u in self.all_units() if under(self.data_key(u), data_prefixes) or under(self.record_key(u), record_prefixes)]
        done = set(self.done)  # a new set: the missing-per-point count compares the last one by content
        for unit in affected:
            if self._listed_done(unit, every_folder):
                done.add(self.record_key(unit))
            else:
                done.discard(self.record_key(unit))
        self.done = done
        self._warn_lost(store, affected)

    def _listed_done(self, unit: Unit, folders: dict[str, list[Unit]]) -> bool:
        """Whether the last listings show ``unit`` done: its record and its raw shard, or its shard
        held by a compacted file (with its record) in one of ``folders`` (every planned data folder)."""
        data = self.data_key(unit)
        return (self.record_key(unit) in self.records and data in self.present) or (
            posixpath.dirname(data) in folders and data in self.holder)

    def _hold(self, store: Store, folder_units: dict[str, list[Unit]]) -> None:
        """``holder`` for the shards of ``folder_units``'s folders, from ``present`` and ``records``."""
        files: dict[str, list[str]] = {}
        for key in sorted(filter(is_compacted, self.present)):
            if posixpath.dirname(key) in folder_units and compaction_record_key(key) in self.records:
                files.setdefault(posixpath.dirname(key), []).append(key)  # a file without its record: not yet
        for folder, units in folder_units.items():
            keys = [self.data_key(u) for u in units]
            compacted = compacted_key(folder, [posixpath.basename(key) for key in keys])
            if compacted in files.get(folder, []):
                self.holder.update((key, compacted) for key in keys)
            elif files.get(folder):
                for key in files[folder]:
                    for name in compacted_members(store, key):
                        self.holder.setdefault(f"{folder}/{name}", key)

    def _warn_lost(self, store: Store, units: list[Unit]) -> None:
        """Logs the units of ``units`` with a record but no data (a deleted shard): they are computed again."""
        lost = [u for u in units if self.record_key(u) in self.records and not self.has_data(self.data_key(u))]
        if lost:
            log.warning("%d completion records without their data (e.g. %s): recomputing them",
                        len(lost), store.url(self.data_key(lost[0])))  # fmt: skip

    def has_data(self, data_key: str) -> bool:
        """Whether the shard ``data_key`` is stored, raw or in a compacted file (as last refreshed)."""
        return data_key in self.present or data_key in self.holder

    def source(self, unit: Unit) -> str:
        """Where ``unit``'s rows are read: the compacted file that holds them, else its raw shard."""
        key = self.data_key(unit)
        return self.holder.get(key, key)

    def folder_units(self, smallest: int = 2) -> dict[str, list[Unit]]:
        """{data folder: its planned Parquet shards} for every folder of ``smallest`` or more (two:
        what compaction makes one file of, once all are done; a measure's run and epoch)."""
        by_folder: dict[str, list[Unit]] = {}
        for unit in self.all_units():
            key = self.data_key(unit)
            if key.endswith(".parquet"):
                by_folder.setdefault(posixpath.dirname(key), []).append(unit)
        return {folder: units for folder, units in by_folder.items() if len(units) >= smallest}

    def _hash_of(self, unit: Unit) -> str:
        """The hash keying ``unit``, as its measure says."""
        return self.hashes[self.measure(unit).hash_name(unit)]

    def record_key(self, unit: Unit) -> str:
        """Where ``unit``'s completion record goes."""
        key = self._record_keys.get(unit)
        if key is None:
            key = self._record_keys[unit] = unit.record_key(self._hash_of(unit))
        return key

    def data_key(self, unit: Unit) -> str:
        """Where ``unit``'s data goes."""
        key = self._data_keys.get(unit)
        if key is None:
            key = self._data_keys[unit] = unit.data_key(self._hash_of(unit))
        return key

    def is_done(self, unit: Unit) -> bool:
        return self.record_key(unit) in self.done

    def of_type(self, kind: type) -> list[Unit]:
        """Every unit of the class ``kind`` (a class of ``io.layout``)."""
        return [unit for unit in self.all_units() if isinstance(unit, kind)]

    def missing_of_type(self, kind: type) -> list[Unit]:
        """The units of the class ``kind`` still to compute."""
        return [unit for unit in self.of_type(kind) if not self.is_done(unit)]

    def missing(self, measure: str | None = None) -> list[Unit]:
        """The units still to compute (of one measure, by name; of all without)."""
        units = self.units.get(measure, []) if measure is not None else self.all_units()
        return [u for u in units if not self.is_done(u)]

    @property
    def missing_keys(self) -> list[str]:
        """The completion records still to be written, sorted."""
        return sorted(self.record_key(u) for u in self.missing())

    def incomplete_epochs(self) -> dict[int, int]:
        """{epoch: number of its gating shards not yet complete} (a study: summed over its runs)."""
        missing: dict[int, int] = {}
        for (_, epoch), count in self.incomplete_checkpoints().items():
            missing[epoch] = missing.get(epoch, 0) + count
        return missing

    def missing_per_point(self) -> Counter[tuple[str, int, float]]:
        """{(run, epoch, alpha): its gating shards (STIR, CKA: the measures whose rows the curves
        need) not yet complete}, for every point (a checkpoint at alpha 1, or a point of its weight
        path) with one missing. Counted once per state of ``done`` (compared by content: whatever
        replaced or changed it in place), a copy returned."""
        cached = self._missing_points
        if cached is not None and cached[0] == self.done:
            return Counter(cached[1])
        counts: Counter[tuple[str, int, float]] = Counter()
        for measure in self.measures:
            if measure.gates_checkpoint:
                counts.update(point for point in map(measure.point, self.missing(measure.name)) if point is not None)
        self._missing_points = (frozenset(self.done), counts)
        return Counter(counts)

    def incomplete_checkpoints(self) -> dict[tuple[str, int], int]:
        """{(run, epoch): number of the checkpoint's own gating shards (at alpha 1) not yet
        complete}. A point of its weight path that is missing a shard leaves the checkpoint
        complete (``incomplete_points``): its own curves are reduced, that point is not."""
        return {(run, epoch): n for (run, epoch, alpha), n in self.missing_per_point().items() if alpha == PLAIN_ALPHA}

    def incomplete_points(self) -> set[tuple[str, int, float]]:
        """(run, epoch, alpha) of every point with a gating shard not yet complete."""
        return set(self.missing_per_point())

    def incomplete_path_points(self) -> dict[str, int]:
        """{"epoch 2 alpha 0.5" (a study: "run lr=0.1 epoch 2 alpha 0.5"): its missing gating
        shards} for the weight-path points (alpha < 1) left out of the tables until computed."""
        return {f"{f'run {run} ' if run else ''}epoch {epoch} alpha {alpha:g}": n
                for (run, epoch, alpha), n in sorted(self.missing_per_point().items()) if alpha != PLAIN_ALPHA}

    def incomplete_measures(self) -> dict[str, int]:
        """{measure: its units not yet complete} for the measures that do not gate a checkpoint
        (their rows are reduced as they come)."""
        return {m.name: n for m in self.measures if not m.gates_checkpoint and (n := len(self.missing(m.name)))}

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

        Units of no checkpoint first (the pretrained inversions, which pt-reference STIR shards
        read; the pretrained kNN shard), measure by measure; then checkpoint by checkpoint, so that
        a worker's cached models and features serve consecutive units: each point (the checkpoint
        at alpha 1, then its weight path from alpha near 1 down) with its units in the order of
        their measures' priorities. Linear in the number of units.
        """
        missing = [(self.measure(unit), unit) for unit in self.missing()]
        missing_set = {unit for _, unit in missing}
        by_point: dict[tuple[str, int], dict[float, list[tuple[int, int, Measure, Unit]]]] = {}
        first: list[tuple[Measure, Unit]] = []
        for position, (measure, unit) in enumerate(missing):
            point = measure.point(unit)
            if point is None:
                first.append((measure, unit))
            else:
                run, epoch, alpha = point
                by_point.setdefault((run, epoch), {}).setdefault(alpha, []).append(
                    (measure.priority(unit), position, measure, unit))
        order: list[tuple[Unit, tuple[Unit, ...]]] = []

        def add(measure: Measure, unit: Unit) -> None:
            order.append((unit, tuple(u for u in measure.waits_for(unit) if u in missing_set)))

        for measure, unit in first:
            add(measure, unit)
        for checkpoint in self.checkpoints:
            points = by_point.get(checkpoint.key, {})
            for alpha in sorted(points, key=lambda alpha: (alpha != PLAIN_ALPHA, -alpha)):
                for _, _, measure, unit in sorted(points[alpha], key=lambda item: item[:2]):
                    add(measure, unit)
        return order


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
        log.warning("interpolation.epochs: no checkpoint of epochs %s yet; their paths come when a rerun finds them (to "
                    "leave them out: interpolation.epochs: %s)", absent, sorted(c.epoch for c in found))  # fmt: skip
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


def checks_key(config: RunConfig) -> str | None:
    """Where the verdict of the plan's checks of these inputs is kept: ``_manifests/checks/<hash>.json``,
    the hash of every setting that changes them (the config's, its measures, the kNN section) and
    of the identity of the inputs found without reading them (the pretrained weights' fingerprint,
    the listings of the eval data's and the bank's files) and of this package's code. A new
    checkpoint reuses it: the checks build no model and read no image; anything else that changes
    makes a new one. None when an input cannot be listed: the checks themselves name what is wrong."""
    try:
        listing = {"pretrained": weights_fingerprint(config.pretrained, config.storage_options)
                   if config.pretrained != "timm" else "timm",
                   "data": source_fingerprint(config.data, config.storage_options, "data.path")}  # fmt: skip
        if config.knn is not None:
            listing["knn"] = source_fingerprint(config.knn.train, config.storage_options, "knn.train.path")
    except Exception:  # noqa: BLE001 - a missing or unreadable input: check_models / input_fingerprints say which
        return None
    settings = {"numbers": config.numbers_settings(), "knn": config.knn.numbers_settings() if config.knn else None,
                "measures": config.measures, "inputs": listing, "code": package_fingerprint()}  # fmt: skip
    return f"{MANIFESTS}/checks/{settings_hash(settings)}.json"


@functools.lru_cache(maxsize=1)
def package_fingerprint() -> str:
    """A hash of this package's source files, as this process first read them: a new release checks
    its inputs anew."""
    import hashlib
    from pathlib import Path

    import invariance

    digest = hashlib.sha256()
    for path in sorted(Path(invariance.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _read_verdict(store: Store, key: str) -> dict | None:
    try:
        verdict = json.loads(store.get(key))
    except (FileNotFoundError, ValueError):
        return None
    return verdict if {"depth", "input_size", "layer_names", "fingerprints", "checked"} <= set(verdict) else None


def make_plan(config: RunConfig, store: Store, checkpoints: list[Checkpoint] | None = None) -> Plan:
    """Discover checkpoints (unless given), enumerate every measure's units, read the completion
    records.

    The settings hash takes the fingerprints of the pretrained weights and of the eval images; each
    measure's hashes build on it (STIR's inversion hash, the kNN hash with the listings of the
    bank's and the eval data's files, a user function's with its source); each unit takes its
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
    measures = active_measures(config)  # an entry of measures: that is not a measure fails here
    verdict_key = checks_key(config)
    verdict = _read_verdict(store, verdict_key) if verdict_key is not None else None
    model: FeatureModel | None = None
    if verdict is None:
        # before any task: a model, image size or finetuned model that cannot work fails every shard alike
        model = check_models(config.model, config.finetuned_model, config.layer_modules, config.token_policy,
                             config.data.image_size)  # fmt: skip
        fingerprints = input_fingerprints(config, model.input_size)
        check_path_shapes(config, model)
        verdict = {"depth": model.depth, "input_size": model.input_size, "layer_names": model.layer_names(),
                   "fingerprints": fingerprints, "checked": {}}  # fmt: skip
    fingerprints = verdict["fingerprints"]
    layers = config.resolve_layers(verdict["depth"])
    # every point: the checkpoints themselves (alpha 1), then the points of their weight paths
    alphas = [alpha for alpha in (config.interpolation.alphas if config.interpolation else []) if alpha != PLAIN_ALPHA]
    points = [(c, PLAIN_ALPHA) for c in checkpoints] + [(c, alpha) for c in path_checkpoints(config, checkpoints)
                                                        for alpha in alphas]  # fmt: skip
    run_hash = settings_hash({**config.numbers_settings(), "fingerprints": fingerprints})
    setup = PlanSetup(config, model, checkpoints, points, config.interpolation.extra if config.interpolation else "keep",
                      layers, fingerprints, run_hash, checked=verdict["checked"])  # fmt: skip
    hashes: dict[str, str] = {}
    for measure in measures:  # a measure's own checks (the kNN bank's labels, a user function's import) fail here
        hashes.update(measure.hashes(setup))
    plan = Plan(
        settings_hash=run_hash,
        checkpoints=checkpoints,
        layers=layers,
        depth=verdict["depth"],
        input_size=verdict["input_size"],
        measures=measures,
        units={measure.name: measure.units(setup) for measure in measures},
        hashes=hashes,
        layer_names=verdict["layer_names"],
        fingerprints=fingerprints,
    )
    if model is not None and verdict_key is not None:  # checked now: kept by the reduce, the next plan reads it instead
        plan.checks = (verdict_key, {**verdict, "checked": setup.checked})
    plan.refresh(store)
    return plan
