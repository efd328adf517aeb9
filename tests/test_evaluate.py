"""epsdist.evaluate: metrics, confusion ratio, ground truth from shards or PNGs, threshold sweep,
errors and the command line."""
import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from epsdist import evaluate as ev
from epsdist import groundtruth as G
from epsdist import metrics as M
from epsdist import scoring as S
from epsdist.data.manifest import FORMAT, sha256_file, write_manifest
from epsdist.data.synthetic import voc_palette

# ----------------------------------------------------------------------------- helpers


def save_png(path, arr, mode="L"):
    """Raw indices as an 8-bit gray (L) or VOC-palette (P) PNG."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())
    if mode == "P":
        im.putpalette(voc_palette())
    im.save(path)


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def reference_conf(pred, gt, n):
    """Independent confusion matrix with np.add.at; pred 255 counted apart per gt class."""
    conf = np.zeros((n, n), np.int64)
    unpred = np.zeros(n, np.int64)
    g, p = gt.ravel(), pred.ravel()
    keep = g != 255
    both = keep & (p != 255)
    np.add.at(conf, (g[both].astype(int), p[both].astype(int)), 1)
    np.add.at(unpred, g[keep & (p == 255)].astype(int), 1)
    return conf, unpred


def reference_iou(conf, unpred):
    """IoU = TP / (TP + FP + FN) with explicit loops; None where the class is absent."""
    n = conf.shape[0]
    out = []
    for c in range(n):
        tp = int(conf[c, c])
        fp = sum(int(conf[r, c]) for r in range(n) if r != c)
        fn = sum(int(conf[c, k]) for k in range(n) if k != c) + int(unpred[c])
        out.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    return out


def make_case(tmp_path, images, *, pred_mode="L", gt_mode="P"):
    """images: {key: (gt, pred, ctx or None)} -> (gt_dir, pred_dir, ctx_dir)."""
    gt_dir, pred_dir, ctx_dir = (tmp_path / d for d in ("gt", "pred", "ctx"))
    for d in (gt_dir, pred_dir, ctx_dir):
        d.mkdir(parents=True, exist_ok=True)
    for key, (gt, pred, ctx) in images.items():
        save_png(gt_dir / f"{key}.png", gt, gt_mode)
        if pred is not None:
            save_png(pred_dir / f"{key}.png", pred, pred_mode)
        if ctx is not None:
            save_png(ctx_dir / f"{key}.png", ctx)
    return str(gt_dir), str(pred_dir), str(ctx_dir)


def make_shards(directory, images, classes, per_shard=2, contexts=None):
    """Shards in the writer's layout (jpg, sal.png, cls.json, seg.png, ctx.png per sample);
    ``contexts``: the manifest's context names."""
    os.makedirs(directory, exist_ok=True)
    keys = list(images)
    shards = []
    for s, start in enumerate(range(0, len(keys), per_shard)):
        name = f"val-{s:06d}.tar"
        path = os.path.join(directory, name)
        chunk = keys[start:start + per_shard]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in chunk:
                seg, ctx = images[key]
                h, w = seg.shape
                buf = io.BytesIO()
                Image.new("RGB", (w, h), (90, 30, 10)).save(buf, format="JPEG")
                labels = [int((seg == c + 1).any()) for c in range(len(classes))]
                members = {"jpg": buf.getvalue(), "sal.png": png_bytes(np.zeros((h, w))),
                           "cls.json": json.dumps(labels).encode(), "seg.png": png_bytes(seg)}
                if ctx is not None:
                    members["ctx.png"] = png_bytes(ctx)
                for field in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(members[field])
                    tar.addfile(info, io.BytesIO(members[field]))
        shards.append({"name": name, "count": len(chunk), "sha256": sha256_file(path)})
    write_manifest(directory, {"format": FORMAT, "source": "test", "split": "val",
                               "classes": list(classes), "num_samples": len(keys),
                               "shards": shards, "skipped": {},
                               **({"contexts": contexts} if contexts else {})})
    return directory


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "epsdist.evaluate", *args],
                          capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_an_independent_computation():
    rng = np.random.default_rng(0)
    n = 6
    gt = rng.integers(0, n, (37, 53)).astype(np.uint8)
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, n, gt.shape)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred[rng.random(gt.shape) < 0.05] = 255
    gt[gt == 4] = 0                                    # class 4 only predicted: IoU 0
    conf, unpred = M.confusion_matrix(pred, gt, n, return_unpredicted=True)
    ref_conf, ref_unpred = reference_conf(pred, gt, n)
    assert conf.dtype == np.int64 and conf.shape == (n, n)
    np.testing.assert_array_equal(conf, ref_conf)
    np.testing.assert_array_equal(unpred, ref_unpred)
    np.testing.assert_array_equal(M.confusion_matrix(pred, gt, n), ref_conf)

    m = M.metrics(conf, unpred)
    ref = reference_iou(ref_conf, ref_unpred)
    assert ref[4] == 0.0
    for c in range(n):
        assert m["iou"][c] == pytest.approx(ref[c], abs=1e-12)
    assert m["mean_iou"] == pytest.approx(sum(ref) / n)
    valid = gt != 255
    assert m["pixels"] == valid.sum()
    assert m["pixel_accuracy"] == pytest.approx((pred[valid] == gt[valid]).mean())
    for c in range(n):
        pred_c = ((pred == c) & valid).sum()
        gt_c = (gt == c).sum()
        hit = ((pred == c) & (gt == c)).sum()
        assert m["precision"][c] == pytest.approx(hit / pred_c)
        if gt_c:
            assert m["recall"][c] == pytest.approx(hit / gt_c)
        else:
            assert math.isnan(m["recall"][c])
    recalls = [m["recall"][c] for c in range(n) if (gt == c).any()]
    assert m["mean_accuracy"] == pytest.approx(sum(recalls) / len(recalls))


def test_hand_computed_3x3_example():
    # gt (3 x 3)      pred          pixel (2, 2) is ignore (gt 255) and must not count
    #   0 0 0         0 0 1
    #   1 1 2         1 1 2
    #   2 2 255       2 0 2
    # confusion (rows gt, cols pred):   class 0: TP 2, FP 1 (gt 2 -> 0), FN 1 (0 -> 1)
    #   gt0: [2, 1, 0]                  class 1: TP 2, FP 1 (gt 0 -> 1), FN 0
    #   gt1: [0, 2, 0]                  class 2: TP 2, FP 0,             FN 1 (2 -> 0)
    #   gt2: [1, 0, 2]
    # IoU = TP / (TP+FP+FN): 2/4 = 1/2, 2/3, 2/3; mIoU = (1/2 + 2/3 + 2/3) / 3 = 11/18
    # precision 2/3, 2/3, 1; recall 2/3, 1, 2/3; pixel acc 6/8; mean acc (2/3+1+2/3)/3 = 7/9
    gt = np.array([[0, 0, 0], [1, 1, 2], [2, 2, 255]], np.uint8)
    pred = np.array([[0, 0, 1], [1, 1, 2], [2, 0, 2]], np.uint8)
    conf = M.confusion_matrix(pred, gt, 3)
    np.testing.assert_array_equal(conf, [[2, 1, 0], [0, 2, 0], [1, 0, 2]])
    m = M.metrics(conf)
    np.testing.assert_allclose(m["iou"], [1 / 2, 2 / 3, 2 / 3])
    assert m["mean_iou"] == pytest.approx(11 / 18)
    np.testing.assert_allclose(m["precision"], [2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(m["recall"], [2 / 3, 1, 2 / 3])
    assert m["pixel_accuracy"] == pytest.approx(6 / 8)
    assert m["mean_accuracy"] == pytest.approx(7 / 9)
    np.testing.assert_array_equal(m["tp"], [2, 2, 2])
    np.testing.assert_array_equal(m["fp"], [1, 1, 0])
    np.testing.assert_array_equal(m["fn"], [1, 0, 1])


def test_ignore_pixels_change_nothing():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    pred = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    ign = rng.random(gt.shape) < 0.3
    gt[ign] = 255
    base = M.confusion_matrix(pred, gt, 4)
    pred2 = pred.copy()
    pred2[ign] = rng.integers(0, 4, int(ign.sum()))     # anything under ignore
    pred2[ign & (rng.random(gt.shape) < 0.5)] = 255
    np.testing.assert_array_equal(M.confusion_matrix(pred2, gt, 4), base)
    assert base.sum() == (~ign).sum()


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 2, 1, 1]], np.uint8)
    m = M.metrics(M.confusion_matrix(pred, gt, 4))
    # class 0: 1/2; class 1: 1; class 2 predicted only: 0 (counts); class 3 absent: NaN
    assert m["iou"][:3].tolist() == [0.5, 1.0, 0.0]
    assert math.isnan(m["iou"][3])
    assert m["present"].tolist() == [True, True, True, False]
    assert m["mean_iou"] == pytest.approx(1.5 / 3)
    assert math.isnan(m["recall"][2]) and math.isnan(m["recall"][3])
    assert m["mean_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    empty = M.metrics(np.zeros((3, 3), np.int64))
    assert math.isnan(empty["mean_iou"]) and math.isnan(empty["pixel_accuracy"])


def test_prediction_255_is_a_miss_not_a_false_positive():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    pred = np.array([[1, 255, 0, 255]], np.uint8)
    conf, unpred = M.confusion_matrix(pred, gt, 2, return_unpredicted=True)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(unpred, [1, 1])
    m = M.metrics(conf, unpred)
    np.testing.assert_allclose(m["iou"], [0.5, 0.5])
    np.testing.assert_allclose(m["precision"], [1.0, 1.0])
    assert m["pixel_accuracy"] == 0.5


def test_values_out_of_range_are_errors():
    gt = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"pred has values \[7\]"):
        M.confusion_matrix(np.full((2, 2), 7, np.uint8), gt, 3)
    with pytest.raises(ValueError, match="shape"):
        M.confusion_matrix(np.zeros((2, 3), np.uint8), gt, 3)


def test_evaluate_matches_the_reference_over_files(tmp_path):
    images = random_images(11, n=6, classes=4)
    for i, (gt, pred, _) in enumerate(images.values()):
        pred[::3, i % 2::2] = 255                          # "no prediction" pixels
    gt_dir, pred_dir, _ = make_case(tmp_path, images)
    conf = sum(reference_conf(p, g, 5)[0] for g, p, _ in images.values())
    unpred = sum(reference_conf(p, g, 5)[1] for g, p, _ in images.values())
    for workers in (1, 3):
        r = S.evaluate(pred_dir, gt_dir, 5, workers=workers)
        assert r["confusion_matrix"] == conf.tolist() and r["unpredicted"] == unpred.tolist()
        assert r["unpredicted_pixels"] == unpred.sum() > 0
        ref = reference_iou(conf, unpred)
        assert r["iou"] == pytest.approx(ref)
        assert r["mean_iou"] == pytest.approx(sum(ref) / len(ref))
        assert r["ignored_pixels"] == sum((g == 255).sum() for g, _, _ in images.values())


# ----------------------------------------------------------------------------- confusion ratio

# 3 classes (0 background, 1 boat, 2 train); context ids 1 = water (boat), 2 = rails (train)
GT_A = np.array([[1, 1, 0, 0],
                 [1, 1, 0, 0],
                 [0, 0, 0, 2],
                 [0, 0, 0, 255]], np.uint8)
CTX_A = np.array([[1, 0, 0, 0],        # (0, 0) is context but gt boat: never a false positive
                  [0, 0, 1, 1],
                  [1, 1, 1, 0],
                  [2, 2, 2, 2]], np.uint8)   # (3, 3) is context but gt ignore: not counted
PRED_A = np.array([[1, 1, 0, 0],
                   [1, 0, 1, 1],
                   [1, 0, 2, 2],
                   [2, 1, 0, 2]], np.uint8)
# water->boat: ctx 1 & pred 1 & gt not 1/255 = (1,2) (1,3) (2,0) -> FP 3; TP(boat) = (0,0) (0,1)
# (1,0) = 3.  rails->train: (3,0) -> 1 ((3,3) is ignore); TP(train) = (2,3) = 1.
# rails->boat: (3,1) -> 1.  water->train: (2,2) -> 1.


def test_confusion_ratio_hand_counts():
    counts = M.confusion_ratio(PRED_A, GT_A, CTX_A, [(1, 1), (2, 2), (1, 2), (2, 1)])
    assert counts["fp"].tolist() == [3, 1, 1, 1]
    assert counts["tp"].tolist() == [3, 1, 3, 1]


def test_confusion_ratio_in_evaluate_sums_over_images(tmp_path):
    rng = np.random.default_rng(2)
    gt_b = np.zeros((5, 6), np.uint8)
    gt_b[:2, :3] = 1
    ctx_b = np.zeros_like(gt_b)
    ctx_b[2:, :] = 1
    pred_b = rng.integers(0, 3, gt_b.shape).astype(np.uint8)
    gt_dir, pred_dir, ctx_dir = make_case(tmp_path, {"a": (GT_A, PRED_A, CTX_A),
                                                     "b": (gt_b, pred_b, ctx_b)})
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("water boat\nrails train\n")
    r = S.evaluate(pred_dir, gt_dir, 3, ctx_dir=ctx_dir, contexts=str(contexts),
                    class_names=["background", "boat", "train"])
    cr = r["confusion_ratio"]
    assert [(p["class"], p["context"], p["name"]) for p in cr["pairs"]] == \
        [(1, 1, "water->boat"), (2, 2, "rails->train")]      # default: v:v for ids present
    pairs = [(1, 1), (2, 2)]
    a = M.confusion_ratio(PRED_A, GT_A, CTX_A, pairs)
    b = M.confusion_ratio(pred_b, gt_b, ctx_b, pairs)
    for i, p in enumerate(cr["pairs"]):
        assert p["fp"] == a["fp"][i] + b["fp"][i] and p["tp"] == a["tp"][i] + b["tp"][i]
        assert p["ratio"] == pytest.approx(p["fp"] / p["tp"])
    assert cr["images_with_ctx"] == 2
    # names: contexts.txt found beside the gt folder; classes without names file: class1, ...
    r2 = S.evaluate(pred_dir, gt_dir, 3, ctx_dir=ctx_dir, pairs=[(1, 2), (2, 1)])
    assert [(p["fp"], p["name"]) for p in r2["confusion_ratio"]["pairs"]] == \
        [(1 + M.confusion_ratio(pred_b, gt_b, ctx_b, [(1, 2)])["fp"][0], "rails->class1"),
         (1 + M.confusion_ratio(pred_b, gt_b, ctx_b, [(2, 1)])["fp"][0], "water->class2")]
    r3 = S.evaluate(pred_dir, gt_dir, 3, ctx_dir=ctx_dir, pairs=[(1, 2)], contexts={})
    assert r3["confusion_ratio"]["pairs"][0]["name"] == "ctx2->class1"
    assert S.evaluate(pred_dir, gt_dir, 3)["confusion_ratio"] is None     # no context masks
    with pytest.raises(G.UsageError, match="needs context masks"):
        S.evaluate(pred_dir, gt_dir, 3, pairs=[(1, 1)])


def test_confusion_ratio_names_come_from_the_shard_manifest(tmp_path):
    images = {"a": (GT_A, CTX_A)}
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    save_png(pred_dir / "a.png", PRED_A)
    named = make_shards(str(tmp_path / "named"), images, ["boat", "train"],
                        contexts=["water", "rails"])
    plain = make_shards(str(tmp_path / "plain"), images, ["boat", "train"])
    for gt, names in ((named, ["water->boat", "rails->train"]),
                      (plain, ["ctx1->boat", "ctx2->train"])):
        r = S.evaluate(str(pred_dir), gt, None)
        assert [p["name"] for p in r["confusion_ratio"]["pairs"]] == names
        assert [p["fp"] for p in r["confusion_ratio"]["pairs"]] == [3, 1]   # hand counts above


# ----------------------------------------------------------------------------- ground truth


def random_images(seed, n=5, classes=2):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        h, w = 9 + i, 13 - i
        gt = rng.integers(0, classes + 1, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        ctx = np.where((gt == 0) & (rng.random((h, w)) < 0.5),
                       rng.integers(1, classes + 1, (h, w)), 0).astype(np.uint8)
        pred = rng.integers(0, classes + 1, (h, w)).astype(np.uint8)
        out[f"img{i:03d}"] = (gt, pred, ctx if i != 3 else None)
    return out


def test_shard_ground_truth_equals_png_folder(tmp_path):
    images = random_images(3)
    gt_dir, pred_dir, ctx_dir = make_case(tmp_path, images)
    shards = make_shards(str(tmp_path / "shards"), {k: (g, c) for k, (g, _, c) in images.items()},
                         ["boat", "train"])
    from_png = list(G.iter_ground_truth(gt_dir, ctx_dir))
    from_shards = list(G.iter_ground_truth(shards))
    assert [k for k, _, _ in from_png] == [k for k, _, _ in from_shards] == sorted(images)
    for (_, s1, c1), (_, s2, c2) in zip(from_png, from_shards):
        np.testing.assert_array_equal(s1, s2)
        assert (c1 is None) == (c2 is None)
        if c1 is not None:
            np.testing.assert_array_equal(c1, c2)
    a = S.evaluate(pred_dir, gt_dir, 3, ctx_dir=ctx_dir)
    b = S.evaluate(pred_dir, shards, None)                 # num_classes from the manifest
    assert b["class_names"] == ["background", "boat", "train"]
    for key in ("confusion_matrix", "mean_iou", "pixels", "ignored_pixels", "images"):
        assert a[key] == b[key], key
    assert a["confusion_ratio"]["pairs"] == \
        [dict(p, name=p["name"].replace("boat", "class1").replace("train", "class2"))
         for p in b["confusion_ratio"]["pairs"]]
    assert b["confusion_ratio"]["images_without_ctx"] == 1
    with pytest.raises(G.UsageError, match="manifest.json lists 2 classes"):
        S.evaluate(pred_dir, shards, 21)


def test_key_list_restricts_the_evaluation(tmp_path):
    images = random_images(13, n=5)
    gt_dir, pred_dir, _ = make_case(tmp_path, images)
    shards = make_shards(str(tmp_path / "shards"), {k: (g, c) for k, (g, _, c) in images.items()},
                         ["boat", "train"])
    listing = tmp_path / "val.txt"
    listing.write_text("/JPEGImages/img003.jpg /Seg/img003.png\nimg001\n")
    assert G.read_key_list(str(listing)) == ["img003", "img001"]
    conf = sum(reference_conf(images[k][1], images[k][0], 3)[0] for k in ("img001", "img003"))
    for gt in (gt_dir, shards):
        r = S.evaluate(pred_dir, gt, 3, keys=["img003", "img001"])
        assert r["images"] == r["gt_images"] == 2 and r["confusion_matrix"] == conf.tolist()
        with pytest.raises(G.EvalError, match="1 listed keys have no ground truth .*: nope"):
            S.evaluate(pred_dir, gt, 3, keys=["img001", "nope"])
    cli = run_cli("--pred", pred_dir, "--gt", shards, "--list", str(listing))
    assert cli.returncode == 0 and ": 2 images" in cli.stdout, cli.stderr


def test_shard_sample_without_mask_is_an_error(tmp_path):
    images = random_images(4, n=2)
    d = make_shards(str(tmp_path / "s"), {k: (g, c) for k, (g, _, c) in images.items()}, ["a", "b"])
    with tarfile.open(os.path.join(d, "val-000000.tar")) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.name != "img001.seg.png"]
    with tarfile.open(os.path.join(d, "val-000000.tar"), "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(G.EvalError, match=r"img001 has no seg\.png"):
        list(G.iter_ground_truth(d))


# ----------------------------------------------------------------------------- errors


def test_size_mismatch_names_the_key_and_both_sizes(tmp_path):
    images = random_images(5, n=3)
    gt, pred, ctx = images["img001"]
    images["img001"] = (gt, pred[:, :-2], ctx)                # 11 wide -> 9 wide
    gt_dir, pred_dir, _ = make_case(tmp_path, images)
    with pytest.raises(G.EvalError, match=r"img001: prediction .* is 10x10 \(WxH\) but the "
                                           r"ground truth is 12x10"):
        S.evaluate(pred_dir, gt_dir, 3)
    r = run_cli("--pred", pred_dir, "--gt", gt_dir, "--num-classes", "3")
    assert r.returncode == 1 and "img001" in r.stderr and "12x10" in r.stderr


def test_missing_prediction_and_allow_missing(tmp_path):
    images = random_images(6, n=4)
    full = dict(images)
    images["img002"] = (images["img002"][0], None, None)
    gt_dir, pred_dir, _ = make_case(tmp_path, images)
    with pytest.raises(G.EvalError, match=r"img002: prediction .*img002\.png is missing"):
        S.evaluate(pred_dir, gt_dir, 3)
    r = S.evaluate(pred_dir, gt_dir, 3, allow_missing=True)
    assert (r["images"], r["gt_images"], r["missing"], r["missing_keys"]) == (3, 4, 1, ["img002"])
    conf = sum(reference_conf(p, g, 3)[0] for k, (g, p, _) in full.items() if k != "img002")
    assert r["confusion_matrix"] == conf.tolist()
    save_png(os.path.join(pred_dir, "extra.png"), np.zeros((3, 3)))
    assert S.evaluate(pred_dir, gt_dir, 3, allow_missing=True)["extra_predictions"] == 1
    cli = run_cli("--pred", pred_dir, "--gt", gt_dir, "--num-classes", "3")
    assert cli.returncode == 1 and "img002" in cli.stderr and "--allow-missing" in cli.stderr
    cli = run_cli("--pred", pred_dir, "--gt", gt_dir, "--num-classes", "3", "--allow-missing")
    assert cli.returncode == 0, cli.stderr
    assert "missing predictions: 1" in cli.stdout and "1 keys without prediction" in cli.stderr


def test_bad_prediction_values_and_modes(tmp_path):
    images = random_images(7, n=2)
    gt_dir, pred_dir, _ = make_case(tmp_path, images)
    save_png(os.path.join(pred_dir, "img001.png"), np.full(images["img001"][0].shape, 9))
    with pytest.raises(G.EvalError, match=r"img001: prediction .* values \[9\]"):
        S.evaluate(pred_dir, gt_dir, 3)
    Image.new("RGB", images["img001"][0].shape[::-1]).save(os.path.join(pred_dir, "img001.png"))
    with pytest.raises(G.EvalError, match="img001.*mode RGB"):
        S.evaluate(pred_dir, gt_dir, 3)
    with pytest.raises(G.EvalError, match=r"img000: ground truth .* values \[2\].*num-classes"):
        S.evaluate(pred_dir, gt_dir, 2)


def test_palette_and_gray_predictions_agree(tmp_path):
    images = random_images(8, n=3)
    g1, p1, _ = make_case(tmp_path / "a", images, pred_mode="P")
    g2, p2, _ = make_case(tmp_path / "b", images, pred_mode="L", gt_mode="L")
    assert Image.open(os.path.join(p1, "img000.png")).mode == "P"
    assert S.evaluate(p1, g1, 3)["confusion_matrix"] == S.evaluate(p2, g2, 3)["confusion_matrix"]


def test_parse_helpers():
    assert ev.parse_thresholds("0.2,0.1,0.2") == [0.1, 0.2]
    assert ev.parse_thresholds("0.05:0.2:0.05") == [0.05, 0.1, 0.15, 0.2]
    for bad in ("a", "0.1:0.05:0.1", "", "nan"):
        with pytest.raises(G.UsageError):
            ev.parse_thresholds(bad)
    names = ["background", "boat", "train"]
    assert ev.parse_pairs("1:1, train:rails", names, {1: "water", 2: "rails"}) == [(1, 1), (2, 2)]
    for bad in ("1", "9:1", "1:0", "plane:1"):
        with pytest.raises(G.UsageError):
            ev.parse_pairs(bad, names, {})


# ----------------------------------------------------------------------------- threshold sweep


def hand_mask(cams, classes, t):
    """argmax over [t, cams...] in float32, first maximum wins -> 0 or classes[i] + 1."""
    h, w = cams.shape[1:]
    stack = np.concatenate([np.full((1, h, w), np.float32(t)), cams.astype(np.float32)])
    lut = np.concatenate([[0], np.asarray(classes, np.int64) + 1])
    return lut[stack.argmax(0)].astype(np.uint8)


def test_threshold_sweep_equals_hand_made_masks(tmp_path):
    rng = np.random.default_rng(9)
    C = 5
    thresholds = [0.0, 0.15, 0.25, 0.5, 1.0]
    gt_dir, cams_dir = tmp_path / "gt", tmp_path / "cams"
    gt_dir.mkdir(), cams_dir.mkdir()
    records = {}
    for i in range(5):
        h, w = 14 + i, 17 - i
        gt = rng.integers(0, C, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        L = [2, 3, 1, 0, 2][i]
        classes = rng.choice(C - 1, L, replace=False)
        cams = rng.choice([0.0, 0.1, 0.15, 0.25, 0.3, 0.5, 0.7, 1.0], (L, h, w))
        cams = cams.astype(np.float16 if i % 2 == 0 else np.float32)
        if L >= 2:
            cams[1, :3] = cams[0, :3]                      # ties between maps: first wins
        if L:
            cams[:, 3, :] = 0.25                           # ties with a threshold: background
        save_png(gt_dir / f"k{i}.png", gt)
        np.savez(cams_dir / f"k{i}.npz", cams=cams, classes=classes)
        records[f"k{i}"] = (gt, cams, classes)
    s = S.sweep_thresholds(str(cams_dir), str(gt_dir), C, thresholds[::-1])
    assert s["thresholds"] == thresholds and s["images"] == 5
    for j, t in enumerate(thresholds):
        pred_dir = tmp_path / f"pred{j}"
        pred_dir.mkdir()
        conf = np.zeros((C, C), np.int64)
        for key, (gt, cams, classes) in records.items():
            mask = hand_mask(cams, classes, t)
            save_png(pred_dir / f"{key}.png", mask)
            conf += reference_conf(mask, gt, C)[0]
        r = S.evaluate(str(pred_dir), str(gt_dir), C)
        assert s["confusion_matrices"][j] == r["confusion_matrix"] == conf.tolist()
        np.testing.assert_equal(s["mean_iou"][j], r["mean_iou"])
    best = int(np.nanargmax(s["mean_iou"]))
    assert s["best_threshold"] == thresholds[best] and s["best_mean_iou"] == s["mean_iou"][best]
    # the tie row at exactly 0.25: background at t = 0.25, the class just below it
    gt, cams, classes = records["k0"]
    assert (hand_mask(cams, classes, 0.25)[3] == 0).all()
    assert (hand_mask(cams, classes, 0.15)[3] == classes[0] + 1).all()


def test_sweep_many_thresholds_and_float64(tmp_path):
    """More than 64 thresholds take another code path: per threshold, the same matrices."""
    rng = np.random.default_rng(12)
    gt_dir, cams_dir = tmp_path / "gt", tmp_path / "cams"
    gt_dir.mkdir(), cams_dir.mkdir()
    for i, dtype in enumerate((np.float16, np.float32, np.float64)):
        gt = rng.integers(0, 4, (11, 13)).astype(np.uint8)
        save_png(gt_dir / f"k{i}.png", gt)
        np.savez(cams_dir / f"k{i}.npz", cams=rng.random((3, 11, 13)).astype(dtype),
                 classes=np.array([2, 0, 1]))
    many = np.linspace(0, 1, 81).tolist()
    big = S.sweep_thresholds(str(cams_dir), str(gt_dir), 4, many)
    few = S.sweep_thresholds(str(cams_dir), str(gt_dir), 4, many[::10])
    assert big["confusion_matrices"][::10] == few["confusion_matrices"]
    assert big["mean_iou"][::10] == few["mean_iou"]
    np.savez(cams_dir / "k1.npz", cams=np.full((1, 11, 13), np.nan, np.float32),
             classes=np.array([0]))
    with pytest.raises(G.EvalError, match="k1: .*NaN"):
        S.sweep_thresholds(str(cams_dir), str(gt_dir), 4, [0.5])


def test_sweep_errors(tmp_path):
    gt_dir, cams_dir = tmp_path / "gt", tmp_path / "cams"
    gt_dir.mkdir(), cams_dir.mkdir()
    save_png(gt_dir / "a.png", np.zeros((4, 5)))
    save_png(gt_dir / "b.png", np.zeros((4, 5)))
    np.savez(cams_dir / "a.npz", cams=np.zeros((1, 4, 6), np.float32), classes=np.array([0]))
    with pytest.raises(G.EvalError,
                       match=r"a: cams .* is 6x4 \(WxH\) but the ground truth is 5x4"):
        S.sweep_thresholds(str(cams_dir), str(gt_dir), 3, [0.5])
    np.savez(cams_dir / "a.npz", cams=np.zeros((1, 4, 5), np.float32), classes=np.array([5]))
    with pytest.raises(G.EvalError, match=r"a: .*classes \[5\] outside 0\.\.1"):
        S.sweep_thresholds(str(cams_dir), str(gt_dir), 3, [0.5])
    np.savez(cams_dir / "a.npz", cams=np.zeros((1, 4, 5), np.float32), classes=np.array([1]))
    with pytest.raises(G.EvalError, match=r"b: CAM file .*b\.npz is missing"):
        S.sweep_thresholds(str(cams_dir), str(gt_dir), 3, [0.5])
    s = S.sweep_thresholds(str(cams_dir), str(gt_dir), 3, [0.5], allow_missing=True)
    assert (s["images"], s["missing"], s["mean_iou"]) == (1, 1, [1.0])


# ----------------------------------------------------------------------------- command line


def test_cli_writes_json_and_prints_the_table(tmp_path):
    images = random_images(10, n=4)
    gt_dir, pred_dir, ctx_dir = make_case(tmp_path, images)
    shards = make_shards(str(tmp_path / "shards"), {k: (g, c) for k, (g, _, c) in images.items()},
                         ["boat", "train"])
    cams_dir = tmp_path / "cams"
    cams_dir.mkdir()
    rng = np.random.default_rng(0)
    for key, (gt, _, _) in images.items():
        np.savez(cams_dir / f"{key}.npz", cams=rng.random((2,) + gt.shape).astype(np.float16),
                 classes=np.array([0, 1]))
    (tmp_path / "contexts.txt").write_text("water boat\nrails train\n")
    out = tmp_path / "res" / "eval.json"
    r = run_cli("--pred", pred_dir, "--gt", shards, "--cams", str(cams_dir), "--thresholds",
                "0.2,0.4", "--contexts", str(tmp_path / "contexts.txt"), "--pairs", "1:1,2:2",
                "--json", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    for text in ("class", "IoU", "prec", "recall", "background", "boat", "train", "mIoU",
                 "water->boat", "rails->train", "best threshold"):
        assert text in r.stdout, text
    data = json.loads(out.read_text())
    api = S.evaluate(pred_dir, shards, 3, pairs=[(1, 1), (2, 2)],
                      contexts={1: "water", 2: "rails"})
    e = data["evaluation"]
    assert e["confusion_matrix"] == api["confusion_matrix"]
    assert e["mean_iou"] == pytest.approx(api["mean_iou"])
    assert [p["name"] for p in e["confusion_ratio"]["pairs"]] == ["water->boat", "rails->train"]
    assert data["sweep"]["thresholds"] == [0.2, 0.4] and len(data["sweep"]["mean_iou"]) == 2
    assert data["class_names"] == ["background", "boat", "train"]
    assert not [f for f in os.listdir(out.parent) if f != "eval.json"]      # no temp left over


def test_cli_nan_is_null_and_exit_codes(tmp_path):
    gt = np.zeros((4, 4), np.uint8)
    gt[0] = 1
    gt_dir, pred_dir, _ = make_case(tmp_path, {"x": (gt, gt, None)})
    out = tmp_path / "e.json"
    r = run_cli("--pred", pred_dir, "--gt", gt_dir, "--num-classes", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    e = json.loads(out.read_text())["evaluation"]
    assert e["iou"] == [1.0, 1.0, None, None] and e["mean_iou"] == 1.0
    assert run_cli("--gt", gt_dir, "--num-classes", "4").returncode == 2          # no --pred
    assert run_cli("--pred", pred_dir, "--gt", gt_dir).returncode == 2            # no classes
    assert run_cli("--pred", pred_dir, "--gt", str(tmp_path / "nope"),
                   "--num-classes", "4").returncode == 2
    assert run_cli("--pred", pred_dir, "--gt", gt_dir, "--num-classes", "4",
                   "--pairs", "1:1").returncode == 2                              # no ctx masks
    save_png(os.path.join(pred_dir, "x.png"), np.full((4, 4), 3))
    assert ev.main(["--pred", pred_dir, "--gt", gt_dir, "--num-classes", "3"]) == 1
    assert ev.main(["--pred", pred_dir, "--gt", gt_dir, "--num-classes", "4"]) == 0
