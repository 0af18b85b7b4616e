"""Safe schedules: a run in progress for the same config is not duplicated."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from invariance.io.layout import InversionUnit, StirUnit
from invariance.config import RunConfig
from invariance.errors import StorageError
from invariance.engine import lease as lease_module
from invariance.engine.lease import LeaseHolder, RunLease, lease_key
from jobs import run as run_module
from jobs.cli import NOTHING_TO_SUBMIT
from jobs.cli import main as cli_main
from invariance.io.storage import Store
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet, write_job_dir
from tests.servers import ray_head, ray_job_submit  # noqa: F401 - fixture


def test_lease_is_exclusive_until_released_or_lapsed(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    first, second = RunLease(store, "abc", ttl_seconds=30), RunLease(store, "abc", ttl_seconds=30)
    assert first.acquire() is None
    holder = second.acquire()
    assert holder is not None and holder.holder == first.holder
    assert RunLease(store, "other-settings").acquire() is None  # other settings are independent
    first.release()
    assert not store.exists(lease_key("abc"))
    assert second.acquire() is None
    second.release()

    lapsed = LeaseHolder("crashed", "elsewhere", 1, time.time() - 100, time.time() - 1)
    store.put(lease_key("abc"), json.dumps(lapsed.__dict__).encode())
    third = RunLease(store, "abc")
    assert third.acquire() is None  # a crashed holder's lease lapses
    third.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed_here = LeaseHolder("killed", socket.gethostname(), dead.pid, time.time(), time.time() + 600)
    store.put(lease_key("abc"), json.dumps(killed_here.__dict__).encode())
    assert RunLease(store, "abc").current() is None  # a dead process on this host holds nothing
    alive_elsewhere = LeaseHolder("alive", "other-host", dead.pid, time.time(), time.time() + 600)
    store.put(lease_key("abc"), json.dumps(alive_elsewhere.__dict__).encode())
    assert RunLease(store, "abc").current() == alive_elsewhere


class FakeClock:
    """Monotonic and wall time that move only when the test says so."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds

    def wall(self) -> float:
        return 1.7e9 + self.seconds


def test_a_lease_taken_over_counts_as_lost(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0.0)
    store, clock = Store(str(tmp_path)), FakeClock()
    lease = RunLease(store, "abc", ttl_seconds=40, clock=clock, now=clock.wall)
    assert lease.acquire(renew_in_background=False) is None
    clock.seconds += 10
    assert lease.renew_once() and not lease.lost
    usurper = LeaseHolder("usurper", "other-host", 1, clock.wall(), clock.wall() + 600)
    store.put(lease_key("abc"), json.dumps(usurper.__dict__).encode())
    clock.seconds += 10
    assert not lease.renew_once()
    assert lease.lost
    lease.release()
    assert RunLease(store, "abc", clock=clock, now=clock.wall).current() == usurper  # release never removes another's record


def test_a_lost_lease_never_rewrites_a_lapsed_record(tmp_path: Path, monkeypatch) -> None:
    """Once overdue by 3/4 of its TTL the lease is lost: a later beat must not bring its record back,
    since a starter may already have found it lapsed and begun."""
    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0.0)
    store, clock = Store(str(tmp_path)), FakeClock()
    lease = RunLease(store, "abc", ttl_seconds=40, clock=clock, now=clock.wall)
    assert lease.acquire(renew_in_background=False) is None
    clock.seconds += 31  # a renewal that hung for 31 s of a 40 s TTL
    assert lease.lost
    store.fs.rm_file(store.path(lease_key("abc")))  # the record lapsed and was cleared meanwhile
    assert not lease.renew_once()
    assert not store.exists(lease_key("abc"))
    assert lease.lost


def test_renewal_survives_storage_errors_until_the_ttl(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0.0)
    store, clock = Store(str(tmp_path)), FakeClock()
    lease = RunLease(store, "abc", ttl_seconds=40, clock=clock, now=clock.wall)  # a beat every 10 s
    assert lease.acquire(renew_in_background=False) is None
    failing = {"on": True}
    put = store.put

    def flaky_put(key: str, data: bytes) -> None:
        if failing["on"]:
            raise OSError("S3 said 503")
        put(key, data)

    monkeypatch.setattr(store, "put", flaky_put)
    for _ in range(2):  # two failed renewals, still inside 3/4 of the TTL
        clock.seconds += 10
        assert lease.renew_once()
    assert not lease.lost
    failing["on"] = False
    clock.seconds += 5
    assert lease.renew_once()
    assert not lease.lost and lease.current().holder == lease.holder  # renewed again
    failing["on"] = True
    for _ in range(3):  # 30 s without a renewal: still held
        clock.seconds += 10
        assert lease.renew_once()
    clock.seconds += 10  # 40 s: lost, and the renewals stop
    assert lease.lost and not lease.renew_once()
    failing["on"] = False
    lease.release()


def test_a_hanging_renewal_counts_as_lost_before_the_record_lapses(tmp_path: Path, monkeypatch) -> None:
    import threading

    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0.0)
    store, clock = Store(str(tmp_path)), FakeClock()
    lease = RunLease(store, "abc", ttl_seconds=40, clock=clock, now=clock.wall)
    assert lease.acquire(renew_in_background=False) is None
    unblock, entered = threading.Event(), threading.Event()
    put = store.put
    monkeypatch.setattr(store, "put", lambda key, data: (entered.set(), unblock.wait(10), put(key, data)))
    beat = threading.Thread(target=lease.renew_once)  # a renewal that hangs in its write
    beat.start()
    assert entered.wait(10)
    clock.seconds += 20
    assert not lease.lost  # the write hangs, but the record is fresh enough
    clock.seconds += 11
    assert lease.lost  # 3/4 of the TTL without a renewal: a starter may soon see it lapsed
    unblock.set()
    beat.join(10)
    lease.release()


def test_a_lease_record_with_wrong_types_is_a_named_error(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    record = {"holder": "x", "host": "h", "pid": "12", "started_at": 1.0, "expires_at": 2.0}
    store.put(lease_key("abc"), json.dumps(record).encode())
    with pytest.raises(StorageError, match=r"settings=abc\.json: not a lease record \(pid has the wrong type"):
        RunLease(store, "abc").current()


def test_a_broken_lease_record_names_its_key(tmp_path: Path, capsys) -> None:
    store = Store(str(tmp_path))
    store.put(lease_key("abc"), b"{not json")
    with pytest.raises(StorageError, match=r"_manifests/leases/settings=abc\.json: not a lease record"):
        RunLease(store, "abc").current()


@pytest.mark.slow
def test_scheduled_duplicate_submission_computes_nothing(tmp_path: Path, ray_head) -> None:
    job_dir = write_job_dir(tmp_path, epochs=[1, 2], seeds=[0])
    raw = yaml.safe_load((job_dir / "run.yaml").read_text())
    entrypoint = ["invariance", "run", "run.yaml", "--no-progress"]

    # a run in progress elsewhere holds the lease of these settings (and keeps renewing it)
    from invariance.config import parse_config
    from invariance.engine.plan import make_plan

    store = Store(raw["output"])
    running = RunLease(store, make_plan(parse_config(raw), store).settings_hash, ttl_seconds=20)
    assert running.acquire() is None
    try:
        duplicate = ray_job_submit(ray_head, job_dir, entrypoint)
    finally:
        running.release()
    log = duplicate.stdout + duplicate.stderr
    assert duplicate.returncode == 0, log[-3000:]
    assert f"another run of these settings is in progress: {running.holder}" in log, log[-3000:]
    assert "computed" not in log
    assert not list((tmp_path / "out" / "stir").rglob("*.parquet"))

    first = ray_job_submit(ray_head, job_dir, entrypoint)
    assert "computed 19/19 units" in first.stdout + first.stderr  # 3 pt inversions + 2 x (2 x 3 STIR, 1 CKA, 1 subspace)
    assert not list((tmp_path / "out" / "_manifests" / "leases").glob("*.json"))  # released at the end
    rerun = ray_job_submit(ray_head, job_dir, entrypoint)
    assert "computed 0/0 units" in rerun.stdout + rerun.stderr


def test_submission_id_follows_the_work_left(tmp_path: Path, capsys, monkeypatch) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")

    def config(**overrides) -> RunConfig:
        return RunConfig(**tiny_config(tmp_path, str(tmp_path / "out"), **overrides))

    def submission_id(**overrides) -> str | None:
        return run_module.next_submission(config(**overrides))[0]

    first = submission_id(seeds=[0])
    assert first is not None and first.startswith("invariance-")
    assert first == submission_id(seeds=[0]) == submission_id(seeds=[0], resources={"num_cpus": 2})
    assert submission_id(seeds=[0, 1]) != first  # a new seed is new work: a new submission
    assert submission_id(seeds=[0], inversion={"iterations": 16}) != first  # new settings

    # a run in progress: nothing to submit
    store = Store(str(tmp_path / "out"))
    plan = run_module.open_run(config(seeds=[0]))[2]
    lease = RunLease(store, plan.settings_hash)
    assert lease.acquire() is None
    identifier, why = run_module.next_submission(config(seeds=[0]))
    assert identifier is None and "in progress" in why
    lease.release()

    # part of the work done (a run that failed half way): another id, so a scheduler retries;
    # a unit is done when its record and its data object exist
    units = sorted(plan.missing(), key=plan.record_key)
    for unit in units[: len(units) // 2]:
        store.put(plan.data_key(unit), b"data")
        store.put(plan.record_key(unit), b"{}")
    partly = submission_id(seeds=[0])
    assert partly is not None and partly != first
    for unit in units:
        store.put(plan.record_key(unit), b"{}")
    assert submission_id(seeds=[0]) is not None  # records without data are not done
    for unit in units:
        store.put(plan.data_key(unit), b"data")
    identifier, why = run_module.next_submission(config(seeds=[0]))
    # every shard done, never reduced: the reduce is the work left (tests/test_reruns.py)
    assert identifier is not None and "-reduce-" in identifier and "not up to date" in why
    # the shards here are stand-ins (b"data", not Parquet: a reduce would forget them): take reduced/ as current
    monkeypatch.setattr(run_module, "reduce_is_stale", lambda plan, store: None)
    monkeypatch.setattr(run_module, "compaction_pending", lambda plan: [])  # nor compact them
    assert run_module.next_submission(config(seeds=[0]))[0] is None
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0])))
    capsys.readouterr()
    assert cli_main(["plan", str(path), "--submission-id"]) == NOTHING_TO_SUBMIT  # cron's `&&` stops here
    printed = capsys.readouterr()
    assert printed.out == "" and "nothing to submit" in printed.err

    # a new checkpoint: work again
    (tmp_path / "ckpt" / "ft" / "epoch=02.safetensors").write_bytes((tmp_path / "ckpt" / "ft" / "epoch=01.safetensors").read_bytes())
    assert submission_id(seeds=[0]) not in (None, first, partly)


@pytest.mark.slow
def test_submission_id_is_stable_and_ray_refuses_a_duplicate(tmp_path: Path, ray_head) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0])))
    invariance = str(Path(sys.executable).with_name("invariance"))

    def submission_id() -> str:
        out = subprocess.run([invariance, "plan", str(config), "--submission-id"], capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    first_id = submission_id()
    assert first_id.startswith("invariance-") and first_id == submission_id()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.dashboard_url}
    command = [ray_cli, "job", "submit", "--no-wait", "--submission-id", first_id, "--", "sleep", "1"]
    accepted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    for _ in range(20):
        if "No available agent" not in accepted.stdout + accepted.stderr:
            break
        time.sleep(3)
        accepted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "already exists" in refused.stdout + refused.stderr

    (tmp_path / "ckpt" / "ft" / "epoch=02.safetensors").write_bytes((tmp_path / "ckpt" / "ft" / "epoch=01.safetensors").read_bytes())
    assert submission_id() != first_id  # a new checkpoint: a new submission


def test_an_interrupt_while_taking_the_lease_leaves_no_record(tmp_path: Path, monkeypatch) -> None:
    store = Store(str(tmp_path))

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lease_module.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunLease(store, "abc").acquire()
    assert not store.exists(lease_key("abc"))  # the next run starts at once, not after the TTL
