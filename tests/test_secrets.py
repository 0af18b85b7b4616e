"""Credentials never reach a screen, a log or an output (issue 25 items 2 and 3).

``redact`` (invariance/io/storage.py) is the one redaction function. It hides a URL's userinfo
whatever it holds ('/' and '@' in a secret), the signature / credential / token parameters of
presigned S3, signed GCS and Azure SAS URLs, and every credential the process was given
(storage_options, URLs it opened, the environment) where a library's message echoes it.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path

import pytest

from invariance.errors import CheckpointError, StorageError
from invariance.io.storage import Store, open_filesystem, redact, remember_secrets
from tests.servers import TEST_CREDENTIALS, s3_server  # noqa: F401 - fixture


# --- redact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("s3://AKIAKEY:SEC/RET+x9@bucket/runs/x", "s3://***@bucket/runs/x"),
    ("s3://AKIAKEY:SEC/RET@bucket/runs/model@v2/x", "s3://***@v2/x"),  # ambiguous: hide more, never less
    ("memory://user:p@ss/w0rd@host/ft", "memory://***@host/ft"),
    ("gs://KEY:a/b/c@bucket/data", "gs://***@bucket/data"),
    ("az://name:KEY/with+slash==@container/x", "az://***@container/x"),
    ("https://user:pa/ss@example.org:8443/pt.safetensors", "https://***@example.org:8443/pt.safetensors"),
    ("ray://user:TOKEN@127.0.0.1:1", "ray://***@127.0.0.1:1"),
    ("memory:///user:TOKEN@host/x", "memory:///***@host/x"),
])  # fmt: skip
def test_redact_hides_userinfo_holding_any_character(url, shown) -> None:
    assert redact(url) == shown
    assert redact(f"cannot read {url!r}: gone") == f"cannot read {shown!r}: gone"


@pytest.mark.parametrize("text", [
    "s3://bucket/model@v2/epoch=1.safetensors", "http://127.0.0.1:9000/a/b", "file:///tmp/x@y/z",
    "gs://b/a/b", "/plain/path@x", "epoch 2: 3 shards", "data:image/png;base64,iVBORw0KGgo+sig/token=AAAA==",
    "https://example.org/pt.safetensors?X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600",
])  # fmt: skip
def test_redact_leaves_text_without_credentials_alone(text) -> None:
    assert redact(text) == text


def test_redact_hides_the_secrets_of_presigned_signed_and_sas_urls() -> None:
    aws = ("https://lab.s3.amazonaws.com/pt.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20250101T000000Z"
           "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FQoGZXIvYXdzEBAaDSESSION"
           "&X-Amz-Signature=0123456789abcdef0123456789abcdef")  # fmt: skip
    assert redact(aws) == ("https://lab.s3.amazonaws.com/pt.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                           "&X-Amz-Credential=***&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600"
                           "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***")  # fmt: skip
    v2 = "https://lab.s3.amazonaws.com/pt.pt?AWSAccessKeyId=AKIAEXAMPLE&Expires=1&Signature=abc%2Bdef%3D"
    assert redact(v2) == "https://lab.s3.amazonaws.com/pt.pt?AWSAccessKeyId=***&Expires=1&Signature=***"
    gcs = "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p&X-Goog-Signature=77aa"
    assert redact(gcs) == "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=***&X-Goog-Signature=***"
    azure = "https://acct.blob.core.windows.net/c/pt?sv=2022-11-02&ss=b&sp=r&se=2030-01-01&sig=AbC%2Bd%2FeF%3D"
    assert redact(azure) == "https://acct.blob.core.windows.net/c/pt?sv=2022-11-02&ss=b&sp=r&se=2030-01-01&sig=***"
    assert redact("https://h/x?token=abc.def&v=1 and https://h/y?access_token=zz#top") == \
        "https://h/x?token=***&v=1 and https://h/y?access_token=***#top"
    # as html.escape writes them into the report, and as an aiohttp error names the URL
    assert redact("<a href='https://h/x?a=1&amp;sig=SIGVALUE&amp;b=2'>") == "<a href='https://h/x?a=1&amp;sig=***&amp;b=2'>"
    assert "deadbeef" not in redact("ClientResponseError: 403, message='Forbidden', url='http://h/p?X-Amz-Signature=deadbeef'")
    header = "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/2025/us-east-1/s3/aws4_request, Signature=deadbeef"
    assert "AKIAEXAMPLE" not in redact(header) and "deadbeef" not in redact(header)
    assert "KEYVALUE" not in redact("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=KEYVALUE==;EndpointSuffix=x")


def test_credentials_the_process_was_given_are_hidden_wherever_a_library_echoes_them(monkeypatch) -> None:
    # an S3 URL with userinfo: s3fs would take "KEY:SEC" for the bucket and botocore echo it
    with pytest.raises(StorageError) as refused:
        open_filesystem("s3://AKIAECHOKEY:EchoSecretOne/EchoSecretTwo@bucket/out")
    message = str(refused.value)
    assert "storage_options" in message and "s3://***@bucket/out" in message
    assert redact('Invalid bucket name "AKIAECHOKEY:EchoSecretOne": Bucket name must match') == \
        'Invalid bucket name "***": Bucket name must match'
    # storage_options values (at any depth) shown in a library's error
    remember_secrets({"key": "AKIAOPTIONKEY", "secret": "Option/Secret+Value", "anon": False,
                      "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": "OptionSessionToken"}})  # fmt: skip
    text = "TypeError: bad options {'key': 'AKIAOPTIONKEY', 'secret': 'Option/Secret+Value', 'token': 'OptionSessionToken'}"
    assert redact(text) == "TypeError: bad options {'key': '***', 'secret': '***', 'token': '***'}"
    assert redact("http://127.0.0.1:9") == "http://127.0.0.1:9"  # not a credential
    # the environment's credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Env/Secret+Access/Key")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "EnvSessionTokenValue")
    assert redact("signed with Env/Secret+Access/Key and EnvSessionTokenValue") == "signed with *** and ***"


def test_checkpoint_errors_and_a_presigned_safetensors_url(tmp_path: Path) -> None:
    from invariance.io.checkpoints import discover_checkpoints, is_safetensors, weights_fingerprint

    with pytest.raises(CheckpointError) as error:
        weights_fingerprint("s3://AKIAFPKEY:FpSecretOne/FpSecretTwo@bucket/pt.safetensors")
    assert "FpSecret" not in str(error.value) and "***@bucket" in str(error.value)
    with pytest.raises(StorageError) as error:
        discover_checkpoints("s3://AKIAFPKEY:FpSecretOne/FpSecretTwo@bucket/ft/epoch={epoch}.safetensors")
    assert "FpSecret" not in str(error.value)
    assert is_safetensors("https://h/pt.safetensors?X-Amz-Signature=abc") and not is_safetensors("https://h/pt.pt?x=.safetensors")


def test_text_written_to_an_output_is_redacted(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    record = {"pretrained": "s3://KEY:Sec/ret@lab/pt.safetensors", "url": "https://h/p?X-Amz-Signature=abcdef"}
    store.put("_manifests/x.json", json.dumps(record).encode())
    written = json.loads(store.get("_manifests/x.json"))
    assert written == {"pretrained": "s3://***@lab/pt.safetensors", "url": "https://h/p?X-Amz-Signature=***"}
    assert not store.put_if_changed("_manifests/x.json", json.dumps(record).encode())  # the same, once redacted
    binary = b"\x00PAR1 s3://KEY:Sec/ret@lab/"  # not a text file: bytes as they are
    store.put("stir/x.parquet", binary)
    assert store.get("stir/x.parquet") == binary


# --- the sweep: a run whose URLs carry credentials writes and prints none of them ------------------


@pytest.mark.slow
def test_a_run_with_credentials_in_its_urls_prints_and_writes_none_of_them(tmp_path: Path, s3_server, monkeypatch,
                                                                           capfd, caplog, torch_single_thread) -> None:  # fmt: skip
    """Output on S3 (credentials from the environment), the pretrained weights behind a presigned
    URL (X-Amz-Credential, X-Amz-Security-Token, X-Amz-Signature), checkpoints behind a URL whose
    userinfo secret holds '/' (one of them corrupt: FAILED lines), then the CLI's `plan` over an
    s3://KEY:SEC/RET@bucket pattern and a presigned URL of a missing file. Every message, log
    line, printed line and file under the output is searched for every secret."""
    import boto3
    import botocore.config
    import fsspec
    import s3fs
    import yaml

    from invariance.config import parse_config
    from invariance.engine.execute import execute_in_process
    from invariance.engine.plan import make_plan
    from invariance.engine.reduce import reduce_plan
    from invariance.engine.steps import RunSpec, Workspace
    from jobs.cli import main
    from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

    key_id, secret = "AKIASWEEPKEY00000001", "Swe3pSecretHalfOne/Swe3pSecretHalfTwo+z"
    session_token = "SweepSessionToken0123456789"
    for name, value in {"AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.make_bucket("sweep")
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    signer = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                          aws_secret_access_key=secret, aws_session_token=session_token,
                          config=botocore.config.Config(signature_version="s3v4"))  # fmt: skip
    signer.put_object(Bucket="sweep", Key="inputs/pretrained.safetensors",
                      Body=(tmp_path / "ckpt" / "pretrained.safetensors").read_bytes())  # fmt: skip
    presigned = signer.generate_presigned_url("get_object", {"Bucket": "sweep", "Key": "inputs/pretrained.safetensors"})
    missing = signer.generate_presigned_url("get_object", {"Bucket": "sweep", "Key": "inputs/missing.safetensors"})
    query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(presigned).query).items()}
    assert {"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token"} <= set(query)
    secrets = {secret, *secret.split("/"), key_id, session_token, *TEST_CREDENTIALS.values(),
               query["X-Amz-Signature"], query["X-Amz-Credential"], urllib.parse.quote(query["X-Amz-Credential"], safe=""),
               urllib.parse.parse_qs(urllib.parse.urlsplit(missing).query)["X-Amz-Signature"][0]}  # fmt: skip

    # checkpoints behind user:SECRET-with-slash@ (the memory filesystem takes it as a path)
    base = f"memory://{key_id}:{secret}@host/{tmp_path.name}"
    memory = fsspec.filesystem("memory")
    memory.pipe_file(f"/{key_id}:{secret}@host/{tmp_path.name}/ft/epoch=01.safetensors",
                     (tmp_path / "ckpt" / "ft" / "epoch=01.safetensors").read_bytes())  # fmt: skip
    memory.pipe_file(f"/{key_id}:{secret}@host/{tmp_path.name}/ft/epoch=02.safetensors", b"not a checkpoint")
    raw = tiny_config(tmp_path, "s3://sweep/out", seeds=[0], layers=[0], pretrained=presigned,
                      checkpoints=f"{base}/ft/epoch={{epoch}}.safetensors")  # fmt: skip
    config = parse_config(raw)
    store = Store(config.output, dict(config.storage_options))
    plan = make_plan(config, store)
    assert [c.epoch for c in plan.checkpoints] == [1, 2]
    with caplog.at_level(logging.INFO):
        summary = execute_in_process(plan, RunSpec.from_plan(config, store, plan), Workspace("cpu"))
        reduced = reduce_plan(make_plan(config, store), store, settings=config.numbers_settings())  # as run does
    assert summary.completed > 0 and summary.failures and all("epoch=02" in unit for unit, _ in summary.failures)
    assert "***@host" in summary.failures[0][1] and "FAILED" in caplog.text
    assert reduced.complete_epochs == [1]

    # the CLI: a pattern with S3 userinfo (botocore would echo it), a presigned URL of a missing file
    for name, bad in {"userinfo": dict(raw, checkpoints=f"s3://{key_id}:{secret}@sweep/ft/epoch={{epoch}}.safetensors"),
                      "presigned": dict(raw, pretrained=missing)}.items():  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(bad))
        with caplog.at_level(logging.INFO):
            assert main(["plan", str(tmp_path / f"{name}.yaml"), "--no-cost"]) == 2, name
    printed = capfd.readouterr()
    assert "storage_options" in printed.err and "X-Amz-Signature=***" in printed.err

    messages = {"printed": printed.out + printed.err, "logged": caplog.text, "failures": str(summary.failures)}
    fs = s3fs.S3FileSystem(**s3_server.fsspec_options())
    keys = fs.find("sweep/out")
    assert any(k.endswith("reports/index.html") for k in keys) and any("/_manifests/" in k for k in keys)
    assert any(k.endswith("status.json") for k in keys)
    for key in keys:
        messages[key] = fs.cat_file(key).decode("latin-1") + "\n" + key
    report = next(text for key, text in messages.items() if key.endswith("reports/index.html"))
    assert "X-Amz-Signature=***" in report and "memory://***@host" in report  # the settings name the inputs
    leaks = {(where, s) for where, text in messages.items() for s in secrets if s in text}
    # where each leak stands, to find what printed it
    context = [messages[where][max(0, messages[where].index(s) - 300): messages[where].index(s) + 100] for where, s in leaks]
    assert leaks == set(), context[:3]
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_host_with_a_port_and_an_at_in_the_path_is_not_userinfo() -> None:
    """`http://minio.lab:9000/models/vit@v2/...` has no credentials: hiding its host (and remembering
    it as a secret) garbled the endpoint in every later message."""
    from invariance.io.storage import redact

    url = "http://minio.lab:9000/models/vit@v2/epoch=01.safetensors"
    assert redact(url) == url
    assert redact("https://AKIA:abc/def@minio.lab:9000/p") == "https://***@minio.lab:9000/p"
