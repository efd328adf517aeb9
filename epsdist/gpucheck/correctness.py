"""Correctness on the device: the fused kernels against their float64 references (the kernel
tests' tolerances) and a short stage-1 run with the fused loss against the same run with the
reference loss.

Each check returns a record ``{"check", "ok", "detail", ...numbers}``; the caller collects them.
The references are looked up at call time (``eps_loss_ref.eps_loss_reference``, ...), so a test
can swap in a wrong one and see the check fail.
"""
from __future__ import annotations

import math

import torch

from . import workload as W

# tests/test_eps_loss.py: loss and gradient, relative; float32 logits / half logits
EPS_TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
# tests/test_cam_post.py TOL64: normalised maps vs the float64 reference (F.interpolate in
# float64), scaled by max(1, max |norm|); masks may differ only where the two best scores are
# closer than that
CAM_TOL64 = 3e-5
# fused-vs-reference training run: the first step sees the same logits (deterministic convs), so
# the two losses differ only by the loss kernels' float32 summation order; later steps also
# carry the gradients' rounding (in bf16: one bf16 ulp, 0.4 %, on some logits' gradients)
# through backward and the SGD updates
RUN_FIRST_TOL = 1e-5
RUN_SEQ_TOL = {"fp32": 1e-3, "bf16": 2e-2}


def _finite(*xs) -> bool:
    return all(math.isfinite(x) for x in xs)


# d(loss)/d(cam) <= 2 / (B h w): ~4e-6 at coco_b64_56, where float16 is subnormal (spacing
# 6e-8, 1.5 % of it). fp16 training scales the loss (DeepSpeed starts at 2**16), so the fp16
# check backpropagates a scaled loss, as training does; the others a plain odd factor.
GRAD_SCALE = {"fp32": 0.37, "bf16": 0.37, "fp16": 1024.0}


def eps_kernel_check(name, shape, dtype_name, layout, device):
    """Fused loss + backward (of GRAD_SCALE x loss) vs the float64 reference on the same
    logit values."""
    grad_scale = GRAD_SCALE[dtype_name]
    from epsdist_kernels import eps_loss_ref
    from epsdist_kernels.eps_loss import eps_loss_triton
    dtype = W.DTYPES[dtype_name]
    cam, sal, labels = W.eps_inputs(shape, device, seed=sum(shape))
    x = cam.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_()
    loss = eps_loss_triton(x, sal, labels)
    (loss * grad_scale).backward()
    ref_x = cam.to(dtype).double().requires_grad_()
    ref = eps_loss_ref.eps_loss_reference(ref_x, sal.double(), labels)
    (ref * grad_scale).backward()
    tol = EPS_TOL[dtype_name]
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)
    B, _, h, w, _ = shape
    floor = 2.0 * abs(grad_scale) / (B * h * w)        # the largest a pixel's gradient can get
    grad_err = ((x.grad.double() - ref_x.grad).abs().max().item()
                / max(ref_x.grad.abs().max().item(), floor))
    layout_ok = (layout != "channels_last"
                 or x.grad.is_contiguous(memory_format=torch.channels_last))
    ok = _finite(loss_err, grad_err) and loss_err <= tol and grad_err <= tol and layout_ok \
        and x.grad.dtype == dtype
    detail = f"loss rel err {loss_err:.2g}, grad rel err {grad_err:.2g} (tol {tol:g})"
    if not layout_ok:
        detail += "; gradient lost the channels_last layout"
    return dict(check=f"eps_loss {name} {dtype_name} {layout}", ok=ok, detail=detail,
                loss_rel_err=loss_err, grad_rel_err=grad_err, tol=tol)


def cam_kernel_check(name, size, dtype_name, layout, device):
    """Fused CAM post-processing vs the float64 reference: normalised maps within
    CAM_TOL64 x max(1, max |norm|), mask pixels differing only at near-ties. ``layout``
    'channels_last': each view is a (K, h, w) slice of a channels_last batch, the strides
    inference gets from a channels_last network."""
    from epsdist_kernels import cam_post_ref
    from epsdist_kernels.cam_post import cam_to_mask_triton
    views, flips, labels, out = W.cam_inputs(size, W.DTYPES[dtype_name], device, seed=7)
    if layout == "channels_last":
        views = [v[None].contiguous(memory_format=torch.channels_last)[0] for v in views]
    got = cam_to_mask_triton(views, flips, labels, out, 0.2, return_norm=True)
    ref = cam_post_ref.cam_to_mask_reference([v.double() for v in views], flips, labels, out,
                                             0.2, return_norm=True)
    mag = max(1.0, ref.norm.abs().max().item())
    tol = CAM_TOL64 * mag
    norm_err = (got.norm.double() - ref.norm).abs().max().item()
    scores = torch.cat([torch.full((1, *out), 0.2, dtype=torch.float64, device=ref.norm.device),
                        ref.norm])
    top = scores.topk(2, dim=0).values
    near_tie = (top[0] - top[1]) < tol
    differ = got.mask != ref.mask
    bad = int((differ & ~near_tie).sum())
    ok = _finite(norm_err) and norm_err <= tol and bad == 0 and got.mask.dtype == torch.uint8
    return dict(check=f"cam_post {name} {dtype_name} {layout}", ok=ok,
                detail=f"norm max err {norm_err:.2g} (tol {tol:.2g}); {bad} mask pixels differ "
                       f"away from ties, {int(differ.sum())} in all",
                norm_err=norm_err, mask_bad=bad, tol=tol)


def training_run_check(plan, key: str, precision: str, device, log):
    """``plan.run_steps`` stage-1 steps of the real model (``plan.backbone``) with the fused
    loss, then the same steps from the same weights, batches and dropout seed with the
    reference loss; the per-step losses must agree (RUN_FIRST_TOL on step 1, RUN_SEQ_TOL
    over all steps), each term (classification, saliency) relative to its own size. bf16 runs
    in the training layout (channels_last), fp32 contiguous. Convolutions are made
    deterministic for the two runs (restored afterwards)."""
    size = plan.train_sizes[key]
    cl = precision == "bf16"
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        model = W.build(plan.backbone, size.classes, device, channels_last=cl)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        batches = W.train_batches(size, plan.run_steps, device, seed=1)
        runs = {}
        for impl in ("triton", "torch"):
            model.load_state_dict(init)
            opt = W.optimizer(model)
            torch.manual_seed(123)                         # same dropout masks in both runs
            losses = [W.train_step(model, opt, b, lam=size.lam, precision=precision,
                                   channels_last=cl, impl=impl) for b in batches]
            runs[impl] = torch.stack(losses).cpu().tolist()         # [[cls, sal], ...]
            a, z = runs[impl][0], runs[impl][-1]
            log(f"    {impl:<6} loss (cls, sal): step 1 ({a[0]:.6f}, {a[1]:.6f}) ... "
                f"step {len(batches)} ({z[0]:.6f}, {z[1]:.6f})")
            del opt
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
        model = init = batches = None
        W.free_memory()
    fused, ref = runs["triton"], runs["torch"]
    # each term relative to its own size: the saliency term is the one the loss kernel computes
    rel = [[abs(a - b) / max(abs(b), 1e-6) for a, b in zip(f, r)] for f, r in zip(fused, ref)]
    first, worst = max(rel[0]), max(max(x) for x in rel)
    tol = RUN_SEQ_TOL[precision]
    values = [v for step in fused + ref for v in step]
    ok = _finite(*values) and first <= RUN_FIRST_TOL and worst <= tol
    B, S = size.batch, size.size
    return dict(check=f"stage-1 run {plan.backbone} {key} B={B} {S}px {precision}"
                      f"{' channels_last' if cl else ''}: fused vs reference loss, "
                      f"{plan.run_steps} steps",
                ok=ok, detail=f"step-1 rel diff {first:.2g} (tol {RUN_FIRST_TOL:g}), max over "
                              f"steps {worst:.2g} (tol {tol:g}), per loss term",
                precision=precision, first_rel_diff=first, max_rel_diff=worst, tol=tol,
                losses_fused=fused, losses_reference=ref, loss_terms=["cls", "sal"])
