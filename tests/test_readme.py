"""Every command in README.md is one the tests or CI run.

The commands are the lines of the README's ```bash blocks (``\\`` continuations joined, ``#``
comments dropped). Each one is checked here, by what it runs:

* ``python -m M ...`` / ``python S.py ...`` / ``deepspeed|torchrun [launcher options] S.py ...``:
  the entry point's real argument parser parses the command's arguments (the parser is stopped
  right after parsing), and for the config-driven entry points (train, infer, segment) the
  recipe plus the command's ``key=value`` overrides load and validate. The training runs
  themselves are the subject of tests/test_train.py, test_infer.py, test_segment.py and
  test_demo.py, which launch the same entry points with ``deepspeed`` on two CPU ranks.
* ``sbatch [options] slurm/X.sh [arguments]``: the script exists, and the arguments, with the
  script's recipe (or ``EPSDIST_CONFIG=...``), parse and load as above for the entry point the
  script runs (tests/test_slurm.py submits these scripts to a real local Slurm).
* ``make T [VAR=...]``: the Makefile has target T and uses VAR (``.ci/run`` is ``make test``;
  ``make demo`` runs ``python -m epsdist.demo``, tests/test_demo.py).
* The data commands (``epsdist.data.synthetic``, ``.shard``, ``.verify``) and every
  ``--print-config`` command are *run*, in the README's order, in a directory laid out as the
  README tells a user to lay out VOC, COCO and the saliency maps, filled with small fixtures of
  the real formats.

A README command that fits none of these (a new tool, a typo in a module name, an option that
no longer exists, a renamed config key) fails here.
"""
import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from epsdist.config import EPSConfig, SegConfig, load_config
from epsdist.data.manifest import voc_palette

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

DEEPSPEED_OPTIONS = {"--num_gpus", "--num_nodes", "--hostfile", "--master_port",
                     "--master_addr", "--include", "--exclude", "--launcher"}
CONFIG_CLS = {"epsdist.train": EPSConfig, "epsdist.infer": EPSConfig,
              "epsdist.segment": SegConfig}
RUN_FOR_REAL = ("epsdist.data.synthetic", "epsdist.data.shard", "epsdist.data.verify")


# ----------------------------------------------------------------------------- the commands


def readme_commands():
    """[(line number, env assignments, argv)] of every command in a ```bash block."""
    lines = open(README, encoding="utf-8").read().split("\n")
    out, in_block, pending, start = [], False, "", 0
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("```"):
            in_block = line == "```bash"
            continue
        if not in_block:
            continue
        if not pending:
            start = i
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        argv = shlex.split(text, comments=True)
        if not argv:
            continue
        env = {}
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        out.append((start, env, argv))
    return out


COMMANDS = readme_commands()


def command_id(c):
    return f"L{c[0]}:" + " ".join(c[2])[:60]


def entry_point(argv):
    """(module, arguments) of a python / deepspeed / torchrun command; None for other tools."""
    prog = argv[0]
    if prog in ("python", "python3"):
        if argv[1] == "-m":
            return argv[2], argv[3:]
        script, rest = argv[1], argv[2:]
    elif prog in ("deepspeed", "torchrun"):
        i = 1
        while not argv[i].endswith(".py"):
            if prog == "deepspeed":
                assert argv[i] in DEEPSPEED_OPTIONS, f"unknown deepspeed option {argv[i]}"
            i += 1 if "=" in argv[i] else 2
        script, rest = argv[i], argv[i + 1:]
    else:
        return None
    assert os.path.isfile(os.path.join(REPO, script)), f"{script}: no such file"
    return script[:-3].replace("/", "."), rest


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def dry_parse(module, args, monkeypatch):
    """Run ``module.main(args)`` up to the end of its argument parsing; returns the namespace
    (a parse error fails the test with argparse's message)."""
    for name in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, name)

        def stop(self, *a, _original=original, **k):
            raise _Parsed(_original(self, *a, **k))
        monkeypatch.setattr(argparse.ArgumentParser, name, stop)
    mod = importlib.import_module(module)
    try:
        mod.main(list(args))
    except _Parsed as parsed:
        ns = parsed.namespace
    except SystemExit as e:
        pytest.fail(f"python -m {module} {shlex.join(args)}: arguments rejected (exit {e.code})")
    else:
        pytest.fail(f"{module}.main returned without parsing arguments")
    finally:
        monkeypatch.undo()
    if module in CONFIG_CLS:                   # the recipe + overrides load and validate
        assert ns.config and os.path.isfile(os.path.join(REPO, ns.config)), ns.config
        load_config(os.path.join(REPO, ns.config), ns.overrides, CONFIG_CLS[module])
    return ns


def makefile_targets_and_vars():
    text = open(os.path.join(REPO, "Makefile")).read()
    return (set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M)),
            set(re.findall(r"\$\((\w+)\)", text)))


def sbatch_entry(argv, env):
    """(module, arguments) that an sbatch command's script runs."""
    i = next(i for i, a in enumerate(argv) if a.endswith(".sh"))
    script = os.path.join(REPO, argv[i])
    assert os.path.isfile(script), argv[i]
    m = re.search(r'^epsdist_(train|segment|infer) (\S+) "\$@"', open(script).read(), re.M)
    assert m, f"{argv[i]} runs no epsdist entry point"
    stage, config = m.groups()
    args = ["--config", env.get("EPSDIST_CONFIG", config)]
    if stage == "infer":
        args += shlex.split(env.get("EPSDIST_INFER_ARGS", ""))
        args += ["--checkpoint", "RUN/export/model.pt", "--shards", "SHARDS", "--out", "OUT"]
    return f"epsdist.{stage}", args + argv[i + 1:]


# ----------------------------------------------------------------------------- every command


def test_the_readme_has_the_commands_the_issue_asks_for():
    text = " ; ".join(" ".join(c[2]) for c in COMMANDS)
    for needle in ("make demo", "make test", "deepspeed --num_gpus 8 epsdist/train.py",
                   "sbatch -p gpu -A myproject slurm/train_coco.sh", "epsdist/infer.py",
                   "epsdist/segment.py", "python -m epsdist.data.shard voc",
                   "python -m epsdist.data.shard coco", "python -m epsdist_kernels.bench"):
        assert needle in text, needle
    assert "make test" in open(os.path.join(REPO, ".ci", "run")).read()


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_readme_command_parses(command, monkeypatch):
    line, env, argv = command
    monkeypatch.chdir(REPO)
    targets, variables = makefile_targets_and_vars()
    for key in env:                       # VAR=... before a command: used by what it runs
        assert key in variables or key.startswith("EPSDIST_"), f"line {line}: {key}"
    prog = argv[0]
    if prog == "make":
        names = [a for a in argv[1:] if "=" not in a]
        assert names and all(t in targets for t in names), f"line {line}: {argv}"
        for a in argv[1:]:
            if "=" in a:
                key, value = a.split("=", 1)
                assert key in variables, f"line {line}: Makefile does not use {key}"
                if key == "DEMO_ARGS":
                    dry_parse("epsdist.demo", ["--out", "runs/demo", *shlex.split(value)],
                              monkeypatch)
        return
    if prog == "sbatch":
        script = next(a for a in argv if a.endswith(".sh"))
        slurm_text = open(os.path.join(REPO, "slurm", "common.sh")).read() + open(script).read()
        for key in env:                   # EPSDIST_* settings the scripts really read
            assert re.search(rf"\b{key}\b", slurm_text), f"line {line}: {key}"
        module, args = sbatch_entry(argv, env)
        dry_parse(module, args, monkeypatch)
        return
    if prog == "sudo" or argv[0] == "tests/slurm/local_slurm.sh":
        script = argv[1] if prog == "sudo" else argv[0]
        assert script == "tests/slurm/local_slurm.sh" and argv[-1] in ("start", "stop"), argv
        return                                # tests/test_slurm.py runs start and stop
    if prog == "export":
        key, value = argv[1].split("=", 1)
        assert key == "SLURM_CONF" and value.startswith("/tmp/epsdist-slurm/")
        assert "/tmp/epsdist-slurm" in open(os.path.join(REPO, "tests/slurm/local_slurm.sh")).read()
        return
    if prog == "tensorboard":
        assert argv[1:] == ["--logdir", "runs"], argv      # every run.dir of the recipes
        return
    entry = entry_point(argv)
    assert entry is not None, f"README line {line}: no test covers the tool {prog!r}"
    dry_parse(*entry, monkeypatch)


def test_a_wrong_readme_command_would_fail(monkeypatch):
    """The checks above can fail: an unknown option, a misspelt config key, a missing recipe."""
    monkeypatch.chdir(REPO)
    with pytest.raises(pytest.fail.Exception, match="arguments rejected"):
        dry_parse("epsdist.data.shard", ["voc", "--root", "x", "--saliency", "s", "--split",
                                         "train", "--out", "o", "--wrokers", "2"], monkeypatch)
    from epsdist.config import ConfigError
    with pytest.raises(ConfigError, match="train.lrr"):
        dry_parse("epsdist.train", ["--config", "configs/voc_eps.yaml", "train.lrr=1"],
                  monkeypatch)
    with pytest.raises(AssertionError):
        dry_parse("epsdist.segment", ["--config", "configs/voc_segg.yaml"], monkeypatch)
    with pytest.raises(AssertionError):
        entry_point(["deepspeed", "--num_gpus", "2", "epsdist/trian.py"])


# ----------------------------------------------------------------------------- run for real


def _palette_png(path, arr):
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def _jpeg(path, w, h, rng):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def _saliency(path, mask):
    Image.fromarray(np.where((mask > 0) & (mask < 255), 230, 10).astype(np.uint8)).save(path)


def make_voc(root, sal_dir, rng):
    """VOC2012 + SegmentationClassAug fixture: 6 train_aug + 3 val images, 20 classes."""
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.makedirs(sal_dir, exist_ok=True)
    ids = {"train_aug": [f"2008_{i:06d}" for i in range(6)],
           "val": [f"2007_{i:06d}" for i in range(3)]}
    for k, key in enumerate(ids["train_aug"] + ids["val"]):
        w, h = 40 + 3 * k, 30 + 2 * k
        mask = np.zeros((h, w), np.uint8)
        mask[4:h // 2, 5:w // 2] = 1 + k % 20
        mask[h // 2:h - 3, w // 2:w - 4] = 1 + (7 * k + 3) % 20
        mask[4, 5:w // 2] = 255                               # a VOC boundary band
        _jpeg(os.path.join(root, "JPEGImages", f"{key}.jpg"), w, h, rng)
        _palette_png(os.path.join(root, "SegmentationClassAug", f"{key}.png"), mask)
        _saliency(os.path.join(sal_dir, f"{key}.png"), mask)
    for split, keys in ids.items():
        with open(os.path.join(root, "ImageSets/Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(keys) + "\n")
    return ids


def make_coco(coco_dir, sal_dir, split, rng):
    """COCO 2014 fixture: images, instances json (polygons, an RLE crowd), saliency maps."""
    img_dir, ann_dir = os.path.join(coco_dir, f"{split}2014"), os.path.join(coco_dir, "annotations")
    for d in (img_dir, ann_dir, sal_dir):
        os.makedirs(d, exist_ok=True)
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}]
    images, anns = [], []
    for i in range(1, 4):
        w, h = 48 + 4 * i, 36 + 2 * i
        name = f"COCO_{split}2014_{i:012d}"
        _jpeg(os.path.join(img_dir, f"{name}.jpg"), w, h, rng)
        images.append({"id": i, "file_name": f"{name}.jpg", "width": w, "height": h})
        x0, y0 = 4 + i, 3 + i
        anns.append({"id": 10 * i, "image_id": i, "category_id": cats[i - 1]["id"], "iscrowd": 0,
                     "area": 200.0, "bbox": [x0, y0, 20, 10],
                     "segmentation": [[x0, y0, x0 + 20, y0, x0 + 20, y0 + 10, x0, y0 + 10]]})
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y0 + 10, x0:x0 + 20] = 1
        _saliency(os.path.join(sal_dir, f"{name}.png"), mask)
    # an image without annotations, as train2014 has: an expected exclusion, not a failure
    _jpeg(os.path.join(img_dir, f"COCO_{split}2014_{4:012d}.jpg"), 40, 30, rng)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(
        os.path.join(sal_dir, f"COCO_{split}2014_{4:012d}.png"))
    unannotated = {"id": 4, "file_name": f"COCO_{split}2014_{4:012d}.jpg", "width": 40, "height": 30}
    h1, w1 = images[0]["height"], images[0]["width"]          # a crowd region (RLE) on image 1
    anns.append({"id": 99, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 30.0,
                 "bbox": [30, 20, 6, 5],
                 "segmentation": {"size": [h1, w1], "counts": _rle_box(h1, w1, 30, 20, 6, 5)}})
    with open(os.path.join(ann_dir, f"instances_{split}2014.json"), "w") as f:
        json.dump({"images": images + [unannotated], "annotations": anns, "categories": cats}, f)
    return [im["file_name"][:-4] for im in images]


def _rle_box(h, w, x, y, bw, bh):
    """COCO's compressed RLE of a box, from pycocotools."""
    from pycocotools import mask as mask_utils
    m = np.zeros((h, w), np.uint8)
    m[y:y + bh, x:x + bw] = 1
    return mask_utils.encode(np.asfortranarray(m))["counts"].decode()


def test_readme_data_and_print_config_commands_run_on_fixtures(tmp_path):
    """The README's dataset steps, run as written, in a folder laid out as it says."""
    rng = np.random.default_rng(0)
    voc = make_voc(str(tmp_path / "data/VOCdevkit/VOC2012"), str(tmp_path / "data/saliency/voc"),
                   rng)
    coco = {s: make_coco(str(tmp_path / "data/coco"), str(tmp_path / "data/saliency/coco"), s, rng)
            for s in ("train", "val")}
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    os.symlink(os.path.join(REPO, "epsdist"), tmp_path / "epsdist")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ran = []
    for line, cmd_env, argv in COMMANDS:
        entry = entry_point(argv) if argv[0].startswith("python") else None
        if entry is None or not (entry[0] in RUN_FOR_REAL or "--print-config" in argv):
            continue
        argv = [sys.executable] + argv[1:]
        proc = subprocess.run(argv, cwd=tmp_path, env=dict(env, **cmd_env),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"README line {line}: {shlex.join(argv[1:])}\n"
                                      f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        ran.append((entry[0], argv, proc.stdout))
    modules = [m for m, _, _ in ran]
    assert modules.count("epsdist.data.shard") >= 6 and "epsdist.data.verify" in modules
    assert "epsdist.data.synthetic" in modules
    # what the README's shards hold: every image of the lists, with their classes
    for name, n in (("voc_train_aug", len(voc["train_aug"])), ("voc_val", len(voc["val"])),
                    ("coco_train", len(coco["train"])), ("coco_val", len(coco["val"])),
                    ("synthetic_train", 400), ("synthetic_val", 100)):
        with open(tmp_path / "shards" / name / "manifest.json") as f:
            manifest = json.load(f)
        assert sum(s["count"] for s in manifest["shards"]) == n, name
        assert len(manifest["classes"]) == {"voc": 20, "coc": 3, "syn": 4}[name[:3]], name
    # --print-config prints the resolved recipe with the overrides applied
    printed = [out for m, argv, out in ran if "--print-config" in argv]
    assert printed and all(out.startswith("seed:") for out in printed)
    seg = next(out for m, argv, out in ran if "train.max_iters=100" in argv)
    assert "max_iters: 100" in seg
