"""Versioned S3 buckets (issue 25 item 1): the plan and the workers fingerprint a file alike.

The plan reads a checkpoint's identity from the bucket listing (ListObjectsV2: no VersionId), a
worker from ``fs.info`` (HeadObject: with a VersionId on a versioned bucket). Both must go through
one function over the same fields, else every shard fails with "the file was replaced since the
run was planned" on a versioned bucket, and so does every rerun.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import s3fs

from invariance.io.checkpoints import discover_checkpoints, weights_fingerprint
from invariance.io.storage import fingerprint_file, open_filesystem
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet
from tests.servers import TEST_CREDENTIALS, S3Server, s3_server  # noqa: F401 - fixture


def _client(server: S3Server):
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


def _bucket(server: S3Server, name: str, versioned: bool) -> None:
    server.make_bucket(name)
    if versioned:
        _client(server).put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})


def _fresh_worker() -> None:
    """What a Ray worker process starts with: no cached filesystem, no cached listing."""
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_plan_and_worker_fingerprints_agree(s3_server, versioned) -> None:
    bucket = f"fp-{'on' if versioned else 'off'}"
    _bucket(s3_server, bucket, versioned)
    client = _client(s3_server)
    for epoch in (1, 2):
        client.put_object(Bucket=bucket, Key=f"ft/epoch={epoch}.safetensors", Body=f"weights {epoch}".encode())
        if versioned:  # a second version of the same key: the listing still shows one object
            client.put_object(Bucket=bucket, Key=f"ft/epoch={epoch}.safetensors", Body=f"weights {epoch}!".encode())
    options = s3_server.fsspec_options()
    found = discover_checkpoints(f"s3://{bucket}/ft/epoch={{epoch}}.safetensors", options)
    assert [c.epoch for c in found] == [1, 2]
    for checkpoint in found:
        _fresh_worker()
        assert weights_fingerprint(checkpoint.url, options, "checkpoints") == checkpoint.fingerprint
    # one function whichever entry it is given: a listing entry and fs.info give the same identity
    _fresh_worker()
    fs, path = open_filesystem(f"s3://{bucket}/ft/epoch=1.safetensors", options)
    info = fs.info(path)
    assert bool(info.get("VersionId")) == versioned  # what the listing entry does not hold
    listed = fs.ls(f"{bucket}/ft", detail=True)
    entry = next(e for e in listed if e["name"] == path)
    assert fingerprint_file(fs, path, entry) == fingerprint_file(fs, path, info) == found[0].fingerprint
    # replacing the file still changes it (the ETag changes with the bytes)
    client.put_object(Bucket=bucket, Key="ft/epoch=1.safetensors", Body=b"other weights")
    _fresh_worker()
    assert weights_fingerprint(found[0].url, options) != found[0].fingerprint


@pytest.mark.slow
@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_a_run_on_a_versioned_bucket_computes_every_unit(tmp_path: Path, s3_server, versioned, torch_single_thread) -> None:
    """Checkpoints, pretrained weights, eval data and output on one S3 bucket, versioned or not:
    every unit completes, the workers starting without the plan's cached listing (as Ray workers do),
    and a rerun has nothing left to do."""
    from invariance.config import parse_config
    from invariance.engine.execute import execute_in_process
    from invariance.engine.plan import make_plan
    from invariance.engine.steps import RunSpec, Workspace
    from invariance.io.storage import Store

    bucket = f"run-{'on' if versioned else 'off'}"
    _bucket(s3_server, bucket, versioned)
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    client = _client(s3_server)
    for local in [*(tmp_path / "ckpt").rglob("*.safetensors"), *(tmp_path / "data").glob("*.parquet")]:
        key = f"inputs/{local.relative_to(tmp_path).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=local.read_bytes())
        if versioned:  # a rewrite with the same bytes: a new VersionId, the same ETag
            client.put_object(Bucket=bucket, Key=key, Body=local.read_bytes())
    raw = tiny_config(tmp_path, f"s3://{bucket}/out", storage_options=s3_server.fsspec_options(), seeds=[0], layers=[0, 1],
                      pretrained=f"s3://{bucket}/inputs/ckpt/pretrained.safetensors",
                      checkpoints=f"s3://{bucket}/inputs/ckpt/ft/epoch={{epoch}}.safetensors",
                      data={"format": "parquet", "path": f"s3://{bucket}/inputs/data", "n_samples": 12})  # fmt: skip
    config = parse_config(raw)
    store = Store(config.output, dict(config.storage_options))
    plan = make_plan(config, store)
    assert len(plan.checkpoints) == 2
    _fresh_worker()
    summary = execute_in_process(plan, RunSpec.from_plan(config, store, plan), Workspace("cpu"))
    assert summary.failures == []
    assert summary.completed == summary.submitted == len(plan.work()) > 0

    _fresh_worker()
    again = make_plan(config, Store(config.output, dict(config.storage_options)))
    assert again.work() == []
