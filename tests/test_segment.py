"""Segmentation stage: two CPU ranks through the real `deepspeed` launcher on the synthetic
recipe (the loss falls, val mIoU beats predicting background everywhere, resume equals an
uninterrupted run, the saved predictions re-evaluate to the same mIoU with epsdist.evaluate),
evaluation of a checkpoint on another world size, config errors before any process group, the
DeepLab networks, the DeepLab augmentation and the mask loader."""
import io
import json
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from epsdist import groundtruth, scoring
from epsdist import metrics as M
from epsdist.config import ConfigError, SegConfig, SegModelConfig, load_config
from epsdist.data import shard, synthetic
from epsdist.data.augment import IGNORE_INDEX, MEAN_U8, SegAugment, decode_mask
from epsdist.data.loader import ShardLoader
from epsdist.data.manifest import (FORMAT, iter_rank_samples, iter_tar_samples, read_manifest,
                                   sha256_file, write_manifest)
from epsdist.dist import free_port
from epsdist.models import param_groups
from epsdist.seg.models import ASPPv2, build_seg_model
from epsdist.seg.step import resolve_batch, seg_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
SEGMENT = os.path.join(REPO, "epsdist", "segment.py")
CONFIG = os.path.join(REPO, "configs", "synthetic_seg.yaml")
N = 20                                            # crash / evaluation / checkpoint point
COMMON = ("data.train_shards=shards/train", "data.val_shards=shards/val", "run.log_every=1",
          f"run.save_every={N}", f"eval.every={N}", "run.panel_every=10",
          f"train.max_iters={2 * N}")


def run(cmd, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def deepspeed_segment(tmp, *overrides, extra=()):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), SEGMENT,
           "--config", CONFIG, *extra, *COMMON, *overrides]
    return run(cmd, cwd=tmp)


def python_segment(tmp, *overrides, extra=()):
    return run([sys.executable, SEGMENT, "--config", CONFIG, *extra, *COMMON, *overrides],
               cwd=tmp)


def metrics(run_dir):
    """(iteration -> loss, iteration -> val mIoU), the last line winning."""
    loss, miou = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "loss/seg" in m:
                loss[m["iteration"]] = m["loss/seg"]
            if "val/miou" in m:
                miou[m["iteration"]] = m["val/miou"]
    return loss, miou


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic train shards (their ground truth stands in for the pseudo-masks of
    epsdist/infer.py: same format) and ground-truth val shards."""
    root = tmp_path_factory.mktemp("seg")
    synthetic.generate(str(root / "data"), 160, 48, seed=0, size=96, workers=1, progress=False)
    for split in ("train", "val"):
        summary = shard.shard_voc(str(root / "data"), str(root / "data" / "saliency"),
                                  str(root / "shards" / split), split=split, shard_size=40,
                                  log=lambda *a: None)
        assert summary["exit_code"] == 0
    return root


def all_background_miou(val_dir):
    """mIoU of predicting background everywhere, from the val ground truth itself."""
    K = synthetic.NUM_CLASSES + 1
    conf = np.zeros((K, K), np.int64)
    for _, gt, _ in groundtruth.iter_ground_truth(str(val_dir)):
        conf += M.confusion_matrix(np.zeros_like(gt), gt, K)
    return M.metrics(conf)["mean_iou"]


# ------------------------------------------------------------------------------ end to end

def test_two_ranks_learn_beat_background_and_resume_exactly(shards):
    full = deepspeed_segment(shards, "run.dir=runs/full")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    crashed = deepspeed_segment(shards, "run.dir=runs/resumed", extra=("--stop-after", str(N)))
    assert crashed.returncode != 0
    assert not os.path.exists(shards / "runs/resumed/export/model.pt")
    resumed = deepspeed_segment(shards, "run.dir=runs/resumed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at iteration {N}" in resumed.stdout

    (loss_a, miou_a), (loss_b, miou_b) = (metrics(shards / "runs/full"),
                                          metrics(shards / "runs/resumed"))
    assert sorted(loss_a) == sorted(loss_b) == list(range(1, 2 * N + 1))
    for it in loss_a:
        assert loss_a[it] == pytest.approx(loss_b[it], rel=1e-5, abs=1e-7), it
    assert sorted(miou_a) == sorted(miou_b) == [N, 2 * N]
    assert miou_a == pytest.approx(miou_b, rel=1e-6)
    losses = [loss_a[i] for i in sorted(loss_a)]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])                  # it learns

    report = json.loads((shards / "runs/full/report.json").read_text())
    baseline = all_background_miou(shards / "shards/val")
    assert report["iteration"] == 2 * N and report["images"] == 48
    assert report["all_background_mean_iou"] == pytest.approx(baseline)
    assert report["mean_iou"] == pytest.approx(miou_a[2 * N])
    assert report["mean_iou"] > baseline + 0.1, (report["mean_iou"], baseline)
    assert [h["iteration"] for h in report["history"]] == [N, 2 * N]
    resumed_report = json.loads((shards / "runs/resumed/report.json").read_text())
    assert [h["iteration"] for h in resumed_report["history"]] == [N, 2 * N]
    assert report["class_names"] == ["background", *synthetic.CLASSES]

    # the written predictions, evaluated by epsdist.evaluate, give the same numbers
    pred_dir = shards / f"runs/full/val_pred/iter_{2 * N:08d}"
    again = scoring.evaluate(str(pred_dir), str(shards / "shards/val"), None)
    assert again["images"] == 48 and again["missing"] == 0
    assert again["mean_iou"] == pytest.approx(report["mean_iou"], abs=1e-12)
    assert again["confusion_matrix"] == report["confusion_matrix"]

    run_dir = shards / "runs/full"
    export = torch.load(run_dir / "export/model.pt", weights_only=False)
    assert export["num_maps"] == 5 and export["classes"] == list(synthetic.CLASSES)
    assert export["config"]["model"]["arch"] == "deeplabv2"
    ckpts = sorted(p for p in os.listdir(run_dir / "checkpoints") if p.startswith("iter_"))
    assert ckpts == [f"iter_{N:08d}", f"iter_{2 * N:08d}"]
    saved = load_config(str(run_dir / "config.yaml"), cls=SegConfig)
    assert saved.train.batch_size == 4 and saved.train.global_batch_size == 8   # 8 over 2 ranks
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tb"))

    # the 2-rank checkpoint evaluated by one process, multi-scale + flip
    out = python_segment(shards, "run.dir=runs/full", "eval.scales=[0.75,1.0,1.25]",
                         "eval.flip=true", extra=("--eval-only",))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["eval"] == {"scales": [0.75, 1.0, 1.25], "flip": True, "crf": False}
    assert report["mean_iou"] > baseline + 0.1
    assert [h["iteration"] for h in report["history"]] == [N, 2 * N, 2 * N]
    again = scoring.evaluate(str(run_dir / f"val_pred/iter_{2 * N:08d}_eval"),
                              str(shards / "shards/val"), None)
    assert again["mean_iou"] == pytest.approx(report["mean_iou"], abs=1e-12)


def test_non_finite_loss_stops_the_run(shards, tmp_path):
    """NaN backbone weights (a tiny-backbone weights file) -> the collective check stops."""
    from epsdist.models.tiny import TinyBackbone
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in TinyBackbone().state_dict().items()}
    torch.save(state, tmp_path / "nan.pt")
    out = python_segment(shards, "run.dir=runs/nan", f"model.weights={tmp_path / 'nan.pt'}")
    assert out.returncode != 0
    assert "non-finite loss at iteration 1" in out.stderr


@pytest.mark.parametrize("override,message", [
    ("data.num_classes=20", "data.num_classes"),                 # pseudo-mask class count
    ("data.train_shards=nowhere", "data.train_shards"),
    ("data.val_shards=", "data.val_shards"),
    ("train.global_batch_size=6", "train.global_batch_size"),    # grad_accum=4 is derived (1)
    ("model.weights=missing.pth", "model.weights"),
    ("model.arch=deeplabv3", "model.backbone"),                  # deeplabv3 needs a resnet
    ("data.scale_range=[1.5,0.5]", "data.scale_range"),
    ("eval.scales=[]", "eval.scales"),
    ("eval.every=-1", "eval.every"),
    ("trian.lr=0.1", "trian"),
])
def test_config_errors_before_any_process_group(shards, override, message, monkeypatch):
    from epsdist import segment
    monkeypatch.chdir(shards)
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match=message):
        segment.main(["--config", CONFIG, *COMMON, "train.grad_accum=4", override])
    assert not torch.distributed.is_initialized()


def test_class_mismatch_between_train_and_val_shards(shards, tmp_path, monkeypatch):
    from epsdist import segment
    other = tmp_path / "val"
    other.mkdir()
    manifest = read_manifest(str(shards / "shards/val"))
    for s in manifest["shards"]:
        os.symlink(shards / "shards/val" / s["name"], other / s["name"])
    write_manifest(str(other), {**manifest, "classes": ["a", "b", "c", "d"]})
    monkeypatch.chdir(shards)
    with pytest.raises(ConfigError, match="different classes"):
        segment.main(["--config", CONFIG, *COMMON, f"data.val_shards={other}"])
    assert not torch.distributed.is_initialized()


def test_crf_without_the_package_is_a_config_error(shards, monkeypatch):
    from epsdist import segment
    monkeypatch.chdir(shards)
    monkeypatch.setitem(sys.modules, "pydensecrf", None)           # import fails
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ConfigError, match="eval.crf.*pydensecrf"):
        segment.main(["--config", CONFIG, *COMMON, "eval.crf=true"])
    assert not torch.distributed.is_initialized()


def test_global_batch_size_splits_over_ranks():
    cfg = load_config(None, ["train.global_batch_size=10"], cls=SegConfig)
    assert resolve_batch(cfg, 1).train.batch_size == 10
    assert resolve_batch(cfg, 2).train.batch_size == 5
    assert resolve_batch(cfg, 10).train.batch_size == 1
    with pytest.raises(ConfigError, match="global_batch_size"):
        resolve_batch(cfg, 8)
    per_rank = load_config(None, ["train.global_batch_size=0", "train.batch_size=3"],
                           cls=SegConfig)
    assert resolve_batch(per_rank, 8).train.batch_size == 3


def test_recipes_load():
    voc = load_config(os.path.join(REPO, "configs", "voc_seg.yaml"), cls=SegConfig)
    assert (voc.model.arch, voc.model.backbone, voc.model.output_stride) == \
        ("deeplabv2", "resnet101", 8)
    assert voc.model.aspp_rates == (6, 12, 18, 24) and voc.data.crop_size == 321
    assert voc.train.global_batch_size == 10 and voc.train.lr == 2.5e-4
    assert voc.train.max_iters == 20000 and voc.data.scale_range == (0.5, 1.5)
    coco = load_config(os.path.join(REPO, "configs", "coco_seg.yaml"), cls=SegConfig)
    assert coco.data.num_classes == 80
    assert load_config(CONFIG, cls=SegConfig).model.backbone == "tiny"


# ------------------------------------------------------------------------------ models

def test_deeplabv2_shapes_stride_head_and_groups():
    model = build_seg_model(SegModelConfig(arch="deeplabv2", backbone="resnet101"), 20,
                            log=lambda m: None).train()
    assert isinstance(model.head, ASPPv2) and model.head.rates == (6, 12, 18, 24)
    assert [c.dilation for c in model.head.branches] == [(r, r) for r in (6, 12, 18, 24)]
    assert all(c.kernel_size == (3, 3) and c.in_channels == 2048 for c in model.head.branches)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 65, 65))
    assert out.shape == (2, 21, 9, 9)                             # ceil(65 / 8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training or m.weight.requires_grad for m in bns)   # frozen BN
    assert model.backbone.conv1.weight.requires_grad                # every conv trains
    groups = {g["name"]: g for g in param_groups(model)}
    assert groups["head_weight"]["lr_mult"] == 10 and len(groups["head_weight"]["params"]) == 4
    assert groups["head_bias"]["lr_mult"] == 20 and not groups["head_bias"]["weight_decay_on"]
    assert groups["backbone_weight"]["lr_mult"] == 1
    os16 = build_seg_model(SegModelConfig(backbone="resnet50", output_stride=16), 3,
                           log=lambda m: None)
    with torch.no_grad():
        assert os16(torch.randn(1, 3, 65, 65)).shape == (1, 4, 5, 5)


def test_deeplabv3_and_tiny_shapes_and_imagenet_weights(tmp_path):
    import torchvision
    tv = torchvision.models.resnet50()
    torch.save(tv.state_dict(), tmp_path / "r50.pth")
    for arch in ("deeplabv3", "deeplabv2"):
        cfg = SegModelConfig(arch=arch, backbone="resnet50", weights=str(tmp_path / "r50.pth"))
        lines = []
        model = build_seg_model(cfg, 4, log=lines.append).eval()
        assert any("loaded" in line for line in lines), lines
        assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)
        assert torch.equal(model.backbone.layer4[2].bn3.running_var, tv.layer4[2].bn3.running_var)
        with torch.no_grad():
            assert model(torch.randn(1, 3, 65, 65)).shape == (1, 5, 9, 9)
    tiny = build_seg_model(SegModelConfig(backbone="tiny", aspp_rates=(1, 2)), 4,
                           log=lambda m: None)
    assert tiny(torch.randn(2, 3, 96, 96)).shape == (2, 5, 12, 12)


def test_loss_upsamples_logits_and_ignores_255():
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    mask = torch.randint(0, 5, (2, 32, 32))
    mask[:, :8] = IGNORE_INDEX
    up = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear",
                                         align_corners=False)
    ref = torch.nn.functional.cross_entropy(up[:, :, 8:], mask[:, 8:])
    assert seg_loss(logits, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    empty = seg_loss(logits, torch.full((2, 32, 32), IGNORE_INDEX))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------ data

def blocks(seed, h=70, w=90, cell=10, classes=5):
    """A mask of cell x cell blocks of random classes and an image whose grey level is
    40 x class, so every pixel's class can be read back from the image."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, classes, (h // cell + 1, w // cell + 1))
    mask = np.kron(grid, np.ones((cell, cell), np.int64))[:h, :w].astype(np.uint8)
    image = np.repeat((40 * mask)[..., None], 3, axis=2).astype(np.uint8)
    return image, mask


def closest_class(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per pixel, the class among the mask's 3x3 neighbourhood whose grey level (40 x class)
    is closest to the image's. Bilinear blends only neighbouring source pixels, and an aligned
    nearest-neighbour mask takes the source pixel of the largest weight: the two agree."""
    H, W = mask.shape
    padded = np.pad(mask.astype(int), 1, constant_values=IGNORE_INDEX)
    best, dist = np.full((H, W), -1), np.full((H, W), 10 ** 9)
    for dy in range(3):
        for dx in range(3):
            c = padded[dy:dy + H, dx:dx + W]
            d = np.where(c != IGNORE_INDEX, np.abs(img - 40 * c), 10 ** 9)
            best, dist = np.where(d < dist, c, best), np.minimum(d, dist)
    return best


def test_seg_augment_keeps_image_and_mask_aligned_and_pads_with_255():
    aug = SegAugment(scale_range=(0.5, 1.5), crop_size=96)
    padded, agree, agree_shifted = 0, [], []
    for seed in range(40):
        image, mask = blocks(seed)
        img, m = aug(image, mask, random.Random(seed))
        assert img.shape == (3, 96, 96) and m.shape == (96, 96)
        assert img.dtype == m.dtype == torch.uint8
        img, m = img.numpy().astype(int), m.numpy()
        assert set(np.unique(m)) <= set(range(5)) | {IGNORE_INDEX}
        pad = m == IGNORE_INDEX
        padded += pad.any()
        assert (img[:, pad] == np.array(MEAN_U8)[:, None]).all()     # padding: mean colour
        labelled = ~pad
        assert (img[:, labelled] == img[0, labelled]).all()            # grey: no colour jitter
        agree.append((closest_class(img[0], m)[labelled] == m[labelled]).mean())
        shifted = np.roll(m, 1, axis=1)                               # misaligned by a pixel
        ok = shifted != IGNORE_INDEX
        agree_shifted.append((closest_class(img[0], shifted)[ok] == shifted[ok]).mean())
    assert min(agree) > 0.97 and np.mean(agree) > 0.985, agree       # measured: 0.986 / 0.994
    assert np.mean(agree_shifted) < 0.95                              # the check can tell
    assert padded > 5                                                 # small scales pad


def test_decode_mask_reads_palette_indices_not_colours():
    from epsdist.data.masks import encode_mask
    mask = np.array([[0, 1, 2], [15, 255, 3]], np.uint8)
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)      # infer.py's pseudo-masks
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")                    # the shard writers' L PNGs
    assert np.array_equal(decode_mask(buf.getvalue()), mask)


def test_mask_loader_batches_resume_and_skip_bad_masks(shards, tmp_path):
    src = str(shards / "shards/val")
    manifest = read_manifest(src)
    # a copy of the val shards with one mask holding value 9 (> C = 4) and one missing
    out = tmp_path / "bad"
    out.mkdir()
    keys = [s["__key__"] for _, s in iter_rank_samples(src, manifest)]
    bad_values, no_mask = keys[3], keys[5]
    entries = []
    for entry in manifest["shards"]:
        path = out / entry["name"]
        with tarfile.open(path, "w") as tar:
            for _, sample in iter_tar_samples(os.path.join(src, entry["name"])):
                key = sample["__key__"]
                if key == bad_values:
                    seg = decode_mask(sample["seg.png"])
                    seg[:4] = 9
                    buf = io.BytesIO()
                    Image.fromarray(seg).save(buf, format="PNG")
                    sample["seg.png"] = buf.getvalue()
                if key == no_mask:
                    del sample["seg.png"]
                for field, data in sample.items():
                    if field.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append({**entry, "sha256": sha256_file(path)})
    write_manifest(str(out), {**manifest, "shards": entries, "format": FORMAT})
    aug = SegAugment(crop_size=64)
    kw = dict(batch_size=4, rank=1, world_size=2, num_workers=1, seed=5, augment=aug)
    loader = ShardLoader(str(out), **kw)
    reference = list(loader)
    assert len(reference) == 48 // 8
    for b in reference:
        assert b.saliency is None and b.image.dtype == torch.float32
        assert b.image.shape == (4, 3, 64, 64)
        assert b.mask.shape == (4, 64, 64) and b.mask.dtype == torch.int64
        assert set(b.mask.unique().tolist()) <= set(range(5)) | {IGNORE_INDEX}
        assert b.labels.shape == (4, 4)
    other = ShardLoader(str(out), **{**kw, "rank": 0})
    served = {k for b in reference + list(other) for k in b.keys}
    assert loader.skipped + other.skipped == {"mask values outside 0..C and 255": 1,
                                              "missing mask": 1}
    assert not served & {bad_values, no_mask}                 # replaced, never served
    first = ShardLoader(str(out), **kw)
    head = [b for _, b in zip(range(2), first)]
    resumed = ShardLoader(str(out), **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(head + list(resumed), reference):
        assert a.keys == b.keys
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)


def test_rank_split_of_the_val_shards_covers_every_sample_once(shards):
    src = str(shards / "shards/val")
    manifest = read_manifest(src)
    got = [i for r in range(3) for i, _ in iter_rank_samples(src, manifest, r, 3)]
    assert sorted(got) == list(range(48))
    assert [i for i, _ in iter_rank_samples(src, manifest, 1, 2, limit=7)] == [1, 3, 5]


def test_dense_crf_refines_probabilities_when_installed():
    pytest.importorskip("pydensecrf.densecrf")
    from epsdist.seg.eval import dense_crf
    ecfg = SegConfig().eval
    image, mask = blocks(0, h=40, w=40)
    probs = np.full((5, 40, 40), 0.1, np.float32)
    probs[mask, np.arange(40)[:, None], np.arange(40)[None]] = 0.6
    q = dense_crf(image, probs, ecfg)
    assert q.shape == probs.shape and np.allclose(q.sum(0), 1, atol=1e-4)
    assert (q.argmax(0) == mask).mean() > 0.95
