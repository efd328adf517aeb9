"""The end-to-end demo (`make demo` = `python -m epsdist.demo`): the real commands through the
real `deepspeed` launcher on two CPU ranks (or the GPUs), and the paper's effect: EPS's
pseudo-masks at least 10 mIoU points better than the CAM baseline's, with a lower confusion
ratio. One seed with a shorter segmentation stage runs in CI; the slow test runs the demo's
full settings for seeds 0, 1 and 2."""
import json
import math
import os
import subprocess
import sys

import pytest

from epsdist import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *args, timeout=1200):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    summary = out / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "epsdist.demo", "--out", str(out),
                           "--json", str(summary), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(summary) as f:
        return json.load(f), proc.stdout


def check_effect(s):
    eps, cam = s["methods"]["eps"], s["methods"]["cam"]
    assert eps["pseudo_mask_miou"] >= cam["pseudo_mask_miou"] + 0.10, (eps, cam)
    assert eps["sweep_best_miou"] >= cam["sweep_best_miou"] + 0.10, (eps, cam)
    assert eps["confusion_ratio_mean"] < cam["confusion_ratio_mean"], (eps, cam)
    assert len(eps["confusion_ratio"]) == 4           # water->boat, rails->train, ...
    assert s["effect"]["reproduced"]


def check_outputs(s, out, stdout):
    for m in ("eps", "cam"):
        method = s["methods"][m]
        assert len(os.listdir(os.path.join(REPO, method["panels"]))) == 8
        assert any(n.startswith("events.out.tfevents")
                   for n in os.listdir(os.path.join(REPO, method["tensorboard"])))
        assert method["bg_threshold"] == demo.THRESHOLDS[m]
        assert f"infer.bg_threshold={demo.THRESHOLDS[m]:g}" in stdout
    seg = s["segmentation"]
    assert seg is not None and 0 < seg["val_miou"] <= 1
    assert not math.isnan(s["methods"]["eps"]["segmentation_val_miou"])
    for stage in ("data", "shard_train", "shard_val", "train_eps", "train_cam", "masks_eps",
                  "masks_cam", "sweep_eps", "sweep_cam", "segment_eps"):
        assert s["stage_seconds"][stage] > 0, stage
        assert f"[{stage}] done in" in stdout
        assert f"[{stage}] $ " in stdout                  # the command is printed
    assert "deepspeed --num_gpus" in stdout
    assert "| CAM baseline |" in stdout and "| EPS |" in stdout
    assert f"tensorboard --logdir {s['tensorboard_logdir']}" in stdout
    assert "wall time per stage" in stdout
    figure = os.path.join(REPO, s["figure"])
    assert os.path.isfile(figure) and f"side by side: {s['figure']}" in stdout
    from PIL import Image
    with Image.open(figure) as im:                    # 3 images x (CAM row, EPS row), 2x scale
        assert im.height >= 2 * 6 * 112
    assert sorted(os.listdir(out / "logs"))[0].startswith("01_data")


def test_demo_one_seed_end_to_end(tmp_path):
    """The demo's stage-1 settings with a short segmentation stage (the pseudo-mask
    comparison is what the assertion is about)."""
    out = tmp_path / "demo"
    s, stdout = run_demo(out, "--seed", "0", "--seg-iters", "100")
    check_effect(s)
    check_outputs(s, out, stdout)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_full_settings_reproduce_the_effect(tmp_path, seed):
    out = tmp_path / f"demo{seed}"
    s, stdout = run_demo(out, "--seed", str(seed))
    check_effect(s)
    check_outputs(s, out, stdout)
    assert s["total_seconds"] < 600 * 1.5               # the 10-minute budget, with slack for CI


def test_a_failing_stage_stops_the_demo_with_its_command_and_output(tmp_path):
    env = dict(os.environ)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "epsdist.demo", "--out", str(out),
                           "--num-train", "4", "--num-val", "2", "--size", "8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "[data] failed with exit status 2" in proc.stderr
    assert "epsdist.data.synthetic" in proc.stderr and "--size" in proc.stderr
    assert (out / "logs" / "01_data.log").exists()


def test_summary_table_and_effect_from_reports(tmp_path):
    """summarise/format_table on hand-made reports: the numbers land in the right columns."""
    d = {k: str(tmp_path / k) for k in demo.SUBDIRS}

    def write(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f)

    names = ["background", "boat", "train", "bird", "car"]
    for m, miou, ratios in (("eps", 0.6, [0.1, 0.5, 0.2, 0.3]), ("cam", 0.3, [3.0, 0.4, 2.0, 1.0])):
        pairs = [{"name": f"{c}->{n}", "ratio": r}
                 for c, n, r in zip(["water", "rails", "foliage", "road"], names[1:], ratios)]
        write(os.path.join(d["pseudo"], m, "report.json"),
              {"mean_iou": miou, "class_names": names, "iou": [miou] * 5,
               "confusion_ratio": {"pairs": pairs, "mean": sum(ratios) / 4}})
        write(os.path.join(d["pseudo"], m, "sweep.json"),
              {"sweep": {"best_threshold": 0.35, "best_mean_iou": miou + 0.05}})
    write(os.path.join(d["runs"], "seg_eps", "report.json"), {"mean_iou": 0.55, "iou": {}})
    args = demo.parse_args(["--out", str(tmp_path)])
    s = demo.summarise(args, str(tmp_path), d, {"eps": 0.4, "cam": 0.5}, 2, False,
                       [("data", 1.0), ("train_eps", 2.0)], 3.0)
    assert s["effect"]["miou_gap_points"] == pytest.approx(30)
    assert s["effect"]["pairs_lower"] == ["water->boat", "foliage->bird", "road->car"]
    assert s["effect"]["mean_confusion_ratio_lower"] and s["effect"]["reproduced"]
    table = demo.format_table(s)
    assert "| CAM baseline | 0.5 | 30.0 | water->boat 3.00, rails->train 0.40" in table
    assert "| EPS | 0.4 | 60.0 |" in table and "| 55.0 |" in table
    assert "lower for 3 of 4 pairs" in table and "is reproduced" in table


def test_the_demo_does_not_replace_folders_it_did_not_make(tmp_path):
    """--out pointing at a directory with a user's data/ (e.g. the checkout): refused, untouched."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("keep")
    proc = subprocess.run([sys.executable, "-m", "epsdist.demo", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no demo made" in proc.stderr
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "shards").exists()
