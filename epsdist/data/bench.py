"""Decode + augment throughput of the training loader on VOC-sized JPEGs.

    python -m epsdist.data.bench [--num 200] [--crop 448] [--resize 256 512] [--workers 0,1,2]
                                 [--url [--reps 3]] [--shard-size 50] [--json FILE]

Writes ``--num`` photo-like 500x375 JPEGs (~quality 90, like VOC's) with saliency PNGs into
temporary shards, then measures
  * ``per-core``: decode + augment of one sample at a time in this process (one thread), the
    figure the loader's per-worker rate is bounded by;
  * ``loader wN``: the whole ShardLoader (tar reading, shuffle buffer, decode, augment,
    batching of 8) with N DataLoader workers, samples/s, after one warm-up epoch.

``--url``: the same shards (``--shard-size`` samples each) also served by an HTTP server on
127.0.0.1 (Python's ``http.server``), read through ``epsdist.data.source`` (curl); prints the
streamed rate, its ratio to the rate from disk measured in the same run, and the bytes fetched
per epoch over the shard bytes (the cost of streaming a shard from its start and dropping the
samples before a slot's range).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..atomic import atomic_write_text
from .augment import TrainAugment
from .loader import ShardLoader, decode_sample
from .manifest import FORMAT, iter_tar_samples, read_manifest, sha256_file, write_manifest


def photo_like(rng: np.random.Generator, h: int = 375, w: int = 500) -> np.ndarray:
    """Smooth colour fields plus texture: compresses like a photo (~60-120 KB at q90)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, f = rng.uniform(0, 1, 3)
        img[..., c] = 128 + 80 * np.sin(6 * f * xx + 4 * a * yy + 3 * b)
    img += rng.normal(0, 18, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_bench_shards(directory: str, num: int, seed: int = 0,
                       shard_size: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    shard_size = shard_size or num
    shards = []
    for first in range(0, num, shard_size):
        name = f"bench-{first // shard_size:06d}.tar"
        path = os.path.join(directory, name)
        count = min(shard_size, num - first)
        with wds.TarWriter(path) as sink:
            for i in range(first, first + count):
                img = io.BytesIO()
                Image.fromarray(photo_like(rng)).save(img, format="JPEG", quality=90)
                sal = io.BytesIO()
                Image.fromarray((rng.random((375, 500)) > 0.7).astype(np.uint8) * 255).save(
                    sal, format="PNG")
                labels = [int(x) for x in rng.random(20) < 0.1]
                sink.write({"__key__": f"b{i:05d}", "jpg": img.getvalue(),
                            "sal.png": sal.getvalue(), "cls.json": json.dumps(labels).encode()})
        shards.append({"name": name, "count": count, "sha256": sha256_file(path)})
    write_manifest(directory, {"format": FORMAT, "source": "bench", "split": "bench",
                               "classes": [f"c{i}" for i in range(20)], "num_samples": num,
                               "shards": shards, "skipped": {}})


def per_core_rate(directory: str, augment: TrainAugment, reps: int = 3) -> float:
    """Samples/s decoding and augmenting one sample at a time, one thread."""
    raw = [sample for entry in read_manifest(directory)["shards"]
           for _, sample in iter_tar_samples(os.path.join(directory, entry["name"]))]
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in raw:
            decode_sample(s, 20, augment, seed=0, epoch=0)
        rates.append(len(raw) / (time.perf_counter() - t0))
    return statistics.median(rates)


def loader_rate(directory: str, augment: TrainAugment, workers: int) -> float:
    """Samples/s of the ShardLoader over ``directory`` (or a URL), after a warm-up epoch."""
    loader = ShardLoader(directory, batch_size=8, num_workers=workers, augment=augment,
                         shuffle_buffer=64)
    for _ in loader:                                     # warm-up epoch (page cache, workers)
        pass
    t0 = time.perf_counter()
    n = sum(len(b.keys) for b in loader)
    return n / (time.perf_counter() - t0)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, quietly, counting the bytes of the shards sent in ``server.sent``."""

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        data = source.read()
        outputfile.write(data)
        if self.path.endswith(".tar"):
            with self.server.lock:
                self.server.sent += len(data)


def serve_loopback(directory: str) -> http.server.ThreadingHTTPServer:
    """An HTTP server of ``directory`` on 127.0.0.1 (a free port), running in a thread."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_CountingHandler, directory=directory))
    server.sent, server.lock = 0, threading.Lock()
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    return server


def url_rows(directory: str, augment: TrainAugment, workers: list[int],
             reps: int = 1) -> list[dict]:
    """Disk and loopback-URL loader rates, measured alternately ``reps`` times (medians), and
    the bytes fetched per epoch over the shard bytes."""
    shard_bytes = sum(os.path.getsize(os.path.join(directory, e["name"]))
                      for e in read_manifest(directory)["shards"])
    server = serve_loopback(directory)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    rows = []
    try:
        for w in workers:
            disks, remotes = [], []
            for _ in range(reps):
                disks.append(loader_rate(directory, augment, w))
                server.sent = 0
                remotes.append(loader_rate(url, augment, w))
                fetched = server.sent / 2 / shard_bytes      # two epochs: warm-up + timed
            disk, remote = statistics.median(disks), statistics.median(remotes)
            rows.append({"what": f"url w{w}", "samples_per_s": remote,
                         "disk_samples_per_s": disk, "ratio_to_disk": remote / disk,
                         "fetched_over_shard_bytes": fetched})
            print(f"  {f'ShardLoader, {w} workers':28s} disk {disk:7.1f}  url {remote:7.1f} "
                  f"samples/s  (url/disk {remote / disk:.2f}; fetched {fetched:.2f}x the "
                  f"shard bytes per epoch)")
    finally:
        server.shutdown()
        server.server_close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=200, help="number of 500x375 JPEGs")
    ap.add_argument("--crop", type=int, default=448)
    ap.add_argument("--resize", type=int, nargs=2, default=(256, 512), metavar=("LO", "HI"))
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    ap.add_argument("--url", action="store_true",
                    help="also stream the shards from a loopback HTTP server (ratio to disk)")
    ap.add_argument("--reps", type=int, default=3,
                    help="--url: disk/url measurements alternated this often (medians)")
    ap.add_argument("--shard-size", type=int, default=0,
                    help="samples per shard (default: one shard; --url: 50)")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    augment = TrainAugment(resize_long=tuple(args.resize), crop_size=args.crop)
    results = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "num": args.num, "crop": args.crop,
               "resize_long": list(args.resize), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        shard_size = args.shard_size or (50 if args.url else args.num)
        write_bench_shards(tmp, args.num, shard_size=shard_size)
        kb = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)
                 if n.endswith(".tar")) / args.num / 1024
        print(f"{args.num} samples of 500x375 JPEG + PNG saliency ({kb:.0f} KB/sample), "
              f"crop {args.crop}, resize long side {args.resize[0]}..{args.resize[1]}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}")
        workers = [int(x) for x in args.workers.split(",")]
        if args.url:
            print(f"  {shard_size} samples per shard, from disk and from http://127.0.0.1")
            results["shard_size"] = shard_size
            results["rows"] += url_rows(tmp, augment, workers, args.reps)
            workers = []
        else:
            rate = per_core_rate(tmp, augment)
            results["rows"].append({"what": "per-core", "samples_per_s": rate})
            print(f"  {'per-core decode+augment':28s} {rate:8.1f} samples/s")
        for w in workers:
            rate = loader_rate(tmp, augment, w)
            results["rows"].append({"what": f"loader w{w}", "samples_per_s": rate})
            print(f"  {f'ShardLoader, {w} workers':28s} {rate:8.1f} samples/s")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
