"""The streaming loader: equal batches per rank, determinism, exact resume, skips."""
import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from epsdist.data.augment import MEAN_U8, TrainAugment, normalize_batch
from epsdist.data.loader import ShardLoader, batches_per_rank
from epsdist.data.manifest import FORMAT, read_manifest, sha256_file, write_manifest

C = 3
SMALL = TrainAugment(resize_long=(40, 56), crop_size=48)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def labels_of(key: str) -> list:
    i = int(key[1:])
    return [int(i % 2 == 0), int(i % 3 == 0), int(i % 2 == 1)]


def make_shards(directory, counts, *, corrupt=(), no_sal=(), mismatch=(), truncate=None):
    """Shards of samples s0000, s0001, ...; the image encodes the index in its pixels."""
    os.makedirs(directory, exist_ok=True)
    shards, i = [], 0
    for n_shard, count in enumerate(counts):
        name = f"t-{n_shard:06d}.tar"
        path = os.path.join(directory, name)
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                key = f"s{i:04d}"
                h, w = 30 + i % 7, 34 + i % 5
                rng = np.random.default_rng(i)
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                sal = rng.integers(0, 256, (h, w), dtype=np.uint8)
                if key in mismatch:
                    sal = sal[:-3]
                members = {"jpg": b"not a jpeg" if key in corrupt else encode(img, "JPEG"),
                           "cls.json": json.dumps(labels_of(key)).encode()}
                if key not in no_sal:
                    members["sal.png"] = encode(sal, "PNG")
                for field, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        shards.append({"name": name, "count": count, "sha256": sha256_file(path)})
    write_manifest(directory, {"format": FORMAT, "source": "test", "split": "train",
                               "classes": ["a", "b", "c"], "num_samples": sum(counts),
                               "shards": shards, "skipped": {}})
    if truncate is not None:
        path = os.path.join(directory, shards[truncate]["name"])
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return directory


def collect(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys == b.keys
        assert torch.equal(a.image, b.image) and torch.equal(a.saliency, b.saliency)
        assert torch.equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("shards")), [5, 3, 11, 2, 6])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_equal_batches_per_rank_and_no_repeats(shards, world):
    bs = 2
    per_rank = []
    for rank in range(world):
        loader = ShardLoader(shards, batch_size=bs, rank=rank, world_size=world, num_workers=0,
                             augment=SMALL)
        batches = collect(loader)
        assert len(batches) == len(loader) == 27 // (world * bs)
        per_rank.append([k for b in batches for k in b.keys])
    keys = [k for ks in per_rank for k in ks]
    assert len(keys) == len(set(keys))                  # nothing seen twice in an epoch
    assert 27 - len(keys) < world * bs                  # only the remainder is dropped
    for b in batches:
        assert b.image.shape == (bs, 3, 48, 48) and b.saliency.shape == (bs, 1, 48, 48)
        assert b.labels.tolist() == [labels_of(k) for k in b.keys]


def test_epochs_differ_and_runs_repeat(shards):
    def run(seed):
        loader = ShardLoader(shards, batch_size=3, num_workers=0, seed=seed, augment=SMALL)
        return collect(loader), collect(loader)
    a0, a1 = run(0)
    b0, b1 = run(0)
    same(a0, b0)
    same(a1, b1)
    assert [b.keys for b in a0] != [b.keys for b in a1]     # reshuffled per epoch
    c0, _ = run(1)
    assert [b.keys for b in a0] != [b.keys for b in c0]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 4, 6])
def test_resume_equals_uninterrupted(shards, workers, stop_after):
    kw = dict(batch_size=2, rank=1, world_size=2, num_workers=workers, seed=3, augment=SMALL)
    full = ShardLoader(shards, **kw)
    reference = collect(full) + collect(full)               # 6 batches per epoch, two epochs

    first = ShardLoader(shards, **kw)
    head = collect(first, stop_after)                       # then the job dies
    state = json.loads(json.dumps(first.state_dict()))      # survives serialisation
    resumed = ShardLoader(shards, **kw)
    resumed.load_state_dict(state)
    tail = []
    while len(head) + len(tail) < len(reference):
        tail += collect(resumed)
    same(head + tail, reference)


def test_worker_count_changes_order_but_not_content(shards):
    one = collect(ShardLoader(shards, batch_size=2, num_workers=0, augment=SMALL))
    two = collect(ShardLoader(shards, batch_size=2, num_workers=2, augment=SMALL))
    assert sorted(k for b in one for k in b.keys) == sorted(k for b in two for k in b.keys)


def test_resume_with_other_layout_starts_next_epoch(shards, caplog):
    a = ShardLoader(shards, batch_size=2, num_workers=0, augment=SMALL)
    next(iter(a))
    b = ShardLoader(shards, batch_size=2, world_size=2, num_workers=0, augment=SMALL)
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.consumed) == (1, 0)
    assert "cannot be replayed exactly" in caplog.text


def test_bad_samples_are_substituted_and_counted(tmp_path, caplog):
    d = make_shards(str(tmp_path / "bad"), [6, 6], corrupt={"s0001"}, no_sal={"s0004"},
                    mismatch={"s0007"})
    loader = ShardLoader(d, batch_size=4, num_workers=0, augment=SMALL)
    batches = collect(loader)
    assert len(batches) == 3 and all(len(b.keys) == 4 for b in batches)
    assert loader.skipped == {"corrupt image": 1, "missing saliency": 1,
                              "image/saliency size mismatch": 1}
    keys = [k for b in batches for k in b.keys]
    assert not {"s0001", "s0004", "s0007"} & set(keys)
    assert "s0001" in caplog.text and "t-000000.tar" in caplog.text


def test_truncated_tar_is_named_and_counts_stay_equal(tmp_path, caplog):
    d = make_shards(str(tmp_path / "trunc"), [6, 6], truncate=1)
    loader = ShardLoader(d, batch_size=3, num_workers=0, augment=SMALL)
    batches = collect(loader)
    assert len(batches) == 4
    (reason, n), = loader.skipped.items()
    assert "t-000001.tar" in reason and 1 <= n <= 6
    assert "t-000001.tar" in caplog.text


def test_too_few_samples_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="full batch"):
        batches_per_rank(27, world_size=4, batch_size=8)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(shards, batch_size=2, rank=2, world_size=2)


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        ShardLoader(str(tmp_path), batch_size=2)


# --------------------------------------------------------------------------- augmentation

def test_saliency_follows_every_geometric_step():
    """Without colour jitter the red channel of an image that equals its saliency stays equal
    to the saliency through resize, flip and crop/pad (up to resampling rounding)."""
    aug = TrainAugment(resize_long=(20, 90), crop_size=64, jitter=(0, 0, 0, 0))
    yy, xx = np.mgrid[0:50, 0:70]
    sal = ((xx * 3 + yy) % 256).astype(np.uint8)
    image = np.stack([sal, np.zeros_like(sal), np.zeros_like(sal)], axis=-1)
    flips = set()
    for seed in range(12):
        out_img, out_sal = aug(image, sal, random.Random(seed))
        assert out_img.shape == (3, 64, 64) and out_sal.shape == (1, 64, 64)
        inside = out_img[1] == 0                    # padding is the mean colour, green != 0
        assert (out_img[:, ~inside] == torch.tensor(MEAN_U8, dtype=torch.uint8)[:, None]).all()
        red, s = out_img[0].int(), out_sal[0].int()
        assert (red[inside] - s[inside]).abs().max() <= 1
        assert (s[~inside] == 0).all()
        assert 0 < inside.float().mean() < 1            # some padding, some image
        # the ramp x * 3 + y runs left to right unless the sample was flipped
        row = s[inside.any(1).nonzero()[0, 0]][inside[inside.any(1).nonzero()[0, 0]]]
        flips.add(bool(row[-1] < row[0]))
    assert flips == {True, False}


def test_normalize_batch_matches_torchvision():
    import torchvision.transforms.v2.functional as TF
    img = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    sal = torch.randint(0, 256, (2, 1, 5, 7), dtype=torch.uint8)
    ours, ours_sal = normalize_batch(img, sal)
    theirs = TF.normalize(img.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours_sal, sal.float() / 255)
    pad, _ = normalize_batch(torch.tensor(MEAN_U8, dtype=torch.uint8).view(1, 3, 1, 1), sal)
    assert pad.abs().max() < 0.01


def test_small_image_is_padded_large_image_is_cropped():
    aug = TrainAugment(resize_long=(32, 32), crop_size=48, jitter=(0, 0, 0, 0))
    img = np.full((20, 32, 3), 200, dtype=np.uint8)
    out, sal = aug(img, np.full((20, 32), 255, dtype=np.uint8), random.Random(0))
    assert int((sal == 255).sum()) == int((out[0] == 200).sum()) == 20 * 32
    aug = TrainAugment(resize_long=(100, 100), crop_size=48)
    out, sal = aug(np.zeros((80, 100, 3), dtype=np.uint8),
                   np.full((80, 100), 255, dtype=np.uint8), random.Random(0))
    assert bool((sal == 255).all())


def test_augmentation_is_a_function_of_the_seed():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    sal = np.random.default_rng(1).integers(0, 256, (40, 50), dtype=np.uint8)
    a = SMALL(img, sal, random.Random("0/1/key"))
    b = SMALL(img, sal, random.Random("0/1/key"))
    c = SMALL(img, sal, random.Random("0/2/key"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# --------------------------------------------------------------------------- end to end

def test_synthetic_to_shards_to_loader(tmp_path):
    """The three data commands chained: generate -> shard (VOC writer) -> verify -> load."""
    from epsdist.data import shard, synthetic, verify
    root = tmp_path / "syn"
    synthetic.generate(str(root), 14, 2, seed=5, size=96, workers=1, progress=False)
    out = tmp_path / "shards"
    summary = shard.shard_voc(str(root), str(root / "saliency"), str(out), split="train",
                              shard_size=4, log=lambda *a: None)
    assert summary["exit_code"] == 0 and summary["num_samples"] == 14
    assert verify.verify(str(out)) == []
    loader = ShardLoader(str(out), batch_size=3, world_size=2, rank=1, num_workers=0,
                         augment=TrainAugment(resize_long=(64, 96), crop_size=80))
    assert loader.classes == list(synthetic.CLASSES)
    batches = collect(loader)
    assert len(batches) == 14 // 6
    for b in batches:
        for key, row in zip(b.keys, b.labels.tolist()):
            seg = np.asarray(Image.open(root / "SegmentationClass" / f"{key}.png"))
            present = {int(v) - 1 for v in np.unique(seg) if 0 < v < 255}
            assert {c for c, v in enumerate(row) if v} == present


def test_data_bench_runs_and_writes_json(tmp_path):
    from epsdist.data import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--num", "16", "--crop", "64", "--resize", "48", "96",
                       "--workers", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["what"] for r in result["rows"]] == ["per-core", "loader w0"]
    assert all(r["samples_per_s"] > 0 for r in result["rows"])


def test_shard_not_matching_its_sha256_is_named_and_never_trained_on(tmp_path, caplog):
    d = make_shards(str(tmp_path / "damaged"), [6, 6])
    path = os.path.join(d, "t-000001.tar")
    data = bytearray(open(path, "rb").read())
    with tarfile.open(path) as tar:                    # one byte inside a JPEG's entropy data
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data[member.offset_data + member.size // 2] ^= 0x55
    open(path, "wb").write(bytes(data))
    loader = ShardLoader(d, batch_size=3, num_workers=0, augment=SMALL)
    batches = collect(loader)
    assert len(batches) == 4 and all(len(b.keys) == 3 for b in batches)
    (reason, n), = loader.skipped.items()
    assert reason.startswith("sha256 mismatch t-000001.tar") and n == 6
    assert not {f"s{i:04d}" for i in range(6, 12)} & {k for b in batches for k in b.keys}
    assert "sha256 mismatch t-000001.tar" in caplog.text


def test_truncated_tar_warning_names_no_none_key(tmp_path, caplog):
    d = make_shards(str(tmp_path / "trunc"), [6, 6], truncate=1)
    m = read_manifest(d)                # a shard truncated before it was hashed: digest agrees
    m["shards"][1]["sha256"] = sha256_file(os.path.join(d, "t-000001.tar"))
    write_manifest(d, m)
    loader = ShardLoader(d, batch_size=3, num_workers=0, augment=SMALL)
    collect(loader)
    (reason, n), = loader.skipped.items()
    assert reason.split(":")[0] in ("truncated tar t-000001.tar", "unreadable tar t-000001.tar")
    assert 1 <= n <= 6 and f"skipping a sample of t-000001.tar: {reason}" in caplog.text
    assert "None" not in caplog.text


def test_empty_and_foreign_bytes_are_decode_errors_that_say_so():
    from epsdist.data.augment import DecodeError, decode_gray, decode_mask, decode_rgb
    for decode in (decode_rgb, decode_gray, decode_mask):
        with pytest.raises(DecodeError, match=r"empty file \(0 bytes\)"):
            decode(b"")
    with pytest.raises(DecodeError) as e:
        decode_mask(b"%PDF-1.4")
    assert "object at" not in str(e.value) and "8 bytes" in str(e.value)
