"""Where shards live: a local directory, or the URL of one, read through webdataset's URL layer.

A shard location (``data.train_shards``, ``data.val_shards``, ``infer.py --shards``,
``evaluate --gt``, ``epsdist.data.verify``) is one of

    /path/to/shards                      a local directory (tar files are read with seeks)
    http://host/shards/train/            HTTP(S): read with ``fetch.http_command`` (curl)
    s3://bucket/shards/train             ``fetch.s3_command`` (``aws s3 cp {url} -``, or mc cat)
    gs://bucket/shards/train             ``fetch.gs_command`` (``gsutil cat {url}``)
    pipe:mc cat minio/bucket/train/{name}   any command printing the file ``{name}`` to stdout
    ais://..., sftp://, ...              webdataset's own opener for that scheme

``manifest.json`` is fetched from the same place. Every remote file is opened with
``webdataset.gopen`` (a ``pipe:`` command for the schemes above), streamed once from its start:
samples before the wanted range are read and dropped, samples after it are never fetched.

Faults: a failed transfer (the command exits non-zero: connection refused or reset, an HTTP
error, a short read) is retried ``fetch.retries`` times, waiting ``fetch.backoff_s * 2**k``
seconds; a retry streams the shard again and skips the samples already delivered, so the
sample sequence is exactly that of an uninterrupted read. A shard still failing raises
:class:`ShardUnavailable` (the loader replaces its samples, as for a truncated local shard);
a manifest still failing raises :class:`ManifestError` (a config error before training).

Cache (``fetch.cache_dir``): a remote shard is fetched whole once per node into
``cache_dir/<hash of the location>/<name>``, checked against the manifest's sha256, and read
from there with seeks on every later epoch and restart; a cached file whose sha256 is wrong
is fetched again. One process fetches a shard while the others on the node wait for it.

Credentials: locations are logged only through :func:`redact` (no user:password, no query
string, no pipe command beyond its program name); commands are never logged.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from webdataset.gopen import gopen, gopen_schemes

from ..atomic import file_mode
from ..config import DEFAULT_HTTP_COMMAND, DataConfig
from .manifest import (MANIFEST, ManifestError, check_manifest, check_shard_name, iter_tar_samples,
                       sha256_file)

log = logging.getLogger("epsdist.data")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CURL_EXITS = {6: "could not resolve host", 7: "connection refused", 18: "transfer closed early",
               22: "HTTP error status (4xx/5xx)", 28: "timed out",
               52: "empty reply", 56: "connection reset / receive failure"}


class ShardUnavailable(OSError):
    """A remote shard that could not be read after all retries; the message names it."""


@dataclass(frozen=True)
class FetchOptions:
    """How remote shards are fetched (the ``data.*`` fetch keys of the config)."""

    retries: int = DataConfig.fetch_retries
    backoff_s: float = DataConfig.fetch_backoff_s
    cache_dir: str = DataConfig.cache_dir
    http_command: str = DEFAULT_HTTP_COMMAND
    s3_command: str = DataConfig.s3_command
    gs_command: str = DataConfig.gs_command


def fetch_options(data_cfg) -> FetchOptions:
    """The FetchOptions of a config's ``data`` section."""
    return FetchOptions(retries=data_cfg.fetch_retries, backoff_s=data_cfg.fetch_backoff_s,
                        cache_dir=data_cfg.cache_dir, http_command=data_cfg.http_command,
                        s3_command=data_cfg.s3_command, gs_command=data_cfg.gs_command)


# --------------------------------------------------------------------------- names and URLs

def is_remote(location: str) -> bool:
    """True for a URL (``scheme://...``) or a ``pipe:`` command; False for a local path."""
    return location.startswith("pipe:") or bool(_URL.match(location))


def join_shard(location: str, name: str) -> str:
    """The path or URL of file ``name`` (a shard or ``manifest.json``) of shard directory
    ``location``: the one place where a manifest name becomes something to open. The name is
    checked (:func:`epsdist.data.manifest.check_shard_name`); a URL keeps the location's scheme
    and host; the name is percent-encoded in a URL and shell-quoted in a ``pipe:`` command (at
    its ``{name}``)."""
    check_shard_name(name)
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise ManifestError(f"{redact(location)}: a pipe: shard location needs '{{name}}' "
                                f"where the file name goes (e.g. pipe:mc cat s3/bucket/{{name}})")
        return location.replace("{name}", shlex.quote(name))
    if not _URL.match(location):
        return os.path.join(location, name)
    base = urlsplit(location)
    if base.query or base.fragment:
        raise ManifestError(f"{redact(location)}: a shard directory URL cannot have a query "
                            f"string or fragment")
    path = base.path.rstrip("/") + "/" + quote(name, safe="/")
    url = urlunsplit((base.scheme, base.netloc, path, "", ""))
    joined = urlsplit(url)
    if (joined.scheme, joined.netloc) != (base.scheme, base.netloc):    # defence in depth
        raise ManifestError(f"shard name {name!r} would leave {redact(location)}")
    return url


def redact(location: str) -> str:
    """A location fit for logs: no user:password, query string or pipe command arguments."""
    if location.startswith("pipe:"):
        words = location[5:].split()
        return f"pipe:{words[0] if words else ''} ..."
    if not _URL.match(location):
        return location
    u = urlsplit(location)
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    if u.username or u.password:
        host = "***@" + host
    return urlunsplit((u.scheme, host, u.path, "***" if u.query else "", ""))


def _command_url(url: str, fetch: FetchOptions) -> str:
    """What ``webdataset.gopen`` opens for ``url``: a ``pipe:`` command for http(s), s3 and gs,
    the URL itself for the other schemes webdataset knows."""
    scheme = url.split(":", 1)[0].lower()
    template = {"http": fetch.http_command, "https": fetch.http_command,
                "s3": fetch.s3_command, "gs": fetch.gs_command}.get(scheme)
    if url.startswith("pipe:"):
        return url
    if template is not None:
        # exec: the shell becomes the command, so stopping a read early stops the command
        return "pipe:exec " + template.replace("{url}", shlex.quote(url))
    if scheme in gopen_schemes or scheme == "file":
        return url
    raise ManifestError(f"{redact(url)}: unsupported scheme {scheme!r} (expected a directory, "
                        f"http(s)://, s3://, gs://, pipe:, or a scheme webdataset opens)")


# --------------------------------------------------------------------------- opening

def describe_error(e: BaseException) -> str:
    """A loggable reason for a failed read (webdataset's pipe errors carry the command line,
    which may hold credentials: only its exit status is kept)."""
    text = str(e)
    m = re.search(r": exit (-?\d+) \(read\)", text)
    if m:
        status = int(m.group(1))
        meaning = _CURL_EXITS.get(status)
        return f"fetch command exit status {status}" + (f" ({meaning})" if meaning else "")
    if isinstance(e, tarfile.TarError) or isinstance(e, EOFError):
        return f"broken tar stream: {type(e).__name__}: {text}"
    strerror = getattr(e, "strerror", None)             # never the file name or command
    return f"{type(e).__name__}" + (f": {strerror}" if strerror else "")


@contextlib.contextmanager
def open_remote(url: str, fetch: FetchOptions):
    """A binary read stream of a remote file through ``webdataset.gopen``. Leaving the block
    early ends the fetch command (no wait for the rest of the file)."""
    stream = gopen(_command_url(url, fetch), "rb")
    try:
        yield stream
    finally:
        proc = getattr(stream, "proc", None)
        if proc is not None:                 # a webdataset Pipe: stop it, ignore its status
            if proc.poll() is None:
                proc.kill()
            stream.stream.close()
            proc.wait()
            stream.status = proc.returncode
        else:
            stream.close()


def _command_failure(stream) -> str | None:
    """Why the fetch command behind ``stream`` failed, if it did: a stream can reach its end
    before its command's exit status is known, which says more than the broken tar."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None
    return describe_error(OSError(f"x: exit {status} (read)")) if status else None


def _backoff(fetch: FetchOptions, attempt: int, what: str, problem: str) -> None:
    delay = fetch.backoff_s * 2 ** attempt
    log.warning("%s: %s; retry %d of %d in %.1f s", what, problem, attempt + 1, fetch.retries,
                delay)
    time.sleep(delay)


def fetch_bytes(url: str, fetch: FetchOptions) -> bytes:
    """The whole remote file, retried; raises ShardUnavailable after the last retry."""
    for attempt in range(fetch.retries + 1):
        try:
            with open_remote(url, fetch) as stream:
                data = stream.read()
                status = stream.proc.wait() if hasattr(stream, "proc") else 0
            if status in (0, None):
                return data
            problem = describe_error(OSError(f"x: exit {status} (read)"))
        except OSError as e:
            problem = describe_error(e)
        if attempt < fetch.retries:
            _backoff(fetch, attempt, redact(url), problem)
    raise ShardUnavailable(f"{redact(url)}: {problem} (after {fetch.retries + 1} attempts)")


def read_remote_manifest(location: str, fetch: FetchOptions | None = None) -> dict:
    """The checked manifest of a remote shard directory; ManifestError when it cannot be
    fetched (after the retries) or is invalid. Use ``manifest.read_manifest``, which takes
    both kinds of location."""
    fetch = fetch or FetchOptions()
    url = join_shard(location, MANIFEST)
    where = redact(url)
    try:
        data = fetch_bytes(url, fetch)
    except ShardUnavailable as e:
        raise ManifestError(f"cannot fetch {e} (expected the manifest.json of a shard "
                            f"directory written by `python -m epsdist.data.shard`)") from None
    try:
        m = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: not valid JSON: {e}") from None
    return check_manifest(m, where)


# --------------------------------------------------------------------------- samples

def iter_shard(location: str, entry: dict, want: Callable[[int], bool] = lambda i: True,
               stop: int | None = None, fetch: FetchOptions | None = None
               ) -> Iterator[tuple[int, dict | None]]:
    """``(index, sample or None)`` of the shard ``entry`` (a manifest entry) of ``location``,
    as :func:`epsdist.data.manifest.iter_tar_samples`. Remote: retried with resume, from the
    cache when ``fetch.cache_dir`` is set; raises ShardUnavailable when it cannot be read."""
    target = join_shard(location, entry["name"])
    if not is_remote(location):
        yield from iter_tar_samples(target, want=want, stop=stop)
        return
    fetch = fetch or FetchOptions()
    if fetch.cache_dir:
        yield from iter_tar_samples(cached_shard(location, entry, fetch), want=want, stop=stop)
        return
    stop = entry["count"] if stop is None else min(stop, entry["count"])
    done = 0                                  # samples [0, done) already delivered
    for attempt in range(fetch.retries + 1):
        try:
            with open_remote(target, fetch) as stream:
                try:
                    for index, sample in iter_tar_samples(
                            target, want=lambda i: i >= done and want(i), stop=stop,
                            fileobj=stream):
                        if index >= done:
                            done = index + 1
                            yield index, sample
                except (tarfile.TarError, EOFError) as e:
                    problem = _command_failure(stream) or describe_error(e)
                else:
                    if done >= stop:
                        return
                    problem = (_command_failure(stream)
                               or f"stream ended after {done} of {stop} samples")
        except OSError as e:
            problem = describe_error(e)
        if attempt < fetch.retries:
            _backoff(fetch, attempt, f"shard {entry['name']} ({redact(target)})", problem)
    raise ShardUnavailable(f"{redact(target)}: {problem} (after {fetch.retries + 1} attempts)")


# --------------------------------------------------------------------------- cache

_verified: set = set()      # (path, size, mtime_ns) checked against the manifest in this process


def _cache_path(location: str, entry: dict, fetch: FetchOptions) -> str:
    tag = hashlib.sha256(location.encode()).hexdigest()[:16]
    return os.path.join(fetch.cache_dir, tag, entry["name"])


def _cached_ok(path: str, sha256: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    stamp = (path, st.st_size, st.st_mtime_ns)
    if stamp in _verified:
        return True
    if sha256_file(path) == sha256:
        _verified.add(stamp)
        return True
    log.warning("cached shard %s does not match the manifest's sha256: fetching it again", path)
    os.unlink(path)
    return False


def cached_shard(location: str, entry: dict, fetch: FetchOptions) -> str:
    """Local path of a verified copy of the remote shard ``entry``, fetched if needed."""
    path = _cache_path(location, entry, fetch)
    if _cached_ok(path, entry["sha256"]):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one fetch per node; the others wait here
        if _cached_ok(path, entry["sha256"]):
            return path
        fetch_file(join_shard(location, entry["name"]), path, fetch, entry["sha256"])
    return path


def fetch_file(url: str, path: str, fetch: FetchOptions, sha256: str | None = None) -> None:
    """Fetch ``url`` into ``path`` (a temporary file renamed into place), retried; with
    ``sha256``, a transfer with another digest is a failed attempt. Raises ShardUnavailable."""
    for attempt in range(fetch.retries + 1):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=".fetch-", suffix=".tmp")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open_remote(url, fetch) as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
                status = stream.proc.wait() if hasattr(stream, "proc") else 0
            if status not in (0, None):
                problem = describe_error(OSError(f"x: exit {status} (read)"))
            elif sha256 is not None and h.hexdigest() != sha256:
                problem = "sha256 of the fetched file differs from the manifest"
            else:
                os.chmod(tmp, file_mode())          # the umask's mode (epsdist.atomic)
                os.replace(tmp, path)
                return
        except OSError as e:
            problem = describe_error(e)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if attempt < fetch.retries:
            _backoff(fetch, attempt, redact(url), problem)
    raise ShardUnavailable(f"{redact(url)}: {problem} (after {fetch.retries + 1} attempts)")
