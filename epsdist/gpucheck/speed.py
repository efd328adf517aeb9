"""Speed, side by side in one run: the EPS loss fwd+bwd (fused vs eager reference vs
torch.compile of it, against the bytes floor at the card's copy bandwidth), one stage-1 training
step in img/s (fp32, bf16, bf16 + channels_last, + train.compile) and the pseudo-mask step per
image (multi-scale + flip views as ``epsdist.infer.view_maps`` batches them, then
``cam_to_mask``).

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
    rows, ref_loss = [], None
    for prov, fn in providers.items():
        step = bench.make_fn(fn, cam, sal, labels, "fwd_bwd")
        warmup = 0 if (prov == "triton" and not cuda) else 1
        t0 = time.perf_counter()
        try:
            ms, out = bench.time_fn(step, reps=plan.loss_reps, warmup=warmup, cuda=cuda)
            value = float(out)
        except Exception as e:                   # noqa: BLE001 -- one provider: record, go on
            err = f"{type(e).__name__}: {e}"[:1000]
            log(f"    {name:<18} {dtype_name} {layout:<13} {prov:<8} ERROR {err[:300]}")
            rows.append(dict(case=name, dtype=dtype_name, layout=layout, provider=prov, ms=None,
                             error=err, shape=list(shape)))
            W.free_memory()
            continue
        if prov == "eager":
            ref_loss = value
        row = dict(case=name, dtype=dtype_name, layout=layout, provider=prov, ms=ms,
                   gbs=nbytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms,
                   x_floor=ms / floor_ms if floor_ms else None,
                   peak_mib=bench.peak_mib(step) if cuda else None, loss=value,
                   shape=list(shape))
        rows.append(row)
        log(f"    {name:<18} {dtype_name} {layout:<13} {prov:<8} {ms:9.3f} ms"
            f"  ({time.perf_counter() - t0:.1f} s)")
    for r in rows:                       # agreement with eager, informational
        if ref_loss is not None and r.get("loss") is not None:
            r["rel_to_eager"] = abs(r["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
    return rows


def loss_providers(plan, with_compile: bool):
    from epsdist_kernels import eps_loss_ref
    from epsdist_kernels.eps_loss import eps_loss_triton
    provs = {"triton": eps_loss_triton, "eager": eps_loss_ref.eps_loss_reference}
    if with_compile:
        provs["compile"] = torch.compile(eps_loss_ref.eps_loss_reference, dynamic=False,
                                         backend=plan.compile_backend)
    return provs


def train_row(plan, key, variant, device, log):
    """img/s of ``plan.timed_steps`` stage-1 steps (fused loss) after ``plan.warmup_steps``."""
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
        losses = [W.train_step(net, opt, batches[i % 2], **kw) for i in range(plan.timed_steps)]
        W.sync(device)
        elapsed = time.perf_counter() - t0
        last = float(losses[-1].sum())
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
                warmup_s=warm_s, last_loss=last, finite=last == last and abs(last) != float("inf"),
                peak_gib=peak)


def mask_row(plan, key, variant, device, log):
    """ms per image of the pseudo-mask step: ``epsdist.infer.view_maps`` (scales x 2 flips, one
    forward per scale with its flip) + ``cam_to_mask`` (fused on CUDA) + the mask to the host,
    as ``epsdist/infer.py`` does per image. Image decode and PNG encode are CPU work, timed
    apart (``cpu_io_row``). ``variant``: 'eager' or 'compile' (infer.compile)."""
    from epsdist.infer import view_maps
    from epsdist_kernels.cam_post import cam_to_mask
    size = plan.mask_sizes[key]
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
        n_warm = 1 if plan.smoke else 2
        images = [torch.randn(1, 3, size.height, size.width, generator=g).to(device)
                  for _ in range(n_warm + plan.mask_images)]
        labels = torch.zeros(size.classes)
        labels[torch.randperm(size.classes, generator=g)[:size.labelled]] = 1.0

        def one(x):
            views, flips = view_maps(net, x, plan.scales, True, True)
            return cam_to_mask(views, flips, labels, (size.height, size.width), 0.2).mask.cpu()

        t0 = time.perf_counter()
        for x in images[:n_warm]:
            one(x)
        W.sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        masks = [one(x) for x in images[n_warm:]]
        W.sync(device)
        elapsed = time.perf_counter() - t0
        assert masks[-1].shape == (size.height, size.width)
    finally:
        cudnn.benchmark = saved
        model = net = images = None
        W.free_memory()
    ms = 1e3 * elapsed / plan.mask_images
    log(f"    {key} {size.height}x{size.width} {variant:<8} {ms:9.2f} ms/image "
        f"(warm-up {warm_s:.1f} s)")
    return dict(size=key, variant=variant, height=size.height, width=size.width,
                classes=size.classes, labelled=size.labelled, views=2 * len(plan.scales),
                ms_per_image=ms, warmup_s=warm_s, images=plan.mask_images)


def cpu_io_row(plan, key, log):
    """CPU ms per image of what inference does around the GPU: JPEG decode (``decode_rgb``)
    and PNG encode of the mask (``epsdist.infer.encode_mask``), one thread."""
    import io

    import numpy as np
    from PIL import Image

    from epsdist.data.augment import decode_rgb
    from epsdist.infer import encode_mask
    size = plan.mask_sizes[key]
    H, Wd = size.height, size.width
    yy, xx = np.mgrid[0:H, 0:Wd]                           # smooth content, like a photo
    rgb = np.stack([(xx * 255 // max(Wd - 1, 1)), (yy * 255 // max(H - 1, 1)),
                    ((xx + yy) * 127 // max(H + Wd - 2, 1))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    mask = ((xx // 37 + yy // 29) % (size.labelled + 1)).astype(np.uint8)
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
