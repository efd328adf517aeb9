"""Atomic, resumable checkpoints of a DeepSpeed engine plus per-rank state.

Layout under ``<run.dir>/checkpoints``::

    iter_00001000/           DeepSpeed's files (model, optimizer, ZeRO partitions, client state)
                             + rank00000.pt ... (each rank's RNG states and data-loader position)
    latest                   the tag of the newest complete checkpoint
    .partial/                where a checkpoint is written before it is complete

A save writes everything under ``.partial/<tag>``, waits for every rank, then rank 0 records
every file's size and SHA-256 in ``files.json``, renames the directory into place and rewrites
``latest`` through a temporary file. A crash at any point leaves ``latest`` naming a complete
checkpoint (or no ``latest`` at all). A rank that fails to write (a full disk: "no space left
on device while writing PATH") makes every rank fail at once; the previous checkpoints stay.
The directory must be on a file system every rank sees (the usual shared run directory of a
cluster).

Resuming (``resolve``) checks a checkpoint against its ``files.json`` first (rank 0 decides,
every rank gets the same answer): ``--resume auto`` takes the newest intact checkpoint and
warns naming the damaged file of any newer one; an explicitly named damaged checkpoint is an
error. Every load error names the file. SHA-256 runs at ~270 MB/s on a 2-core VM (~3 s for a
ResNet-38 checkpoint with its SGD momentum, ~830 MB), small next to writing it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from . import dist as D
from .atomic import DiskFullError, atomic_path, atomic_write_text, disk_full
from .data.manifest import sha256_file
from .safeload import numpy_rng_from_safe, numpy_rng_to_safe, safe_torch_load

TAG = re.compile(r"^iter_(\d{8})$")
PREEMPT_EXIT = 75          # "checkpointed on request, run me again": the Slurm scripts requeue
FILES = "files.json"       # size and SHA-256 of every file of a complete checkpoint
log = logging.getLogger("epsdist.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or loaded; the message names the file."""


class StopRequest:
    """SIGUSR1 (Slurm's time-limit warning, ``--signal=B:USR1@120``) or SIGTERM (what schedulers
    and launchers send before killing; also what a rank sends itself when its launcher dies,
    see ``epsdist.dist.watch_launcher``) sets a flag; the trainers agree on it across ranks
    inside the per-step all-reduce (ranks receive the signal at slightly different times),
    write a checkpoint at that iteration and exit with ``PREEMPT_EXIT``. Install it before
    DataLoader workers start. A forked loader worker ignores SIGUSR1 (Slurm delivers it to every
    process of the step; the trainer checkpoints) and exits on SIGTERM."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, signums=SIGNALS):
        self.requested = False
        self.pid = os.getpid()
        for signum in signums:
            signal.signal(signum, self._set)

    def _set(self, signum, frame) -> None:
        if os.getpid() != self.pid:             # a forked loader worker, before its init ran
            if signum == signal.SIGUSR1:        # the trainer process checkpoints; carry on
                return
            signal.signal(signum, signal.SIG_DFL)    # SIGTERM: the default (exit)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        _RECEIVED.append(signal.Signals(signum).name)


_RECEIVED: list[str] = []        # the stop signals this process got, in order


def stop_reason() -> str:
    """What the stop message names: the signal this process got, or another rank's."""
    return _RECEIVED[0] if _RECEIVED else "another rank's SIGUSR1/SIGTERM"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": numpy_rng_to_safe(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(numpy_rng_from_safe(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` through a temporary file beside ``path`` (umask mode; a full disk is a
    ``DiskFullError`` naming ``path``)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ------------------------------------------------------------------------------ verification

def record_files(directory: str) -> dict:
    """``{relative path: {"size", "sha256"}}`` of every file under ``directory``."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != FILES:
                files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    return files


def damaged_file(directory: str) -> str | None:
    """None when the checkpoint ``directory`` matches its ``files.json``, else what is wrong,
    naming the file. A checkpoint written before ``files.json`` existed is taken as it is."""
    listing = os.path.join(directory, FILES)
    if not os.path.isfile(listing):
        return None
    try:
        with open(listing) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{listing} is unreadable ({e})"
    for rel, want in files.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
        if sha256_file(path) != want["sha256"]:
            return f"{path} does not match its SHA-256 (the file changed after it was written)"
    return None


def _broken_torch_file(directory: str) -> str | None:
    """The first ``*.pt`` under ``directory`` that is not a readable torch zip archive."""
    import zipfile
    for root, _, names in sorted(os.walk(directory)):
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.endswith(".pt") and not zipfile.is_zipfile(path):
                return path
    return None


# DeepSpeed's optimizer-state files under ZeRO stages 1-3 (and fp16's loss scaling) pickle a few
# of its own plain data classes. Unpickling one calls that class (an enum, a dataclass, a loss
# scaler that stores its arguments) and sets attributes: no other code runs, whatever the file.
DEEPSPEED_DATA_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
})


def refuse_unsafe_pickles(path: str) -> None:
    """DeepSpeed loads its own checkpoint files with the unrestricted unpickler. Before
    it does, every ``*.pt`` of the checkpoint directory is scanned (the pickle's opcodes are
    read, nothing is run): a file that names any Python global outside what
    ``weights_only=True`` allows and ``DEEPSPEED_DATA_GLOBALS`` is refused, naming the file and
    the globals. epsdist's own checkpoints never name one, so a refused file was made by
    something else."""
    from torch.serialization import get_unsafe_globals_in_checkpoint
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt"):
            file = os.path.join(path, name)
            try:
                unsafe = [g for g in get_unsafe_globals_in_checkpoint(file)
                          if g not in DEEPSPEED_DATA_GLOBALS]
            except Exception:                   # noqa: BLE001  (not a torch zip: load names it)
                continue
            if unsafe:
                raise CheckpointError(f"{file} names Python globals the safe loader refuses "
                                      f"({', '.join(unsafe[:5])}): not loaded, nothing in it "
                                      f"was run. Resume only from checkpoints epsdist wrote")


class Checkpointer:
    def __init__(self, root: str, info: D.DistInfo, keep_last: int):
        self.root, self.info, self.keep_last = root, info, keep_last
        self.partial = os.path.join(root, ".partial")
        self.client_state = {}                  # of the checkpoint loaded, if any

    # ------------------------------------------------------------------ save
    def save(self, engine, iteration: int, client_state: dict, rank_state: dict) -> str:
        tag = tag_for(iteration)
        if self.info.is_main:
            shutil.rmtree(os.path.join(self.partial, tag), ignore_errors=True)
            os.makedirs(self.partial, exist_ok=True)
        D.barrier()
        partial = os.path.join(self.partial, tag)
        error = None
        try:
            engine.save_checkpoint(self.partial, tag=tag, client_state=client_state,
                                   save_latest=False)
        except Exception as e:                  # noqa: BLE001  (agreed on below)
            error = e
            D.barrier()                          # the one DeepSpeed's save ends with
        if error is None:
            try:
                atomic_torch_save(rank_state, os.path.join(partial,
                                                           f"rank{self.info.rank:05d}.pt"))
            except Exception as e:              # noqa: BLE001
                error = e
        self._agree_written(error, partial)     # every rank has written, or all raise
        final = os.path.join(self.root, tag)
        if self.info.is_main:
            self._complete(partial, final, tag)
        D.barrier()
        return final

    def _agree_written(self, error: Exception | None, partial: str) -> None:
        """A barrier that also tells every rank whether any rank failed to write; if one did,
        every rank raises (the failing one with its reason) and the partial checkpoint is
        removed: ``latest`` still names the previous one."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.info.device)
        if D.all_reduce_max(flag).item() == 0:
            return
        if self.info.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        kept = "; the previous checkpoint is kept"
        if error is None:
            raise CheckpointError(f"another rank could not write the checkpoint {partial} "
                                  f"(its error says why){kept}")
        if isinstance(error, DiskFullError):   # names the file
            raise CheckpointError(f"{error}{kept}") from error
        if disk_full(error, partial):
            raise CheckpointError(f"no space left on device while writing {partial}{kept}"
                                  ) from error
        raise CheckpointError(f"writing the checkpoint {partial} failed: {error}{kept}"
                              ) from error

    def _complete(self, partial: str, final: str, tag: str) -> None:
        """Rank 0, every rank's files in place: record them, rename, point ``latest``."""
        try:
            atomic_write_text(os.path.join(partial, FILES),
                              json.dumps({"tag": tag, "files": record_files(partial)},
                                         indent=1) + "\n")
        except DiskFullError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"{e}; the previous checkpoint is kept") from e
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        atomic_write_text(os.path.join(self.root, "latest"), tag + "\n")
        self._prune()

    def _prune(self) -> None:
        tags = sorted(t for t in os.listdir(self.root) if TAG.match(t))
        for old in tags[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def latest(self) -> str | None:
        """The newest complete checkpoint directory, or None."""
        path = os.path.join(self.root, "latest")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            tag = f.read().strip()
        full = os.path.join(self.root, tag)
        if not (TAG.match(tag) and os.path.isdir(full)):
            raise FileNotFoundError(f"{path} names {tag!r}, which is not a checkpoint in "
                                    f"{self.root}")
        return full

    def resolve(self, resume: str) -> str | None:
        """``--resume`` value -> a verified checkpoint directory: 'auto' (the newest intact
        one, or None), 'none' (fresh start) or a path to an ``iter_*`` directory. Rank 0
        checks, every rank gets its answer (or its error)."""
        if resume == "none":
            return None
        path = resume.rstrip("/")
        if resume != "auto" and not (os.path.isdir(path) and TAG.match(os.path.basename(path))):
            raise FileNotFoundError(f"--resume {resume}: expected 'auto', 'none' or a "
                                    f"checkpoint directory iter_NNNNNNNN")
        answer = None
        if self.info.is_main:
            try:
                answer = ("ok", self._newest_intact() if resume == "auto" else self._intact(path))
            except Exception as e:              # noqa: BLE001  (re-raised on every rank)
                answer = ("error", e)
        kind, value = D.broadcast_object(answer)
        if kind == "error":
            raise value
        return value

    def _intact(self, path: str) -> str:
        damage = damaged_file(path)
        if damage:
            raise CheckpointError(f"checkpoint {path} is damaged: {damage}")
        return path

    def _newest_intact(self) -> str | None:
        """The newest checkpoint that matches its ``files.json`` (warning, naming the file,
        about each newer damaged one); None when there is none at all."""
        if not os.path.isdir(self.root):
            return None
        tags = sorted((t for t in os.listdir(self.root) if TAG.match(t)), reverse=True)
        for tag in tags:                        # every iter_* directory was complete once
            path = os.path.join(self.root, tag)
            damage = damaged_file(path)
            if damage is None:
                return path
            log.warning("checkpoint %s is damaged: %s; trying the previous one", path, damage)
        if not tags:
            return None
        raise CheckpointError(f"no intact checkpoint in {self.root} (all of {', '.join(tags)} "
                              f"are damaged, see the warnings); use --resume none to start "
                              f"from scratch")

    def load(self, engine, path: str) -> tuple[dict, dict | None]:
        """Restore the engine; returns (client_state, this rank's state or None when the
        checkpoint was written by another number of ranks)."""
        root, tag = os.path.split(os.path.abspath(path))
        error = client_state = rank_state = None
        try:
            refuse_unsafe_pickles(path)          # before DeepSpeed unpickles anything
            loaded, client_state = engine.load_checkpoint(root, tag=tag)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {path}")
        except Exception as e:                  # noqa: BLE001  (agreed on below)
            broken = _broken_torch_file(path)
            error = CheckpointError(f"cannot load the checkpoint {path}"
                                    + (f": {broken} is not a complete torch file" if broken
                                       else "") + f" ({type(e).__name__}: {e})")
        rank_file = os.path.join(path, f"rank{self.info.rank:05d}.pt")
        if error is None and os.path.isfile(rank_file):
            try:
                rank_state = safe_torch_load(rank_file, "per-rank checkpoint state")
            except Exception as e:              # noqa: BLE001
                error = CheckpointError(f"cannot load {rank_file} ({type(e).__name__}: {e})")
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.info.device)
        if D.all_reduce_max(flag).item() > 0:    # nobody reports "resumed" unless all did
            raise error or CheckpointError(f"another rank could not load the checkpoint "
                                           f"{path} (its error names the file)")
        self.client_state = client_state
        return client_state, rank_state
