"""Planning: which shards a config needs, which are done (one listing of the completion
records), and what the rest costs. Pure: no Ray, no computation of results."""

from __future__ import annotations

from dataclasses import dataclass, field

from invariance.checkpoints import Checkpoint, discover_checkpoints
from invariance.config import RunConfig, settings_hash
from invariance.errors import CheckpointError
from invariance.layout import MANIFESTS, CkaUnit, InversionUnit, StirUnit
from invariance.models import build_network, network_input_size
from invariance.storage import Store

REF_MODELS = ("pt", "ft")


@dataclass
class Plan:
    """Every unit of work of a config and which of them are already complete."""

    settings: str
    inversion_settings: str
    checkpoints: list[Checkpoint]
    layers: list[int]
    depth: int
    input_size: int
    inversions: list[InversionUnit]
    stir: list[StirUnit]
    cka: list[CkaUnit]
    done: set[str] = field(default_factory=set)

    def refresh(self, store: Store) -> None:
        """Re-read the completion records (one listing), e.g. after an execution."""
        self.done = set(store.list(MANIFESTS))

    def record_key(self, unit: StirUnit | CkaUnit | InversionUnit) -> str:
        """Where ``unit``'s completion record goes (pt inversions: under their own settings)."""
        return unit.record_key(self.inversion_settings if isinstance(unit, InversionUnit) else self.settings)

    def is_done(self, unit: StirUnit | CkaUnit | InversionUnit) -> bool:
        return self.record_key(unit) in self.done

    @property
    def missing_keys(self) -> list[str]:
        """The completion records still to be written, sorted."""
        return sorted(self.record_key(u) for u in [*self.missing_inversions, *self.missing_stir, *self.missing_cka])

    @property
    def missing_inversions(self) -> list[InversionUnit]:
        return [u for u in self.inversions if not self.is_done(u)]

    @property
    def missing_stir(self) -> list[StirUnit]:
        return [u for u in self.stir if not self.is_done(u)]

    @property
    def missing_cka(self) -> list[CkaUnit]:
        return [u for u in self.cka if not self.is_done(u)]

    def incomplete_epochs(self) -> dict[int, int]:
        """{epoch: number of its shards (STIR + CKA) not yet complete}."""
        missing: dict[int, int] = {}
        for unit in [*self.missing_stir, *self.missing_cka]:
            missing[unit.epoch] = missing.get(unit.epoch, 0) + 1
        return missing

    def complete_checkpoints(self) -> list[Checkpoint]:
        incomplete = self.incomplete_epochs()
        return [c for c in self.checkpoints if c.epoch not in incomplete]


def make_plan(config: RunConfig, store: Store, checkpoints: list[Checkpoint] | None = None) -> Plan:
    """Discover checkpoints (unless given), enumerate the shards, read the completion records."""
    if checkpoints is None:
        checkpoints = discover_checkpoints(config.checkpoints, config.storage_options)
    if not checkpoints:
        raise CheckpointError(
            f"checkpoints: the pattern {config.checkpoints!r} matches no file; check the folder "
            "and that {epoch} stands where the epoch number is in the file names"
        )
    network = build_network(config.model)
    depth = len(network.blocks)
    layers = config.resolve_layers(depth)
    stir = [
        StirUnit(c.epoch, ref_model, layer, seed, c.name, c.url)
        for c in checkpoints
        for ref_model in REF_MODELS
        for layer in layers
        for seed in config.seeds
    ]
    return Plan(
        settings=settings_hash(config.numbers_settings()),
        inversion_settings=settings_hash(config.inversion_settings()),
        checkpoints=checkpoints,
        layers=layers,
        depth=depth,
        input_size=network_input_size(network),
        inversions=[InversionUnit(layer, seed) for layer in layers for seed in config.seeds],
        stir=stir,
        cka=[CkaUnit(c.epoch, c.name, c.url) for c in checkpoints],
        done=set(store.list(MANIFESTS)),
    )
