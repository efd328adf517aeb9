"""Process-group set-up and the few collectives the trainer uses. The only module of epsdist
that touches ``torch.distributed``.

Launchers and where the rank comes from:
  * ``deepspeed [--num_gpus N | --hostfile H] epsdist/train.py``, ``torchrun``: RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set by the launcher;
  * ``srun`` (one task per GPU): derived from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the
    first host of SLURM_JOB_NODELIST (MASTER_PORT: 29500 + SLURM_JOB_ID mod 10000, unless set);
  * plain ``python epsdist/train.py``: one process, rank 0 of 1 (a local process group is still
    created so the same code path runs, on MASTER_PORT or a free loopback port).
CUDA ranks use NCCL on ``cuda:LOCAL_RANK``; without CUDA, gloo on the CPU (this is how
``deepspeed --num_gpus 2`` runs two ranks in CI). Every collective has the configured timeout:
a dead rank makes the others fail after ``timeout_s`` instead of hanging forever.

A rank never outlives its launcher (``watch_launcher``): under deepspeed/torchrun, when the
launcher process goes away (SIGTERM/SIGINT/SIGKILL to the ``deepspeed`` or ``torchrun``
process alone), each rank sends itself SIGTERM, which the trainers treat like SIGUSR1
(checkpoint at the next step, exit 75), and exits hard if it is still alive ``grace_s`` later.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str               # "nccl" or "gloo"
    device: torch.device
    launcher: str              # "env" (deepspeed/torchrun), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env(environ=None) -> tuple[dict, str]:
    """The RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* variables to use and where they came from."""
    env = dict(os.environ if environ is None else environ)
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in keys if k in env}
        out.setdefault("LOCAL_RANK", env.get("LOCAL_RANK", "0"))
        out.setdefault("MASTER_ADDR", "127.0.0.1")
        out.setdefault("MASTER_PORT", "29500")
        return out, "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("srun without SLURM_JOB_NODELIST: cannot find the master host")
        port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000)
        return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "WORLD_SIZE": env["SLURM_NTASKS"],
                "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                "MASTER_PORT": port}, "slurm"
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}, "single"


def free_port() -> int:
    """A free loopback port for a one-process group (two single-process runs on one machine
    must not collide on a fixed port)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(timeout_s: float = 600.0) -> DistInfo:
    """Create the process group (through DeepSpeed, which the engine needs) and return who we are."""
    import deepspeed

    values, launcher = launcher_env()
    if launcher == "env":
        watch_launcher(grace_s=timeout_s + 60)
    os.environ.update(values)
    rank, local_rank = int(values["RANK"]), int(values["LOCAL_RANK"])
    world_size = int(values["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s),
                                   rank=rank, world_size=world_size, verbose=False)
        if backend == "gloo" and world_size > 1:
            torch_dist.barrier()          # every rank has mapped every rank's buffer by now
            unlink_deepspeed_shm(rank)
    return DistInfo(rank, local_rank, world_size, backend, device, launcher)


def _ppid(pid: int) -> int | None:
    """The parent of process ``pid`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain() -> list[tuple[int, int]]:
    """``(pid, its parent)`` links that must stay as they are while the launcher lives: this
    process -> its parent (torchrun's agent, DeepSpeed's per-node ``launch.py``), and for
    DeepSpeed also ``launch.py`` -> the ``deepspeed`` command itself, which leaves
    ``launch.py`` and the ranks running when it is signalled. A dead process's children are
    re-parented, so a changed link means the launcher died (and a reused PID cannot fool it)."""
    me, parent = os.getpid(), os.getppid()
    chain = [(me, parent)]
    grand = _ppid(parent)
    if "deepspeed.launcher.launch" in _cmdline(parent) and grand not in (None, 0, 1):
        chain.append((parent, grand))
    return chain


def watch_launcher(grace_s: float = 660.0, poll_s: float = 1.0,
                   chain: list[tuple[int, int]] | None = None) -> threading.Thread | None:
    """A daemon thread: once a link of ``launcher_chain()`` changes, SIGTERM to this process
    (checkpoint and exit where a ``StopRequest`` is installed, else the default: exit), then
    ``os._exit(143)`` if it is still running ``grace_s`` later. Linux only (``/proc``)."""
    if not os.path.isdir("/proc/self"):
        return None
    chain = launcher_chain() if chain is None else chain

    def alive() -> bool:
        return all((os.getppid() if pid == os.getpid() else _ppid(pid)) == parent
                   for pid, parent in chain)

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    thread = threading.Thread(target=watch, name="epsdist-launcher-watch", daemon=True)
    thread.start()
    return thread


def unlink_deepspeed_shm(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer.

    On the CPU, with every rank on one machine, DeepSpeed's shared-memory all-reduce creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MB)
    while the process group starts, and never removes it: every CPU run would keep 66 MB of RAM
    per rank until the machine reboots (a test suite or a day of experiments fills /dev/shm and
    then the memory). Once every rank has mapped every rank's buffer (DeepSpeed's init does that
    before it returns; the caller's barrier makes sure all have), the names are no longer needed:
    the mappings stay valid and the kernel frees the memory when the last rank exits, crashed or
    not."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except FileNotFoundError:              # LOCAL_SIZE != world size: DeepSpeed used no buffer
        pass


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place, returned)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]
