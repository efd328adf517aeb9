"""Untrusted shards, model files and label files: nothing is written outside the output folder
and nothing in a data file runs (epsdist.data.safepath, epsdist.safeload)."""
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from epsdist import evaluate
from epsdist.checkpoint import atomic_torch_save, rng_state, set_rng_state
from epsdist.config import load_config, to_dict
from epsdist.data import shard, synthetic, verify
from epsdist.data.augment import TrainAugment
from epsdist.data.loader import ShardLoader
from epsdist.data.manifest import (ManifestError, iter_tar_samples, read_manifest, sha256_file,
                                   shard_paths, write_manifest)
from epsdist.data.safepath import (UnsafeNameError, check_key, check_shard_name, key_path,
                                   shard_path)
from epsdist.models import build_model
from epsdist.safeload import UnsafeFileError, load_label_npy, safe_torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(REPO, "epsdist", "infer.py")
CONFIG = os.path.join(REPO, "configs", "synthetic_eps.yaml")


def tree(root) -> set:
    """Every file and folder under ``root`` (relative paths)."""
    found = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            found.add(os.path.relpath(os.path.join(d, n), root))
    return found


class MarkerPayload:
    """Unpickling this creates ``path`` (what a crafted file would do, only harmless)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- names -> paths

GOOD_KEYS = ["2007_000032", "COCO_train2014_000000000009", "s0001", "a-b_c", "x..y", "é"]
BAD_KEYS = {"../x": "'..'", "a/../../b": "'..'", "/etc/passwd": "absolute", "a/b": "'/'",
            "a\\b": "backslash", "a\x00b": "control", "a\nb": "control", "": "empty",
            ".": "'.'", "..": "'..'", 7: "not a string"}


def test_good_keys_become_paths_inside_the_root(tmp_path):
    for key in GOOD_KEYS:
        assert check_key(key) == key
        assert key_path(str(tmp_path), key, ".png") == os.path.join(str(tmp_path), key + ".png")


@pytest.mark.parametrize("key", list(BAD_KEYS))
def test_bad_keys_are_refused_naming_key_and_reason(tmp_path, key):
    with pytest.raises(UnsafeNameError) as e:
        key_path(str(tmp_path), key, ".png")
    assert repr(key) in str(e.value) and BAD_KEYS[key] in str(e.value)


def test_a_symlink_in_the_output_folder_cannot_redirect_a_key(tmp_path):
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "out" / "k.png")
    with pytest.raises(UnsafeNameError, match="outside"):
        key_path(str(tmp_path / "out"), "k", ".png")
    # a symlinked output folder itself is fine: both sides are resolved
    os.symlink(tmp_path / "out", tmp_path / "link")
    assert key_path(str(tmp_path / "link"), "j", ".png") == str(tmp_path / "link" / "j.png")


@pytest.mark.parametrize("name", ["../x.tar", "/abs/x.tar", "sub/x.tar", "http://host/x.tar",
                                  "//host/x.tar", "file:x.tar", "a\\x.tar", ".hidden.tar",
                                  "x\x00.tar", "", None])
def test_bad_shard_names_are_refused(tmp_path, name):
    with pytest.raises(UnsafeNameError):
        shard_path(str(tmp_path), name)


def test_writer_shard_names_are_accepted():
    for name in (shard.shard_name("train", 0), shard.shard_name("voc.train_aug", 12),
                 "synthetic_val-000003.tar"):
        assert check_shard_name(name) == name


def test_manifest_with_a_traversing_shard_name_is_refused(tmp_path):
    write_manifest(str(tmp_path), {"format": "epsdist-shards/1", "classes": ["a"],
                                   "num_samples": 1, "shards": [
                                       {"name": "../../etc/x.tar", "count": 1, "sha256": "0"}]})
    with pytest.raises(ManifestError, match=r"unsafe shard name '\.\./\.\./etc/x\.tar'"):
        read_manifest(str(tmp_path))


def test_shard_writer_refuses_unsafe_keys(tmp_path):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        with pytest.raises(UnsafeNameError, match=r"'\.\./\.\./pwn'"):
            shard.add_sample(tar, {"__key__": "../../pwn", "jpg": b"x"})
    items = [shard.Item(key=k, image=str(tmp_path / f"{i}.jpg"), sal=str(tmp_path / f"{i}.png"))
             for i, k in enumerate(["ok", "nul\x00id", "ctl\x01id"])]
    skips = shard._key_skips(items)
    assert skips[0] is None
    assert [s[0] for s in skips[1:]] == ["bad id", "bad id"]
    assert "'nul\\x00id'" in skips[1][2] and "'ctl\\x01id'" in skips[2][2]


# ----------------------------------------------------------------------------- crafted shards

BAD_SAMPLE_KEYS = ["../../../../escaped/pwn", None, "nul\x00key"]  # None: an absolute key


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Synthetic shards written by the project's writer plus one hand-made shard whose samples
    (complete and valid otherwise) have a relative traversal key, an absolute key (into this
    temp tree) and a key with a NUL; the manifest's count and sha256 are updated."""
    root = tmp_path_factory.mktemp("crafted")
    synthetic.generate(str(root / "data"), 6, 0, seed=3, size=64, workers=1, progress=False)
    shards = root / "shards"
    assert shard.shard_voc(str(root / "data"), str(root / "data" / "saliency"), str(shards),
                           split="train", shard_size=3, log=lambda *a: None)["exit_code"] == 0
    m = read_manifest(str(shards))
    good = next(s for _, s in iter_tar_samples(shard_paths(str(shards), m)[0]))
    keys = [k if k is not None else str(root / "abs_escape" / "pwn") for k in BAD_SAMPLE_KEYS]
    for target in ("escaped", "abs_escape"):     # where unchecked keys would write (it exists)
        (root / target).mkdir()
    name = "train-000099.tar"
    with tarfile.open(shards / name, "w", format=tarfile.PAX_FORMAT) as tar:
        for key in keys:
            for field in sorted(f for f in good if f != "__key__"):
                info = tarfile.TarInfo("placeholder." + field)
                info.pax_headers = {"path": f"{key}.{field}"}    # keeps the NUL
                info.size = len(good[field])
                tar.addfile(info, io.BytesIO(good[field]))
    assert [s["__key__"] for _, s in iter_tar_samples(str(shards / name))] == keys
    m["shards"].append({"name": name, "count": len(keys), "sha256": sha256_file(shards / name)})
    m["num_samples"] += len(keys)
    write_manifest(str(shards), m)
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(m["classes"]), log=lambda msg: None)
    (root / "export").mkdir()
    torch.save({"state_dict": model.state_dict(), "config": to_dict(cfg),
                "classes": list(m["classes"]), "num_maps": len(m["classes"]) + 1,
                "iteration": 0}, root / "export" / "model.pt")
    return root, keys, m["num_samples"]


def run_infer(root, out, checkpoint=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)                 # CPU -> the reference post-processing
    cmd = [sys.executable, INFER, "--config", CONFIG, "--shards", str(root / "shards"),
           "--checkpoint", str(checkpoint or root / "export" / "model.pt"), "--out", str(out),
           "--cams", "--panels", "100", "infer.scales=[1.0]"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_verify_names_the_unsafe_keys(crafted):
    root, keys, _ = crafted
    problems = verify.verify(str(root / "shards"))
    for key in keys:
        assert any(repr(key) in p and "unsafe key" in p for p in problems), key


def test_infer_writes_nothing_outside_its_output_folder(crafted):
    root, keys, total = crafted
    out = root / "run" / "deep" / "er"
    before = tree(root)
    res = run_infer(root, out)
    new = tree(root) - before
    outside = sorted(p for p in new if not p.startswith(os.path.join("run", "deep", "er"))
                     and p not in ("run", os.path.join("run", "deep")))
    assert outside == []
    assert res.returncode == 1, res.stderr[-3000:]           # skips: exit 1 without --allow-skips
    assert f"{len(keys)} image(s) skipped" in res.stderr
    for key in keys:
        assert f"skipping {key!r}: unsafe sample key" in res.stderr
    good = total - len(keys)
    assert f"{good} written, 0 already there, {len(keys)} skipped" in res.stdout
    assert len(os.listdir(out / "masks")) == good
    assert len(os.listdir(out / "cams")) == good and len(os.listdir(out / "panels")) == good
    pseudo = read_manifest(str(out / "shards"))
    assert pseudo["num_samples"] == good and pseudo["pseudo_masks"]["missing"] == len(keys)
    assert verify.verify(str(out / "shards")) == []
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == good and report["unsafe_keys"] == len(keys)


def test_training_loader_skips_and_counts_unsafe_keys(crafted, caplog):
    root, keys, total = crafted
    before = tree(root)
    loader = ShardLoader(str(root / "shards"), batch_size=total, num_workers=0,
                         augment=TrainAugment(resize_long=(40, 48), crop_size=32))
    with caplog.at_level("WARNING", logger="epsdist.data"):
        batches = list(loader)
    assert len(batches) == 1 and len(batches[0].keys) == total
    assert not set(keys) & set(batches[0].keys)          # replaced by good samples
    assert sum(n for r, n in loader.skipped.items() if r.startswith("unsafe key")) == len(keys)
    for key in keys:
        assert repr(key) in caplog.text
    assert tree(root) == before


def test_evaluate_skips_names_and_counts_unsafe_keys(crafted, tmp_path, capsys):
    root, keys, total = crafted
    pred = tmp_path / "pred"
    pred.mkdir()
    for _, s in (x for p in shard_paths(str(root / "shards"), read_manifest(str(root / "shards")))
                 for x in iter_tar_samples(p)):
        if s["__key__"] not in keys:
            (pred / f"{s['__key__']}.png").write_bytes(s["seg.png"])   # perfect predictions
    before = tree(root)
    code = evaluate.main(["--gt", str(root / "shards"), "--pred", str(pred),
                          "--json", str(tmp_path / "e.json"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())["evaluation"]
    assert result["images"] == total - len(keys) and result["mean_iou"] == 1.0
    assert result["unsafe_keys"] == len(keys) and result["unsafe_key_examples"] == keys
    for key in keys:
        assert f"skipping sample {key!r}: unsafe key" in err
    assert tree(root) == before


def test_segmentation_validation_skips_unsafe_keys(crafted, tmp_path, caplog):
    from epsdist.config import SegConfig
    from epsdist.dist import DistInfo
    from epsdist.seg.eval import validate
    from epsdist.seg.models import build_seg_model

    root, keys, total = crafted
    m = read_manifest(str(root / "shards"))
    cfg = load_config(os.path.join(REPO, "configs", "synthetic_seg.yaml"),
                      [f"data.val_shards={root / 'shards'}", f"data.num_classes={len(m['classes'])}"],
                      cls=SegConfig)
    torch.manual_seed(0)
    model = build_seg_model(cfg.model, len(m["classes"]), log=lambda msg: None)
    info = DistInfo(0, 0, 1, "gloo", torch.device("cpu"), "single")
    pred = tmp_path / "a" / "run" / "deep" / "val_pred"      # '../../../../x' would be in tmp_path
    before = tree(root)
    with caplog.at_level("WARNING"):
        result = validate(model, cfg, info, str(pred), ["background"] + list(m["classes"]))
    assert result["images"] == total - len(keys) and result["skipped"] == len(keys)
    assert len(os.listdir(pred)) == total - len(keys)
    for key in keys:
        assert repr(key) in caplog.text
    assert tree(root) == before
    assert tree(tmp_path) == {"a", *(os.path.relpath(d, tmp_path) for d in
                                     (pred.parent.parent, pred.parent, pred))} | {
        os.path.relpath(pred / n, tmp_path) for n in os.listdir(pred)}


# ----------------------------------------------------------------------------- model files

def test_crafted_model_file_runs_nothing_and_is_named(crafted, tmp_path):
    root, _, _ = crafted
    marker = tmp_path / "marker"
    bad = tmp_path / "crafted_model.pt"
    export = torch.load(root / "export" / "model.pt", weights_only=True)
    export["config"]["extra"] = MarkerPayload(marker)
    torch.save(export, bad)
    with pytest.raises(UnsafeFileError) as e:
        safe_torch_load(str(bad), "--checkpoint")
    assert str(bad) in str(e.value) and re.search(r"GLOBAL (io|builtins)\.open", str(e.value))
    assert "weights_only=False" not in str(e.value)       # no advice to load it unsafely
    res = run_infer(root, tmp_path / "o1" / "o2" / "o3" / "out", checkpoint=bad)
    assert res.returncode != 0 and str(bad) in res.stderr and "safe loader" in res.stderr
    assert not marker.exists()


def test_legacy_pickle_model_file_is_refused(tmp_path):
    marker = tmp_path / "marker"
    with open(tmp_path / "m.pt", "wb") as f:
        pickle.dump({"state_dict": MarkerPayload(marker)}, f)
    with pytest.raises(UnsafeFileError, match="m.pt"):
        safe_torch_load(str(tmp_path / "m.pt"), "--checkpoint")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(UnsafeFileError, match="junk.pt"):
        safe_torch_load(str(tmp_path / "junk.pt"), "--checkpoint")


def test_rng_state_survives_the_safe_loader_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()                  # leaves a cached gaussian (has_gauss = 1)
    assert np.random.get_state()[3] == 1
    atomic_torch_save({"rng": rng_state(), "loader": {"epoch": 1, "skipped": {"x": 2}}},
                      str(tmp_path / "rank00000.pt"))
    expected = (random.random(), np.random.standard_normal(3), np.random.randint(1 << 30),
                torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = safe_torch_load(str(tmp_path / "rank00000.pt"), "per-rank checkpoint state")
    set_rng_state(state["rng"])
    got = (random.random(), np.random.standard_normal(3), np.random.randint(1 << 30),
           torch.rand(3))
    assert got[0] == expected[0] and (got[1] == expected[1]).all() and got[2] == expected[2]
    assert torch.equal(got[3], expected[3])
    assert state["loader"] == {"epoch": 1, "skipped": {"x": 2}}


# ----------------------------------------------------------------------------- cls_labels.npy

def test_released_label_file_format_is_read(tmp_path):
    labels = {"2007_000032": np.eye(20, dtype=np.float32)[0] + np.eye(20, dtype=np.float32)[14],
              np.str_("2007_000039"): np.eye(20, dtype=np.float32)[19]}
    np.save(tmp_path / "cls_labels.npy", labels)
    raw = load_label_npy(str(tmp_path / "cls_labels.npy"))
    assert set(raw) == {"2007_000032", "2007_000039"}
    assert shard.load_labels_file(str(tmp_path / "cls_labels.npy"), 20) == {
        "2007_000032": (0, 14), "2007_000039": (19,)}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("core", ["numpy._core", "numpy.core"])   # numpy 2 / numpy 1 names
def test_label_file_of_any_numpy_and_pickle_protocol_is_read(tmp_path, protocol, core):
    arr = np.asanyarray({"2007_000032": np.eye(20, dtype=np.float32)[3]})
    data = pickle.dumps(arr, protocol=protocol)
    if protocol <= 3:                                  # text GLOBAL opcodes: rename in place
        data = data.replace(b"numpy._core.", core.encode() + b".")
    with open(tmp_path / "l.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
        f.write(data)
    assert np.flatnonzero(load_label_npy(str(tmp_path / "l.npy"))["2007_000032"]).tolist() == [3]


def test_code_running_label_file_is_refused(tmp_path):
    marker = tmp_path / "marker"
    np.save(tmp_path / "cls_labels.npy", {"2007_000032": MarkerPayload(marker)})
    with pytest.raises(UnsafeFileError, match=r"refused global (io|builtins)\.open"):
        load_label_npy(str(tmp_path / "cls_labels.npy"))
    with pytest.raises(shard.InputError, match="cls_labels.npy"):
        shard.load_labels_file(str(tmp_path / "cls_labels.npy"), 20)
    assert not marker.exists()


@pytest.mark.parametrize("content", [np.zeros(20, np.float32), {"a": [1, 0]}, {3: np.ones(2)},
                                     ["2007_000032"]])
def test_label_file_of_another_shape_is_a_clear_error(tmp_path, content):
    np.save(tmp_path / "l.npy", np.asarray(content, dtype=object)
            if isinstance(content, list) else content)
    with pytest.raises(UnsafeFileError, match="l.npy"):
        load_label_npy(str(tmp_path / "l.npy"))
