"""The sbatch scripts (slurm/train_voc.sh, train_coco.sh, pseudo_masks.sh, train_seg.sh) against
a real Slurm.

tests/slurm/local_slurm.sh brings up a throw-away cluster on this machine from Debian's packages
(two fake nodes on 127.0.0.1 with two fake GPUs each: the jobs see CUDA_VISIBLE_DEVICES but no
GPU, so the trainer runs gloo ranks on the CPU). The module starts it once and stops it at the
end (unless it was already running). It needs root; elsewhere these tests skip, saying why. In
CI (CI set in the environment) a cluster that cannot be started is a failure, not a skip.
EPSDIST_SKIP_SLURM=1 skips them on purpose.

Each job is `timeout 900 sbatch --wait ... slurm/<script>.sh key=value ...` with the synthetic
recipe, exactly as a user submits it, with the #SBATCH resources overridden on the command line.
The stages follow each other as in a real run: the two-node training's export makes the
pseudo-masks (pseudo_masks.sh, stopped by the time-limit signal and requeued on the way), and
their shards train the segmentation stage (train_seg.sh).
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
from epsdist.data.manifest import iter_tar_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SLURM = os.path.join(REPO, "tests", "slurm", "local_slurm.sh")
SCRIPTS = [os.path.join(REPO, "slurm", name) for name in ("train_voc.sh", "train_coco.sh")]
ALL_SCRIPTS = SCRIPTS + [os.path.join(REPO, "slurm", name)
                         for name in ("pseudo_masks.sh", "train_seg.sh")]
SBATCH_TIMEOUT = 900


# ------------------------------------------------------------------ without a cluster

@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=os.path.basename)
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


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=os.path.basename)
def test_outside_a_job_it_says_to_use_sbatch(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "submit with sbatch" in out.stderr


def test_pseudo_masks_without_a_checkpoint_says_which_and_launches_nothing(tmp_path):
    """Checked before srun: a missing export is status 2 (not requeued) naming the path it
    looked for, RUN/export/model.pt with RUN from EPSDIST_RUN_DIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="1", EPSDIST_PYTHON=sys.executable,
               EPSDIST_CONFIG="configs/synthetic_eps.yaml", EPSDIST_RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run(["bash", os.path.join(REPO, "slurm", "pseudo_masks.sh")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"checkpoint {tmp_path}/run/export/model.pt: no such file" in out.stderr
    assert "srun" not in out.stdout


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
              "data.crop_size": 64, "data.resize_long": "[64,96]", "train.global_batch_size": 8,
              "run.log_every": 1, "run.panel_every": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def job_env(slurm_conf, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TRITON_INTERPRET")}
    env.update(SLURM_CONF=slurm_conf, EPSDIST_CONFIG="configs/synthetic_eps.yaml",
               EPSDIST_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def sbatch(slurm_conf, root, script, resources, args, name, **env):
    """`timeout 900 sbatch --wait` from the repository root, as a user would (``env``: more
    EPSDIST_* settings); returns the Popen (stdout: the job id, --parsable), the job id and
    the path of the job's log."""
    log = root / f"{name}-%j.out"
    cmd = ["timeout", str(SBATCH_TIMEOUT), "sbatch", "--wait", "--parsable", "--time=10",
           f"--job-name={name}", f"--output={log}", *resources,
           os.path.join("slurm", script), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(slurm_conf, **env), stdout=subprocess.PIPE,
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
    # the ranks checkpointed the iteration they stopped at and exited with 75 (EX_TEMPFAIL),
    # which the batch shell turned into the requeue
    m = re.search(r"stopping at iteration (\d+) on SIGUSR1 \(checkpoint written\)", text)
    assert m, text[-4000:]
    assert "trainer exited with status 75" in text
    n, stopped = _check_resumed(text, run_dir, max_iters)
    assert n == stopped == int(m.group(1)), (n, stopped, m.group(1))
    print(f"signalled: stopped at iteration {stopped}, resumed at {n}", file=sys.stderr)
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


# ------------------------------------------------------------------ the later stages

@pytest.fixture(scope="module")
def stage1_export(slurm, shards):
    """RUN/export/model.pt of the two-node training above (trained here, the same way, when
    that test did not run, e.g. under -k)."""
    run_dir = shards / "runs" / "two_nodes"
    if not (run_dir / "export" / "model.pt").exists():
        proc, job, log = sbatch(slurm, shards, "train_coco.sh", TWO_NODES,
                                overrides(shards, "two_nodes", **{"train.max_iters": 6,
                                                                  "run.save_every": 3}), "coco")
        rc, text, err = finish(proc, log)
        assert rc == 0, text[-4000:] + err
    return run_dir


def wait_for_files(directory, proc, pattern=".png", timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.isdir(directory) and any(f.endswith(pattern) and not f.startswith(".")
                                            for f in os.listdir(directory)):
            return
        assert proc.poll() is None, "the job ended before writing any " + pattern
        time.sleep(0.05)
    raise AssertionError(f"nothing in {directory} after {timeout} s")


@pytest.fixture(scope="module")
def pseudo_masks(slurm, shards, stage1_export):
    """slurm/pseudo_masks.sh on the training shards with that export, two nodes x one task, as
    configured from the environment: the checkpoint from EPSDIST_RUN_DIR, the output directory
    by default (RUN_pseudo), EPSDIST_INFER_ARGS. As soon as the first mask is written it gets
    the time-limit signal (`scancel --batch --signal=USR1`, what --signal=B:USR1@120 sends);
    the requeued job finishes the rest. Returns (rc, log text, sbatch stderr, job id, OUT)."""
    # key=value arguments reach infer.py as config overrides; a fifth, larger scale makes the
    # run take long enough (about 2x) for the signal to arrive while it works
    proc, job, log = sbatch(slurm, shards, "pseudo_masks.sh", TWO_NODES,
                            ["infer.scales=[0.5,1.0,1.5,2.0,3.0]"], "pseudo",
                            EPSDIST_RUN_DIR=str(stage1_export),
                            EPSDIST_SHARDS=str(shards / "shards"),
                            EPSDIST_INFER_ARGS="--cams --panels 4")
    out = shards / "runs" / "two_nodes_pseudo"
    wait_for_files(out / "masks", proc)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True,
                   env=job_env(slurm))
    rc, text, err = finish(proc, log)
    return rc, text, err, job, out


def test_pseudo_masks_script_on_two_nodes_continues_after_the_time_limit_signal(shards,
                                                                               pseudo_masks):
    rc, text, err, job, out = pseudo_masks
    assert rc == 0, text[-4000:] + err
    assert f"pseudo-masks of {shards / 'shards'} with " \
           f"{shards / 'runs' / 'two_nodes' / 'export' / 'model.pt'} -> {out}" in text
    assert "rank 1/2 local_rank 0 on node2" in text
    assert "--cams --panels 4 infer.scales=[0.5,1.0,1.5,2.0,3.0]" in text
    # signalled while working: the ranks stopped, the job was requeued, the restart did the rest
    assert "SIGUSR1" in text, text[-4000:]
    assert f"requeueing job {job}; it skips the images already done" in text, text[-4000:]
    assert f"job {job} (restart 1)" in text, \
        "the job finished before the signal reached it:\n" + text[-4000:]
    m = re.search(r"pseudo-masks: (\d+) written, (\d+) already there, 0 skipped", text)
    assert m, text[-4000:]
    written, existing = int(m.group(1)), int(m.group(2))
    assert existing >= 1 and written + existing == 64, (written, existing)
    assert len(re.findall(r"pseudo-masks: \d+ written", text)) == 1   # the first run was cut off
    assert "pseudo-mask inference exited with status 0" in text
    # a mask, CAMs and a sample in the pseudo-mask shards for every image
    keys = sorted(sample["__key__"] for path in sorted((shards / "shards").glob("*.tar"))
                  for _, sample in iter_tar_samples(str(path)) if sample is not None)
    assert len(keys) == 64
    assert sorted(f[:-4] for f in os.listdir(out / "masks") if not f.startswith(".")) == keys
    assert len([f for f in os.listdir(out / "cams") if f.endswith(".npz")]) == 64
    assert len(os.listdir(out / "panels")) == 4
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 64 and manifest["pseudo_masks"]["missing"] == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["mean_iou"] <= 1.0


@pytest.fixture(scope="module")
def val_shards(shards):
    root = shards / "valdata"
    synthetic.generate(str(root), 1, 16, seed=1, size=96, workers=1, progress=False)
    summary = shard.shard_voc(str(root), str(root / "saliency"), str(shards / "val_shards"),
                              split="val", shard_size=16, log=lambda *a: None)
    assert summary["exit_code"] == 0
    return shards / "val_shards"


def test_seg_script_trains_on_the_pseudo_masks_and_requeues_on_status_75(slurm, shards,
                                                                       pseudo_masks,
                                                                       val_shards):
    """slurm/train_seg.sh with configs/synthetic_seg.yaml on the pseudo-mask shards (one node,
    two tasks), the shards from EPSDIST_TRAIN_SHARDS / EPSDIST_VAL_SHARDS. After its first
    checkpoint the ranks (not the batch shell: `scancel --signal=USR1` without --batch) get
    SIGUSR1: segment.py checkpoints and exits with 75, and that status alone requeues the job,
    which resumes and evaluates on the val shards."""
    assert pseudo_masks[0] == 0, "the pseudo-mask job failed"
    max_iters = 40
    run_dir = shards / "runs" / "seg"
    args = [f"run.dir={run_dir}", f"train.max_iters={max_iters}", "eval.every=20",
            "run.save_every=5", "data.crop_size=64", "run.log_every=1", "run.panel_every=0"]
    proc, job, log = sbatch(slurm, shards, "train_seg.sh", ONE_NODE_TWO_GPUS, args, "seg",
                            EPSDIST_CONFIG="configs/synthetic_seg.yaml",
                            EPSDIST_TRAIN_SHARDS=str(pseudo_masks[4] / "shards"),
                            EPSDIST_VAL_SHARDS=str(val_shards))
    wait_for_checkpoint(run_dir, proc)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=job_env(slurm))
    rc, text, err = finish(proc, log)
    assert rc == 0, text[-4000:] + err
    assert "epsdist/segment.py --config configs/synthetic_seg.yaml --resume auto" in text
    assert "rank 1/2 local_rank 1 on node1" in text
    m = re.search(r"stopping at iteration (\d+) on SIGUSR1 \(checkpoint written\)", text)
    assert m, text[-4000:]
    stopped = int(m.group(1))
    assert "SIGUSR1 (time limit" not in text                  # the batch shell got no signal:
    assert "trainer exited with status 75" in text            # the status requeued the job
    assert f"requeueing job {job}" in text and f"job {job} (restart 1)" in text
    assert re.search(rf"resumed from \S+iter_{stopped:08d} at iteration {stopped}\n", text)
    assert text.rstrip().endswith("trainer exited with status 0")
    report = json.loads((run_dir / "report.json").read_text())
    assert [h["iteration"] for h in report["history"]] == [20, 40]
    assert report["iteration"] == max_iters and 0.0 <= report["mean_iou"] <= 1.0
    assert report["train_shards"] == str(pseudo_masks[4] / "shards")
    assert report["val_shards"] == str(val_shards) and report["images"] == 16
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{max_iters:08d}"
    assert (run_dir / "export" / "model.pt").exists()
