"""Pseudo-mask inference: masks against an independent multi-scale computation, CAM files,
panels, pseudo-mask shards, the report, resumability and the 2-rank split."""
import io
import json
import os
import subprocess
import sys

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


def expected_mask(model, sample, scales=(0.5, 1.0, 1.5, 2.0), thr=0.2):
    """Independent computation of the pseudo-mask of one sample (PIL decode, each scale resized
    with PIL's bicubic as the released code does, one view at a time)."""
    pil = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
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
