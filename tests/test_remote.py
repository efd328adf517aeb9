"""Shards from URLs (epsdist.data.source): a real HTTP server on 127.0.0.1 with injected faults,
the pipe: form, an S3-compatible server (moto) when installed, the cache, the name checks."""
import collections
import http.server
import logging
import os
import shlex
import socket
import struct
import sys
import threading
import urllib.parse

import pytest
import torch

from epsdist.config import ConfigError, load_config
from epsdist.data.loader import ShardLoader
from epsdist.data.manifest import (ManifestError, iter_rank_samples, read_manifest,
                                   write_manifest)
from epsdist.data.source import FetchOptions, join_shard, redact
from test_loader import SMALL, make_shards

COUNTS = [7, 5, 9, 3]                     # 24 samples: every sample is in an epoch at batch 3
FAST = FetchOptions(retries=2, backoff_s=0.01)


class ShardServer:
    """Serves ``root`` on 127.0.0.1; counts GETs per path. ``faults[path]`` is a list of
    faults used one per request ("reset": half the file then a TCP reset; an int: that HTTP
    status); paths in ``missing`` always answer 404."""

    def __init__(self, root):
        self.root, self.lock = str(root), threading.Lock()
        self.requests = collections.Counter()
        self.faults = collections.defaultdict(list)
        self.missing = set()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    def url(self, sub="", auth=""):
        return f"http://{auth}127.0.0.1:{self.httpd.server_address[1]}/{sub}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        with srv.lock:
            srv.requests[path] += 1
            fault = srv.faults[path].pop(0) if srv.faults[path] else None
        file = os.path.join(srv.root, path)
        if isinstance(fault, int) or path in srv.missing or ".." in path \
                or not os.path.isfile(file):
            self.send_error(fault if isinstance(fault, int) else 404)
            return
        with open(file, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "reset":
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        self.wfile.write(data)

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass


@pytest.fixture
def shards(tmp_path):
    make_shards(str(tmp_path / "shards"), COUNTS)
    return tmp_path / "shards"


@pytest.fixture
def server(shards):
    with ShardServer(shards) as srv:
        yield srv


def epoch(loader):
    return [(b.keys, b.image.clone(), b.saliency.clone(), b.labels.clone()) for b in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0]
        for s, t in zip(x[1:], y[1:]):
            assert torch.equal(s, t)


def shard_requests(srv):
    return {p: n for p, n in srv.requests.items() if p.endswith(".tar")}


# --------------------------------------------------------------------------- names and URLs

@pytest.mark.parametrize("name,problem", [
    ("../x.tar", "'/'"), ("a/../../x.tar", "'/'"), ("/etc/passwd", "'/'"),
    ("a\\b.tar", "backslash"), ("a\nb.tar", "control"), ("x\x00.tar", "control"),
    ("http://evil.example/x.tar", "'/'"), ("evil:x.tar", "':'"), ("//evil.example/x.tar", "'/'"), ("", "empty"),
    ("..", "starts with '.'"), (".hidden.tar", "starts with '.'"),
])
def test_bad_shard_names_are_rejected_naming_them(tmp_path, name, problem):
    for base in (str(tmp_path), "http://127.0.0.1:1/d/", "s3://bucket/d", "pipe:cat d/{name}"):
        with pytest.raises(ManifestError, match=problem) as e:
            join_shard(base, name)
        assert repr(name) in str(e.value)
    make_shards(str(tmp_path), [2])
    m = read_manifest(str(tmp_path))
    m["shards"][0]["name"] = name
    write_manifest(str(tmp_path), m)
    with pytest.raises(ManifestError, match=problem):
        read_manifest(str(tmp_path))


def test_names_stay_on_the_host_and_are_quoted():
    base = "https://data.example:8443/sets/voc/"
    for name in ("a.tar", "x?y=1.tar", "x#frag.tar", "@x.tar", "%2e%2e.tar", "a b.tar"):
        url = join_shard(base, name)
        parts = urllib.parse.urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("https", "data.example:8443")
        assert parts.path.startswith("/sets/voc/") and not parts.query and not parts.fragment
        assert urllib.parse.unquote(parts.path) == "/sets/voc/" + name
    assert join_shard("s3://bkt/p", "t-1.tar") == "s3://bkt/p/t-1.tar"
    assert join_shard("pipe:mc cat s3/b/{name}", "a b.tar") == "pipe:mc cat s3/b/'a b.tar'"
    with pytest.raises(ManifestError, match="needs '{name}'"):
        join_shard("pipe:cat shards", "a.tar")


def test_redact_hides_credentials():
    assert redact("https://ann:s3cr3t@host:81/d/x.tar?X-Amz-Signature=abc") == \
        "https://***@host:81/d/x.tar?***"
    assert redact("pipe:curl -H 'Authorization: Bearer tok' http://h/{name}") == "pipe:curl ..."
    assert redact("/local/dir") == "/local/dir"


@pytest.mark.parametrize("override,key", [
    ("data.fetch_retries=-1", "data.fetch_retries"), ("data.fetch_backoff_s=-0.5",
                                                      "data.fetch_backoff_s"),
    ("data.http_command=curl -s", "data.http_command"), ("data.s3_command=aws s3 cp",
                                                         "data.s3_command"),
])
def test_fetch_config_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
    from epsdist.config import SegConfig
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override], cls=SegConfig)


# --------------------------------------------------------------------------- streaming

def test_url_gives_the_same_batches_as_the_directory_on_every_rank_and_resumes_exactly(
        shards, server):
    kw = dict(batch_size=3, world_size=2, num_workers=2, augment=SMALL, seed=3)
    for rank in (0, 1):
        want = epoch(ShardLoader(str(shards), rank=rank, **kw))
        assert_same(epoch(ShardLoader(server.url(), rank=rank, fetch=FAST, **kw)), want)
    first = ShardLoader(server.url(), rank=1, fetch=FAST, **kw)
    it = iter(first)
    head = [next(it).keys for _ in range(2)]
    state = first.state_dict()
    resumed = ShardLoader(server.url(), rank=1, fetch=FAST, **kw)
    resumed.load_state_dict(state)
    tail = epoch(resumed)
    assert [k for k, *_ in want[:2]] == head
    assert_same(tail, want[2:])
    assert not first.skipped and not resumed.skipped


def test_reset_and_503_are_retried_and_the_stream_is_exact(shards, server):
    server.faults["t-000001.tar"] = ["reset"]
    server.faults["t-000002.tar"] = [503, "reset"]
    kw = dict(batch_size=3, num_workers=0, augment=SMALL)
    want = epoch(ShardLoader(str(shards), **kw))
    loader = ShardLoader(server.url(), fetch=FAST, **kw)
    assert_same(epoch(loader), want)
    assert not loader.skipped
    assert shard_requests(server) == {"t-000000.tar": 1, "t-000001.tar": 2, "t-000002.tar": 3,
                                      "t-000003.tar": 1}


def test_unreachable_shard_is_named_replaced_and_counted(shards, server, caplog):
    server.missing.add("t-000002.tar")
    url = server.url(auth="ann:s3cr3t@")
    loader = ShardLoader(url, batch_size=3, num_workers=0, augment=SMALL, fetch=FAST)
    with caplog.at_level(logging.WARNING, "epsdist.data"):
        batches = epoch(loader)
    assert len(batches) == len(loader) == 8
    assert all(len(keys) == 3 for keys, *_ in batches)
    reasons = [r for r in loader.skipped if "unreachable shard t-000002.tar" in r]
    assert sum(loader.skipped[r] for r in reasons) == COUNTS[2] == sum(loader.skipped.values())
    assert "HTTP error" in reasons[0] and "after 3 attempts" in reasons[0]
    assert server.requests["t-000002.tar"] == FAST.retries + 1
    assert "t-000002.tar" in caplog.text and "s3cr3t" not in caplog.text
    assert "s3cr3t" not in "".join(loader.skipped)
    keys = {k for ks, *_ in batches for k in ks}
    assert not keys & {f"s{i:04d}" for i in range(12, 21)}        # shard 2 held s0012..s0020


def test_missing_manifest_is_a_config_error_before_training(tmp_path, server):
    from epsdist.stage1 import check_config
    with pytest.raises(ManifestError, match=r"manifest\.json.*HTTP error"):
        read_manifest(server.url("nowhere/"), FAST)
    assert server.requests["nowhere/manifest.json"] == FAST.retries + 1
    cfg = load_config(None, ["data.fetch_retries=0", "data.num_classes=3",
                             f"data.train_shards={server.url('nowhere/', auth='ann:s3cr3t@')}"])
    with pytest.raises(ConfigError, match="data.train_shards.*manifest.json") as e:
        check_config(cfg)
    assert "s3cr3t" not in str(e.value)
    cfg = load_config(None, ["data.num_classes=3", f"data.train_shards={server.url()}"])
    assert check_config(cfg, world_size=1)[1]["num_samples"] == sum(COUNTS)


def test_cache_fetches_each_shard_once_per_node_and_refetches_a_corrupt_copy(
        shards, server, tmp_path):
    fetch = FetchOptions(retries=1, backoff_s=0.01, cache_dir=str(tmp_path / "cache"))
    kw = dict(batch_size=3, world_size=2, num_workers=2, augment=SMALL)
    want = {r: ShardLoader(str(shards), rank=r, **kw) for r in (0, 1)}
    want = {r: [epoch(want[r]), epoch(want[r])] for r in (0, 1)}
    for r in (0, 1):                       # two ranks of one node, two epochs each
        loader = ShardLoader(server.url(), rank=r, fetch=fetch, **kw)
        assert_same(epoch(loader), want[r][0])
        assert_same(epoch(loader), want[r][1])
    assert shard_requests(server) == {f"t-{i:06d}.tar": 1 for i in range(4)}
    cached = [os.path.join(d, n) for d, _, ns in os.walk(tmp_path / "cache") for n in ns
              if n == "t-000001.tar"]
    assert len(cached) == 1
    with open(cached[0], "r+b") as f:                 # flip one byte of the cached copy
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    loader = ShardLoader(server.url(), rank=0, fetch=fetch, **kw)
    assert_same(epoch(loader), want[0][0])
    assert not loader.skipped
    assert server.requests["t-000001.tar"] == 2 and server.requests["t-000000.tar"] == 1


def test_iter_rank_samples_and_verify_read_urls(shards, server, capsys):
    from epsdist.data import verify
    m = read_manifest(str(shards))
    for rank in (0, 1):
        local = [(i, s["__key__"], s["jpg"]) for i, s in iter_rank_samples(str(shards), m, rank, 2)]
        remote = [(i, s["__key__"], s["jpg"]) for i, s in
                  iter_rank_samples(server.url(), m, rank, 2, fetch=FAST)]
        assert remote == local and len(local) == sum(COUNTS) // 2
    assert verify.main([server.url(), "--quiet"]) == 0
    server.missing.add("t-000003.tar")
    assert verify.main([server.url(), "--quiet", "--retries", "0"]) == 1
    assert "t-000003.tar: unreachable" in capsys.readouterr().err


def test_pipe_command_form(shards):
    location = f"pipe:cat {shlex.quote(str(shards))}/{{name}}"
    kw = dict(batch_size=3, world_size=2, rank=1, num_workers=0, augment=SMALL)
    assert_same(epoch(ShardLoader(location, fetch=FAST, **kw)),
                epoch(ShardLoader(str(shards), **kw)))
    with pytest.raises(ManifestError, match="cannot fetch"):
        read_manifest(f"pipe:cat {shlex.quote(str(shards))}/missing/{{name}}", FAST)


def test_s3_form_against_a_local_s3_server(shards, tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    if not os.path.exists(aws):
        pytest.skip("the aws command line client is not installed")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    try:
        endpoint = f"http://127.0.0.1:{srv.get_host_and_port()[1]}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="data")
        for name in os.listdir(shards):
            s3.upload_file(str(shards / name), "data", f"sets/train/{name}")
        fetch = FetchOptions(retries=1, backoff_s=0.01,
                             s3_command=f"{aws} --endpoint-url {endpoint} s3 cp {{url}} -")
        kw = dict(batch_size=3, world_size=2, rank=0, num_workers=0, augment=SMALL)
        assert_same(epoch(ShardLoader("s3://data/sets/train/", fetch=fetch, **kw)),
                    epoch(ShardLoader(str(shards), **kw)))
        with pytest.raises(ManifestError, match="cannot fetch"):
            read_manifest("s3://data/sets/none", fetch)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- two ranks

@pytest.fixture(scope="module")
def written(tmp_path_factory, make_train_shards):
    """Shards made by the writer (python -m epsdist.data.shard) from the synthetic set."""
    root = tmp_path_factory.mktemp("remote_train")
    make_train_shards(root)
    return root


@pytest.mark.slow
def test_two_ranks_from_a_url_train_and_resume_exactly_as_from_the_directory(written):
    """deepspeed, two ranks: from the directory for 2k iterations; from the URL stopped after
    k (mid-epoch) and resumed: the same loss at every iteration."""
    from test_train import COMMON, deepspeed_train, metrics
    k = 4
    common = (*COMMON, f"run.save_every={k}", f"train.max_iters={2 * k}")
    full = deepspeed_train(written, *common, "run.dir=runs/dir")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    with ShardServer(written / "shards") as srv:
        remote = (*common, f"data.train_shards={srv.url()}", "run.dir=runs/url")
        crashed = deepspeed_train(written, *remote, extra=("--stop-after", str(k)))
        assert crashed.returncode != 0
        resumed = deepspeed_train(written, *remote)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"at iteration {k}" in resumed.stdout
        assert shard_requests(srv) and set(shard_requests(srv)) == \
            {e["name"] for e in read_manifest(str(written / "shards"))["shards"]}
    a, b = metrics(written / "runs/dir"), metrics(written / "runs/url")
    assert sorted(a) == sorted(b) == list(range(1, 2 * k + 1))
    for it in a:
        assert a[it] == pytest.approx(b[it], rel=1e-5, abs=1e-7), it


def test_bench_url_reports_the_ratio_to_disk_and_the_bytes_fetched(tmp_path):
    import json
    from epsdist.data import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--url", "--num", "8", "--shard-size", "3", "--workers", "0", "--reps", "1",
                       "--crop", "64", "--resize", "64", "96", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["what"] == "url w0" and row["samples_per_s"] > 0 and row["disk_samples_per_s"] > 0
    assert row["ratio_to_disk"] == pytest.approx(row["samples_per_s"] / row["disk_samples_per_s"])
    assert row["fetched_over_shard_bytes"] == pytest.approx(1.0)   # one slot reads every byte


def test_evaluate_gt_from_a_url_equals_the_directory(written, tmp_path):
    """python -m epsdist.evaluate --gt URL: the same report as --gt DIR (predictions: the
    ground truth with every fifth mask shifted, so the numbers are not trivial)."""
    import json
    import numpy as np
    from PIL import Image
    from epsdist import evaluate
    local = str(written / "shards")
    pred = tmp_path / "pred"
    pred.mkdir()
    m = read_manifest(local)
    for i, (_, s) in enumerate(iter_rank_samples(local, m)):
        mask = np.asarray(Image.open(__import__("io").BytesIO(s["seg.png"])))
        Image.fromarray(np.roll(mask, 5, axis=1) if i % 5 == 0 else mask).save(
            pred / f"{s['__key__']}.png")
    with ShardServer(written / "shards") as srv:
        assert evaluate.main(["--pred", str(pred), "--gt", srv.url(), "--json",
                              str(tmp_path / "url.json")]) == 0
        assert srv.requests["manifest.json"] >= 1
    assert evaluate.main(["--pred", str(pred), "--gt", local, "--json",
                          str(tmp_path / "dir.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("url", "dir"))
    assert a.pop("gt") == a["evaluation"].pop("gt") == srv.url()
    assert b.pop("gt") == b["evaluation"].pop("gt") == local
    assert a == b and a["evaluation"]["gt_images"] == 160
    assert 0.5 < a["evaluation"]["mean_iou"] < 1.0
