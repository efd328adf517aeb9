"""Speed, side by side in one run: the EPS loss fwd+bwd (fused vs eager reference vs
torch.compile of it, against the bytes floor at the card's copy bandwidth), one stage-1 training
step in img/s (fp32, bf16, bf16 + channels_last, + train.compile) and the pseudo-mask step per
image (``epsdist.infer_pipeline.group_masks``, what infer.py runs: multi-scale + flip views of
one or several same-size images per forward, then ``cam_to_mask``).

Timing: the loss through ``epsdist_kernels.bench.time_fn`` (CUDA: ``triton.testing.do_bench``,
median); training steps and pseudo-masks as wall time over several steps/images between two
``torch.cuda.synchronize()`` calls, after untimed warm-up steps (which also compile).
"""
from __future__ import annotations

import time

import torch

from . import workload as W

# name -> (precision, channels_last, compile): the training-step variants, cheapest first
TRAIN_VARIANTS = {
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "bf16+cl": ("bf16", True, False),
    "bf16+cl+compile": ("bf16", True, True),
}


def loss_rows(plan, name, shape, dtype_name, layout, providers, copy_bw, device, log):
    """fwd+bwd time of each provider on one loss case; the bytes floor and its ratio."""
    from epsdist_kernels import bench
    cuda = device.type == "cuda"
    dtype = W.DTYPES[dtype_name]
    cam, sal, labels = W.eps_inputs(shape, device)
    cam = cam.to(dtype)
    if layout == "channels_last":
        cam = cam.contiguous(memory_format=torch.channels_last)
    nbytes = W.loss_bytes(shape, dtype)
    floor_ms = nbytes / (copy_bw * 1e9) * 1e3 if copy_bw else None
    rows = []
    for prov, fn in providers.items():
        step = bench.make_fn(fn, cam, sal, labels, "fwd_bwd")
        warmup = 0 if (prov == "triton" and not cuda) else 1
        t0 = time.perf_counter()
        try:
            ms, out = bench.time_fn(step, reps=plan.loss_reps, warmup=warmup, cuda=cuda)
            value = float(out)
            peak = bench.peak_mib(step) if cuda else None
        except Exception as e:                   # noqa: BLE001 -- one provider: record, go on
            err = f"{type(e).__name__}: {e}"[:1000]
            log(f"    {name:<18} {dtype_name} {layout:<13} {prov:<8} ERROR {err[:300]}")
            rows.append(dict(case=name, dtype=dtype_name, layout=layout, provider=prov, ms=None,
                             error=err, shape=list(shape)))
            W.free_memory()
            continue
        row = dict(case=name, dtype=dtype_name, layout=layout, provider=prov, ms=ms,
                   gbs=nbytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms,
                   x_floor=ms / floor_ms if floor_ms else None,
                   peak_mib=peak, loss=value,
                   shape=list(shape))
        rows.append(row)
        log(f"    {name:<18} {dtype_name} {layout:<13} {prov:<8} {ms:9.3f} ms"
            f"  ({time.perf_counter() - t0:.1f} s)")
    return rows


def add_rel_to_eager(rows) -> None:
    """Each loss row's relative difference to the eager row of its case (informational: the
    correctness section holds the real check)."""
    eager = {(r["case"], r["dtype"], r["layout"]): r.get("loss") for r in rows
             if r["provider"] == "eager"}
    for r in rows:
        ref = eager.get((r["case"], r["dtype"], r["layout"]))
        if ref is not None and r.get("loss") is not None:
            r["rel_to_eager"] = abs(r["loss"] - ref) / max(abs(ref), 1e-12)


def loss_providers(plan, compiled: bool):
    """{'triton', 'eager'} (the fused kernels, the reference), or {'compile'}: torch.compile of
    the reference (one compile per shape, dtype and layout)."""
    from epsdist_kernels import eps_loss_ref
    from epsdist_kernels.eps_loss import eps_loss_triton
    if compiled:
        return {"compile": torch.compile(eps_loss_ref.eps_loss_reference, dynamic=False,
                                         backend=plan.compile_backend)}
    return {"triton": eps_loss_triton, "eager": eps_loss_ref.eps_loss_reference}


def train_row(plan, key, variant, device, log):
    """img/s of ``plan.timed_steps`` stage-1 steps (fused loss) after ``plan.warmup_steps``,
    on batches already on the device (the loader is measured by ``epsdist.data.bench``)."""
    precision, cl, comp = TRAIN_VARIANTS[variant]
    size = plan.train_sizes[key]
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark
    cudnn.benchmark = True                              # fixed sizes: let cuDNN pick
    model = opt = net = batches = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = W.build(plan.backbone, size.classes, device, channels_last=cl)
        opt = W.optimizer(model)
        net = torch.compile(model, dynamic=False, backend=plan.compile_backend) if comp else model
        batches = W.train_batches(size, 2, device, seed=2)
        impl = "triton"
        kw = dict(lam=size.lam, precision=precision, channels_last=cl, impl=impl)
        t0 = time.perf_counter()
        for i in range(plan.warmup_steps):
            W.train_step(net, opt, batches[i % 2], **kw)
        W.sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        finite = True
        for i in range(plan.timed_steps):
            losses = W.train_step(net, opt, batches[i % 2], **kw)
            # the trainer reads its losses back every step (the NaN check): one host sync
            finite = bool(torch.isfinite(losses).all()) and finite
        W.sync(device)
        elapsed = time.perf_counter() - t0
        last = float(losses.sum())
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    finally:
        cudnn.benchmark = saved
        model = opt = net = batches = None
        W.free_memory()
    ips = plan.timed_steps * size.batch / elapsed
    log(f"    {key} B={size.batch} {size.size}px {variant:<16} {ips:9.1f} img/s "
        f"({1e3 * elapsed / plan.timed_steps:.1f} ms/step; warm-up {warm_s:.1f} s)")
    return dict(size=key, variant=variant, batch=size.batch, crop=size.size,
                classes=size.classes, img_per_s=ips, ms_per_step=1e3 * elapsed / plan.timed_steps,
                warmup_s=warm_s, last_loss=last, finite=finite,
                peak_gib=peak)


def mask_row(plan, key, variant, device, log):
    """ms per image of the pseudo-mask step as ``epsdist/infer.py`` runs it, through the same
    function (``epsdist.infer_pipeline.group_masks``): the decoded uint8 images (pinned on CUDA)
    copied to the device, the views of a group of same-size images through the network (scales
    x 2 flips, one forward per scale), ``cam_to_mask`` per image (fused on CUDA), the masks to
    the host. JPEG decode and PNG encode are CPU work, timed apart (``cpu_io_row``; infer.py
    overlaps them with the network: decode workers, writer threads). ``variant``: 'eager' (one
    image per forward, ``infer.batch_images=1``), 'batched' (infer.py's default
    ``infer.batch_images``, as ``infer_pipeline.group_size`` caps it for the size) or
    'compile' (the same with ``infer.compile``)."""
    from epsdist.config import InferConfig
    from epsdist.infer_pipeline import group_masks, group_size
    size = plan.mask_sizes[key]
    out_size = (size.height, size.width)
    icfg = InferConfig(scales=tuple(plan.scales), flip=True)
    if variant == "eager":
        icfg.batch_images = 1
    group = min(group_size(*out_size, icfg), plan.mask_images)
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark
    cudnn.benchmark = True
    model = net = images = None
    try:
        model = W.build(plan.backbone, size.classes, device, channels_last=device.type == "cuda")
        model.eval()
        net = (torch.compile(model, backend=plan.compile_backend) if variant == "compile"
               else model)
        g = torch.Generator().manual_seed(3)
        n_warm = group if plan.smoke else 2 * group
        images = torch.randint(0, 256, (n_warm + plan.mask_images, *out_size, 3), generator=g,
                               dtype=torch.uint8)            # decoded JPEGs: uint8 on the host
        if device.type == "cuda":
            images = images.pin_memory()                    # as infer.py's DataLoader gives them
        labels = torch.zeros(size.classes)
        labels[torch.randperm(size.classes, generator=g)[:size.labelled]] = 1.0

        def masks_of(m, xs, icfg):                          # xs: n (H, W, 3) -> n host masks
            return [r[0] for r in group_masks(m, list(xs), [labels] * len(xs), icfg, True,
                                              device, need_norm=False)]

        def run_all(xs):
            return [mk for i in range(0, len(xs), group)
                    for mk in masks_of(net, xs[i:i + group], icfg)]

        t0 = time.perf_counter()
        run_all(images[:n_warm])
        W.sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        masks = run_all(images[n_warm:])
        W.sync(device)
        elapsed = time.perf_counter() - t0
        assert len(masks) == plan.mask_images and masks[-1].shape == out_size
        agree = None
        if variant != "eager":           # the same first image, one image per forward, eager
            one = InferConfig(scales=tuple(plan.scales), flip=True, batch_images=1)
            ref = masks_of(model, images[n_warm:n_warm + 1], one)[0]
            agree = float((ref == masks[0]).mean())
    finally:
        cudnn.benchmark = saved
        model = net = images = None
        W.free_memory()
    ms = 1e3 * elapsed / plan.mask_images
    log(f"    {key} {size.height}x{size.width} {variant:<8} {ms:9.2f} ms/image "
        f"({group} per forward; warm-up {warm_s:.1f} s"
        + (f"; mask pixels equal to eager's: {100 * agree:.3f} %" if agree is not None else "")
        + ")")
    return dict(size=key, variant=variant, height=size.height, width=size.width,
                classes=size.classes, labelled=size.labelled, views=2 * len(plan.scales),
                images_per_forward=group, ms_per_image=ms, warmup_s=warm_s,
                images=plan.mask_images, mask_agreement_with_eager=agree)


def cpu_io_row(plan, key, log):
    """CPU ms per image of what inference does around the GPU: JPEG decode (``decode_rgb``)
    and PNG encode of the mask (``epsdist.infer.encode_mask``), one thread."""
    import io

    import numpy as np
    from PIL import Image

    from epsdist.data.augment import decode_rgb
    from epsdist.data.masks import encode_mask
    size = plan.mask_sizes[key]
    H, Wd = size.height, size.width
    yy, xx = np.mgrid[0:H, 0:Wd]                           # smooth content, like a photo
    rgb = np.stack([(xx * 255 // max(Wd - 1, 1)), (yy * 255 // max(H - 1, 1)),
                    ((xx + yy) * 127 // max(H + Wd - 2, 1))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    mask = np.zeros((H, Wd), np.uint8)                     # a few blobs, like a pseudo-mask
    for c in range(size.labelled):
        cy, cx = H * (c + 1) / (size.labelled + 1), Wd * ((2 * c + 1) % 5 + 1) / 7
        mask[((yy - cy) / (0.2 * H)) ** 2 + ((xx - cx) / (0.15 * Wd)) ** 2 < 1] = c + 1
    n = max(5, plan.mask_images)
    t0 = time.perf_counter()
    for _ in range(n):
        decode_rgb(jpeg)
    dec = 1e3 * (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        encode_mask(mask)
    enc = 1e3 * (time.perf_counter() - t0) / n
    log(f"    {key} {H}x{Wd} CPU: JPEG decode {dec:.2f} ms, PNG encode {enc:.2f} ms per image")
    return dict(size=key, height=H, width=Wd, decode_ms=dec, encode_ms=enc)
