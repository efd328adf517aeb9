"""The synthetic dataset: determinism, layout, mask semantics, the context/saliency structure
EPS needs (contexts always with their class, never salient), and the command line."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from epsdist.data import synthetic
from epsdist.data.synthetic import CLASSES, CONTEXTS, generate, render_sample

C = len(CLASSES)
BATCH = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def batch():
    return [render_sample(7, i, 112) for i in range(BATCH)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "serial"
    summary = generate(str(out), 12, 5, seed=3, size=80, workers=1, progress=False)
    return out, summary


def _files(root):
    """{relative path: bytes} of every file under root."""
    res = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            res[os.path.relpath(p, root)] = open(p, "rb").read()
    return res


def _read_ids(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------- constants


def test_classes_and_contexts_are_distinct_names():
    assert len(CLASSES) == 4 and len(CONTEXTS) == 4
    assert len(set(CLASSES) | set(CONTEXTS)) == 8
    assert synthetic.CONTEXT_OF == dict(zip(CLASSES, CONTEXTS))


def test_voc_palette_known_entries():
    pal = synthetic.voc_palette()
    assert len(pal) == 768
    assert pal[0:3] == [0, 0, 0]
    assert pal[3:6] == [128, 0, 0]
    assert pal[6:9] == [0, 128, 0]
    assert pal[255 * 3:255 * 3 + 3] == [224, 224, 192]


# ----------------------------------------------------------------------------- render_sample


def test_render_sample_shapes_and_dtypes(batch):
    s = batch[0]
    assert s["image"].shape == (112, 112, 3) and s["image"].dtype == np.uint8
    for key in ("seg", "ctx", "sal"):
        assert s[key].shape == (112, 112) and s[key].dtype == np.uint8
    assert all(isinstance(v, int) for v in s["labels"])
    s = render_sample(0, 0, 96)
    assert s["image"].shape == (96, 96, 3) and s["seg"].shape == (96, 96)


def test_render_is_deterministic_and_seed_dependent():
    a, b = render_sample(11, 5), render_sample(11, 5)
    for key in ("image", "seg", "ctx", "sal"):
        assert np.array_equal(a[key], b[key]), key
    assert a["labels"] == b["labels"]
    c = render_sample(12, 5)
    assert not np.array_equal(a["image"], c["image"])
    d = render_sample(11, 6)
    assert not np.array_equal(a["image"], d["image"])
    v = render_sample(11, 5, split="val")
    assert not np.array_equal(a["image"], v["image"])


def test_mask_values_and_labels(batch):
    for s in batch:
        seg, ctx = s["seg"], s["ctx"]
        assert set(np.unique(seg).tolist()) <= set(range(C + 1)) | {255}
        assert set(np.unique(ctx).tolist()) <= set(range(C + 1))
        present = sorted(int(v) for v in np.unique(seg) if 1 <= v <= C)
        assert s["labels"] == present
        assert 1 <= len(s["labels"]) <= 2                # at least one object, at most two
        assert (seg == 255).any()                        # VOC-style boundary band
        assert (seg == 0).mean() > 0.3                   # mostly background (incl. context)


def test_ignore_band_is_thin_and_on_object_boundaries(batch):
    for s in batch[:16]:
        seg = s["seg"]
        band = seg == 255
        obj = (seg >= 1) & (seg <= C)
        # the band hugs the objects: ignore pixels lie within 3 px of labelled object pixels,
        # except on thin parts (legs, a mast, wheel rims), which the band swallows, as in VOC
        grown = np.zeros_like(obj)
        p = np.pad(obj, 3)
        for dy in range(7):
            for dx in range(7):
                grown |= p[dy:dy + seg.shape[0], dx:dx + seg.shape[1]]
        assert (band & ~grown).sum() <= 0.25 * band.sum()
        assert band.sum() < obj.sum()                    # a band, not a blob
        assert not (band & (s["ctx"] > 0)).any()


def test_context_always_co_occurs_and_is_background(batch):
    for s in batch:
        seg, ctx = s["seg"], s["ctx"]
        for c in s["labels"]:
            region = ctx == c
            assert region.sum() > 100, f"class {CLASSES[c - 1]} without its {CONTEXTS[c - 1]}"
            assert (seg[region] == 0).all()              # context pixels are background
        # no context appears without its class
        assert set(np.unique(ctx).tolist()) - {0} <= set(s["labels"])


def test_contexts_are_large(batch):
    obj_px = sum(int(((s["seg"] >= 1) & (s["seg"] <= C)).sum()) for s in batch)
    ctx_px = sum(int((s["ctx"] > 0).sum()) for s in batch)
    assert ctx_px > obj_px                               # the context is a big, easy cue


def test_every_class_occurs(batch):
    seen = {c for s in batch for c in s["labels"]}
    assert seen == set(range(1, C + 1))
    assert any(len(s["labels"]) == 2 for s in batch) and any(len(s["labels"]) == 1 for s in batch)


def test_context_colour_differs_from_object_colour(batch):
    """Contexts are not object-coloured: per class, the mean colour of the object and that of
    its context are far apart."""
    for c in range(1, C + 1):
        obj = np.concatenate([s["image"][s["seg"] == c] for s in batch if c in s["labels"]])
        ctx = np.concatenate([s["image"][s["ctx"] == c] for s in batch if c in s["labels"]])
        d = np.linalg.norm(obj.mean(0).astype(float) - ctx.mean(0).astype(float))
        assert d > 40, (CLASSES[c - 1], d)


# ----------------------------------------------------------------------------- saliency


def _sal_stats(s):
    sal = s["sal"].astype(np.float64) / 255.0
    obj = (s["seg"] >= 1) & (s["seg"] <= C)
    return sal, obj, s["ctx"] > 0


def test_saliency_on_objects_not_on_contexts(batch):
    on_obj = np.mean([_sal_stats(s)[0][_sal_stats(s)[1]].mean() for s in batch])
    on_ctx = np.mean([_sal_stats(s)[0][_sal_stats(s)[2]].mean() for s in batch])
    assert on_obj > 0.5, on_obj
    assert on_ctx < 0.15, on_ctx
    for s in batch:                                      # never covers a context wholesale
        sal, obj, ctx = _sal_stats(s)
        assert (sal[ctx] > 0.5).mean() < 0.2
    assert all(s["sal"].max() > 128 for s in batch)


def test_saliency_is_blurred_not_binary(batch):
    s = batch[0]
    vals = np.unique(s["sal"])
    assert len(vals) > 20                                # soft edges


def test_saliency_has_missing_parts_and_distractors(batch):
    missing = distract = 0
    for s in batch:
        sal, obj, ctx = _sal_stats(s)
        inner = obj.copy()                               # object interior (3 px from any edge)
        for _ in range(3):
            inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            inner[[0, -1], :] = False
            inner[:, [0, -1]] = False
        for c in s["labels"]:
            part = inner & (s["seg"] == c)
            if part.sum() and (sal[part] < 0.3).mean() > 0.08:
                missing += 1
        near = np.zeros_like(obj)                        # pixels within 6 px of an object
        p = np.pad(obj | (s["seg"] == 255), 6)
        H, W = obj.shape
        for dy in range(0, 13, 2):
            for dx in range(0, 13, 2):
                near |= p[dy:dy + H, dx:dx + W]
        far_bg = (s["seg"] == 0) & ~ctx & ~near
        if (sal[far_bg] > 0.4).sum() >= 15:
            distract += 1
    n_obj = sum(len(s["labels"]) for s in batch)
    assert 0.05 * n_obj <= missing <= 0.5 * n_obj, (missing, n_obj)
    assert 0.03 * BATCH <= distract <= 0.45 * BATCH, distract


# ----------------------------------------------------------------------------- generate


def test_layout_and_id_lists(dataset):
    out, summary = dataset
    train = _read_ids(out / "ImageSets" / "Segmentation" / "train.txt")
    val = _read_ids(out / "ImageSets" / "Segmentation" / "val.txt")
    assert train == [f"syn_train_{i:06d}" for i in range(12)]
    assert val == [f"syn_val_{i:06d}" for i in range(5)]
    for sid in train + val:
        img = Image.open(out / "JPEGImages" / f"{sid}.jpg")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (80, 80)
        seg = Image.open(out / "SegmentationClass" / f"{sid}.png")
        assert seg.mode == "P" and seg.size == (80, 80)
        assert seg.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        ctx = Image.open(out / "SegmentationContext" / f"{sid}.png")
        sal = Image.open(out / "saliency" / f"{sid}.png")
        assert ctx.mode == "L" and sal.mode == "L"
    assert (out / "classes.txt").read_text().split("\n")[:-1] == list(CLASSES)
    pairs = [line.split() for line in (out / "contexts.txt").read_text().splitlines()]
    assert pairs == [[x, c] for x, c in zip(CONTEXTS, CLASSES)]
    assert not [p for p in _files(out) if p.endswith(".tmp") or os.path.basename(p).startswith(".")]
    assert summary["num_train"] == 12 and summary["num_val"] == 5
    assert summary["classes"] == list(CLASSES)
    assert sum(summary["class_counts"]["train"].values()) >= 12


def test_written_files_match_render_sample(dataset):
    out, _ = dataset
    s = render_sample(3, 4, 80, split="val")
    sid = "syn_val_000004"
    assert np.array_equal(np.asarray(Image.open(out / "SegmentationClass" / f"{sid}.png")), s["seg"])
    assert np.array_equal(np.asarray(Image.open(out / "SegmentationContext" / f"{sid}.png")), s["ctx"])
    assert np.array_equal(np.asarray(Image.open(out / "saliency" / f"{sid}.png")), s["sal"])
    jpg = np.asarray(Image.open(out / "JPEGImages" / f"{sid}.jpg")).astype(int)
    assert np.abs(jpg - s["image"]).mean() < 8                  # JPEG q90


def test_parallel_equals_serial_and_overwrite(dataset, tmp_path):
    out, _ = dataset
    par = tmp_path / "par"
    generate(str(par), 12, 5, seed=3, size=80, workers=2, progress=False)
    a, b = _files(out), _files(par)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".png") or name.endswith(".jpg") or name.endswith(".txt"):
            assert a[name] == b[name], name
    # regenerating into the same directory with another seed overwrites the files
    generate(str(par), 12, 5, seed=4, size=80, workers=1, progress=False)
    c = _files(par)
    assert c["SegmentationClass/syn_train_000000.png"] != a["SegmentationClass/syn_train_000000.png"]
    assert c["ImageSets/Segmentation/train.txt"] == a["ImageSets/Segmentation/train.txt"]


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate(str(tmp_path), 0, 1)
    with pytest.raises(ValueError, match="num_val"):
        generate(str(tmp_path), 1, -1)
    with pytest.raises(ValueError, match="size"):
        generate(str(tmp_path), 1, 1, size=32)
    assert not os.listdir(tmp_path)                             # nothing written


# ----------------------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "epsdist.data.synthetic", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_cli_generates(tmp_path):
    out = tmp_path / "cli"
    r = _cli("--out", str(out), "--num-train", "4", "--num-val", "2", "--seed", "1",
             "--size", "64", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert _read_ids(out / "ImageSets" / "Segmentation" / "train.txt") == \
        [f"syn_train_{i:06d}" for i in range(4)]
    assert len(os.listdir(out / "JPEGImages")) == 6
    assert Image.open(out / "JPEGImages" / "syn_val_000001.jpg").size == (64, 64)


@pytest.mark.parametrize("args,needle", [
    (["--num-train", "0", "--num-val", "1"], "--num-train must be >= 1"),
    (["--num-train", "2", "--num-val", "-1"], "--num-val must be >= 0"),
    (["--num-train", "2", "--num-val", "1", "--size", "32"], "--size must be >= 64"),
    (["--num-train", "x", "--num-val", "1"], "--num-train must be an integer"),
    (["--num-val", "1"], "--num-train"),
])
def test_cli_rejects_bad_arguments(tmp_path, args, needle):
    out = tmp_path / "bad"
    r = _cli("--out", str(out), *args)
    assert r.returncode != 0
    assert needle in r.stderr
    assert not out.exists()
