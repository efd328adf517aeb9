"""Smoke test of the kernel microbenchmark (epsdist_kernels.bench): one small case, triton and
eager, both modes, one timed call each; the JSON it writes has the documented structure.
On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1)."""
import json
import math

import pytest
import torch

from epsdist_kernels import bench

ROW_KEYS = {"case", "provider", "mode", "ms", "gbs", "frac_of_copy_bw", "peak_mib",
            "B", "K", "h", "w", "S"}


def test_bench_main_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    rc = bench.main(["--cases", "voc_b8_56", "--providers", "triton,eager",
                     "--modes", "fwd,fwd_bwd", "--reps", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "WARNING" not in text                      # triton loss matches eager
    assert "voc_b8_56" in text and "x eager" in text  # the table was printed
    assert not (tmp_path / "sub" / "bench.json.tmp").exists()

    res = json.loads(out.read_text())
    assert {"device", "versions", "copy_bandwidth_gbs", "rows"} <= set(res)
    assert {"torch", "triton", "python", "cuda"} <= set(res["versions"])
    rows = res["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("triton", "eager") for m in ("fwd", "fwd_bwd")}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["case"] == "voc_b8_56"
        assert (r["B"], r["K"], r["h"], r["w"], r["S"]) == bench.CASES["voc_b8_56"]
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert math.isfinite(r["gbs"]) and r["gbs"] > 0
        if res["copy_bandwidth_gbs"] is None:        # CPU: no copy bandwidth, no peak memory
            assert r["frac_of_copy_bw"] is None and r["peak_mib"] is None
        else:
            assert r["frac_of_copy_bw"] > 0 and r["peak_mib"] >= 0
    spd = {(s["case"], s["mode"]): s for s in res["speedups"]}
    assert set(spd) == {("voc_b8_56", "fwd"), ("voc_b8_56", "fwd_bwd")}
    assert all(s["vs_eager"] > 0 and "vs_compile" not in s for s in spd.values())


def test_ideal_bytes_model():
    B, K, h, w, _ = bench.CASES["coco_b16_41"]
    fwd = bench.ideal_bytes("coco_b16_41", torch.bfloat16, "fwd")
    assert fwd == B * K * h * w * 2 + B * h * w * 4 + B * (K - 1) * 4
    assert bench.ideal_bytes("coco_b16_41", torch.bfloat16, "fwd_bwd") == fwd + B * K * h * w * 2


def test_bad_option_is_rejected():
    with pytest.raises(SystemExit):
        bench.main(["--cases", "nope"])
