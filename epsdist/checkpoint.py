"""Atomic, resumable checkpoints of a DeepSpeed engine plus per-rank state.

Layout under ``<run.dir>/checkpoints``::

    iter_00001000/           DeepSpeed's files (model, optimizer, ZeRO partitions, client state)
                             + rank00000.pt ... (each rank's RNG states and data-loader position)
    latest                   the tag of the newest complete checkpoint
    .partial/                where a checkpoint is written before it is complete

A save writes everything under ``.partial/<tag>``, waits for every rank, then rank 0 renames
the directory into place and rewrites ``latest`` through a temporary file. A crash at any point
leaves ``latest`` naming a complete checkpoint (or no ``latest`` at all). The directory must be
on a file system every rank sees (the usual shared run directory of a cluster).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from . import dist as D
from .safeload import numpy_rng_from_safe, numpy_rng_to_safe, safe_torch_load

TAG = re.compile(r"^iter_(\d{8})$")
PREEMPT_EXIT = 75          # "checkpointed on request, run me again": the Slurm scripts requeue


class StopRequest:
    """SIGUSR1 (Slurm's time-limit warning, ``--signal=B:USR1@120``) sets a flag; the trainers
    agree on it across ranks inside the per-step all-reduce (ranks receive the signal at
    slightly different times), write a checkpoint at that iteration and exit with
    ``PREEMPT_EXIT``. Install it before DataLoader workers start."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.requested = False
        signal.signal(signum, self._set)

    def _set(self, signum, frame) -> None:
        self.requested = True


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
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, root: str, info: D.DistInfo, keep_last: int):
        self.root, self.info, self.keep_last = root, info, keep_last
        self.partial = os.path.join(root, ".partial")

    # ------------------------------------------------------------------ save
    def save(self, engine, iteration: int, client_state: dict, rank_state: dict) -> str:
        tag = tag_for(iteration)
        if self.info.is_main:
            shutil.rmtree(os.path.join(self.partial, tag), ignore_errors=True)
            os.makedirs(self.partial, exist_ok=True)
        D.barrier()
        engine.save_checkpoint(self.partial, tag=tag, client_state=client_state,
                               save_latest=False)
        atomic_torch_save(rank_state, os.path.join(self.partial, tag,
                                                   f"rank{self.info.rank:05d}.pt"))
        D.barrier()
        final = os.path.join(self.root, tag)
        if self.info.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(self.partial, tag), final)
            tmp = os.path.join(self.root, f".latest.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(tag + "\n")
            os.replace(tmp, os.path.join(self.root, "latest"))
            self._prune()
        D.barrier()
        return final

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
        """``--resume`` value -> a checkpoint directory: 'auto' (newest, or none yet),
        'none' (fresh start) or a path to an ``iter_*`` directory."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = resume.rstrip("/")
        if not (os.path.isdir(path) and TAG.match(os.path.basename(path))):
            raise FileNotFoundError(f"--resume {resume}: expected 'auto', 'none' or a "
                                    f"checkpoint directory iter_NNNNNNNN")
        return path

    def load(self, engine, path: str) -> tuple[dict, dict | None]:
        """Restore the engine; returns (client_state, this rank's state or None when the
        checkpoint was written by another number of ranks)."""
        root, tag = os.path.split(os.path.abspath(path))
        loaded, client_state = engine.load_checkpoint(root, tag=tag)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        rank_file = os.path.join(path, f"rank{self.info.rank:05d}.pt")
        rank_state = (safe_torch_load(rank_file, "per-rank checkpoint state")
                      if os.path.isfile(rank_file) else None)
        return client_state, rank_state
