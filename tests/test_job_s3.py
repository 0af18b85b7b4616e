"""The run with its output on S3 (a moto server on 127.0.0.1), read back with Polars."""

from __future__ import annotations

import json

import polars as pl
import pytest
import s3fs

from invariance.config import parse_config
from jobs.run import run
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture
from tests.servers import TEST_CREDENTIALS, s3_server  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def test_run_writes_to_s3_and_polars_reads_it(tmp_path, local_ray, s3_server) -> None:
    s3_server.make_bucket("lab")
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    raw = tiny_config(tmp_path, "s3://lab/results/tiny", storage_options=s3_server.fsspec_options(), seeds=[0])
    result = run(parse_config(raw), progress=False)
    assert result.execution.failures == []
    assert result.reduced.complete_epochs == [1, 2]

    options = s3_server.polars_options()
    stir = pl.scan_parquet("s3://lab/results/tiny/stir/**/*.parquet", hive_partitioning=True,
                           storage_options=options).collect()  # fmt: skip
    assert stir.height == 2 * 2 * 3 * 1 * 2 * 3  # epochs x refs x layers x seeds x targets x layers
    assert set(stir["settings"].unique()) == {result.plan.settings_hash}
    curves = pl.read_parquet("s3://lab/results/tiny/reduced/curves.parquet", storage_options=options)
    assert sorted(curves["epoch"].unique()) == [1, 2]

    fs = s3fs.S3FileSystem(**s3_server.fsspec_options())
    keys = fs.find("lab/results/tiny")
    assert any(k.endswith("plots/layer_curves.png") for k in keys)
    assert not any(k.endswith(".tmp") for k in keys)
    # credentials from storage_options never reach the outputs or completion records
    for key in keys:
        if key.endswith((".json", ".parquet")):
            blob = fs.cat_file(key)
            for secret in TEST_CREDENTIALS.values():
                assert secret.encode() not in blob, key
    record = json.loads(fs.cat_file(next(k for k in keys if "/_manifests/settings=" in k and k.endswith(".json"))))
    assert "data" in record and "rows" in record

    again = run(parse_config(raw), progress=False)
    assert again.execution.submitted == 0
