"""Object storage through fsspec: any URL (s3://, gs://, file://, a plain path).

Shards are written once: serialized to a buffer first, then uploaded in one put to a
deterministic key. On local disks the put goes to a hidden temporary name in the same
folder and is renamed into place, so a crash never leaves a half file under a data name.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from invariance.errors import StorageError
from invariance.io.fingerprint_cache import FingerprintCache, stat_key
from invariance.io.layout import write_probe_key

if TYPE_CHECKING:
    import polars as pl


# A local put writes ".<name>.<uuid>.tmp" first: hidden, and matched by no "*.parquet" glob.
TEMPORARY_SUFFIX = ".tmp"


# content-hash local files up to this size; larger ones are identified by size and mtime
CONTENT_HASH_LIMIT = 64 * 1024 * 1024

# --- redaction: the one function that hides credentials in any text -----------------------------
HIDDEN = "***"
# scheme://<rest of the URL, up to a space or a quote>; a scheme starts where no word goes on before
# it (linear on long base64 runs, such as the PNGs embedded in the report)
_URL = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:///?)(?P<rest>[^\s'\"<>`]*)")
# query parameters that carry a signature, a credential or a token: presigned S3 (SigV4 and V2),
# GCS signed URLs, Azure SAS, OAuth-style tokens, API keys. A "[?&;]" before the name: a query
# string, also html-escaped ("&amp;sig="); never inside base64, which holds none of the three.
SENSITIVE_PARAMETERS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature",
    "X-Goog-Signature", "X-Goog-Credential", "X-Goog-Security-Token", "GoogleAccessId",
    "sig", "token", "access_token", "id_token", "refresh_token", "sas_token", "security_token",
    "key", "api_key", "apikey", "password", "secret", "client_secret",
)  # fmt: skip
_PARAMETER = re.compile(r"(?i)(?P<name>[?&;](?:" + "|".join(re.escape(n) for n in SENSITIVE_PARAMETERS) + r")=)[^&#\s'\"<>]*")
# an Authorization header's parts (SigV4: "Credential=AKIA.../..., SignedHeaders=..., Signature=...")
# and an Azure connection string's key / SAS (";AccountKey=...;", "SharedAccessSignature=...")
_ASSIGNMENT = re.compile(r"(?i)(?P<name>(?<![A-Za-z0-9+/_-])(?:Credential|Signature|AccountKey|SharedAccessSignature)=)[^,;&\s'\"<>]*")
# environment variables whose values are credentials: a library's message may echo them
SECRET_ENVIRONMENT = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET", "GOOGLE_API_KEY", "RAY_AUTH_TOKEN",
)  # fmt: skip
# storage_options keys (at any depth) whose values are credentials (s3fs key/secret/token,
# client_kwargs.aws_secret_access_key, gcsfs token, adlfs account_key/sas_token/connection_string, ...)
_SECRET_OPTION = re.compile(r"(?i)secret|token|passw|credential|signature|sas|account_key|connection_string|"
                            r"private_key|api_?key|access_key|session|^key$|^sig$")  # fmt: skip
# option values that name a way to find credentials, not a credential (gcsfs token=...)
_NOT_SECRET_VALUES = {"anon", "google_default", "cache", "cloud", "browser", "true", "false", "none"}
# shorter known values are left alone: replacing every "user" or "abc" would garble messages
# (a URL's userinfo is hidden by its place in the URL whatever its length)
MIN_SECRET_LENGTH = 8
_known_secrets: set[str] = set()


def remember_secret(value: Any) -> None:
    """Hide ``value`` wherever it appears in a text ``redact`` is given from now on, in this
    process: a library's message may echo a credential out of its URL (botocore's "Invalid bucket
    name \"KEY:SECRET\"") or out of the options it was given."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH and value.lower() not in _NOT_SECRET_VALUES:
        _known_secrets.add(value)


def remember_secrets(storage_options: Any, sensitive: bool = False) -> None:
    """Remember every credential in ``storage_options`` (the values of keys named like one, at any depth)."""
    if isinstance(storage_options, dict):
        for key, value in storage_options.items():
            remember_secrets(value, sensitive or bool(_SECRET_OPTION.search(str(key))))
    elif isinstance(storage_options, (list, tuple)):
        for value in storage_options:
            remember_secrets(value, sensitive)
    elif sensitive:
        remember_secret(storage_options)


def _userinfo_end(rest: str) -> int:
    """Where the userinfo of a URL (``rest``: what follows ``scheme://``) ends: the index of its
    last '@' before the query, or -1 without userinfo. A password may hold '/' and '@'
    (``KEY:SEC/RET@bucket``), so everything up to the last '@' is hidden when the part before the
    first '/' looks like userinfo (holds ':' or '@'); a path with an '@' and no such part
    (``s3://bucket/model@v2``) is a path."""
    path = re.split(r"[?#]", rest, maxsplit=1)[0]
    first = path.split("/", 1)[0]
    if "@" not in path or (":" not in first and "@" not in first):
        return -1
    if "@" not in first and re.fullmatch(r"[\w.-]+:\d+", first):
        return -1  # host:port (http://minio.lab:9000/models/vit@v2): a path with an '@', no userinfo
    return path.rindex("@")


def _url_credentials(rest: str) -> list[str]:
    """The pieces of a URL's userinfo a library may echo: the whole, user and password, and the
    part before the first '/' (what a URL parser takes for the host: botocore's bucket name)."""
    end = _userinfo_end(rest)
    if end < 0:
        return []
    userinfo = rest[:end]
    user, _, password = userinfo.partition(":")
    return [userinfo, user, password, userinfo.split("/", 1)[0], *password.split("/")]


def remember_url_secrets(url: str) -> None:
    """Remember the credentials in ``url``'s userinfo (see ``remember_secret``)."""
    for match in _URL.finditer(str(url)):
        for piece in _url_credentials(match.group("rest")):
            remember_secret(piece)


def _hide_url(match: re.Match) -> str:
    rest = match.group("rest")
    end = _userinfo_end(rest)
    return match.group("scheme") + (f"{HIDDEN}{rest[end:]}" if end >= 0 else rest)


def redact(text: Any) -> str:
    """``text`` (a URL, or a message holding URLs) with every credential hidden: a URL's userinfo
    whatever it holds (``s3://KEY:SEC/RET@bucket/x`` -> ``s3://***@bucket/x``), the signature,
    credential and token parameters of presigned / signed / SAS URLs (``?X-Amz-Signature=***``,
    ``&sig=***``, ``&token=***``), an Authorization header's Credential and Signature, and any
    credential this process was given (``remember_secret``: storage_options, URLs opened, the
    environment's AWS/Azure keys) wherever a library's message echoes it. The one redaction
    function: every message, log line and written text goes through it."""
    text = str(text)
    secrets = set(_known_secrets)
    for name in SECRET_ENVIRONMENT:
        value = os.environ.get(name)
        if value and len(value) >= MIN_SECRET_LENGTH:
            secrets.add(value)
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, HIDDEN)
    text = _URL.sub(_hide_url, text)
    text = _PARAMETER.sub(lambda m: m.group("name") + HIDDEN, text)
    return _ASSIGNMENT.sub(lambda m: m.group("name") + HIDDEN, text)


# texts written under an output go through ``redact`` on their way (Store.put)
TEXT_SUFFIXES = (".json", ".html", ".htm", ".txt", ".md", ".yaml", ".yml", ".csv", ".log")


def redact_text_file(key: str, data: bytes) -> bytes:
    """``data`` redacted when ``key`` names a text file (TEXT_SUFFIXES) in UTF-8, else as it is."""
    if not key.lower().endswith(TEXT_SUFFIXES):
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    hidden = redact(text)
    return data if hidden == text else hidden.encode("utf-8")


class RedactingFormatter(logging.Formatter):
    """A log formatter that hides URL credentials in every line it formats (message, arguments,
    traceback), whichever module logged it."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def is_temporary(key: str) -> bool:
    """Whether ``key`` is an unfinished local write (left behind only by a hard crash)."""
    # the suffix first: a listing of thousands of keys asks for the name of none of them
    return key.endswith(TEMPORARY_SUFFIX) and os.path.basename(key).startswith(".")


# schemes whose filesystems read no userinfo: ``s3://KEY:SECRET@bucket`` names a bucket
# "KEY:SECRET@bucket" there (no bucket name holds ':' or '@'), which botocore refuses by echoing it
NO_USERINFO_SCHEMES = ("s3", "s3a", "gs", "gcs")


def open_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url`` -> (filesystem, path inside it). Credentials come from ``storage_options``
    or the standard AWS/GCS chains of the filesystem's own library."""
    remember_url_secrets(url)
    remember_secrets(storage_options)
    scheme, _, rest = str(url).partition("://")
    if scheme.lower() in NO_USERINFO_SCHEMES and _userinfo_end(rest) >= 0:
        raise StorageError(
            f"{redact(url)}: {scheme}:// URLs cannot carry credentials (its library would read "
            "them as the bucket name); give them in `storage_options` (s3: key, secret; gcs: token) "
            "or the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)"
        )
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(redact(f"cannot open storage URL {url!r}: {exc}")) from exc
    return fs, path


def _time_text(value: Any) -> str:
    """A modification time as one text however the backend gives it: a listing may hold seconds
    where ``info`` holds a datetime (fsspec's memory filesystem), so both read to the millisecond."""
    if isinstance(value, datetime.datetime):
        value = value.timestamp()
    if isinstance(value, (int, float)):
        return f"{float(value):.3f}"
    return str(value)


# The fields that identify an object's content, as every store gives them alike in a listing and in
# ``fs.info``: the plan reads a checkpoint's identity from a listing, a worker from ``fs.info``.
# Never a version id: S3's HeadObject gives a VersionId on a versioned bucket where ListObjectsV2
# gives none (and "null" for objects written before versioning was enabled), so a fingerprint that
# took it would differ between plan and worker for every file (issue 25). Replacing an object's
# bytes changes its ETag / MD5 / CRC; a rewrite with the same bytes is the same content.
CONTENT_TAGS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5")
MODIFICATION_TIMES = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def fingerprint_info(info: dict[str, Any]) -> str:
    """Identity of one stored object from its listing entry or ``fs.info`` (the same for both):
    size and the content tag the store keeps (ETag / MD5 / CRC), else size and modification time.
    Replacing the object's content changes it; a version id is not part of it (CONTENT_TAGS)."""
    parts = [str(info.get("size"))]
    for key in CONTENT_TAGS:
        if info.get(key):
            parts.append(f"{key}={str(info[key]).strip(chr(34))}")
    if len(parts) == 1:  # no content tag: the modification time
        for key in MODIFICATION_TIMES:
            if info.get(key) is not None:
                parts.append(f"{key}={_time_text(info[key])}")
                break
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def fingerprint_file(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any] | None = None,
                     cache: FingerprintCache | None = None) -> str:  # fmt: skip
    """Identity of the file at ``path``, the one function the plan (``info``: its listing entry)
    and the workers (``info`` left out: ``fs.info``) both call: a content hash for local files up
    to CONTENT_HASH_LIMIT (copies and rewrites with the same bytes keep it), else ``fingerprint_info``.
    A local file's hash is kept in the per-user ``cache`` (io/fingerprint_cache.py; one of its own,
    saved at once, when left out): a file whose stat is unchanged is not read again."""
    info = info if info is not None else fs.info(path)
    if isinstance(fs, LocalFileSystem) and (info.get("size") or 0) <= CONTENT_HASH_LIMIT:
        return content_hash(path, cache)
    return fingerprint_info(info)


def content_hash(path: str, cache: FingerprintCache | None = None) -> str:
    """The first 16 hex digits of the SHA-256 of the local file at ``path``; from ``cache``, without
    opening the file, when its stat is the one it was hashed at."""
    own = cache is None
    cache = cache if cache is not None else FingerprintCache()
    name = os.path.abspath(path)
    found = cache.get(name, os.stat(path))
    if found is not None:
        return found
    with open(path, "rb") as handle:
        status, read_at = os.fstat(handle.fileno()), time.time_ns()
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        unchanged = stat_key(os.fstat(handle.fileno())) == stat_key(status)
    text = digest.hexdigest()[:16]
    if unchanged:  # else written to while it was read: hashed again next time
        cache.put(name, status, text, read_at)
        if own:
            cache.save()
    return text


def same_location(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """(protocol, absolute path without trailing '/') of ``url``: comparable across spellings
    (``./out``, ``/abs/out``, ``file:///abs/out``)."""
    fs, path = open_filesystem(url, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    protocol = "file" if isinstance(fs, LocalFileSystem) else protocol
    return protocol, path.rstrip("/")


def is_inside(inner: str, outer: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the location ``inner`` is ``outer`` or below it (same filesystem)."""
    inner_protocol, inner_path = same_location(inner, storage_options)
    outer_protocol, outer_path = same_location(outer, storage_options)
    return inner_protocol == outer_protocol and (inner_path == outer_path or inner_path.startswith(outer_path + "/"))


def parquet_bytes(frame: "pl.DataFrame") -> bytes:
    """``frame`` as the bytes of one Parquet file."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def _local_files(path: str) -> list[str]:
    """Every file below the local folder ``path`` (``path`` itself when it is a file), as fsspec's
    ``find`` lists them (folders left out, linked folders followed, unreadable ones skipped), from
    the folders' entries alone: fsspec stats each file, the most of a rerun's listing of thousands
    of completion records."""
    if os.path.isfile(path):
        return [path]
    found: list[str] = []
    folders, seen = [path], {os.path.realpath(path)}
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:  # gone, not a folder, unreadable: nothing below it, as fsspec's walk
            continue
        with entries:
            for entry in entries:
                if not entry.is_dir():
                    found.append(entry.path)
                    continue
                if entry.is_symlink():  # a linked folder once: a link to a folder above it would loop
                    real = os.path.realpath(entry.path)
                    if real in seen:
                        continue
                    seen.add(real)
                folders.append(entry.path)
    return found


@dataclass
class Store:
    """A root URL plus the options to reach it; keys are '/'-separated paths below the root."""

    root: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/")
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root_path = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, self._root_path = open_filesystem(self.root, self.storage_options)
            self._root_path = self._root_path.rstrip("/")
        return self._fs

    def path(self, key: str) -> str:
        """Path of ``key`` inside the filesystem (no protocol)."""
        self.fs  # noqa: B018 - resolves the root path
        return f"{self._root_path}/{key}" if key else self._root_path

    def url(self, key: str) -> str:
        """Full URL of ``key`` for messages, as a user would pass it to Polars (userinfo hidden)."""
        return redact(f"{self.url('')}/{key}" if key else self.root)

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` in one put; readers never see a partial object. A text file
        (status.json, completion records, the report) is written redacted: no credential reaches an output."""
        path = self.path(key)
        data = redact_text_file(key, data)
        try:
            if isinstance(self.fs, LocalFileSystem):
                folder = os.path.dirname(path)
                os.makedirs(folder, exist_ok=True)
                temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")
                try:
                    with open(temporary, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(temporary, path)
                finally:
                    if os.path.exists(temporary):
                        os.remove(temporary)
            else:
                self.fs.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001 - every backend raises its own types
            raise StorageError(f"cannot write {self.url(key)}: {type(exc).__name__}: {redact(str(exc))}") from exc

    def put_if_changed(self, key: str, data: bytes) -> bool:
        """Write ``data`` to ``key`` unless ``key`` already holds exactly it; True if written.

        For outputs rebuilt on every run (reduced tables, plots): a rerun that has nothing new
        leaves them, and their modification times, as they were.
        """
        data = redact_text_file(key, data)  # as put writes it
        try:
            if self.get(key) == data:
                return False
        except FileNotFoundError:
            pass
        self.put(key, data)
        return True

    def put_parquet(self, key: str, frame: "pl.DataFrame") -> None:
        """Write ``frame`` as one Parquet object at ``key`` (serialized in memory, one put)."""
        self.put(key, parquet_bytes(frame))

    def read_parquet(self, keys: list[str], how: str = "vertical") -> "pl.DataFrame":
        """The Parquet objects at ``keys`` concatenated in that order (``how`` as in ``pl.concat``),
        fetched concurrently where the filesystem can; an empty frame for no keys."""
        import polars as pl

        if not keys:
            return pl.DataFrame()
        blobs = self.get_many(keys)
        frames = []
        for key in keys:
            try:
                frames.append(pl.read_parquet(io.BytesIO(blobs.pop(key))))
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"{self.url(key)}: not a readable Parquet file ({type(exc).__name__}: {redact(str(exc))}); "
                                   "delete it and its completion record under _manifests/ to recompute it") from exc  # fmt: skip
        try:
            return pl.concat(frames, how=how)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"Parquet files under {self.url('')} do not share one schema: {redact(str(exc))}") from exc

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """{key: its bytes} of ``keys``, fetched concurrently where the filesystem can (one request
        each on S3, in parallel). A StorageError when one cannot be read."""
        if not keys:
            return {}
        try:
            blobs = self.fs.cat([self.path(key) for key in keys], on_error="raise")
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot read under {self.url('')}: {type(exc).__name__}: {redact(str(exc))}") from exc
        if len(keys) == 1 and isinstance(blobs, bytes):  # fsspec returns the bytes of a single path
            return {keys[0]: blobs}
        return {key: blobs[self.path(key)] for key in keys}

    def remove(self, keys: list[str]) -> None:
        """Delete ``keys`` (batched where the filesystem can: one request per 1,000 keys on S3);
        keys already gone are fine."""
        paths = [self.path(key) for key in keys]
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for path in paths:  # some were gone: remove the rest one by one
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot remove {len(keys)} objects under {self.url('')}: {type(exc).__name__}: "
                               f"{redact(str(exc))}") from exc  # fmt: skip

    def copy(self, source: str, target: str) -> None:
        """Copy the object ``source`` to ``target`` inside the store (server-side where it can)."""
        try:
            if isinstance(self.fs, LocalFileSystem):
                os.makedirs(os.path.dirname(self.path(target)), exist_ok=True)
            self.fs.copy(self.path(source), self.path(target))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot copy {self.url(source)} to {self.url(target)}: {type(exc).__name__}: "
                               f"{redact(str(exc))}") from exc  # fmt: skip

    def get(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot read {self.url(key)}: {type(exc).__name__}: {redact(str(exc))}") from exc

    def exists(self, key: str) -> bool:
        try:
            return self.fs.exists(self.path(key))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot reach {self.url(key)}: {type(exc).__name__}: {redact(str(exc))}") from exc

    def list(self, prefix: str) -> list[str]:
        """Keys of every object below ``prefix`` (recursive), relative to the root; one listing."""
        base = self.path(prefix)
        try:
            if isinstance(self.fs, LocalFileSystem):  # thousands of records: no stat per file
                found = _local_files(base)
            else:
                self.fs.invalidate_cache()
                found = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list {self.url(prefix)}: {type(exc).__name__}: {redact(str(exc))}") from exc
        return self._keys(found)

    def list_starting(self, start: str) -> list[str]:
        """Keys that begin with ``start``: a folder and the beginning of names in it (e.g. one
        checkpoint's records among every checkpoint's). On an object store one listing of that
        prefix alone (a page per 1,000 of its keys, not of the folder's); on a local disk, or a
        filesystem without server-side prefixes, the folder's listing filtered."""
        folder, _, name = start.rpartition("/")
        if not name or isinstance(self.fs, LocalFileSystem):
            return [key for key in self.list(folder) if key.startswith(start)]
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self.path(folder), prefix=name)
        except TypeError:  # no ``prefix`` argument: the folder, filtered
            return [key for key in self.list(folder) if key.startswith(start)]
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list {self.url(start)}*: {type(exc).__name__}: {redact(str(exc))}") from exc
        return [key for key in self._keys(found) if key.startswith(start)]

    def _keys(self, found: list[str]) -> list[str]:
        """Listed paths as keys relative to the root, sorted, temporary files left out."""
        start = len(self._root_path) + 1
        keys = [p[start:] if p.startswith(self._root_path + "/") else p for p in found]
        return sorted(k for k in keys if not is_temporary(k))

    def check_writable(self) -> None:
        """Fail early, naming the output prefix, when it cannot be written. Leaves nothing
        behind: on a local disk the folders the probe created are removed with it."""
        probe = write_probe_key(uuid.uuid4().hex)
        existing = None
        if isinstance(self.fs, LocalFileSystem):  # the deepest folder that exists before the probe
            existing = os.path.dirname(self.path(probe))
            while existing and not os.path.isdir(existing) and os.path.dirname(existing) != existing:
                existing = os.path.dirname(existing)
        try:
            self.put(probe, b"ok")
        except StorageError as exc:
            raise StorageError(
                f"output: the prefix {self.url('')} is not writable ({redact(str(exc))}). Check the `output` URL, that "
                "the bucket exists, and the credentials (environment / AWS or GCS chain) or `storage_options`"
            ) from exc
        try:
            self.fs.rm_file(self.path(probe))
            folder = os.path.dirname(self.path(probe))
            while existing is not None and folder != existing and folder.startswith(existing):
                os.rmdir(folder)  # only folders the probe created, empty once it is gone
                folder = os.path.dirname(folder)
        except Exception:  # noqa: BLE001 - a leftover probe is harmless
            pass
