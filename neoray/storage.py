"""Every path a user gives neoray, behind one small interface: local paths, shared mounts and URIs.

A path is one of:

* a local path or a shared mount (NFS, EFS, Lustre): ``data/coco``, ``/mnt/efs/runs``;
* a URI that ``pyarrow.fs`` understands: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``;
* any other fsspec URI (``abfs://``, ``memory://``, ...) through pyarrow's ``FSSpecHandler``, when the
  user has installed that fsspec package.

S3-compatible endpoints (MinIO, Ceph, a test server) are configured the standard way, through
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``, which
pyarrow reads itself; on a cluster an IAM instance profile needs no variables at all.

No call waits forever on a store that accepts connections and never answers: one budget,
``NEORAY_STORAGE_TIMEOUT_S`` (30 s by default), bounds how long an S3 request may go unanswered, all its tries
together, before it fails in one line naming the path and the endpoint. It is shared out over ``MAX_ATTEMPTS``
tries, each with a connect timeout and a request timeout (no byte for that long) of a sixth of it; GCS retries
for at most the budget.

Reads are bounded where the caller says so (``read_bytes(path, max_bytes=N)``) without reserving the bound: the
buffer is what the file holds (its listed size, then in chunks while it goes on), so a 4 GiB limit costs a
3-byte file 3 bytes, also under an address-space limit (``ulimit -v``).

``probe_writable(folder)`` creates and removes a file where a command will write, before any work starts: a
read-only folder or mount is one line naming it, not a failure halfway through.

Writes are atomic where the storage allows it: a local file is written to a temporary name in its folder
and renamed (a reader or a crash never sees half a file), with the permissions a plain ``open()`` would
give (the umask's, so that teammates sharing a folder can read it); an object store publishes an object
only when its upload completes, so one ``write_bytes`` is one whole object or nothing.

Relative local paths are made absolute with ``absolute`` against the working directory of the process
that calls it: the driver does that before anything reaches a Ray worker, whose working directory differs.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import hashlib
import json
import math
import os
import posixpath
import re
import stat
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec  # a dependency of torch: the filesystems pyarrow does not know
import pyarrow.fs as pafs

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_HASH_CHUNK = 8 << 20
# Schemes whose pyarrow filesystem addresses objects as "bucket/key".
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


TIMEOUT_ENV = "NEORAY_STORAGE_TIMEOUT_S"
# The longest an object-storage request may go unanswered, all its tries together, before the command fails.
DEFAULT_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3  # each request in all, with the AWS SDK's backoff (milliseconds) between tries
# Each try may spend a share on connecting and a share waiting for a byte (curl's low-speed limit: a slow,
# steady download of a large shard is not cut off): 2 * MAX_ATTEMPTS shares make the budget.
_SHARES = 2 * MAX_ATTEMPTS
_READ_CHUNK = 8 << 20  # what a bounded read asks for at a time once past the file's listed size


class StorageError(OSError):
    """A storage operation that failed; the message is one line naming the path."""


class JSONError(ValueError):
    """A file that is not valid JSON (nested too deeply to parse included); one line naming the file."""


@dataclass(frozen=True)
class FileInfo:
    path: str  # the full path or URI
    kind: str  # "file", "dir", "missing" or "other" (a FIFO, a device, a socket: never read)
    size: int | None = None
    mtime_ns: int | None = None

    @property
    def name(self) -> str:
        return basename(self.path)


def scheme(path: str | os.PathLike) -> str:
    """The URI scheme (``s3``, ``gs``, ...), or "" for a local path (``file://`` counts as local)."""
    match = _URI.match(os.fspath(path))
    if not match or match.group(1).lower() == "file":
        return ""
    return match.group(1).lower()


def is_uri(path: str | os.PathLike) -> bool:
    return bool(scheme(path))


def _local(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.expanduser(text)


def absolute(path: str | os.PathLike) -> str:
    """A URI unchanged (trailing slashes dropped), a local path made absolute against this process's
    working directory. Empty stays empty (an unset optional path)."""
    text = os.fspath(path)
    if not text:
        return ""
    if is_uri(text):
        return text.rstrip("/") if text.rstrip("/") != f"{scheme(text)}:/" else text
    return os.path.abspath(_local(text))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(_local(base), *parts)


def basename(path: str | os.PathLike) -> str:
    text = os.fspath(path).rstrip("/")
    return posixpath.basename(text) if is_uri(text) else os.path.basename(text)


def parent(path: str | os.PathLike) -> str:
    text = os.fspath(path).rstrip("/")
    return posixpath.dirname(text) if is_uri(text) else os.path.dirname(_local(text))


def local_path(path: str | os.PathLike) -> str | None:
    """The local path, or None for a URI."""
    return None if is_uri(path) else _local(path)


def is_utf8(text: str) -> bool:
    """Whether ``text`` is valid Unicode text: no lone surrogates, which a name that is not UTF-8 on disk (read
    with Python's surrogateescape) or a JSON escape such as ``\\udcff`` leaves. pyarrow, Parquet and UTF-8
    files can hold no other."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str, on_disk: bool = True) -> str:
    """``text`` as valid UTF-8 for reports and messages. ``on_disk``: a name read from the filesystem shows
    the bytes it has there (``\\xff``); otherwise (text from a JSON file) lone surrogates show as the
    escapes that wrote them (``\\udcff``)."""
    if is_utf8(text):
        return text
    if on_disk:
        with contextlib.suppress(UnicodeEncodeError):
            return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise StorageError(f"{env}: expected a positive number of seconds, got {text!r}")
    return value


def timeout() -> float:
    """The object-storage budget in seconds (``NEORAY_STORAGE_TIMEOUT_S``, else ``DEFAULT_TIMEOUT_S``): how long
    a request may go unanswered, all its tries together, before it fails."""
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def timeouts() -> tuple[float, float]:
    """(connect, request) timeouts of one try, in seconds: each a share of ``timeout()``, so that
    ``MAX_ATTEMPTS`` tries that each wait out both stay within it."""
    share = timeout() / _SHARES
    return share, share


def _uri_filesystem(prefix: str) -> pafs.FileSystem:
    # The settings that shape the filesystem are part of the cache key: a changed variable takes effect.
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    return _cached_filesystem(prefix, timeout(), endpoint)


def _with_timeouts(fs: pafs.FileSystem, budget: float) -> pafs.FileSystem:
    """``fs`` rebuilt with bounded waits. The options come from ``from_uri`` (its pickling state), so the
    endpoint, region and credentials it found in the URI and the AWS variables are kept."""
    if isinstance(fs, pafs.S3FileSystem):
        options = dict(fs.__reduce__()[1][0])
        share = budget / _SHARES
        options.update(connect_timeout=share, request_timeout=share,
                       retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS))
        return pafs.S3FileSystem(**options)
    if isinstance(fs, pafs.GcsFileSystem):
        # pyarrow exposes no per-request timeout for GCS (its client gives up a stalled transfer after about
        # two minutes); what can be bounded is how long it retries.
        options = dict(fs.__reduce__()[1][0])
        if options.get("retry_time_limit") is None:
            options["retry_time_limit"] = datetime.timedelta(seconds=math.ceil(budget))
        return pafs.GcsFileSystem(**options)
    return fs


def endpoint(fs: pafs.FileSystem) -> str | None:
    """The endpoint an S3 filesystem talks to when it is not AWS's own (``AWS_ENDPOINT_URL``), else None."""
    if isinstance(fs, pafs.S3FileSystem):
        return dict(fs.__reduce__()[1][0]).get("endpoint_override") or None
    return None


@functools.lru_cache(maxsize=32)
def _cached_filesystem(prefix: str, budget: float, endpoint: tuple) -> pafs.FileSystem:
    """One filesystem object per scheme and bucket/host: ``from_uri`` may ask the store for its region."""
    try:
        fs = pafs.FileSystem.from_uri(prefix)[0]
    except Exception as exc:  # pyarrow knows no such scheme: try fsspec, which knows many more
        try:
            handler = pafs.FSSpecHandler(fsspec.filesystem(scheme(prefix)))
        except (ImportError, ValueError) as fsspec_exc:
            raise StorageError(f"{prefix}: no filesystem for this URI (pyarrow: {exc}; fsspec: {fsspec_exc}); "
                               f"install the fsspec package for '{scheme(prefix)}://'") from None
        return pafs.PyFileSystem(handler)
    return _with_timeouts(fs, budget)


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    text = os.fspath(path)
    if not is_uri(text):
        if not is_utf8(text):
            raise StorageError(f"{printable(text)}: the path is not valid UTF-8; neoray cannot use it")
        return pafs.LocalFileSystem(), os.path.abspath(_local(text))
    uri_scheme = scheme(text)
    rest = text[len(uri_scheme) + 3:]
    fs = _uri_filesystem(f"{uri_scheme}://{rest.split('/', 1)[0]}")
    if uri_scheme in _BUCKET_SCHEMES or isinstance(fs, pafs.PyFileSystem):
        return fs, rest.rstrip("/")  # object stores and fsspec take "bucket/key"
    return fs, pafs.FileSystem.from_uri(text)[1]  # e.g. hdfs://host:port/path -> /path


# How the AWS SDK (curl) words a request that got no answer in time, and a failed connection.
_TIMED_OUT = ("curlCode: 28", "Timeout was reached")
_NETWORK = "NETWORK_CONNECTION"


def _error(path, action: str, exc: BaseException) -> StorageError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_uri(path) and (any(text in message for text in _TIMED_OUT) or _NETWORK in message):
        where = _endpoint_of(path)
        if any(text in message for text in _TIMED_OUT):
            message = (f"no answer from {where} in {MAX_ATTEMPTS} tries of {timeouts()[1]:g} s; {TIMEOUT_ENV}="
                       f"{timeout():g} s bounds the whole wait")
        else:
            message = f"{message}; endpoint {where}"
    return StorageError(f"{os.fspath(path)}: cannot {action} ({message})")


def _endpoint_of(path) -> str:
    try:
        found = endpoint(resolve(path)[0])
    except (StorageError, OSError):
        found = None
    return found or f"the {scheme(path)} service"


_KINDS = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir", pafs.FileType.NotFound: "missing"}


def _stat_info(path: str) -> FileInfo:
    """``info`` through the OS, for a local name that is not UTF-8 (pyarrow cannot address it)."""
    try:
        found = os.stat(_local(path))
    except (FileNotFoundError, NotADirectoryError):
        return FileInfo(path, "missing")
    except OSError as exc:
        raise _error(printable(path), "look up", exc) from None
    if stat.S_ISREG(found.st_mode):
        return FileInfo(path, "file", found.st_size, found.st_mtime_ns)
    return FileInfo(path, "dir" if stat.S_ISDIR(found.st_mode) else "other")


_OTHER_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def describe(path: str | os.PathLike) -> str:
    """What is at ``path``, in words for a message: "a regular file", "a directory", "nothing" (missing), and for
    a local path that is neither file nor directory what it is ("a FIFO", "a character device", "a block
    device", "a socket"; links followed)."""
    found = info(path)
    if found.kind != "other":
        return {"file": "a regular file", "dir": "a directory", "missing": "nothing"}[found.kind]
    local = local_path(path)
    try:
        mode = os.stat(local).st_mode if local is not None else None
    except OSError:
        mode = None
    return next((words for test, words in _OTHER_KINDS if mode is not None and test(mode)),
                "neither a regular file nor a directory")


def not_a_folder(path: str | os.PathLike) -> str | None:
    """What is at ``path`` in words ("a regular file", "a FIFO", ...) when something is there that is not a
    directory; None for a directory, nothing, or a store that cannot say. Callers that take a folder refuse such
    a path as what it is (after their own file inside it was not found: no extra request otherwise)."""
    try:
        kind = info(path).kind
        return None if kind in ("dir", "missing") else describe(path)
    except StorageError:
        return None


def info(path: str | os.PathLike) -> FileInfo:
    """What is at ``path``. Local symlinks are followed: a link to a regular file is a "file", a link to
    a device or a FIFO is "other" (never read). A local name that is not UTF-8 is looked up (so that a
    listing holds it and a caller can skip it by name); reading it is a ``StorageError``."""
    if not is_uri(path) and not is_utf8(os.fspath(path)):
        return _stat_info(os.fspath(path))
    fs, inner = resolve(path)
    try:
        found = fs.get_file_info(inner)
    except OSError as exc:
        raise _error(path, "look up", exc) from None
    mtime = found.mtime_ns if found.type == pafs.FileType.File else None
    return FileInfo(os.fspath(path), _KINDS.get(found.type, "other"), found.size if found.is_file else None, mtime)


def exists(path: str | os.PathLike) -> bool:
    return info(path).kind != "missing"


def is_file(path: str | os.PathLike) -> bool:
    return info(path).kind == "file"


def is_dir(path: str | os.PathLike) -> bool:
    return info(path).kind == "dir"


def list_dir(path: str | os.PathLike, recursive: bool = False) -> list[FileInfo]:
    """Entries under a directory, sorted by path; [] when it does not exist."""
    fs, inner = resolve(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise _error(path, "list", exc) from None
    base = os.fspath(path).rstrip("/")
    out = []
    prefix = inner.strip("/")
    for entry in found:
        # Some filesystems (fsspec's) return paths with a leading "/": compare without it.
        relative = entry.path.strip("/")[len(prefix):].lstrip("/")
        mtime = entry.mtime_ns if entry.type == pafs.FileType.File else None
        out.append(FileInfo(join(base, relative), _KINDS.get(entry.type, "other"),
                            entry.size if entry.is_file else None, mtime))
    return sorted(out, key=lambda e: e.path)


def list_files(path: str | os.PathLike) -> list[FileInfo]:
    """Everything under a directory that is not a directory, recursively, sorted by path; [] when it does
    not exist. Locally, symlinks to directories are not entered (a link to a parent would loop), a link
    to a file is that file, a broken link is "missing", and a FIFO, device or socket is "other"."""
    local = local_path(path)
    if local is None:
        return [e for e in list_dir(path, recursive=True) if e.kind != "dir"]

    def fail(exc: OSError):
        raise _error(exc.filename or path, "list", exc)

    if not os.path.isdir(local):
        return []
    out = []
    for folder, dirs, names in os.walk(local, onerror=fail):
        relative = os.path.relpath(folder, local)
        out += [info(join(path, os.path.normpath(os.path.join(relative, name)))) for name in names]
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return sorted(out, key=lambda e: e.path)


def glob(path: str | os.PathLike, pattern: str) -> list[FileInfo]:
    """Entries directly in ``path`` whose name matches ``pattern`` (fnmatch)."""
    return [e for e in list_dir(path) if fnmatch.fnmatchcase(e.name, pattern)]


class TooLarge(StorageError):
    """A file bigger than the caller's limit."""


def read_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The whole file. Only regular files are read (a FIFO would block forever, a device never end);
    with ``max_bytes`` a bigger file raises ``TooLarge`` without being read."""
    found = info(path)
    if found.kind == "missing":
        raise FileNotFoundError(f"{os.fspath(path)}: not found")
    if found.kind != "file":
        raise StorageError(f"{os.fspath(path)}: not a regular file ({describe(path)}); not read")
    if max_bytes is not None and found.size is not None and found.size > max_bytes:
        raise TooLarge(f"{os.fspath(path)}: {found.size} bytes, over the limit of {max_bytes}")
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as handle:
            data = handle.read() if max_bytes is None else _read_bounded(handle, found.size, max_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: not found") from None
    except OSError as exc:
        raise _error(path, "read", exc) from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the size check
        raise TooLarge(f"{os.fspath(path)}: over the limit of {max_bytes} bytes")
    return data


def _read_bounded(handle, size: int | None, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of ``handle`` (one more than the bound tells a file over it), allocating
    what the file holds: its listed ``size`` (plus the byte that tells it grew) in one read, then chunks while it
    goes on. ``handle.read(n)`` reserves n bytes before it reads, so asking for the bound would reserve it."""
    limit = max_bytes + 1
    want = min(limit, size + 1 if size is not None else _READ_CHUNK)
    parts, total = [], 0
    while want > 0:
        chunk = handle.read(want)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        want = min(_READ_CHUNK, limit - total)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """``length`` bytes of a regular file from ``offset`` (fewer where the file ends first), without reading
    the rest: a header, on object storage one ranged request."""
    found = info(path)
    if found.kind != "file":
        raise StorageError(f"{os.fspath(path)}: not a regular file ({describe(path)}); not read")
    fs, inner = resolve(path)
    try:
        with fs.open_input_file(inner) as handle:
            return handle.read_at(max(0, min(length, (found.size or 0) - offset)), offset)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: not found") from None
    except OSError as exc:
        raise _error(path, "read", exc) from None


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text (a BOM is accepted); UnicodeDecodeError for anything else."""
    return read_bytes(path).decode("utf-8-sig")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in a UTF-8 file; ``JSONError`` naming the file when it does not parse, nested too deeply
    included (Python's parser recurses once per level)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except RecursionError:
        raise JSONError(f"{os.fspath(path)}: not valid JSON (nested deeper than the {sys.getrecursionlimit()} "
                        f"levels Python can parse)") from None
    except json.JSONDecodeError as exc:
        raise JSONError(f"{os.fspath(path)}: not valid JSON ({exc})") from None


def _umask() -> int:
    # Linux reports the umask in /proc without changing it; setting it to read it back (the fallback)
    # would, for a moment, give files other threads create meanwhile the wrong mode.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    current = os.umask(0)
    os.umask(current)
    return current


def umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 without the process's umask."""
    return 0o666 & ~_umask()


def _write_local_atomic(target: str, data: bytes) -> None:
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, umask_mode())  # mkstemp makes 0600; others sharing the folder must read it
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` as the whole content of ``path``, atomically (see the module docstring)."""
    try:
        local = local_path(path)
        if local is not None:
            _write_local_atomic(os.path.abspath(local), data)
        else:
            fs, inner = resolve(path)
            with fs.open_output_stream(inner) as handle:
                handle.write(data)
    except StorageError:
        raise
    except OSError as exc:
        raise _error(path, "write", exc) from None
    return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, allow_nan: bool = True) -> str:
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


PROBE_PREFIX = ".neoray-probe-"


def probe_writable(folder: str | os.PathLike) -> None:
    """Refuse (``StorageError``, one line naming the folder and why) a folder where nothing can be written, by
    creating and removing a probe there, before a command starts its work. A local folder that does not exist
    yet is probed in the nearest folder above it that does (nothing is left behind, no folder created); on
    object storage the probe is a small object under the prefix, after which pyarrow keeps an empty folder
    marker there: probe a prefix that is meant to exist (the parent of a directory a command will claim)."""
    local = local_path(folder)
    if local is None:
        fs, inner = resolve(join(folder, PROBE_PREFIX + uuid.uuid4().hex))
        try:
            with fs.open_output_stream(inner) as handle:
                handle.write(b"")
            fs.delete_file(inner)
        except OSError as exc:
            raise _error(folder, "write there", exc) from None
        return
    target = os.path.abspath(local)
    existing = target
    while not os.path.isdir(existing):
        if os.path.lexists(existing) or os.path.dirname(existing) == existing:
            kind = "a file" if os.path.isfile(existing) else describe(existing)
            where = "is" if existing == target else f"is under {existing},"
            raise StorageError(f"{os.fspath(folder)}: cannot write there (it {where} {kind}, not a folder)")
        existing = os.path.dirname(existing)
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        shown = "" if existing == target else f" (its nearest existing folder {existing})"
        raise StorageError(f"{os.fspath(folder)}: cannot write there{shown}: "
                           f"{exc.strerror or type(exc).__name__}") from None


def makedirs(path: str | os.PathLike) -> None:
    """Create a directory and its parents (object stores have no directories: nothing to do there)."""
    fs, inner = resolve(path)
    try:
        fs.create_dir(inner, recursive=True)
    except OSError as exc:
        raise _error(path, "create the directory", exc) from None


def remove(path: str | os.PathLike) -> None:
    """Delete a file; a missing one is not an error."""
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if info(path).kind != "missing":  # some stores report a missing path as another error
            raise _error(path, "delete", exc) from None


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory and everything under it (on object storage: every object under the prefix); a
    missing one is not an error."""
    fs, inner = resolve(path)
    try:
        fs.delete_dir(inner)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if info(path).kind != "missing":
            raise _error(path, "delete", exc) from None


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed (shards are hundreds of MB)."""
    fs, inner = resolve(path)
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(inner) as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: not found") from None
    except OSError as exc:
        raise _error(path, "read", exc) from None
    return digest.hexdigest()


def upload_dir(local_dir: str, target: str | os.PathLike) -> None:
    """Copy a local directory tree to ``target`` (any storage)."""
    fs, inner = resolve(target)
    if local_path(target) is not None:
        os.makedirs(inner, exist_ok=True)  # pyarrow copies into local folders that exist
    try:
        pafs.copy_files(local_dir, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as exc:
        raise _error(target, "upload to", exc) from None


__all__ = [
    "FileInfo", "JSONError", "StorageError", "TooLarge", "absolute", "basename", "describe", "endpoint", "exists",
    "glob", "info", "is_dir", "is_file", "is_uri", "is_utf8", "join", "list_dir", "list_files", "local_path",
    "makedirs", "not_a_folder", "parent", "printable", "probe_writable", "read_bytes", "read_json", "read_range",
    "read_text", "remove", "remove_dir", "resolve", "scheme", "sha256", "timeout", "timeouts", "umask_mode",
    "upload_dir", "write_bytes", "write_json", "write_text",
]
