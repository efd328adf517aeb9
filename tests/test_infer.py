"""Pseudo-mask inference: masks against an independent multi-scale computation, CAM files,
panels, pseudo-mask shards, the report, resumability and the 2-rank split."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from epsdist.config import load_config, to_dict
from epsdist.data import shard, synthetic, verify
from epsdist.data.augment import IMAGENET_MEAN, IMAGENET_STD
from epsdist.data.manifest import iter_tar_samples, read_manifest, shard_paths
from epsdist.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(REPO, "epsdist", "infer.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
CONFIG = os.path.join(REPO, "configs", "synthetic_eps.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    synthetic.generate(str(root / "data"), 10, 0, seed=1, size=80, workers=1, progress=False)
    assert shard.shard_voc(str(root / "data"), str(root / "data" / "saliency"), str(root / "shards"),
                           split="train", shard_size=4, log=lambda *a: None)["exit_code"] == 0
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, log=lambda m: None)
    with torch.no_grad():               # make the head favour some classes so masks are varied
        model.head.weight.mul_(20)
    os.makedirs(root / "export")
    torch.save({"state_dict": model.state_dict(), "config": to_dict(cfg),
                "classes": list(synthetic.CLASSES), "num_maps": 5, "iteration": 0},
               root / "export" / "model.pt")
    return root, model


def infer(root, out, *extra, launcher=None):
    cmd = [sys.executable, INFER] if launcher is None else launcher + [INFER]
    cmd += ["--config", CONFIG, "--checkpoint", str(root / "export" / "model.pt"),
            "--shards", str(root / "shards"), "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)                 # CPU -> the reference post-processing
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def samples(root):
    m = read_manifest(str(root / "shards"))
    for path in shard_paths(str(root / "shards"), m):
        for _, s in iter_tar_samples(path):
            yield s


def expected_mask(model, sample, scales=(0.5, 1.0, 1.5, 2.0), thr=0.2, size=None):
    """Independent computation of the pseudo-mask of one sample (PIL decode, each scale resized
    with PIL's bicubic as the released code does, one view at a time); ``size=(w, h)``: computed
    on the image first resized to that size (Pillow bilinear: infer.max_side)."""
    pil = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    if size is not None:
        pil = pil.resize(size, Image.BILINEAR)
    W, H = pil.size
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    labels = json.loads(sample["cls.json"])
    acc = torch.zeros(4, H, W, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for s in scales:
            size = (round(W * s), round(H * s))
            im = pil if size == pil.size else pil.resize(size, Image.BICUBIC)
            xs = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
            xs = (xs - mean) / std
            for flip in (False, True):
                p = torch.softmax(model(xs.flip(-1) if flip else xs), dim=1)
                up = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)[0]
                acc += (up.flip(-1) if flip else up)[:4].double()
    classes = [c for c in range(4) if labels[c]]
    norm = acc[classes] / (acc[classes].amax(dim=(1, 2), keepdim=True) + 1e-5)
    scores = torch.cat([torch.full((1, H, W), thr, dtype=torch.float64), norm])
    top2 = scores.topk(2, dim=0).values
    idx = scores.argmax(0)
    mask = torch.tensor([0] + [c + 1 for c in classes])[idx].numpy()
    # near ties: pixels whose two best scores are within 1e-2 (a 1-2 grey level rounding
    # difference between torchvision's uint8 bicubic and PIL's moves a few of them)
    return mask, (top2[0] - top2[1]).numpy() < 1e-2


def test_masks_cams_panels_shards_and_report(setup):
    root, model = setup
    out = root / "out"
    res = infer(root, out, "--cams", "--panels", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    keys = []
    for s in samples(root):
        key = s["__key__"]
        keys.append(key)
        mask = np.asarray(Image.open(out / "masks" / f"{key}.png"))
        want, near_tie = expected_mask(model, s)
        assert mask.shape == want.shape
        assert (mask[~near_tie] == want[~near_tie]).all(), key
        assert (mask != want).mean() < 0.005, key
        cams = np.load(out / "cams" / f"{key}.npz")
        labels = json.loads(s["cls.json"])
        assert list(cams["classes"]) == [c for c in range(4) if labels[c]]
        assert cams["cams"].shape == (len(cams["classes"]),) + mask.shape
        assert cams["cams"].max() <= 1.0 + 1e-3
    assert len(os.listdir(out / "panels")) == 3
    assert verify.verify(str(out / "shards")) == []
    for s in (x for p in shard_paths(str(out / "shards"), read_manifest(str(out / "shards")))
              for _, x in iter_tar_samples(p)):
        assert s["seg.png"] == (out / "masks" / f"{s['__key__']}.png").read_bytes()
    assert sorted(s["__key__"] for s in samples(root)) == sorted(keys)
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["mean_iou"] <= 1 and report["images"] == len(keys)
    assert "pseudo-mask mIoU" in res.stdout

    again = infer(root, out, "--cams")                      # resumable: nothing to redo
    assert again.returncode == 0
    assert f"0 written, {len(keys)} already there" in again.stdout


def test_two_ranks_split_the_images_and_agree_with_one(setup, tmp_path):
    root, _ = setup
    port = str(20000 + os.getpid() % 20000)
    res = infer(root, tmp_path / "two", "--no-shards",
                launcher=[DEEPSPEED, "--num_gpus", "2", "--master_port", port])
    assert res.returncode == 0, res.stderr[-3000:]
    one = root / "out" / "masks"
    if not one.exists():
        pytest.skip("needs the single-rank output of the test above")
    for name in os.listdir(one):
        assert (tmp_path / "two" / "masks" / name).read_bytes() == (one / name).read_bytes()


def test_bad_inputs_name_the_argument(setup, tmp_path):
    root, _ = setup
    res = subprocess.run([sys.executable, INFER, "--config", CONFIG, "--checkpoint",
                          str(tmp_path / "nope.pt"), "--shards", str(root / "shards"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode != 0 and "--checkpoint" in res.stderr
    export = torch.load(root / "export" / "model.pt", weights_only=False)
    export["classes"] = ["a", "b", "c", "d"]
    torch.save(export, tmp_path / "other.pt")
    res = subprocess.run([sys.executable, INFER, "--config", CONFIG, "--checkpoint",
                          str(tmp_path / "other.pt"), "--shards", str(root / "shards"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode != 0 and "classes" in res.stderr


def infer_injected(root, out, fail_key, *extra):
    """infer.py with an out-of-memory error injected into the inference of image ``fail_key``."""
    code = ("import sys, torch\n"
            "from epsdist import infer, infer_pipeline\n"
            "real = infer_pipeline.infer_group\n"
            "def failing(model, items, job):\n"
            f"    if any(it.key == {fail_key!r} for it in items):\n"
            "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 3.4 GiB')\n"
            "    return real(model, items, job)\n"
            "infer_pipeline.infer_group = failing\n"
            "sys.exit(infer.main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", code, "--config", CONFIG, "--checkpoint",
           str(root / "export" / "model.pt"), "--shards", str(root / "shards"), "--out", str(out),
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_capped_resolution_and_a_failing_image_is_a_named_skip(setup, tmp_path):
    """infer.max_side=48 on 80x80 images: masks keep the original size and equal the
    computation at 48x48 resized back (nearest); one image failing with out-of-memory is
    named and counted, the others are written, the report is made, the exit code is 1 (0 with
    --allow-skips)."""
    root, model = setup
    keys = [s["__key__"] for s in samples(root)]
    out = tmp_path / "capped"
    res = infer_injected(root, out, keys[3], "infer.max_side=48", "--no-shards")
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"skipping {keys[3]}: inference failed (OutOfMemoryError: CUDA out of memory" in res.stderr
    assert f"{len(keys) - 1} written, 0 already there, 1 skipped" in res.stdout
    assert (out / "report.json").exists() and not (out / "masks" / f"{keys[3]}.png").exists()
    for s in samples(root):
        if s["__key__"] == keys[3]:
            continue
        mask = np.asarray(Image.open(out / "masks" / f"{s['__key__']}.png"))
        W, H = Image.open(io.BytesIO(s["jpg"])).size
        assert max(H, W) > 48
        h, w = (round(H * 48 / max(H, W)), round(W * 48 / max(H, W)))
        want, near_tie = expected_mask(model, s, size=(w, h))
        up = lambda a: np.asarray(Image.fromarray(a.astype(np.uint8)).resize((W, H), Image.NEAREST))  # noqa: E731
        assert mask.shape == (H, W)
        ok = up(near_tie) == 0
        assert (mask[ok] == up(want)[ok]).all(), s["__key__"]
    again = infer_injected(root, out, keys[3], "infer.max_side=48", "--no-shards", "--allow-skips")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 written, {len(keys) - 1} already there, 1 skipped" in again.stdout


def infer_patched(root, out, patch, *extra, popen=False):
    """infer.py with ``patch`` (Python source, run first) applied."""
    code = f"import os, sys, time, torch\nfrom epsdist import infer\n{patch}\n" \
           "sys.exit(infer.main(sys.argv[1:]))\n"
    cmd = [sys.executable, "-c", code, "--config", CONFIG, "--checkpoint",
           str(root / "export" / "model.pt"), "--shards", str(root / "shards"), "--out", str(out),
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if popen:
        # a shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps an ignored SIGINT: give the child the default, as a terminal would
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_a_failed_write_stops_the_run_naming_the_file(setup, tmp_path):
    """The disk fills up while one mask is written (in a writer thread): exit 1, the error
    names the file, no summary claims the masks were made."""
    root, _ = setup
    key = sorted(s["__key__"] for s in samples(root))[4]
    patch = ("from epsdist import infer_outputs\n"
             "real = infer_outputs.atomic_write_bytes\n"
             "def full(path, data):\n"
             f"    if path.endswith(os.path.join('masks', {key!r} + '.png')):\n"
             "        raise OSError(28, 'No space left on device')\n"
             "    real(path, data)\n"
             "infer_outputs.atomic_write_bytes = full\n")
    res = infer_patched(root, tmp_path / "out", patch, "--no-shards")
    assert res.returncode == 1, res.stderr[-3000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert line and os.path.join("masks", f"{key}.png") in line[0], res.stderr[-3000:]
    assert "No space left on device" in line[0]
    assert "pseudo-masks:" not in res.stdout
    assert not (tmp_path / "out" / "masks" / f"{key}.png").exists()


def gone(proc) -> bool:
    import psutil
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_leaves_no_worker_behind_and_the_rerun_resumes(setup, tmp_path, signum):
    """SIGTERM / Ctrl-C in the middle of a run (2 decode workers, inference slowed down): the
    process exits through its cleanup (143 for SIGTERM), its decode workers are gone, no
    temporary file is left, and a rerun writes only the missing masks."""
    import psutil
    root, _ = setup
    n = len(list(samples(root)))
    slow = ("from epsdist import infer_pipeline\n"
            "real = infer_pipeline.infer_group\n"
            "def slow(*a):\n"
            "    time.sleep(1.0)\n"
            "    return real(*a)\n"
            "infer_pipeline.infer_group = slow\n")
    out = tmp_path / "out"
    proc = infer_patched(root, out, slow, "--no-shards", "infer.batch_images=1",
                         "infer.workers=2", popen=True)
    try:
        deadline = time.time() + 300
        while not (out / "masks").is_dir() or not list((out / "masks").glob("*.png")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 2
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGINT), err[-3000:]
    deadline = time.time() + 30
    while not all(gone(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert all(gone(w) for w in workers)
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert all(m.endswith(".png") and not m.startswith(".") for m in masks), masks
    assert 1 <= len(masks) < n
    again = infer(root, out, "--no-shards")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{n - len(masks)} written, {len(masks)} already there, 0 skipped" in again.stdout


def test_working_resolution_bounds_every_view(setup, tmp_path):
    from epsdist.config import InferConfig
    from epsdist.infer_guard import working_size
    from epsdist.infer_outputs import write_outputs
    from epsdist.infer_pipeline import Job, decode_sample, infer_group
    root, model = setup
    assert working_size(6000, 8000, 1024) == (768, 1024)
    assert working_size(375, 500, 1024) == (375, 500)
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return model(x)

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(buf, format="JPEG")
    sample = {"__key__": "big", "jpg": buf.getvalue(), "cls.json": b"[1,0,1,0]"}
    job = Job("", {}, str(tmp_path), InferConfig(max_side=64, impl="torch"), cams=True, panels=1)
    for d in job.dirs.values():
        os.makedirs(d)
    item = decode_sample(sample, 0, job)
    assert item.status == "ok" and tuple(item.image.shape) == (43, 64, 3)
    (result,) = infer_group(Recording().eval(), [item], job)
    write_outputs(item, result, job.dirs, cams=True)
    assert seen and max(max(s) for s in seen) <= 64 * max(job.icfg.scales)
    assert np.asarray(Image.open(tmp_path / "masks" / "big.png")).shape == (200, 300)
    cams = np.load(tmp_path / "cams" / "big.npz")
    assert cams["cams"].shape == (2, 200, 300)
    assert Image.open(tmp_path / "panels" / "big.png").size[1] == 43      # 64 * 200 / 300


def test_rerun_with_another_checkpoint_or_settings_is_refused(setup, tmp_path):
    """Resumption only with the same checkpoint (sha256) and settings; --overwrite replaces."""
    import shutil
    root, _ = setup
    if not (root / "out" / "masks").exists():
        pytest.skip("needs the output of test_masks_cams_panels_shards_and_report")
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    keys = sorted(before)

    res = infer(root, out, "infer.bg_threshold=0.3")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "infer.bg_threshold 0.2 (now 0.3)" in res.stderr and "--overwrite" in res.stderr
    assert "already there" not in res.stdout

    cfg = load_config(CONFIG, ["model.eps_head=false"])
    cam = build_model(cfg.model, 4, log=lambda m: None)
    torch.save({"state_dict": cam.state_dict(), "config": to_dict(cfg),
                "classes": list(synthetic.CLASSES), "num_maps": 4, "iteration": 0},
               tmp_path / "cam.pt")
    cmd = [sys.executable, INFER, "--config", CONFIG, "--checkpoint", str(tmp_path / "cam.pt"),
           "--shards", str(root / "shards"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "checkpoint_sha256" in res.stderr and "model 'eps' (now 'cam-baseline')" in res.stderr
    assert "model settings of --config are ignored" in res.stderr
    assert "model.eps_head: config True, checkpoint False" in res.stderr
    assert {p.name: p.read_bytes() for p in (out / "masks").iterdir()} == before

    res = infer(root, out, "--overwrite", "--no-shards", "infer.bg_threshold=0.3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(keys)} written, 0 already there" in res.stdout
    assert not (out / "shards" / "manifest.json").exists() and not list((out / "cams").iterdir())
    assert (out / "notes.txt").read_text() == "mine"
    state = json.loads((out / "infer_state.json").read_text())
    assert state["infer"]["bg_threshold"] == 0.3
    assert sorted(p.name for p in (out / "masks").iterdir()) == keys


def test_overrides_before_and_after_options(setup):
    root, _ = setup
    res = subprocess.run([sys.executable, INFER, "infer.flip=false", "--config", CONFIG,
                          "--checkpoint", "x.pt", "--shards", "s", "--out", "o",
                          "infer.bg_threshold=0.35", "--print-config"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "flip: false" in res.stdout and "bg_threshold: 0.35" in res.stdout


def test_config_error_is_one_line_and_exit_2(tmp_path):
    """A bad override stops infer.py before it reads anything: one line on stderr, exit 2."""
    res = subprocess.run([sys.executable, INFER, "--config", CONFIG, "--checkpoint",
                          str(tmp_path / "none.pt"), "--shards", str(tmp_path), "--out",
                          str(tmp_path / "out"), "infer.bg_threshold=abc"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "config error" in lines[0] and "infer.bg_threshold" in lines[0]
    assert not (tmp_path / "out").exists()
