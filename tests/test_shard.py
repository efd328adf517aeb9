"""Shard writer (epsdist.data.shard) and checker (epsdist.data.verify) on tiny fixtures."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from epsdist.data import manifest as mf
from epsdist.data import shard, verify

# pycocotools' decode trips numpy 2's __array__ copy deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZES = [(37, 29), (41, 33), (23, 45), (50, 31), (29, 29), (33, 47), (45, 27)]  # (w, h)


def voc_palette():
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def save_palette_png(path, arr):
    """A VOC-style palette PNG whose indices are ``arr``."""
    p = Image.fromarray(arr.astype(np.uint8)).convert("P")  # L -> P keeps the values as indices
    p.putpalette(voc_palette())
    assert np.array_equal(np.asarray(p), arr)
    p.save(path)


def write_jpeg(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=85)


def write_gray(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(path)


def make_mask(w, h, classes):
    m = np.zeros((h, w), np.uint8)
    for j, c in enumerate(classes):
        m[2 + 3 * j: h // 2 + 3 * j, 3 + 2 * j: w // 2 + 2 * j] = c
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 255
    return m


@pytest.fixture
def voc(tmp_path):
    """7 JPEGs of odd sizes, palette masks with 255 borders, L saliency, train list."""
    root, sal = tmp_path / "VOC", tmp_path / "sal"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    sal.mkdir()
    ids, masks = [], {}
    for i, (w, h) in enumerate(SIZES):
        k = f"2007_{i:06d}"
        ids.append(k)
        write_jpeg(root / "JPEGImages" / f"{k}.jpg", w, h, i)
        masks[k] = make_mask(w, h, [1 + (i % 20), 1 + ((3 * i + 5) % 20)][: 1 + i % 2])
        save_palette_png(root / "SegmentationClass" / f"{k}.png", masks[k])
        write_gray(sal / f"{k}.png", w, h, 100 + i)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return {"root": root, "sal": sal, "ids": ids, "masks": masks, "tmp": tmp_path}


def read_tar(path):
    """[(key, {field: bytes})] in tar order."""
    samples = []
    with tarfile.open(path) as t:
        for m in t:
            key, _, field = m.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][field] = t.extractfile(m).read()
    return samples


def write_tar(path, samples):
    """The inverse of ``read_tar``: [(key, {field: bytes})] as the members of a new tar."""
    with tarfile.open(path, "w") as t:
        for key, fields in samples:
            for field, data in fields.items():
                ti = tarfile.TarInfo(f"{key}.{field}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))


def read_all(out):
    m = mf.read_manifest(str(out))
    samples = []
    for p in mf.shard_paths(str(out), m):
        samples += read_tar(p)
    return m, samples


def png_array(data):
    im = Image.open(io.BytesIO(data))
    assert im.mode == "L"
    return np.asarray(im)


def labels_of(mask):
    return [int(c in set(np.unique(mask).tolist())) for c in range(1, 21)]


def quiet(*a, **k):
    pass


# ----------------------------------------------------------------------------- VOC

def test_voc_roundtrip_deterministic(voc):
    outs = []
    for workers in (1, 2):
        out = voc["tmp"] / f"out{workers}"
        s = shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train",
                            shard_size=3, workers=workers, log=quiet)
        assert s["exit_code"] == 0 and s["num_samples"] == 7 and s["num_shards"] == 3
        outs.append(out)
    m1, m2 = (mf.read_manifest(str(o)) for o in outs)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert [s["name"] for s in m1["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["count"] for s in m1["shards"]] == [3, 3, 1]
    for s in m1["shards"]:
        assert mf.sha256_file(str(outs[0] / s["name"])) == s["sha256"]
    assert m1["source"] == "voc" and m1["split"] == "train" and m1["classes"] == list(shard.VOC_CLASSES)
    assert m1["fields"] == ["jpg", "sal.png", "cls.json", "seg.png"]
    assert m1["skipped"] == {} and m1["num_samples"] == 7
    assert sorted(os.listdir(outs[0])) == ["manifest.json"] + [s["name"] for s in m1["shards"]]

    _, samples = read_all(outs[0])
    assert [k for k, _ in samples] == voc["ids"]           # list order kept
    for k, f in samples:
        assert set(f) == {"jpg", "sal.png", "cls.json", "seg.png"}
        assert f["jpg"] == (voc["root"] / "JPEGImages" / f"{k}.jpg").read_bytes()
        assert f["sal.png"] == (voc["sal"] / f"{k}.png").read_bytes()    # L PNG stored as is
        np.testing.assert_array_equal(png_array(f["seg.png"]), voc["masks"][k])
        assert json.loads(f["cls.json"]) == labels_of(voc["masks"][k])
    assert verify.verify(str(outs[0])) == []


def test_voc_sbd_list_aug_masks_and_context(voc):
    root = voc["root"]
    (root / "SegmentationClassAug").mkdir()
    (root / "SegmentationContext").mkdir()
    aug = {}
    for k, (w, h) in zip(voc["ids"], SIZES):
        aug[k] = make_mask(w, h, [7])
        Image.fromarray(aug[k]).save(root / "SegmentationClassAug" / f"{k}.png")   # 8-bit gray
    k0 = voc["ids"][0]
    ctx = make_mask(*SIZES[0], [3])
    save_palette_png(root / "SegmentationContext" / f"{k0}.png", ctx)
    lst = voc["tmp"] / "train_aug.txt"
    lst.write_text("".join(f"/JPEGImages/{k}.jpg /SegmentationClassAug/{k}.png\n" for k in voc["ids"][:4]))
    out = voc["tmp"] / "out"
    s = shard.shard_voc(str(root), str(voc["sal"]), str(out), list_file=str(lst), log=quiet)
    assert s["exit_code"] == 0
    m, samples = read_all(out)
    assert m["split"] == "train_aug" and m["shards"][0]["name"] == "train_aug-000000.tar"
    assert [k for k, _ in samples] == voc["ids"][:4]
    assert m["fields"] == ["jpg", "sal.png", "cls.json", "seg.png", "ctx.png"]
    for k, f in samples:
        np.testing.assert_array_equal(png_array(f["seg.png"]), aug[k])
        assert json.loads(f["cls.json"]) == labels_of(aug[k])
        assert ("ctx.png" in f) == (k == k0)
    np.testing.assert_array_equal(png_array(samples[0][1]["ctx.png"]), ctx)
    assert verify.verify(str(out)) == []


def test_voc_contexts_txt_goes_into_the_manifest(voc):
    out = voc["tmp"] / "out"
    shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train", log=quiet)
    assert "contexts" not in read_all(out)[0]                  # no contexts.txt: no key
    (voc["root"] / "contexts.txt").write_text("water boat\nrails train\n")
    shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train", log=quiet)
    assert read_all(out)[0]["contexts"] == ["water", "rails"]
    assert verify.verify(str(out)) == []


def test_voc_classes_txt(voc):
    (voc["root"] / "classes.txt").write_text("\n".join(f"c{i}" for i in range(25)) + "\n")
    k = voc["ids"][0]
    mask = make_mask(*SIZES[0], [24])
    save_palette_png(voc["root"] / "SegmentationClass" / f"{k}.png", mask)
    out = voc["tmp"] / "out"
    s = shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train", log=quiet)
    assert s["exit_code"] == 0
    m, samples = read_all(out)
    assert m["classes"] == [f"c{i}" for i in range(25)]
    assert json.loads(samples[0][1]["cls.json"]) == [int(i == 23) for i in range(25)]


@pytest.mark.parametrize("kind", ["json", "npy"])
def test_voc_labels_file(voc, kind):
    ids = voc["ids"]
    given = {k: sorted({(3 * i) % 20, (7 * i + 1) % 20}) for i, k in enumerate(ids[:-1])}  # last absent
    if kind == "json":
        path = voc["tmp"] / "labels.json"
        path.write_text(json.dumps(given))
    else:
        path = voc["tmp"] / "cls_labels.npy"
        arrays = {}
        for k, v in given.items():
            a = np.zeros(20, np.float32)
            a[v] = 1
            arrays[k] = a
        np.save(path, arrays)
    os.unlink(voc["root"] / "SegmentationClass" / f"{ids[1]}.png")   # no mask: still fine
    out = voc["tmp"] / "out"
    lines = []
    s = shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train",
                        labels_file=str(path), log=lambda *a, **k: lines.append(a[0]))
    assert s["exit_code"] == 1 and s["skipped"] == {"no label": 1}
    assert any(line.startswith(f"{path}:") and ids[-1] in line for line in lines)
    m, samples = read_all(out)
    assert [k for k, _ in samples] == ids[:-1]
    for k, f in samples:
        assert json.loads(f["cls.json"]) == [int(c in given[k]) for c in range(20)]
        assert ("seg.png" in f) == (k != ids[1])
        if k != ids[1]:
            np.testing.assert_array_equal(png_array(f["seg.png"]), voc["masks"][k])
    assert verify.verify(str(out)) == []


def test_voc_labels_without_masks(voc):
    shutil.rmtree(voc["root"] / "SegmentationClass")
    path = voc["tmp"] / "labels.json"
    path.write_text(json.dumps({k: [0] for k in voc["ids"]}))
    out = voc["tmp"] / "out"
    s = shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train",
                        labels_file=str(path), log=quiet)
    assert s["exit_code"] == 0
    m, samples = read_all(out)
    assert m["fields"] == ["jpg", "sal.png", "cls.json"]
    bad = voc["tmp"] / "bad.json"
    bad.write_text(json.dumps({voc["ids"][0]: [20]}))
    with pytest.raises(shard.InputError, match="bad.json"):
        shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train",
                        labels_file=str(bad), log=quiet)


def test_voc_bad_samples(voc, capsys):
    root, sal, ids = voc["root"], voc["sal"], voc["ids"]
    os.unlink(root / "JPEGImages" / f"{ids[0]}.jpg")                       # missing image
    os.unlink(sal / f"{ids[1]}.png")                                       # missing saliency
    jpg = root / "JPEGImages" / f"{ids[2]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[: 200])                               # truncated JPEG
    bad = voc["masks"][ids[3]].copy()
    bad[5, 5], bad[6, 6] = 30, 254
    save_palette_png(root / "SegmentationClass" / f"{ids[3]}.png", bad)    # values 30, 254
    empty = np.full(voc["masks"][ids[4]].shape, 255, np.uint8)
    empty[3:-3, 3:-3] = 0
    save_palette_png(root / "SegmentationClass" / f"{ids[4]}.png", empty)  # no label
    write_gray(sal / f"{ids[5]}.png", 10, 10, 0)                           # size mismatch
    with open(root / "ImageSets/Segmentation/train.txt", "a") as f:
        f.write(f"{ids[6]}\n")                                             # duplicate id
    out = voc["tmp"] / "out"
    argv = ["voc", "--root", str(root), "--saliency", str(sal), "--split", "train", "--out", str(out)]
    assert shard.main(argv) == 1
    err = capsys.readouterr()
    assert f"{root / 'JPEGImages' / ids[0]}.jpg: missing image" in err.err
    assert f"{sal / ids[1]}.png: missing saliency" in err.err
    assert f"{jpg}: unreadable image" in err.err
    assert f"{root / 'SegmentationClass' / ids[3]}.png: bad mask values [30, 254]" in err.err
    assert f"{root / 'SegmentationClass' / ids[4]}.png: no label" in err.err
    assert f"{sal / ids[5]}.png: size mismatch" in err.err
    assert "duplicate id" in err.err
    expected = {"missing image": 1, "missing saliency": 1, "unreadable image": 1,
                "bad mask values": 1, "no label": 1, "size mismatch": 1, "duplicate id": 1}
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(expected.items()))
    assert f"wrote 1 samples in 1 shards to {out}; skipped 7 ({reasons})" in err.out
    m, samples = read_all(out)
    assert m["skipped"] == expected and len(m["skipped_examples"]) == 7
    assert m["skipped_examples"][0].startswith(f"{ids[0]}: missing image")
    assert [k for k, _ in samples] == [ids[6]]
    assert shard.main(argv + ["--allow-skips"]) == 0


def test_voc_no_sample_left(voc, capsys):
    shutil.rmtree(voc["sal"])
    voc["sal"].mkdir()
    out = voc["tmp"] / "out"
    argv = ["voc", "--root", str(voc["root"]), "--saliency", str(voc["sal"]), "--split", "train",
            "--out", str(out)]
    assert shard.main(argv) == 1
    assert "no samples to write" in capsys.readouterr().err
    assert not out.exists()


def test_saliency_conversion(voc):
    root, sal, ids = voc["root"], voc["sal"], voc["ids"]
    w, h = SIZES[0]
    rgb = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(sal / f"{ids[0]}.png")
    w1, h1 = SIZES[1]
    v16 = np.random.default_rng(2).integers(0, 65535, (h1, w1)).astype(np.uint16)
    Image.fromarray(v16).save(sal / f"{ids[1]}.png")
    w2, h2 = SIZES[2]
    pal = np.random.default_rng(3).integers(0, 5, (h2, w2)).astype(np.uint8)
    save_palette_png(sal / f"{ids[2]}.png", pal)
    out = voc["tmp"] / "out"
    assert shard.shard_voc(str(root), str(sal), str(out), split="train", log=quiet)["exit_code"] == 0
    _, samples = read_all(out)
    f = dict(samples)
    np.testing.assert_array_equal(png_array(f[ids[0]]["sal.png"]),
                                  np.asarray(Image.fromarray(rgb).convert("L")))
    np.testing.assert_array_equal(png_array(f[ids[1]]["sal.png"]),
                                  np.round(v16.astype(np.float64) * 255 / 65535).astype(np.uint8))
    luma = np.array([round(sum(c * k for c, k in zip(voc_palette()[3 * i: 3 * i + 3], (0.299, 0.587, 0.114))))
                     for i in range(5)])
    assert np.abs(png_array(f[ids[2]]["sal.png"]).astype(int) - luma[pal]).max() <= 1
    assert f[ids[3]]["sal.png"] == (sal / f"{ids[3]}.png").read_bytes()


def test_stale_shards_removed(voc):
    out = voc["tmp"] / "out"
    args = (str(voc["root"]), str(voc["sal"]), str(out))
    shard.shard_voc(*args, split="train", shard_size=2, log=quiet)
    assert len([f for f in os.listdir(out) if f.endswith(".tar")]) == 4
    (out / "other-000009.tar").write_bytes(b"x")
    shard.shard_voc(*args, split="train", shard_size=3, log=quiet)
    assert sorted(os.listdir(out)) == ["manifest.json", "other-000009.tar", "train-000000.tar",
                                       "train-000001.tar", "train-000002.tar"]
    assert verify.verify(str(out)) == []


def test_bad_inputs_exit_2(voc, capsys):
    root, sal, tmp = voc["root"], voc["sal"], voc["tmp"]
    out = tmp / "out"

    def run(*argv):
        code = shard.main(list(argv) + ["--out", str(out)])
        return code, capsys.readouterr().err

    cases = [
        (("voc", "--root", str(tmp / "nope"), "--saliency", str(sal), "--split", "train"), tmp / "nope"),
        (("voc", "--root", str(root), "--saliency", str(tmp / "nosal"), "--split", "train"), tmp / "nosal"),
        (("voc", "--root", str(root), "--saliency", str(sal), "--split", "val"),
         root / "ImageSets/Segmentation/val.txt"),
        (("voc", "--root", str(root), "--saliency", str(sal), "--list", str(tmp / "x.txt")), tmp / "x.txt"),
        (("voc", "--root", str(root), "--saliency", str(sal), "--split", "train", "--labels",
          str(tmp / "l.json")), tmp / "l.json"),
        (("coco", "--images", str(root / "JPEGImages"), "--annotations", str(tmp / "a.json"),
          "--saliency", str(sal)), tmp / "a.json"),
        (("coco", "--images", str(tmp / "imgs"), "--annotations", str(tmp / "a.json"),
          "--saliency", str(sal)), tmp / "imgs"),
    ]
    for argv, path in cases:
        code, err = run(*argv)
        assert code == 2, argv
        assert str(path) in err, (argv, err)
        assert not out.exists()
    shutil.rmtree(root / "JPEGImages")
    code, err = run("voc", "--root", str(root), "--saliency", str(sal), "--split", "train")
    assert code == 2 and str(root / "JPEGImages") in err and not out.exists()


def test_cli_subprocess(voc):
    out = voc["tmp"] / "out"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "epsdist.data.shard", "voc", "--root", str(voc["root"]),
                        "--saliency", str(voc["sal"]), "--split", "train", "--out", str(out),
                        "--shard-size", "4", "--workers", "2", "--prefix", "voc"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"wrote 7 samples in 2 shards to {out}; skipped 0" in r.stdout
    r = subprocess.run([sys.executable, "-m", "epsdist.data.verify", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "voc-000000.tar: 4 samples, ok" in r.stdout


# ----------------------------------------------------------------------------- verify

@pytest.fixture
def good_out(voc):
    out = voc["tmp"] / "out"
    shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train", shard_size=3, log=quiet)
    return out


def test_verify_good(good_out, capsys):
    assert verify.main([str(good_out)]) == 0
    o = capsys.readouterr().out
    assert "train-000001.tar: 3 samples, ok" in o and "ok, 7 samples in 3 shards" in o
    assert verify.main([str(good_out), "--quiet"]) == 0
    assert "train-000001" not in capsys.readouterr().out


def test_verify_modified_byte(good_out, capsys):
    p = good_out / "train-000001.tar"
    data = bytearray(p.read_bytes())
    data[1000] ^= 0xFF
    p.write_bytes(bytes(data))
    assert verify.main([str(good_out)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: sha256" in err
    assert "train-000000" not in err and "train-000002" not in err


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_verify_truncated(good_out, capsys, cut):
    p = good_out / "train-000000.tar"
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut)])
    assert verify.main([str(good_out)]) == 1
    err = capsys.readouterr().err
    assert "train-000000.tar:" in err and "Traceback" not in err
    assert verify.verify(str(good_out))


def test_verify_problems_name_key(good_out):
    """A sample that breaks the format is named by shard and key (manifest re-hashed to match)."""
    m = mf.read_manifest(str(good_out))
    p = good_out / "train-000002.tar"
    (key, fields), = read_tar(p)
    fields["cls.json"] = b"[1, 0]"
    fields["sal.png"] = shard._encode_png(np.zeros((3, 3), np.uint8))
    write_tar(p, [(key, fields)])
    m["shards"][2]["sha256"] = mf.sha256_file(str(p))
    (good_out / "train-000000.tar").rename(good_out / "copy.tar")
    shutil.copy(good_out / "train-000001.tar", good_out / "train-000000.tar")
    m["shards"][0]["sha256"] = m["shards"][1]["sha256"]
    mf.write_manifest(str(good_out), m)
    problems = verify.verify(str(good_out))
    assert any(x.startswith(f"train-000002.tar: {key}: cls.json") for x in problems)
    assert any(x.startswith(f"train-000002.tar: {key}: sal.png size") for x in problems)
    assert any(x.startswith("train-000001.tar:") and "duplicate key" in x for x in problems)


def test_verify_missing_manifest(good_out, capsys):
    os.unlink(good_out / "manifest.json")
    assert verify.main([str(good_out)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    (good_out / "manifest.json").write_text("{not json")
    assert verify.main([str(good_out)]) == 2


# ----------------------------------------------------------------------------- COCO

def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.fixture
def coco(tmp_path):
    images, sal = tmp_path / "train2014", tmp_path / "sal"
    images.mkdir()
    sal.mkdir()
    sizes = {1: (40, 30), 2: (36, 28), 3: (32, 32), 4: (30, 21), 5: (20, 20)}  # 5: no annotations
    imgs = []
    for i, (w, h) in sizes.items():
        fn = f"COCO_train2014_{i:012d}.jpg"
        write_jpeg(images / fn, w, h, i)
        write_gray(sal / f"{fn[:-4]}.png", w, h, 10 + i)
        imgs.append({"id": i, "file_name": fn, "width": w, "height": h})
    # Image 1: crowd (uncompressed RLE, airplane) under the big person; zebra on top of person,
    # listed first so only the area order puts it on top.
    crowd = np.zeros((30, 40), np.uint8)
    crowd[20:30, 25:40] = 1
    counts = []
    flat, cur, run = crowd.ravel(order="F"), 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    assert mask_utils.decode(mask_utils.frPyObjects({"size": [30, 40], "counts": counts}, 30, 40)).sum() == crowd.sum()
    # Image 2: compressed RLE airplane.
    plane = np.zeros((28, 36), np.uint8)
    plane[5:20, 3:30] = 1
    plane[8:12, 10:14] = 0
    plane_rle = mask_utils.encode(np.asfortranarray(plane))
    anns = [
        {"id": 11, "image_id": 1, "category_id": 90, "iscrowd": 0, "segmentation": [rect(10, 10, 20, 20)], "area": 100},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [rect(2, 2, 30, 25)], "area": 644},
        {"id": 13, "image_id": 1, "category_id": 5, "iscrowd": 1,
         "segmentation": {"size": [30, 40], "counts": counts}, "area": int(crowd.sum())},
        {"id": 21, "image_id": 2, "category_id": 5, "iscrowd": 0,
         "segmentation": {"size": plane_rle["size"], "counts": plane_rle["counts"].decode()}, "area": int(plane.sum())},
        {"id": 31, "image_id": 3, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [32, 32], "counts": [0, 1024]}, "area": 1024},
        {"id": 41, "image_id": 4, "category_id": 90, "iscrowd": 0,
         "segmentation": [[3.5, 2.2, 25.1, 4.8, 12.3, 19.6], [1, 1, 2, 2]], "area": 150},
        {"id": 42, "image_id": 4, "category_id": 1, "iscrowd": 0,
         "segmentation": [[14, 8, 29, 12, 28, 20, 12, 17]], "area": 70},
    ]
    cats = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    ann_path = tmp_path / "instances_train2014.json"
    ann_path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return {"images": images, "sal": sal, "ann": ann_path, "tmp": tmp_path, "crowd": crowd, "plane": plane}


def test_coco(coco):
    outs = []
    for workers in (1, 2):
        out = coco["tmp"] / f"out{workers}"
        s = shard.shard_coco(str(coco["images"]), str(coco["ann"]), str(coco["sal"]), str(out),
                             shard_size=2, workers=workers, log=quiet)
        # images 3 (crowd only) and 5 (no annotation) are expected exclusions, not failures
        assert s["exit_code"] == 0 and s["skipped"] == {}
        assert s["excluded"] == {"no annotations": 1, "only crowd annotations": 1}
        assert s["warnings"] == {"degenerate polygon": 1}          # image 4's 2-point polygon
        outs.append(out)
    m, samples = read_all(outs[0])
    assert m == mf.read_manifest(str(outs[1]))
    assert m["classes"] == ["person", "airplane", "zebra"] and m["split"] == "train2014"
    assert [s["count"] for s in m["shards"]] == [2, 1]
    assert m["skipped_examples"] == []
    assert m["excluded"] == {"no annotations": 1, "only crowd annotations": 1}
    assert m["warnings"] == {"degenerate polygon": 1}
    assert m["warning_examples"][0].startswith(str(coco["images"] / "COCO_train2014_000000000004.jpg"))
    f = dict(samples)
    assert list(f) == [f"COCO_train2014_{i:012d}" for i in (1, 2, 4)]
    for k, fields in f.items():
        assert fields["jpg"] == (coco["images"] / f"{k}.jpg").read_bytes()

    # Image 1: hand-computed. Person rect, zebra on top, crowd 255 only where no instance.
    expect = np.zeros((30, 40), np.uint8)
    expect[coco["crowd"] == 1] = 255
    expect[2:25, 2:30] = 1
    expect[10:20, 10:20] = 3
    seg1 = png_array(f["COCO_train2014_000000000001"]["seg.png"])
    np.testing.assert_array_equal(seg1, expect)
    assert json.loads(f["COCO_train2014_000000000001"]["cls.json"]) == [1, 0, 1]  # crowd-only airplane: no label
    # Image 2: compressed RLE.
    np.testing.assert_array_equal(png_array(f["COCO_train2014_000000000002"]["seg.png"]), coco["plane"] * 2)
    assert json.loads(f["COCO_train2014_000000000002"]["cls.json"]) == [0, 1, 0]
    # Image 4: float polygons vs pycocotools' COCO API (degenerate 2-point polygon ignored).
    api = COCO(str(coco["ann"]))
    tri = api.annToMask({**api.anns[41], "segmentation": [api.anns[41]["segmentation"][0]]})
    quad = api.annToMask(api.anns[42])
    expect = np.zeros((21, 30), np.uint8)
    big, small = (tri, quad) if tri.sum() >= quad.sum() else (quad, tri)
    expect[big == 1] = 3 if big is tri else 1
    expect[small == 1] = 3 if small is tri else 1
    assert tri.sum() > 0 and quad.sum() > 0 and (tri & quad).any()
    np.testing.assert_array_equal(png_array(f["COCO_train2014_000000000004"]["seg.png"]), expect)
    assert json.loads(f["COCO_train2014_000000000004"]["cls.json"]) == [1, 0, 1]
    assert verify.verify(str(outs[0])) == []


def test_coco_bad_annotations(coco, capsys):
    data = json.loads(coco["ann"].read_text())
    data["annotations"][0]["category_id"] = 7
    coco["ann"].write_text(json.dumps(data))
    out = coco["tmp"] / "out"
    assert shard.main(["coco", "--images", str(coco["images"]), "--annotations", str(coco["ann"]),
                       "--saliency", str(coco["sal"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(coco["ann"]) in err and "category_id 7" in err and not out.exists()


def test_coco_bad_samples(coco, capsys):
    data = json.loads(coco["ann"].read_text())
    data["annotations"][3]["segmentation"]["size"] = [10, 10]       # image 2: RLE of another size
    data["images"][3]["width"] = 31                                  # image 4: json size != image
    coco["ann"].write_text(json.dumps(data))
    out = coco["tmp"] / "out"
    s = shard.shard_coco(str(coco["images"]), str(coco["ann"]), str(coco["sal"]), str(out),
                         allow_skips=True)
    assert s["exit_code"] == 0 and s["num_samples"] == 1
    assert s["skipped"] == {"bad annotation": 1, "size mismatch": 1}
    err = capsys.readouterr().err
    assert f"{coco['images'] / 'COCO_train2014_000000000002.jpg'}: bad annotation" in err
    assert f"{coco['images'] / 'COCO_train2014_000000000004.jpg'}: size mismatch" in err


def test_coco_label_needs_pixels(coco, capsys):
    """A non-crowd annotation whose polygons are all degenerate (< 3 points) or cover no pixel
    gives no label: image 1 keeps person (rect) but loses zebra; image 2 loses its only class."""
    data = json.loads(coco["ann"].read_text())
    data["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]          # image 1 zebra: 2 points
    data["annotations"][3]["segmentation"] = [[5, 5, 6, 6, 7, 7]]    # image 2: collinear, no area
    coco["ann"].write_text(json.dumps(data))
    out = coco["tmp"] / "out"
    s = shard.shard_coco(str(coco["images"]), str(coco["ann"]), str(coco["sal"]), str(out),
                         log=quiet)
    assert s["skipped"] == {"no label": 1} and s["exit_code"] == 1
    # warnings count kept samples: image 1 (zebra) and image 4 (its 2-point polygon)
    assert s["warnings"] == {"degenerate polygon": 2, "empty annotation": 1}
    _, samples = read_all(out)
    f = dict(samples)
    assert "COCO_train2014_000000000002" not in f
    seg1 = png_array(f["COCO_train2014_000000000001"]["seg.png"])
    assert json.loads(f["COCO_train2014_000000000001"]["cls.json"]) == [1, 0, 0]
    assert 3 not in np.unique(seg1)
    for k, fields in f.items():       # every label has pixels in its mask
        labels = json.loads(fields["cls.json"])
        present = set(np.unique(png_array(fields["seg.png"])).tolist())
        assert all((c + 1 in present) == bool(v) for c, v in enumerate(labels)), k


# ----------------------------------------------------------------------------- issue 14 faults

def rename_sample(voc, old, new):
    root, sal = voc["root"], voc["sal"]
    for folder, ext in ((root / "JPEGImages", "jpg"), (root / "SegmentationClass", "png"), (sal, "png")):
        os.rename(folder / f"{old}.{ext}", folder / f"{new}.{ext}")


def test_long_ids_round_trip_and_overlong_ids_are_named(voc, capsys):
    ids = voc["ids"]
    long_ascii, cjk, too_long = "a" * 150, "图" * 60, "b" * 210        # 150, 180, 210 bytes
    for old, new in zip(ids, (long_ascii, cjk, too_long)):
        rename_sample(voc, old, new)
    keys = [long_ascii, cjk, too_long] + ids[3:]
    (voc["root"] / "ImageSets/Segmentation/train.txt").write_text("\n".join(keys) + "\n", encoding="utf-8")
    out = voc["tmp"] / "out"
    s = shard.shard_voc(str(voc["root"]), str(voc["sal"]), str(out), split="train", shard_size=3,
                        log=print)
    assert s["skipped"] == {"bad id": 1} and s["exit_code"] == 1
    assert too_long in capsys.readouterr().err
    m = mf.read_manifest(str(out))
    got = [x["__key__"] for p in mf.shard_paths(str(out), m) for _, x in mf.iter_tar_samples(p)]
    assert got == [long_ascii, cjk] + ids[3:]
    assert verify.verify(str(out)) == []


def test_failed_rerun_keeps_the_previous_output(voc, monkeypatch):
    out = voc["tmp"] / "out"
    args = (str(voc["root"]), str(voc["sal"]), str(out))
    shard.shard_voc(*args, split="train", shard_size=2, log=quiet)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    calls = []
    real_add = shard.add_sample

    def failing_add(tar, sample):                       # the disk fills up in the third shard
        calls.append(sample["__key__"])
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real_add(tar, sample)

    monkeypatch.setattr(shard, "add_sample", failing_add)
    with pytest.raises(OSError):
        shard.shard_voc(*args, split="train", shard_size=3, log=quiet)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert verify.verify(str(out)) == []


def test_saliency_in_alpha_and_all_zero_saliency_are_counted(voc, capsys):
    root, sal, ids = voc["root"], voc["sal"], voc["ids"]
    w, h = SIZES[0]
    alpha = np.random.default_rng(5).integers(0, 255, (h, w), dtype=np.uint8)
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(sal / f"{ids[0]}.png")
    w, h = SIZES[1]
    Image.fromarray(np.zeros((h, w), np.uint8)).save(sal / f"{ids[1]}.png")
    out = voc["tmp"] / "out"
    s = shard.shard_voc(str(root), str(sal), str(out), split="train", log=print)
    assert s["exit_code"] == 0
    warned = {"all-zero saliency": 1, "saliency in alpha channel": 1}
    assert s["warnings"] == warned
    m, samples = read_all(out)
    assert m["warnings"] == warned and len(m["warning_examples"]) == 2
    np.testing.assert_array_equal(png_array(dict(samples)[ids[0]]["sal.png"]), alpha)
    err = capsys.readouterr().err
    assert f"{sal / ids[0]}.png: warning: saliency in alpha channel" in err
    assert f"{sal / ids[1]}.png: warning: all-zero saliency" in err


def test_zero_byte_and_foreign_files_are_named_plainly(voc, capsys):
    root, sal, ids = voc["root"], voc["sal"], voc["ids"]
    (root / "JPEGImages" / f"{ids[0]}.jpg").write_bytes(b"")
    (sal / f"{ids[1]}.png").write_bytes(b"")
    (root / "SegmentationClass" / f"{ids[2]}.png").write_bytes(b"")
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"%PDF-1.4 not an image")
    out = voc["tmp"] / "out"
    s = shard.shard_voc(str(root), str(sal), str(out), split="train", log=print)
    assert s["skipped"] == {"unreadable image": 2, "unreadable mask": 1, "unreadable saliency": 1}
    err = capsys.readouterr().err
    assert "object at 0x" not in err
    assert f"{root / 'JPEGImages' / ids[0]}.jpg: unreadable image (empty file (0 bytes))" in err
    assert f"{sal / ids[1]}.png: unreadable saliency (empty file (0 bytes))" in err
    assert f"{root / 'SegmentationClass' / ids[2]}.png: unreadable mask (empty file (0 bytes))" in err
    assert f"{root / 'JPEGImages' / ids[3]}.jpg: unreadable image (not an image format" in err


def test_id_with_a_space_is_named_whole(voc, capsys):
    root, ids = voc["root"], voc["ids"]
    rename_sample(voc, ids[0], "my photo")
    lst = voc["tmp"] / "list.txt"
    lst.write_text("\n".join(["my photo"] + ids[1:]) + "\n")
    assert shard.read_id_list(str(lst)) == ["my photo"] + ids[1:]
    s = shard.shard_voc(str(root), str(voc["sal"]), str(voc["tmp"] / "out"), list_file=str(lst),
                        log=print)
    assert s["skipped"] == {"bad id": 1}
    err = capsys.readouterr().err
    assert "bad id 'my photo'" in err and "my.jpg" not in err
    sbd = voc["tmp"] / "sbd.txt"
    sbd.write_text("".join(f"/JPEGImages/{k}.jpg /SegmentationClassAug/{k}.png\n" for k in ids))
    assert shard.read_id_list(str(sbd)) == ids


def test_verify_names_empty_and_foreign_members_plainly(good_out):
    m = mf.read_manifest(str(good_out))
    p = good_out / "train-000002.tar"
    (key, fields), = read_tar(p)
    fields["sal.png"], fields["jpg"] = b"", b"%PDF-1.4 not an image"
    write_tar(p, [(key, fields)])
    m["shards"][2]["sha256"] = mf.sha256_file(str(p))
    mf.write_manifest(str(good_out), m)
    problems = verify.verify(str(good_out))
    assert f"train-000002.tar: {key}: jpg does not decode (no image format Pillow knows, 21 bytes)" in problems
    fields.pop("jpg")
    assert verify.check_sample(key, {"png": b"", **fields}, m["classes"]) == [
        f"{key}: png does not decode (empty member (0 bytes))"]
    assert not any("object at" in x for x in problems)
