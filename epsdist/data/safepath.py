"""Sample keys and shard names from other people's files -> paths that stay where they belong.

Shards and their ``manifest.json`` come from other people, so a sample key (``__key__``) or a
shard name is untrusted text. This module is the one place that turns them into paths; every
writer and reader goes through it.

Sample keys (``check_key``, ``key_path``)
    A key is a flat file name stem, as the shard writer produces them: non-empty, no ``/``
    (so it can be neither absolute nor hold a ``..`` component), no backslash, no NUL or other
    control character, and not ``.`` or ``..``. ``key_path(root, key, suffix)`` also checks,
    with ``os.path.realpath``, that the joined path stays inside ``root`` (a symlink planted in
    an output folder cannot redirect a write or a read elsewhere).
Shard names (``check_shard_name``, ``shard_path``)
    A shard name from a manifest is a plain file name: non-empty, no ``/``, no backslash, no
    ``:``, no control character, and it does not start with ``.`` (the writers name shards
    ``<prefix>-NNNNNN.tar`` with a prefix of letters, digits, ``_``, ``-``, ``.`` not starting
    with ``.``). Refusing ``/`` and ``:`` also means a name can never be an absolute path, a
    URL (``http://...``), a scheme switch (``file:...``) or a host switch (``//host/...``) once
    it is joined to a local directory or a remote base URL. Shard files are only read as tar
    streams (never extracted), so a symlink the user placed in a shard directory is followed.

A refused key or name raises :class:`UnsafeNameError` (a ``ValueError``) naming it and saying
why. Writers refuse to write such a key; readers skip the sample and count it, like a corrupt
image (``key_problem`` gives the reason without raising).
"""
from __future__ import annotations

import os
import sys

__all__ = ["UnsafeNameError", "key_problem", "check_key", "key_path", "shard_name_problem",
           "check_shard_name", "shard_path", "skip_unsafe_key"]


class UnsafeNameError(ValueError):
    """A sample key or shard name that cannot safely become a path; the message names it."""


def _control(text: str) -> str | None:
    for ch in text:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            return f"contains the control character {ch!r}"
    return None


def key_problem(key) -> str | None:
    """Why ``key`` cannot be a sample key (None: it can)."""
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not a string"
    if not key:
        return "is empty"
    bad = _control(key)
    if bad:
        return bad
    if key.startswith("/"):
        return "is an absolute path"
    if ".." in key.split("/"):
        return "has a '..' component"
    if "/" in key:
        return "contains '/' (keys are flat file names)"
    if "\\" in key:
        return "contains a backslash"
    if key == ".":
        return "is '.'"
    return None


def check_key(key) -> str:
    """``key`` itself when it is a safe sample key, else :class:`UnsafeNameError`."""
    problem = key_problem(key)
    if problem:
        raise UnsafeNameError(f"unsafe sample key {key!r}: {problem}")
    return key


def key_path(root: str, key: str, suffix: str) -> str:
    """``root/<key><suffix>`` for a safe ``key``; checks that it resolves inside ``root``."""
    path = os.path.join(root, check_key(key) + suffix)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.dirname(real) != real_root:
        raise UnsafeNameError(f"sample key {key!r}: {path} resolves to {real}, outside "
                              f"{real_root}")
    return path


def shard_name_problem(name) -> str | None:
    """Why ``name`` cannot be a shard name from a manifest (None: it can)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    bad = _control(name)
    if bad:
        return bad
    for ch, what in (("/", "'/'"), ("\\", "a backslash"), (":", "':'")):
        if ch in name:
            return f"contains {what} (a shard name is a plain file name, not a path or URL)"
    if name.startswith("."):
        return "starts with '.'"
    return None


def check_shard_name(name) -> str:
    """``name`` itself when it is a safe shard name, else :class:`UnsafeNameError`."""
    problem = shard_name_problem(name)
    if problem:
        raise UnsafeNameError(f"unsafe shard name {name!r}: {problem}")
    return name


def shard_path(directory: str, name: str) -> str:
    """``directory/<name>`` for a safe shard ``name`` (a symlink the user put in ``directory``
    is followed: only the name comes from the manifest, and it cannot leave the folder)."""
    return os.path.join(directory, check_shard_name(name))


def skip_unsafe_key(key, where: str, skipped: list | None = None) -> bool:
    """For readers: True when ``key`` is unsafe, after naming it on stderr (``where``: the
    shard or folder it came from) and appending ``(key, reason)`` to ``skipped``."""
    problem = key_problem(key)
    if problem is None:
        return False
    print(f"warning: {where}: skipping sample {key!r}: unsafe key, {problem}", file=sys.stderr)
    if skipped is not None:
        skipped.append((key, problem))
    return True
