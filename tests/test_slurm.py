"""The sbatch scripts (slurm/train_voc.sh, slurm/train_coco.sh) against a real Slurm.

tests/slurm/local_slurm.sh brings up a throw-away cluster on this machine from Debian's packages
(two fake nodes on 127.0.0.1 with two fake GPUs each: the jobs see CUDA_VISIBLE_DEVICES but no
GPU, so the trainer runs gloo ranks on the CPU). The module starts it once and stops it at the
end (unless it was already running). It needs root; elsewhere these tests skip, saying why. In
CI (CI set in the environment) a cluster that cannot be started is a failure, not a skip.
EPSDIST_SKIP_SLURM=1 skips them on purpose.

Each job is `timeout 900 sbatch --wait ... slurm/train_*.sh key=value ...` with the synthetic
recipe, exactly as a user submits it, with the #SBATCH resources overridden on the command line.
"""
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from epsdist.data import shard, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SLURM = os.path.join(REPO, "tests", "slurm", "local_slurm.sh")
SCRIPTS = [os.path.join(REPO, "slurm", name) for name in ("train_voc.sh", "train_coco.sh")]
SBATCH_TIMEOUT = 900


# ------------------------------------------------------------------ without a cluster

@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses_and_asks_for_what_the_issue_says(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
    for key in ("nodes", "ntasks-per-node", "gres", "cpus-per-task", "time", "signal",
                "requeue", "open-mode", "output"):
        assert key in directives, key
    gpus = directives["gres"].split(":")[-1]
    assert directives["ntasks-per-node"] == gpus                  # one task per GPU
    assert directives["signal"] == "B:USR1@120"
    assert "partition" not in directives and "account" not in directives  # site-specific: -p / -A
    assert "nvidia-smi" not in text + open(os.path.join(REPO, "slurm", "common.sh")).read()


def test_outside_a_job_it_says_to_use_sbatch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", SCRIPTS[1]], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "submit with sbatch" in out.stderr


# ------------------------------------------------------------------ the cluster

def _cannot_run(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Slurm tests, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
    """SLURM_CONF of the local cluster (started here, stopped at the end if started here).
    Test runs on one machine take turns (a lock file beside the cluster's state directory):
    they share one cluster, and one run must not stop it under another."""
    if os.environ.get("EPSDIST_SKIP_SLURM"):
        pytest.skip("EPSDIST_SKIP_SLURM is set")
    if not sys.platform.startswith("linux"):
        pytest.skip("the throw-away Slurm cluster needs Linux")
    if os.geteuid() != 0:
        _cannot_run("starting a throw-away Slurm cluster needs root "
                    "(tests/slurm/local_slurm.sh installs packages and edits /etc/hosts)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        _cannot_run("Slurm is not installed and there is no apt-get to install it")
    state = os.environ.get("EPSDIST_SLURM_DIR", "/tmp/epsdist-slurm").rstrip("/")
    with open(state + ".lock", "w") as lock:
        t0 = time.time()
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() - t0 > 1200:
                    _cannot_run(f"another test run has held {state}.lock for 20 minutes")
                time.sleep(1)
        status = subprocess.run(["bash", LOCAL_SLURM, "status"], capture_output=True,
                                timeout=60)
        was_running = status.returncode == 0
        t0 = time.time()
        out = subprocess.run(["bash", LOCAL_SLURM, "start"], capture_output=True, text=True,
                             timeout=900)
        if out.returncode != 0:
            _cannot_run(f"tests/slurm/local_slurm.sh start failed:\n{out.stderr[-3000:]}")
        m = re.search(r"export SLURM_CONF=(\S+)", out.stdout)
        assert m, out.stdout
        print(f"local Slurm up in {time.time() - t0:.1f} s", file=sys.stderr)
        try:
            yield m.group(1)
        finally:
            if not was_running:
                subprocess.run(["bash", LOCAL_SLURM, "stop"], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    synthetic.generate(str(root / "data"), 64, 0, seed=0, size=96, workers=1, progress=False)
    summary = shard.shard_voc(str(root / "data"), str(root / "data" / "saliency"),
                              str(root / "shards"), split="train", shard_size=16,
                              log=lambda *a: None)
    assert summary["exit_code"] == 0
    return root


def overrides(root, run, **extra):
    values = {"data.train_shards": root / "shards", "run.dir": root / "runs" / run,
              "data.crop_size": 64, "data.resize_long": "[64,96]", "train.batch_size": 4,
              "run.log_every": 1, "run.panel_every": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def job_env(slurm_conf):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TRITON_INTERPRET")}
    env.update(SLURM_CONF=slurm_conf, EPSDIST_CONFIG="configs/synthetic_eps.yaml",
               EPSDIST_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return env


def sbatch(slurm_conf, root, script, resources, args, name):
    """`timeout 900 sbatch --wait` from the repository root, as a user would; returns the
    Popen (stdout: the job id, --parsable) and the path of the job's log."""
    log = root / f"{name}-%j.out"
    cmd = ["timeout", str(SBATCH_TIMEOUT), "sbatch", "--wait", "--parsable", "--time=10",
           f"--job-name={name}", f"--output={log}", *resources,
           os.path.join("slurm", script), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(slurm_conf), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), proc.stderr.read()
    return proc, job_id, str(log).replace("%j", job_id)


def finish(proc, log):
    out, err = proc.communicate(timeout=SBATCH_TIMEOUT + 60)
    text = open(log).read() if os.path.exists(log) else "(no job log)"
    return proc.returncode, text, err


def iterations(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["iteration"] for line in f]


def wait_for_checkpoint(run_dir, proc, timeout=300):
    latest = os.path.join(run_dir, "checkpoints", "latest")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(latest):
            return open(latest).read().strip()
        assert proc.poll() is None, "the job ended before its first checkpoint"
        time.sleep(0.1)
    raise AssertionError("no checkpoint after %d s" % timeout)


TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1"]
ONE_NODE_TWO_GPUS = ["--nodes=1", "--ntasks-per-node=2", "--gres=gpu:2", "--cpus-per-task=1"]


def test_coco_script_trains_on_two_nodes_and_checkpoints(slurm, shards):
    t0 = time.time()
    proc, job, log = sbatch(slurm, shards, "train_coco.sh", TWO_NODES,
                            overrides(shards, "two_nodes", **{"train.max_iters": 6,
                                                              "run.save_every": 3}), "coco")
    rc, text, err = finish(proc, log)
    assert rc == 0, text[-4000:] + err
    run_dir = shards / "runs" / "two_nodes"
    assert iterations(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_00000006"
    assert (run_dir / "checkpoints" / "iter_00000003").is_dir()
    assert (run_dir / "export" / "model.pt").exists()
    assert f"job {job} (restart 0) on node[1-2]: WORLD_SIZE=2 tasks/node=1 GPUs/node=1" in text
    assert "MASTER=node1:" in text
    # both ranks ran, one on each node, each seeing its (fake) GPU
    assert "rank 0/2 local_rank 0 on node1 CUDA_VISIBLE_DEVICES=0" in text
    assert "rank 1/2 local_rank 0 on node2 CUDA_VISIBLE_DEVICES=0" in text
    assert "requeueing" not in text
    print(f"two-node job: {time.time() - t0:.1f} s", file=sys.stderr)


def test_voc_script_crash_is_not_requeued_and_a_resubmission_resumes(slurm, shards):
    """Two ranks on one node (local ranks 0 and 1). A rank that crashes after the checkpoint
    of iteration 3 fails the job (no requeue: only a time-limit signal or status 75 requeue);
    the same command submitted again continues at iteration 4."""
    args = overrides(shards, "crash", **{"train.max_iters": 8, "run.save_every": 3})
    proc, job, log = sbatch(slurm, shards, "train_voc.sh", ONE_NODE_TWO_GPUS,
                            ["--stop-after", "5", *args], "voc")
    rc, text, err = finish(proc, log)
    assert rc != 0, text[-4000:]
    assert "rank 1/2 local_rank 1 on node1 CUDA_VISIBLE_DEVICES=0,1" in text
    assert "trainer exited with status 3" in text and "requeueing" not in text
    run_dir = shards / "runs" / "crash"
    assert iterations(run_dir) == [1, 2, 3, 4, 5]
    assert not (run_dir / "export").exists()

    proc, job2, log2 = sbatch(slurm, shards, "train_voc.sh", ONE_NODE_TWO_GPUS, args, "voc")
    rc, text, err = finish(proc, log2)
    assert rc == 0, text[-4000:] + err
    assert "at iteration 3" in text and re.search(r"resumed from \S+iter_00000003 ", text)
    assert iterations(run_dir) == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_00000008"


def _check_resumed(text, run_dir, max_iters):
    """The log shows a second start that resumed from the checkpoint of iteration N, and the
    iterations logged are 1..k by the first run (k >= N: the run stopped at or after its last
    checkpoint), then N+1..max_iters by the resumed one. Returns (N, k)."""
    m = re.search(r"resumed from \S+iter_(\d{8}) at iteration (\d+)", text)
    assert m, text[-4000:]
    n = int(m.group(2))
    assert int(m.group(1)) == n and 0 < n < max_iters
    its = iterations(run_dir)
    first, second = its[:len(its) - (max_iters - n)], its[len(its) - (max_iters - n):]
    assert second == list(range(n + 1, max_iters + 1)), its
    assert first == list(range(1, len(first) + 1)) and len(first) >= n, its
    return n, len(first)


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, shards):
    """What `--signal=B:USR1@120` does near the time limit, sent now: the batch shell forwards
    SIGUSR1 to the ranks, waits for them, requeues the job, and the restarted job resumes."""
    max_iters = 60
    proc, job, log = sbatch(slurm, shards, "train_coco.sh", TWO_NODES,
                            overrides(shards, "signal", **{"train.max_iters": max_iters,
                                                           "run.save_every": 10}), "sig")
    run_dir = shards / "runs" / "signal"
    wait_for_checkpoint(run_dir, proc)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True,
                   env=job_env(slurm))
    rc, text, err = finish(proc, log)
    assert rc == 0, text[-4000:] + err
    assert "SIGUSR1" in text and f"requeueing job {job}" in text
    assert f"job {job} (restart 1)" in text
    n, stopped = _check_resumed(text, run_dir, max_iters)
    print(f"signalled at iteration {stopped}, resumed at {n}", file=sys.stderr)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{max_iters:08d}"


def test_requeue_from_outside_resumes(slurm, shards):
    """`scontrol requeue` (what preemption with PreemptMode=REQUEUE or an admin does): Slurm
    kills the job and starts it again; --resume auto continues from the newest checkpoint."""
    max_iters = 60
    proc, job, log = sbatch(slurm, shards, "train_coco.sh", TWO_NODES,
                            overrides(shards, "requeue", **{"train.max_iters": max_iters,
                                                            "run.save_every": 10}), "req")
    run_dir = shards / "runs" / "requeue"
    wait_for_checkpoint(run_dir, proc)
    subprocess.run(["scontrol", "requeue", job], check=True, env=job_env(slurm))
    rc, text, err = finish(proc, log)
    assert rc == 0, text[-4000:] + err
    assert f"job {job} (restart 1)" in text
    _check_resumed(text, run_dir, max_iters)
