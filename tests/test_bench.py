"""Smoke tests of the kernel microbenchmark (epsdist_kernels.bench): one small case per kernel,
triton and eager, every mode, one timed call each; the JSON it writes has the documented
structure. On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1)."""
import argparse
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


# ------------------------------------------------------------------------------------------
# cam_post cases
# ------------------------------------------------------------------------------------------

CAM_ROW_KEYS = {"kernel", "case", "provider", "mode", "ms", "gbs", "frac_of_copy_bw",
                "peak_mib", "H", "W", "K", "L", "V"}


def test_bench_cam_post_smoke(tmp_path, capsys, monkeypatch):
    """A small cam_post case (the real ones take minutes in the interpreter) through main()."""
    monkeypatch.setitem(bench.CAM_CASES, "cam_tiny", (37, 53, 21, 3))
    out = tmp_path / "cam.json"
    rc = bench.main(["--cases", "cam_tiny", "--providers", "triton,eager", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "WARNING" not in text and "cam_tiny" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("triton", "eager") for m in ("mask", "mask_norm")}
    for r in rows:
        assert CAM_ROW_KEYS <= set(r) and r["kernel"] == "cam_post"
        assert (r["H"], r["W"], r["K"], r["L"], r["V"]) == (37, 53, 21, 3, 8)
        assert math.isfinite(r["gbs"]) and r["gbs"] > 0


def test_kernel_option_picks_default_cases():
    ns = lambda **kw: argparse.Namespace(**{"cases": None, "kernel": None, **kw})  # noqa: E731
    assert bench.resolve_cases(ns(), cuda=False) == ["voc_b8_56"]
    assert bench.resolve_cases(ns(kernel="cam_post"), cuda=False) == ["cam_voc"]
    assert bench.resolve_cases(ns(kernel="all"), cuda=False) == ["voc_b8_56", "cam_voc"]
    assert bench.resolve_cases(ns(), cuda=True) == [*bench.CASES, *bench.CAM_CASES]
    assert bench.resolve_cases(ns(kernel="eps_loss"), cuda=True) == list(bench.CASES)
    assert bench.resolve_cases(ns(cases="cam_coco,voc_b8_56", kernel="eps_loss"),
                               cuda=False) == ["cam_coco", "voc_b8_56"]
    with pytest.raises(SystemExit):
        bench.main(["--cases", "cam_voc", "--modes", "fwd"])      # no mode of cam_post
    with pytest.raises(SystemExit):
        bench.main(["--kernel", "nope"])


def test_cam_ideal_bytes_model():
    H, W, K, L = bench.CAM_CASES["cam_voc"]
    sizes = bench.cam_view_sizes("cam_voc")
    assert len(sizes) == 8 and sizes[0] == (round(375 * 0.5 / 8), round(500 * 0.5 / 8))
    views = sum(L * h * w * 2 for h, w in sizes)
    assert bench.cam_ideal_bytes("cam_voc", torch.bfloat16, "mask") == views + H * W
    assert bench.cam_ideal_bytes("cam_voc", torch.bfloat16, "mask_norm") == \
        views + H * W + L * H * W * 4
