"""Stage-1 trainer: two CPU ranks through the real `deepspeed` launcher (gloo), resume equality,
data-parallel equivalence, config errors before any process group, checkpoint atomicity,
launcher environments and the dead-rank timeout."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch

from epsdist import dist as D
from epsdist.dist import free_port
from epsdist.checkpoint import Checkpointer, CheckpointError, refuse_unsafe_pickles
from epsdist.config import ConfigError, load_config
from epsdist.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "epsdist", "train.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def run(cmd, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def deepspeed_train(tmp, *overrides, extra=()):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
           "--config", os.path.join(REPO, "configs", "synthetic_eps.yaml"),
           *extra, *overrides]
    return run(cmd, cwd=tmp)


def metrics(run_dir):
    """iteration -> (loss_cls, loss_sal), the last line winning (see RunLogger)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            out[m["iteration"]] = (m["loss/cls"], m["loss/sal"])
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, make_train_shards):
    root = tmp_path_factory.mktemp("train")
    make_train_shards(root)
    return root


N = 12
COMMON = ("data.train_shards=shards", "data.crop_size=64", "data.resize_long=[64,96]",
          "run.log_every=1", f"run.save_every={N}", "run.panel_every=5",
          "train.global_batch_size=8")


@pytest.fixture(scope="module")
def full(shards):
    """2N uninterrupted iterations on two ranks (ZeRO stage 0): the reference run."""
    out = deepspeed_train(shards, *COMMON, "run.dir=runs/full", f"train.max_iters={2 * N}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_two_ranks_resume_equals_uninterrupted_and_loss_decreases(shards, full):
    crashed = deepspeed_train(shards, *COMMON, "run.dir=runs/resumed",
                              f"train.max_iters={2 * N}", extra=("--stop-after", str(N)))
    assert crashed.returncode != 0
    assert not os.path.exists(shards / "runs/resumed/export/model.pt")
    resumed = deepspeed_train(shards, *COMMON, "run.dir=runs/resumed",
                              f"train.max_iters={2 * N}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at iteration {N}" in resumed.stdout
    assert f"skipped steps (non-finite loss): 0 of {2 * N} iterations" in full.stdout

    a, b = metrics(shards / "runs/full"), metrics(shards / "runs/resumed")
    assert sorted(a) == sorted(b) == list(range(1, 2 * N + 1))
    for it in a:
        assert a[it] == pytest.approx(b[it], rel=1e-5, abs=1e-7), it
    total = [a[i][0] + a[i][1] for i in sorted(a)]
    assert sum(total[-4:]) < sum(total[:4])                 # it learns

    run_dir = shards / "runs/full"
    export = torch.load(run_dir / "export/model.pt", weights_only=False)
    assert export["num_maps"] == 5 and export["classes"] == list(synthetic.CLASSES)
    assert export["config"]["train"]["max_iters"] == 2 * N
    ckpts = sorted(p for p in os.listdir(run_dir / "checkpoints") if p.startswith("iter_"))
    assert ckpts == [f"iter_{N:08d}", f"iter_{2 * N:08d}"]
    assert (run_dir / "checkpoints/latest").read_text().strip() == ckpts[-1]
    assert load_config(str(run_dir / "config.yaml")).train.max_iters == 2 * N
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tb"))


def test_zero_stage_2_trains_like_stage_0_and_resumes_exactly(shards, full):
    """train.zero_stage=2 (optimizer state and gradients partitioned over the ranks) with the
    SGD of the four groups (DeepSpeed refuses torch's SGD under ZeRO unless told it may): the
    same losses and exported weights as the unpartitioned run up to float summation order, and
    stopped at N then resumed from its partitioned checkpoint, exactly the uninterrupted run."""
    common = (*COMMON, f"train.max_iters={2 * N}", "train.zero_stage=2")
    whole = deepspeed_train(shards, *common, "run.dir=runs/zero2")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    crashed = deepspeed_train(shards, *common, "run.dir=runs/zero2r",
                              extra=("--stop-after", str(N)))
    assert crashed.returncode != 0 and "untested" not in crashed.stderr, crashed.stderr[-3000:]
    resumed = deepspeed_train(shards, *common, "run.dir=runs/zero2r")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at iteration {N}" in resumed.stdout

    ref, z, zr = (metrics(shards / f"runs/{d}") for d in ("full", "zero2", "zero2r"))
    assert sorted(ref) == sorted(z) == sorted(zr) == list(range(1, 2 * N + 1))
    for it in ref:
        assert z[it] == pytest.approx(zr[it], rel=1e-5, abs=1e-7), it
        # reduce-scatter of flat buckets sums in another order: 1e-7 drifts to ~3e-4 in 24 steps
        assert z[it] == pytest.approx(ref[it], rel=2e-3), it
    weights = [torch.load(shards / f"runs/{d}/export/model.pt", weights_only=True)["state_dict"]
               for d in ("full", "zero2", "zero2r")]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    for k in weights[0]:
        assert torch.equal(weights[1][k], weights[2][k]) or torch.allclose(
            weights[1][k], weights[2][k], rtol=1e-5, atol=1e-7), k
        assert torch.allclose(weights[0][k], weights[1][k], rtol=1e-2, atol=1e-3), k


def test_data_parallel_equals_one_rank_with_the_whole_batch(tmp_path):
    """train.global_batch_size=4: two ranks x 2, one rank x 4 and one rank x 4 micro-batches
    of 1 (gradient accumulation) give the same losses and weights."""
    script = os.path.join(REPO, "tests", "scripts", "dp_step.py")
    two = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script,
               str(tmp_path / "two.pt")], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable, script, str(tmp_path / "one.pt")], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    acc = run([sys.executable, script, "train.micro_batch_size=1", str(tmp_path / "acc.pt")],
              cwd=tmp_path)
    assert acc.returncode == 0, acc.stderr[-3000:]
    a, b, c = (torch.load(tmp_path / f"{n}.pt") for n in ("two", "one", "acc"))
    assert (a["micro"], a["accum"], b["micro"], b["accum"], c["micro"], c["accum"]) == \
        (2, 1, 4, 1, 1, 4)
    for other in (b, c):
        assert torch.allclose(a["losses"], other["losses"], rtol=1e-5, atol=1e-7)
        assert a["state"].keys() == other["state"].keys()
        for k in a["state"]:
            assert torch.allclose(a["state"][k], other["state"][k], rtol=1e-4, atol=1e-6), k
    assert not torch.allclose(a["losses"][0], a["losses"][-1])            # it trained


def test_global_batch_is_kept_at_any_rank_count():
    """The paper recipes' DeepSpeed config keeps the paper's batch per optimizer step on 1-16
    ranks (with accumulation when train.micro_batch_size caps the per-rank batch); a rank
    count that cannot split it is a ConfigError naming both numbers."""
    from epsdist.config import resolve_batch
    from epsdist.stage1 import deepspeed_config
    cases = {"voc_eps": (8, [(1, 0, 8, 1), (2, 0, 4, 1), (4, 0, 2, 1), (8, 0, 1, 1),
                             (1, 2, 2, 4), (2, 3, 2, 2), (4, 1, 1, 2)]),
             "coco_eps": (16, [(1, 0, 16, 1), (2, 0, 8, 1), (4, 0, 4, 1), (8, 0, 2, 1),
                               (16, 0, 1, 1), (8, 1, 1, 2), (1, 5, 4, 4)])}
    for name, (total, rows) in cases.items():
        for ranks, cap, micro, accum in rows:
            cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"),
                              [f"train.micro_batch_size={cap}"])
            ds = deepspeed_config(cfg, D.DistInfo(0, 0, ranks, "gloo", torch.device("cpu"),
                                                  "env"))
            assert ds["train_batch_size"] == total, (name, ranks, cap)
            assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
                == (micro, accum), (name, ranks, cap)
    voc = load_config(os.path.join(REPO, "configs", "voc_eps.yaml"))
    for ranks in (3, 16):
        with pytest.raises(ConfigError, match=f"'train.global_batch_size' is 8.*{ranks} ranks"):
            resolve_batch(voc, ranks)


def test_global_batch_error_before_any_process_group(shards, monkeypatch):
    """WORLD_SIZE from the launcher's environment: 3 ranks cannot split 16."""
    from epsdist import train
    monkeypatch.chdir(shards)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="'train.global_batch_size' is 16.*3 ranks"):
        train.main(["--config", os.path.join(REPO, "configs", "synthetic_eps.yaml"),
                    "data.train_shards=shards"])
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("override,message", [
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.batch_size=3", "train.batch_size"),                # derived (16 on 1 rank)
    ("loss.tau=1.5", "loss.tau"),
    ("data.train_shards=nowhere", "data.train_shards"),
    ("data.train_shards=", "data.train_shards"),
    ("data.num_classes=20", "data.num_classes"),
    ("model.weights=missing.params", "model.weights"),
    ("trian.lr=0.1", "trian"),
    ("train.global_batch_size=161", "160 samples.*train.global_batch_size=161"),
])
def test_config_errors_before_any_process_group(shards, override, message, monkeypatch):
    from epsdist import train
    monkeypatch.chdir(shards)
    with pytest.raises(ConfigError, match=message):
        train.main(["--config", os.path.join(REPO, "configs", "synthetic_eps.yaml"),
                    "data.train_shards=shards", override])
    assert not torch.distributed.is_initialized()


def test_a_config_error_is_one_line_and_exit_2(shards):
    out = run([sys.executable, TRAIN, "--config",
               os.path.join(REPO, "configs", "synthetic_eps.yaml"), "data.train_shards=shards",
               "train.momentum=5", "train.lr=1e999", "run.dir=runs/config_error"], cwd=shards)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "train.py: config error:" in lines[0]
    assert "'train.momentum' must be in [0, 1)" in lines[0] and "'train.lr'" in lines[0]
    assert not (shards / "runs/config_error").exists()


# ------------------------------------------------------------------------------ units

class FakeEngine:
    """Writes and reads one file like DeepSpeed's engine; can fail half-way (``fail``: the
    exception to raise after writing)."""

    def __init__(self, fail=None):
        self.fail, self.value = fail, None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(client_state, os.path.join(save_dir, tag, "model.pt"))
        if self.fail:
            raise self.fail

    def load_checkpoint(self, root, tag):
        return root, torch.load(os.path.join(root, tag, "model.pt"))


def test_checkpoint_is_atomic_and_keeps_last_k(tmp_path):
    info = D.DistInfo(0, 0, 1, "gloo", torch.device("cpu"), "single")
    ck = Checkpointer(str(tmp_path), info, keep_last=2)
    assert ck.resolve("auto") is None
    for it in (10, 20, 30):
        ck.save(FakeEngine(), it, {"iteration": it}, {"rng": it})
    assert sorted(os.listdir(tmp_path)) == [".partial", "iter_00000020", "iter_00000030", "latest"]
    with pytest.raises(CheckpointError, match="writing the checkpoint .*iter_00000040.*oops"):
        ck.save(FakeEngine(fail=OSError("oops")), 40, {"iteration": 40}, {"rng": 40})
    assert ck.latest() == str(tmp_path / "iter_00000030")     # the crash left latest intact
    assert not (tmp_path / "iter_00000040").exists()
    client, rank_state = ck.load(FakeEngine(), ck.resolve("auto"))
    assert client == {"iteration": 30} and rank_state == {"rng": 30}
    assert ck.resolve("none") is None
    with pytest.raises(FileNotFoundError, match="--resume"):
        ck.resolve(str(tmp_path / "elsewhere"))


def test_launcher_env_from_deepspeed_torchrun_slurm_and_single():
    env, how = D.launcher_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                               "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert how == "env" and env["RANK"] == "3" and env["MASTER_ADDR"] == "h1"
    env, how = D.launcher_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
                               "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1", "SLURM_JOB_ID": "4321"})
    assert how == "slurm"
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(29500 + 4321)}
    env, how = D.launcher_env({})
    assert how == "single" and env["WORLD_SIZE"] == "1"
    assert D.first_slurm_host("node001") == "node001"
    assert D.first_slurm_host("a-b[3,5-6]") == "a-b3"


def test_deepspeed_config_is_generated_from_the_yaml():
    from epsdist.stage1 import deepspeed_config
    cfg = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=4",
                             "train.zero_stage=2", "train.grad_clip=1.0", "train.precision=fp16"])
    cpu = D.DistInfo(0, 0, 4, "gloo", torch.device("cpu"), "env")
    ds = deepspeed_config(cfg, cpu)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.0
    assert "fp16" not in ds                                 # no fp16 without CUDA
    gpu = D.DistInfo(0, 0, 4, "nccl", torch.device("cuda", 0), "env")
    assert deepspeed_config(cfg, gpu)["fp16"]["enabled"] is True


def _rank_main(rank, port, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.setup(timeout_s=5)
    if rank == 1:
        os._exit(0)                                         # dies without a word
    t0 = time.time()
    try:
        D.all_reduce_sum(torch.ones(1))
        result.put(("no error", time.time() - t0))
    except Exception as e:                                  # noqa: BLE001
        result.put((type(e).__name__, time.time() - t0))


def test_ranks_leave_no_shared_memory_behind_even_when_they_crash(shards):
    """DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm) are unlinked once every
    rank has mapped them (epsdist.dist.unlink_deepspeed_shm): none is left after a finished run
    or after a crash."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    for extra in ((), ("--stop-after", "2")):
        port = free_port()
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), TRAIN, "--config",
               os.path.join(REPO, "configs", "synthetic_eps.yaml"), *extra, *COMMON,
               "train.max_iters=4", f"run.dir=runs/shm{len(extra)}"]
        proc = run(cmd, cwd=shards)
        assert proc.returncode == (3 if extra else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
        left = [n for n in os.listdir("/dev/shm")
                if n.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_") and
                f"_{port}_" in n]
        assert left == [], left


def test_dead_rank_makes_the_others_fail_instead_of_hanging():
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, result)) for r in range(2)]
    for p in procs:
        p.start()
    outcome, seconds = result.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert outcome != "no error" and seconds < 60


def train_cmd(*overrides):
    return [TRAIN, "--config", os.path.join(REPO, "configs", "synthetic_eps.yaml"), *COMMON,
            "train.max_iters=3", *overrides]


def test_torchrun_launcher(shards):
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), *train_cmd("run.dir=runs/torchrun")],
              cwd=shards)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(metrics(shards / "runs/torchrun")) == [1, 2, 3]


def test_srun_style_environment_without_a_launcher(shards):
    """Two processes that only have what `srun` gives them (SLURM_* variables)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, *train_cmd("run.dir=runs/srun")],
                                      cwd=shards, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
    assert sorted(metrics(shards / "runs/srun")) == [1, 2, 3]


@pytest.fixture(scope="module")
def nan_weights(shards):
    """A tiny-backbone weights file of NaNs: every step's loss is non-finite."""
    from epsdist.models.tiny import TinyBackbone
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in TinyBackbone().state_dict().items()}
    torch.save(state, shards / "nan.pt")
    return f"model.weights={shards / 'nan.pt'}"


@pytest.mark.parametrize("policy", ["stop", "skip", "skip_allowed"])
def test_non_finite_loss_stops_skips_or_fails_past_the_skip_limits(shards, nan_weights, policy):
    limits = ("train.max_skipped_fraction=1", "train.max_consecutive_skips=3")
    out = run([sys.executable, *train_cmd(f"run.dir=runs/nan_{policy}", nan_weights,
                                          f"train.on_nonfinite={policy[:4]}",
                                          *(limits if policy == "skip_allowed" else
                                            ("train.max_iters=100",)))], cwd=shards)
    export = shards / f"runs/nan_{policy}/export/model.pt"
    if policy == "stop":
        assert out.returncode != 0
        assert "non-finite loss at iteration 1" in out.stderr
    elif policy == "skip":                  # default limits: 5 in a row at most
        assert out.returncode != 0
        assert "step skipped (6 so far)" in out.stderr
        assert "non-finite loss in 6 steps in a row (iterations 1-6)" in out.stderr
        assert "train.max_consecutive_skips=5" in out.stderr and not export.exists()
    else:                                   # limits raised: the run ends and says how it went
        assert out.returncode == 0, out.stderr[-3000:]
        assert "step skipped (3 so far)" in out.stderr
        assert "skipped steps (non-finite loss): 3 of 3 iterations" in out.stdout
        assert export.exists()


def test_skip_counter_limits_and_resumed_counts():
    from epsdist.skips import SkipCounter
    t = load_config(None, ["train.max_iters=100", "train.max_skipped_fraction=0.1",
                           "train.max_consecutive_skips=2", "train.on_nonfinite=skip"]).train
    c = SkipCounter(t)
    for it in range(1, 15):                 # 2 skipped of every 3: never 3 in a row
        c.finite() if it % 3 == 0 else c.skip(it)
        assert c.skipped == it - it // 3
    assert c.skipped == 10                  # the budget: 0.1 x 100
    c.finite()
    with pytest.raises(FloatingPointError, match=r"11 steps skipped .*=0\.1 x .*=100 \(10\)"):
        c.skip(16)
    resumed = SkipCounter(t, {"skipped_steps": 1, "consecutive_skips": 2})
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(iterations 5-7\)"):
        resumed.skip(7)
    assert SkipCounter(t, None).state() == {"skipped_steps": 0, "consecutive_skips": 0}
    assert "0 of 100 iterations" in SkipCounter(t).summary(100)


def test_sigusr1_checkpoints_and_exits_75_then_resume_finishes(shards):
    import re
    import signal
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()))
    env.pop("TRITON_INTERPRET", None)
    run_dir = shards / "runs/usr1"
    proc = subprocess.Popen([sys.executable, *train_cmd("run.dir=runs/usr1", "run.save_every=1000",
                                                        "train.max_iters=400")],
                            cwd=shards, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped = int(re.search(r"stopping at iteration (\d+) on SIGUSR1", out).group(1))
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"iter_{stopped:08d}"
    assert not (run_dir / "export/model.pt").exists()
    resumed = run([sys.executable, *train_cmd("run.dir=runs/usr1", "run.save_every=1000",
                                              f"train.max_iters={stopped + 2}")], cwd=shards)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at iteration {stopped}" in resumed.stdout
    assert sorted(metrics(run_dir))[-1] == stopped + 2


# ------------------------------------------------------------------------------ faults (#14)

def _single():
    return D.DistInfo(0, 0, 1, "gloo", torch.device("cpu"), "single")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), _single(), keep_last=3)
    for it in (10, 20, 30):
        ck.save(FakeEngine(), it, {"iteration": it}, {"rng": it})
    files = json.loads((tmp_path / "iter_00000030" / "files.json").read_text())["files"]
    assert set(files) == {"model.pt", "rank00000.pt"}
    assert files["model.pt"]["size"] == os.path.getsize(tmp_path / "iter_00000030" / "model.pt")
    model30 = tmp_path / "iter_00000030" / "model.pt"
    model30.write_bytes(model30.read_bytes()[:-20])                  # truncated
    rank20 = tmp_path / "iter_00000020" / "rank00000.pt"
    data = bytearray(rank20.read_bytes())
    data[len(data) // 2] ^= 0xFF                                     # same size, one bit flipped
    rank20.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="epsdist.checkpoint"):
        path = ck.resolve("auto")
    assert path == str(tmp_path / "iter_00000010")
    assert str(model30) in caplog.text and "bytes" in caplog.text
    assert str(rank20) in caplog.text and "SHA-256" in caplog.text
    client, rank_state = ck.load(FakeEngine(), path)
    assert client == {"iteration": 10} and rank_state == {"rng": 10}
    with pytest.raises(CheckpointError, match=f"{model30}"):        # named explicitly: no fallback
        ck.resolve(str(tmp_path / "iter_00000030"))
    (tmp_path / "iter_00000010" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint.*--resume none"):
        ck.resolve("auto")


def test_load_errors_name_the_file(tmp_path):
    ck = Checkpointer(str(tmp_path), _single(), keep_last=3)
    ck.save(FakeEngine(), 10, {"iteration": 10}, {"rng": 10})
    path = tmp_path / "iter_00000010"
    (path / "files.json").unlink()                   # unverified (an older checkpoint)
    rank = path / "rank00000.pt"
    rank.write_bytes(rank.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot load {rank}"):
        ck.load(FakeEngine(), ck.resolve("auto"))
    model = path / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{model} is not a complete torch file"):
        ck.load(FakeEngine(), str(path))


@pytest.mark.parametrize("error", [RuntimeError("basic_ios::clear: iostream error"),
                                   OSError(28, "No space left on device")])
def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, error):
    import shutil
    from collections import namedtuple
    ck = Checkpointer(str(tmp_path), _single(), keep_last=3)
    ck.save(FakeEngine(), 10, {"iteration": 10}, {"rng": 10})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9, 0))
    with pytest.raises(CheckpointError) as e:
        ck.save(FakeEngine(fail=error), 20, {"iteration": 20}, {"rng": 20})
    partial = tmp_path / ".partial" / "iter_00000020"
    assert f"no space left on device while writing {partial}" in str(e.value)
    assert not partial.exists()                       # the space is given back
    assert ck.resolve("auto") == str(tmp_path / "iter_00000010")
    # the per-rank state, written by epsdist itself, names its own file
    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).startswith(str(tmp_path / ".partial")) and "rank" in os.path.basename(str(f)):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="no space left on device while writing "
                       f"{tmp_path / '.partial' / 'iter_00000030' / 'rank00000.pt'}"):
        ck.save(FakeEngine(), 30, {"iteration": 30}, {"rng": 30})
    assert (tmp_path / "latest").read_text().strip() == "iter_00000010"


def test_written_files_respect_the_umask(tmp_path):
    """Everything written through a temporary file gets 0o666 & ~umask, not mkstemp's 0600."""
    from epsdist import atomic, evaluate
    from epsdist.checkpoint import atomic_torch_save
    from epsdist.config import EPSConfig, save_config
    from epsdist.data.manifest import atomic_write_bytes, write_manifest
    from epsdist.models.mxnet_params import save_mxnet_params
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
            os.umask(umask)
            assert atomic.current_umask() == umask
            d = tmp_path / oct(umask)
            d.mkdir()
            save_config(EPSConfig(), str(d / "config.yaml"))
            write_manifest(str(d), {"format": 1})
            evaluate.write_json(str(d / "report.json"), {"a": 1})
            atomic_write_bytes(str(d / "mask.png"), b"png")
            atomic_torch_save({"x": 1}, str(d / "model.pt"))
            save_mxnet_params(str(d / "w.params"), {"a": torch.zeros(2)})
            ck = Checkpointer(str(d / "ck"), _single(), keep_last=1)
            ck.save(FakeEngine(), 10, {"iteration": 10}, {"rng": 10})
            written = [p for p in d.rglob("*") if p.is_file()]
            assert len(written) == 10, written
            for p in written:
                assert p.stat().st_mode & 0o777 == mode, (p, oct(p.stat().st_mode))
    finally:
        os.umask(old)


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError):
                pass
    return out


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ranks_checkpoint_and_exit_when_the_launcher_alone_is_signalled(shards):
    """SIGTERM to the `deepspeed` command only (not its process group): DeepSpeed's runner
    exits at once and leaves its per-node launch.py and the ranks running; the ranks notice
    (epsdist.dist.watch_launcher), checkpoint and exit 75 instead of training on as orphans."""
    import re
    import signal
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *train_cmd(
        "run.dir=runs/orphans", "run.save_every=1000", "train.max_iters=400")]
    proc = subprocess.Popen(cmd, cwd=shards, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir, ranks = shards / "runs/orphans", []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2:
                break
            time.sleep(0.2)
        ranks = [r for launch in _children(proc.pid) for r in _children(launch)]
        assert len(ranks) == 2, ranks                       # deepspeed -> launch.py -> ranks
        proc.send_signal(signal.SIGTERM)                    # the launcher alone
        out, err = proc.communicate(timeout=120)            # EOF: every rank has exited
        assert not any(_running(r) for r in ranks)
        stopped = int(re.search(r"stopping at iteration (\d+) on SIGTERM \(checkpoint "
                                r"written\)", out).group(1))
        assert (run_dir / "checkpoints/latest").read_text().strip() == f"iter_{stopped:08d}"
        assert sorted(metrics(run_dir))[-1] == stopped < 400
    finally:
        for pid in ranks + [proc.pid]:                      # only what this test started
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


class _Marker:
    """Unpickling this creates a marker file: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_deepspeed_file_is_refused_before_anything_runs(tmp_path):
    """DeepSpeed unpickles its files itself (weights_only=False): the checkpoint is scanned first."""
    ck = Checkpointer(str(tmp_path / "ck"), _single(), keep_last=3)
    ck.save(FakeEngine(), 10, {"iteration": 10}, {"rng": 10})
    path = tmp_path / "ck" / "iter_00000010"
    (path / "files.json").unlink()                   # as if crafted by hand
    marker = tmp_path / "marker"
    torch.save({"iteration": 10, "x": _Marker(str(marker))}, path / "model.pt")

    class UnsafeEngine(FakeEngine):                  # loads like DeepSpeed's checkpoint engine
        def load_checkpoint(self, root, tag):
            return root, torch.load(os.path.join(root, tag, "model.pt"), weights_only=False)

    with pytest.raises(CheckpointError, match=f"{path / 'model.pt'} names Python globals"):
        ck.load(UnsafeEngine(), str(path))
    assert not marker.exists()


def test_deepspeeds_own_data_classes_pass_the_scan_and_nothing_else_does(tmp_path):
    """ZeRO's optimizer-state files name DeepSpeed's ZeroStageEnum, fragment_address and
    LossScaler (test_zero_stage_2_trains_and_resumes_like_stage_0 resumes from real ones); the
    scan accepts exactly those, and still refuses a file that names them beside a callable."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    ok = tmp_path / "ok"
    ok.mkdir()
    torch.save({"stage": ZeroStageEnum(2), "scaler": LossScaler(1.0), "t": torch.ones(2)},
               ok / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    refuse_unsafe_pickles(str(ok))                                   # no error
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"stage": ZeroStageEnum(2), "x": _Marker(str(tmp_path / "marker"))},
               bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"names Python globals the safe loader refuses "
                                              r"\(io.open\)"):
        refuse_unsafe_pickles(str(bad))
    assert not (tmp_path / "marker").exists()


def test_a_forked_loader_worker_ignores_sigusr1_and_exits_on_sigterm():
    """Slurm's `scancel --signal=USR1` reaches every process of the step, loader workers too,
    possibly before their init ignores it: the inherited handler must not end the worker."""
    import multiprocessing
    import signal
    from epsdist.checkpoint import StopRequest
    saved = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    try:
        stop = StopRequest()
        ctx = multiprocessing.get_context("fork")
        codes = {}
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            child = ctx.Process(target=lambda s=signum: os.kill(os.getpid(), s))
            child.start()
            child.join(30)
            codes[signum] = child.exitcode
        assert codes == {signal.SIGUSR1: 0, signal.SIGTERM: -signal.SIGTERM}
        assert not stop.requested                    # the children's signals are theirs
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
