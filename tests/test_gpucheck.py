"""The GPU check (``python -m epsdist.gpucheck``) at smoke sizes: the whole code path runs (on
CPU: kernels in Triton's interpreter, torch.compile with its 'eager' backend), writes the JSON
and the markdown it documents, passes its correctness checks, and fails (exit status 1) when a
reference is wrong or a kernel raises. The verdict logic against the goals on hand-made rows."""
import json
import math

import pytest
import torch

import epsdist.loss
from epsdist import gpucheck
from epsdist.gpucheck import report, workload
from epsdist_kernels import bench, eps_loss_ref

DTYPES = {"fp32", "bf16", "fp16"}
LAYOUTS = {"contiguous", "channels_last"}
VARIANTS = {"fp32", "bf16", "bf16+cl", "bf16+cl+compile"}


def test_smoke_run_passes_and_reports_every_section(tmp_path, capsys):
    out = tmp_path / "sub" / "gpu-check.json"
    assert gpucheck.main(["--smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert not (tmp_path / "sub" / "gpu-check.json.tmp").exists()
    assert r["smoke"] is True and r["exit_status"] == 0 and r["correctness_ok"] is True
    assert r["errors"] == [] and r["skipped"] == []
    assert {"card", "driver", "cuda", "torch", "triton", "python"} <= set(r["environment"])
    plan = workload.Plan.smoke_plan()

    # correctness: every loss case x dtype x layout, every CAM case x dtype, two training runs
    checks = {c["check"]: c for c in r["correctness"]}
    assert all(c["ok"] for c in checks.values())
    want = {f"eps_loss {n} {d} {lo}" for n in plan.loss_cases for d in DTYPES for lo in LAYOUTS}
    want |= {f"cam_post {n} {d} {lo}" for n in plan.cam_cases for d in DTYPES for lo in LAYOUTS}
    assert want <= set(checks)
    for name in want:
        c = checks[name]
        err = c.get("loss_rel_err", c.get("norm_err"))
        assert math.isfinite(err) and 0 <= err <= c["tol"]
    runs = [c for c in r["correctness"] if c["check"].startswith("stage-1 run")]
    assert sorted(c["precision"] for c in runs) == ["bf16", "fp32"]
    for c in runs:
        assert len(c["losses_fused"]) == len(c["losses_reference"]) == plan.run_steps
        assert c["first_rel_diff"] <= 1e-5 and c["max_rel_diff"] <= c["tol"]
        assert all(math.isfinite(v) and v > 0 for step in c["losses_fused"] for v in step)

    spd = r["speed"]
    loss = {(x["case"], x["dtype"], x["layout"], x["provider"]) for x in spd["loss"]}
    for case in [*plan.loss_cases, *plan.train_layout_cases]:
        rows = {k for k in loss if k[0] == case}
        assert {k[3] for k in rows} == {"triton", "eager", "compile"}, case
    for x in spd["loss"]:
        assert x["ms"] > 0 and x["rel_to_eager"] <= 2e-2      # compile/triton agree with eager
    assert {(x["size"], x["variant"]) for x in spd["train"]} == {
        (k, v) for k in plan.train_sizes for v in VARIANTS}
    assert all(x["img_per_s"] > 0 and x["finite"] for x in spd["train"])
    assert {(x["size"], x["variant"]) for x in spd["masks"]} == {
        (k, v) for k in plan.mask_sizes for v in ("eager", "batched", "compile")}
    assert all(x["ms_per_image"] > 0 and x["views"] == 8 for x in spd["masks"])
    assert {x["images_per_forward"] for x in spd["masks"] if x["variant"] == "batched"} == {2}
    for x in spd["masks"]:      # batching / compiling change at most near-tie pixels
        agree = x["mask_agreement_with_eager"]
        assert agree is None if x["variant"] == "eager" else agree >= 0.99
    assert {x["size"] for x in spd["cpu_io"]} == set(plan.mask_sizes)

    # the verdict names every goal; nothing is judged at smoke sizes
    assert len(r["verdict"]) == 7 and all(v["met"] is None for v in r["verdict"])
    assert r["markdown"] in text and "Correctness: **PASS**" in r["markdown"]
    assert "| card | driver | CUDA |" in r["markdown"]


def _wrong_reference(real):
    def wrong(cam, saliency, labels, **kw):                # 5 % too large
        out = real(cam, saliency, labels, **kw)
        return (out[0] * 1.05, out[1]) if kw.get("return_maps") else out * 1.05
    return wrong


def test_a_wrong_reference_or_a_raising_kernel_fails_the_run(tmp_path, monkeypatch, capsys):
    wrong = _wrong_reference(eps_loss_ref.eps_loss_reference)
    monkeypatch.setattr(eps_loss_ref, "eps_loss_reference", wrong)
    monkeypatch.setattr(epsdist.loss, "eps_loss_reference", wrong)
    import epsdist_kernels.cam_post as cam_post

    def broken(*a, **k):
        raise RuntimeError("simulated kernel failure")
    monkeypatch.setattr(cam_post, "cam_to_mask_triton", broken)
    out = tmp_path / "gc.json"
    assert gpucheck.main(["--smoke", "--sections", "correctness", "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["exit_status"] == 1 and r["correctness_ok"] is False
    checks = r["correctness"]
    eps = [c for c in checks if c["check"].startswith("eps_loss")]
    cam = [c for c in checks if c["check"].startswith("cam_post")]
    runs = [c for c in checks if c["check"].startswith("stage-1 run")]
    assert len(eps) == 12 and not any(c["ok"] for c in eps)
    assert all(0.04 < c["loss_rel_err"] < 0.06 for c in eps)   # the 5 % was seen
    assert len(cam) == 6 and not any(c["ok"] for c in cam)
    assert all("simulated kernel failure" in c["detail"] for c in cam)
    assert len(runs) == 2 and not any(c["ok"] for c in runs)     # the run went on after errors
    assert {e["section"] for e in r["errors"]} == {"correctness"}
    assert r["speed"] == {"loss": [], "train": [], "masks": [], "cpu_io": []}
    assert "Correctness: **FAIL**" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_full_sizes_need_a_gpu(capsys):
    assert gpucheck.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sections", "speed"], ["--steps", "0"],
                                  ["--budget-s", "-1"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--smoke", *argv])
    assert e.value.code == 2


@pytest.mark.parametrize("case", list(bench.CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_model_is_the_benchmarks(case, dtype):
    for mode in ("fwd", "fwd_bwd"):
        assert workload.loss_bytes(bench.CASES[case], dtype, mode) == \
            bench.ideal_bytes(case, dtype, mode)


def test_verdict_against_the_goals():
    """Full-size rows by hand: the fused fp32 contiguous loss row counts, the fastest training
    / pseudo-mask variant counts, a missing row is 'not measured'."""
    loss = [dict(case="voc_b8_56", dtype="fp32", layout="contiguous", provider="triton", ms=0.04),
            dict(case="voc_b8_56", dtype="fp32", layout="contiguous", provider="eager", ms=0.01),
            dict(case="coco_b64_56", dtype="fp32", layout="contiguous", provider="triton",
                 ms=0.2),
            dict(case="coco_b16_41", dtype="bf16", layout="channels_last", provider="triton",
                 ms=0.01)]
    train = [dict(size="voc", variant="fp32", img_per_s=90.0),
             dict(size="voc", variant="bf16+cl", img_per_s=210.0),
             dict(size="coco", variant="bf16", img_per_s=300.0)]
    masks = [dict(size="voc", variant="eager", ms_per_image=16.0),
             dict(size="voc", variant="compile", ms_per_image=14.0),
             dict(size="voc", variant="batched", ms_per_image=15.5),    # infer.py's default
             dict(size="coco", variant="batched", ms_per_image=21.0)]
    res = dict(smoke=False, speed=dict(loss=loss, train=train, masks=masks, cpu_io=[]))
    got = [(v["measured"], v["met"]) for v in report.verdict(res)]
    assert got == [("0.04 ms", True), (None, None), ("0.2 ms", False),
                   ("210.0 img/s (bf16+cl)", True), ("300.0 img/s (bf16)", False),
                   ("14.00 ms (compile)", True), ("21.00 ms (batched)", False)]
    assert all(v["met"] is None for v in report.verdict({**res, "smoke": True}))
