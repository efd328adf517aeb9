"""The pseudo-mask pipeline (epsdist.infer_pipeline): several images per forward give the same
maps and masks, bit for bit (CPU, fp32), as one image at a time; decode workers turn a bad
image into a named skip; a failed write stops the run; nothing is left running afterwards."""
import io
import os
import tarfile
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from epsdist import infer_outputs
from epsdist.cams import batched_view_maps, view_maps
from epsdist.config import InferConfig, load_config
from epsdist.data.shard import TAR_FORMAT, add_sample
from epsdist.infer_pipeline import Grouper, Job, group_size, run
from epsdist.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic_eps.yaml")
# (height, width) of the images, in stream order: odd sizes, mixed, one above max_side (120)
SIZES = [(37, 53), (40, 40), (37, 53), (61, 29), (37, 53), (80, 80), (40, 40), (61, 29),
         (37, 53), (90, 120), (37, 53), (61, 29), (40, 40), (37, 53), (39, 53)]
BAD = 6                                     # this sample's JPEG is garbage after its header


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(load_config(CONFIG).model, 4, log=lambda m: None)
    with torch.no_grad():               # make the head favour some classes so masks are varied
        net.head.weight.mul_(20)
    return net.eval()


def jpeg(rng, h, w) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of SIZES images (one corrupt) and their manifest entries."""
    root = tmp_path_factory.mktemp("pipeline_shards")
    rng = np.random.default_rng(0)
    entries = []
    for s, part in enumerate((range(0, 8), range(8, len(SIZES)))):
        name = f"part-{s}.tar"
        with tarfile.open(root / name, "w", format=TAR_FORMAT) as tar:
            for i in part:
                data = jpeg(rng, *SIZES[i])
                labels = [int(c in (i % 4, (i + 1) % 4)) for c in range(4)]
                add_sample(tar, {"__key__": f"img{i:02d}", "cls.json": str(labels).encode(),
                                 "jpg": data[:2] + b"junk" * 64 if i == BAD else data})
        entries.append({"name": name, "count": len(part)})
    return str(root), {"shards": entries}


class Recording(torch.nn.Module):
    """The model, recording the batch size of every forward."""

    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


def test_batched_views_are_bit_identical_to_one_image(model):
    """``batched_view_maps`` of N images equals ``view_maps`` of each image alone, exactly, for
    odd sizes, with and without flips (a batch of 1 vs 2; of 2 vs 18, where oneDNN / NNPACK
    would take other algorithms), EPS softmax and CAM ReLU, in the HWC-strided layout decoded
    images arrive in, multi-threaded or not."""
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            g = torch.Generator().manual_seed(1)
            for (h, w), n, flip, eps in [((37, 53), 3, True, True), ((61, 29), 2, False, True),
                                         ((9, 7), 3, True, False), ((23, 17), 9, True, True)]:
                images = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
                x = images.permute(0, 3, 1, 2)
                per = batched_view_maps(model, x, (0.5, 1.0, 1.5, 2.0), flip, eps)
                assert len(per) == n
                for i in range(n):
                    views, flips = view_maps(model, x[i:i + 1], (0.5, 1.0, 1.5, 2.0), flip, eps)
                    assert per[i][1] == flips == ([False, True] * 4 if flip else [False] * 4)
                    assert len(per[i][0]) == len(views)
                    for a, b in zip(per[i][0], views):
                        assert torch.equal(a, b), (t, (h, w), i)
    finally:
        torch.set_num_threads(threads)
    assert torch.backends.mkldnn.enabled                        # restored afterwards


def test_groups_hold_one_size_up_to_batch_images_and_max_side_pixels():
    icfg = InferConfig(batch_images=3, max_side=100)
    assert group_size(37, 53, icfg) == 3 and group_size(80, 80, icfg) == 1
    assert group_size(75, 100, InferConfig(batch_images=4, max_side=1024)) == 4
    assert group_size(480, 640, InferConfig(batch_images=4, max_side=1024)) == 3

    class It:
        def __init__(self, key, h, w):
            self.key, self.image = key, torch.zeros(h, w, 3)

    grouper, out = Grouper(icfg, hold=4), []
    for k, (h, w) in enumerate([(37, 53), (40, 40), (37, 53), (37, 53), (40, 40), (61, 29),
                                (9, 9), (9, 9)]):
        out += [[it.key for it in grp] for grp in grouper.add(It(k, h, w))]
    out += [[it.key for it in grp] for grp in grouper.flush()]
    # 0, 2, 3 fill a group; at 7 five images wait (> hold 4): the oldest size goes as it is
    assert out == [[0, 2, 3], [1, 4], [5], [6, 7]]


def run_job(model, shards, out, batch_images, workers, capsys=None):
    location, manifest = shards
    job = Job(location, manifest, str(out), InferConfig(batch_images=batch_images,
                                                         workers=workers, max_side=100,
                                                         impl="torch"), cams=True, panels=4)
    net = Recording(model)
    counts = run(net, job)
    return counts, net.batches


def outputs(out):
    masks = {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())}
    cams = {}
    for p in sorted((out / "cams").iterdir()):
        with np.load(p) as z:
            cams[p.name] = (z["cams"].copy(), z["classes"].copy())
    panels = {p.name: p.read_bytes() for p in sorted((out / "panels").iterdir())}
    return masks, cams, panels


def test_batched_run_writes_the_same_files_and_a_bad_image_is_a_named_skip(
        model, shards, tmp_path, capfd):
    """batch_images 1 (one image per forward, in order) vs 3 with 2 decode workers: the same
    masks, CAMs and panels, byte for byte; groups of 3 were really formed; the corrupt image is
    a counted skip named by its key, the job finishes; a rerun finds every output."""
    counts1, batches1 = run_job(model, shards, tmp_path / "one", 1, 0)
    err1 = capfd.readouterr().err
    counts3, batches3 = run_job(model, shards, tmp_path / "three", 3, 2)
    err3 = capfd.readouterr().err
    for counts, err in ((counts1, err1), (counts3, err3)):
        assert counts == {"written": len(SIZES) - 1, "existing": 0, "skipped": 1}
        assert f"skipping img{BAD:02d}: DecodeError" in err, err
    assert set(batches1) == {2}                     # one image and its flip per forward
    assert max(batches3) == 6 and len(batches3) < len(batches1)
    one, three = outputs(tmp_path / "one"), outputs(tmp_path / "three")
    assert len(one[0]) == len(SIZES) - 1 and len(one[2]) == 4      # panels: the first 4
    assert one[0] == three[0] and one[2] == three[2]
    assert one[1].keys() == three[1].keys()
    for name, (cams, classes) in one[1].items():
        assert np.array_equal(cams, three[1][name][0]) and np.array_equal(classes,
                                                                          three[1][name][1])
    big = np.asarray(Image.open(tmp_path / "three" / "masks" / "img09.png"))
    assert big.shape == (90, 120)                   # back at the original size

    again, batches = run_job(model, shards, tmp_path / "three", 3, 2)
    assert again == {"written": 0, "existing": len(SIZES) - 1, "skipped": 1} and not batches


def leftovers(before_threads, before_children, grace_s=5.0):
    """Threads and child processes started since ``before_*`` that are still running after
    ``grace_s``: a DataLoader's queue feeder threads end by themselves just after its workers
    are shut down (multiprocessing does not join them), so they get a few seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        threads = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        children = [p for p in psutil.Process().children(recursive=True)
                    if p.pid not in before_children and p.status() != psutil.STATUS_ZOMBIE]
        if not (threads or children) or time.monotonic() > deadline:
            return threads, children
        time.sleep(0.05)


def test_a_failed_write_raises_and_nothing_is_left_running(model, shards, tmp_path,
                                                           monkeypatch):
    """A write that fails (disk full on one mask) stops the run with WriteError naming the file;
    after a run, finished or failed, no writer thread and no decode worker is left."""
    before = set(threading.enumerate())
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    run_job(model, shards, tmp_path / "ok", 3, 2)
    assert leftovers(before, children) == ([], [])

    real = infer_outputs.atomic_write_bytes

    def full_disk(path, data):
        if path.endswith(os.path.join("masks", "img04.png")):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(infer_outputs, "atomic_write_bytes", full_disk)
    with pytest.raises(infer_outputs.WriteError, match=r"masks/img04\.png.*No space left"):
        run_job(model, shards, tmp_path / "full", 3, 2)
    assert not (tmp_path / "full" / "masks" / "img04.png").exists()
    assert leftovers(before, children) == ([], [])


def test_writer_raises_the_first_failure_on_submit_and_close():
    w = infer_outputs.Writer(threads=2, depth=2)
    done = []
    w.submit(done.append, 1)

    def fail():
        raise ValueError("bad bytes")

    w.submit(fail)
    with pytest.raises(infer_outputs.WriteError, match="ValueError: bad bytes"):
        for _ in range(1000):                 # the failure reaches submit once the thread ran
            w.submit(done.append, 2)
            threading.Event().wait(0.001)
    with pytest.raises(infer_outputs.WriteError):
        w.close()
    assert done[0] == 1 and not any(t.is_alive() for t in w.threads)
    w.close(abort=True)                       # the cleanup after the failure: no raise


def test_the_benchmark_runs(tmp_path, capsys):
    """``python -m epsdist.infer_bench`` (BENCHMARKS.md's inference rows) at a tiny size."""
    import json

    from epsdist import infer_bench
    out = tmp_path / "bench.json"
    assert infer_bench.main(["--images", "3", "--size", "64", "--batch-images", "1", "2",
                             "--workers", "0", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_images"], r["workers"]) for r in rows] == [(1, 0), (2, 0)]
    assert all(r["ms_per_image"] > 0 and len(r["runs_ms"]) == 1 for r in rows)
    assert "| 2 | 0 |" in capsys.readouterr().out


@pytest.mark.parametrize("override,key", [("infer.batch_images=0", "infer.batch_images"),
                                          ("infer.workers=-1", "infer.workers")])
def test_speed_settings_are_checked_and_do_not_stop_a_resume(override, key):
    from epsdist.config import ConfigError, to_dict
    from epsdist.infer_guard import inference_state
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, [override])
    cfg = load_config(CONFIG, ["infer.batch_images=7", "infer.workers=0"])
    state = inference_state("sha", to_dict(cfg.infer), True, ["a"], "cpu")
    assert state == inference_state("sha", to_dict(load_config(CONFIG).infer), True, ["a"], "cpu")
