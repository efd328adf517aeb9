"""The EPS saliency loss: the fused Triton kernels (CPU: Triton's interpreter, see conftest)
against the float64 reference, the reference against a hand-computed case and against a direct
transcription of the authors' released code, and the input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from epsdist.loss import classification_loss, eps_loss, resolve_impl
from epsdist_kernels.eps_loss import eps_loss_triton
from epsdist_kernels.eps_loss_ref import eps_loss_reference


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def make_inputs(B, K, h, w, H, W, *, seed=0, label_p=0.5, device="cpu"):
    """Logits with per-image class biases (so some classes win regions), a blobby saliency
    with values exactly at the 0.5 tie, and multi-hot labels."""
    g = torch.Generator().manual_seed(seed)
    cam = 2.0 * torch.randn(B, K, h, w, generator=g) + 3.0 * torch.randn(B, K, 1, 1, generator=g)
    sal = torch.rand(B, 1, H, W, generator=g)
    sal[:, :, ::5, ::3] = 0.5                               # ties: 0.5 is not > 0.5
    labels = (torch.rand(B, K - 1, generator=g) < label_p).float()
    return cam.to(device), sal.to(device), labels.to(device)


def run_both(cam, sal, labels, *, dtype=torch.float32, grad_scale=1.0, layout=None, **kw):
    """Loss, gradient and maps from the Triton kernel (logits in ``dtype``) and from the
    float64 reference on the same logit values."""
    x = cam.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":                               # a non-contiguous view
        x = torch.stack([x, -x], dim=-1)[..., 0]            # same values, stride_w = 2
    assert x.is_contiguous() == (layout is None)
    x = x.detach().requires_grad_()
    loss, maps = eps_loss_triton(x, sal, labels, return_maps=True, **kw)
    (loss * grad_scale).backward()

    ref_x = cam.to(dtype).double().cpu().requires_grad_()
    ref_loss, ref_maps = eps_loss_reference(ref_x, sal.double().cpu(), labels.cpu(),
                                            return_maps=True, **kw)
    (ref_loss * grad_scale).backward()
    return (loss, x.grad, maps), (ref_loss, ref_x.grad, ref_maps)


def assert_matches(got, ref, tol, grad_scale=1.0):
    (loss, grad, maps), (ref_loss, ref_grad, ref_maps) = got, ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item()) + 1e-12
    grad = grad.double().cpu()
    assert grad.shape == ref_grad.shape
    # relative to the largest gradient, floored at tol x the largest a pixel can get
    # (|dL/dcam| <= 2 |pred - s| / N <= 2 / N), for cases whose exact gradient is ~0
    floor = 2.0 * abs(grad_scale) / (grad.shape[0] * grad.shape[2] * grad.shape[3])
    err = (grad - ref_grad).abs().max().item()
    assert err <= tol * max(ref_grad.abs().max().item(), floor), f"grad error {err}"
    for m, rm in zip(maps, ref_maps):
        assert torch.allclose(m.double().cpu(), rm.double(), rtol=0, atol=10 * tol)


# ------------------------------------------------------------------------------------------
# Triton vs float64 reference
# ------------------------------------------------------------------------------------------

# (B, K, h, w, H, W): every K in {2, 21, 81}, (h, w) in {(41,41), (13,17), (56,56)},
# B in {1, 3, 8}; saliency at non-integer multiples of (h, w), and smaller than it once.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # as conftest's
# The two benchmark-sized cases take ~20 s each in Triton's interpreter: on the CPU they run with
# the slow tests (K=81 and K=21 stay covered at smaller sizes); on a GPU always.
_BENCH_SIZE = () if DEVICE.type == "cuda" else (pytest.mark.slow,)
SHAPES = [
    (8, 2, 41, 41, 321, 321),
    (3, 21, 13, 17, 50, 61),
    pytest.param((1, 81, 56, 56, 448, 448), marks=_BENCH_SIZE),
    pytest.param((8, 21, 56, 56, 448, 448), marks=_BENCH_SIZE),
    (3, 81, 13, 17, 37, 44),
    (1, 2, 13, 17, 7, 9),
    (1, 21, 41, 41, 100, 130),
    (3, 2, 56, 56, 97, 97),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_K{}_{}x{}_sal{}x{}".format(*s))
def test_triton_matches_reference_fp32(shape, device):
    cam, sal, labels = make_inputs(*shape, device=device)
    assert_matches(*run_both(cam, sal, labels, grad_scale=0.37), tol=1e-5, grad_scale=0.37)


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_tau_lam_grid(tau, lam, device):
    cam, sal, labels = make_inputs(3, 21, 13, 17, 29, 40, seed=1, device=device)
    assert_matches(*run_both(cam, sal, labels, tau=tau, lam=lam, grad_scale=-2.5), tol=1e-5,
                   grad_scale=-2.5)


@pytest.mark.parametrize("strategy,bg_classes", [("adaptive", ()), ("naive", ()),
                                                 ("predefined", (0, 3, 19))])
def test_strategies(strategy, bg_classes, device):
    cam, sal, labels = make_inputs(3, 21, 41, 41, 100, 100, seed=2, label_p=0.7, device=device)
    got, ref = run_both(cam, sal, labels, strategy=strategy, bg_classes=bg_classes)
    assert_matches(got, ref, tol=1e-5)


def test_strategies_differ_where_they_should(device):
    """Naive puts every labelled class into fg; predefined moves its classes to bg."""
    cam, sal, labels = make_inputs(2, 3, 13, 17, 13, 17, seed=3, device=device)
    labels[:] = 1.0
    _, naive = eps_loss_reference(cam.double(), sal.double(), labels, strategy="naive",
                                  return_maps=True)
    _, pre = eps_loss_reference(cam.double(), sal.double(), labels, strategy="predefined",
                                bg_classes=[1], return_maps=True)
    p = torch.softmax(cam.double(), 1)
    assert torch.allclose(naive.fg.double(), p[:, :2].sum(1, keepdim=True), atol=1e-6)
    assert torch.allclose(pre.fg.double(), p[:, :1], atol=1e-6)
    assert torch.allclose(pre.bg.double(), p[:, 1:].sum(1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("labels_kind", ["all_absent", "all_present"])
@pytest.mark.parametrize("sal_kind", ["zeros", "ones"])
def test_extreme_labels_and_saliency(labels_kind, sal_kind, device):
    cam, sal, labels = make_inputs(3, 21, 13, 17, 26, 34, seed=4, device=device)
    labels.fill_(0.0 if labels_kind == "all_absent" else 1.0)
    sal.fill_(0.0 if sal_kind == "zeros" else 1.0)
    assert_matches(*run_both(cam, sal, labels, grad_scale=3.0), tol=1e-5, grad_scale=3.0)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_logits(layout, device):
    cam, sal, labels = make_inputs(3, 21, 13, 17, 40, 40, seed=5, device=device)
    got, ref = run_both(cam, sal, labels, layout=layout)
    assert_matches(got, ref, tol=1e-5)
    if layout == "channels_last":   # the gradient keeps the logits' memory format
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,dtype", [((2, 81, 13, 17, 40, 40), torch.bfloat16),
                                         ((2, 2, 1, 3, 3, 5), torch.float32),
                                         ((1, 21, 7, 1, 9, 4), torch.float16)])
def test_channels_last_training_layout(shape, dtype, device):
    """channels_last (the training layout) takes the pixel-major tile path: K = 81 bf16 as in
    COCO training, K = 2 on one row, one column, with a loss-scale grad_output. (A 1x1 map is
    contiguous and channels_last at once: covered by the contiguous tests.)"""
    cam, sal, labels = make_inputs(*shape, seed=15, device=device)
    got, ref = run_both(cam, sal, labels, dtype=dtype, grad_scale=1024.0, layout="channels_last")
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    assert_matches(got, ref, tol=1e-5 if dtype == torch.float32 else 1e-2, grad_scale=1024.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype, device):
    cam, sal, labels = make_inputs(3, 21, 41, 41, 100, 100, seed=6, device=device)
    got, ref = run_both(cam, sal, labels, dtype=dtype, grad_scale=1.5)
    assert got[1].dtype == dtype
    assert_matches(got, ref, tol=1e-2, grad_scale=1.5)


@pytest.mark.parametrize("scale", [65536.0, 32768.0])
def test_fp16_gradient_under_loss_scaling(scale, device):
    """fp16 training scales the loss (DeepSpeed starts at 65536, which is inf in fp16): the
    gradient is computed with grad_output in float32 and rounded to fp16 once, so it is finite
    and matches the float64 reference's (scaled) gradient entry by entry, to fp16 rounding."""
    cam, sal, labels = make_inputs(3, 21, 41, 41, 100, 100, seed=6, device=device)
    got, ref = run_both(cam, sal, labels, dtype=torch.float16, grad_scale=scale)
    grad, ref_grad = got[1].double().cpu(), ref[1]
    assert grad.dtype == torch.float64 and torch.isfinite(grad).all()
    assert_matches(got, ref, tol=1e-2, grad_scale=scale)
    # fp16 rounding: half an ulp (2^-11 relative) or half the smallest subnormal (2^-25),
    # plus float32 arithmetic
    bound = 2.0**-11 * ref_grad.abs() + 2.0**-25 + 1e-5 * ref_grad.abs().max()
    assert ((grad - ref_grad).abs() <= bound).all()
    nonzero = ref_grad.abs() >= 2.0**-24                    # representable in fp16
    assert (grad[nonzero] != 0).all()                       # none flushes to zero


def test_bf16_gradient_has_no_bias_from_grad_output(device):
    """grad_output 1/3 is applied in float32 (in bf16 it would be 0.3340, a +0.19 % bias)."""
    cam, sal, labels = make_inputs(3, 21, 41, 41, 100, 100, seed=6, device=device)
    got, ref = run_both(cam, sal, labels, dtype=torch.bfloat16, grad_scale=1 / 3)
    grad, ref_grad = got[1].double().cpu(), ref[1]
    assert_matches(got, ref, tol=1e-2, grad_scale=1 / 3)
    big = ref_grad.abs() > 1e-3 * ref_grad.abs().max()
    bias = ((grad - ref_grad)[big] / ref_grad[big]).mean().item()  # rounding alone: ~1e-5
    assert abs(bias) < 5e-4, bias


@pytest.mark.parametrize("layout", [None, "channels_last"], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [81, 130])
def test_channel_chunks_match_reference(K, dtype, layout, device):
    """K = 81 (COCO) and K = 130 are walked in chunks of channels with an online softmax; only
    the last chunk is padded. Loss, gradient and maps match the float64 reference."""
    from epsdist_kernels.eps_loss import tile_config
    esize = torch.empty((), dtype=dtype).element_size()
    block_k, _, _ = tile_config(K, 2, 9 * 11, channels_last=layout is not None,
                                elem_size=esize)
    n_chunks = -(-K // block_k)
    assert n_chunks >= 10                                   # a real loop over chunks
    assert n_chunks * block_k - K < block_k                 # padding: the last chunk only
    assert n_chunks * block_k < 2 ** math.ceil(math.log2(K))    # less than a power of two
    cam, sal, labels = make_inputs(2, K, 9, 11, 20, 23, seed=19, label_p=0.3, device=device)
    # the running max grows in later chunks for some pixels, shrinks for none
    cam[:, K - 1 - block_k:, 2:5] += 6.0
    got, ref = run_both(cam, sal, labels, dtype=dtype, grad_scale=2.0, layout=layout)
    assert_matches(got, ref, tol=1e-5 if dtype == torch.float32 else 1e-2, grad_scale=2.0)
    if dtype == torch.float32:                  # the counts pass selected classes both ways
        p = torch.softmax(cam.double(), 1)
        assert (p[:, :K - 1] > 0.5).any()


def test_logits_minus_inf_over_whole_chunks(device):
    """A pixel whose first chunks are all -inf (the running max is -inf for a while) gets the
    softmax of its finite logits, not NaN."""
    cam, sal, labels = make_inputs(2, 81, 7, 9, 14, 18, seed=20, device=device)
    cam[:, :40, 1:3] = float("-inf")
    got, ref = run_both(cam, sal, labels, grad_scale=1.0)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_matches(got, ref, tol=1e-5)


def test_block_p_fills_the_gpu_for_the_benchmark_cases():
    """The launcher picks pixels per program so that every benchmark case, dtype and layout
    gives the 132 SMs of an H100/H200 at least two programs each, and programs no smaller than
    that needs: with twice the pixels the grid would fall short (or the tile is already the
    largest, 4 warps x 16 bytes of pixels per thread)."""
    from epsdist_kernels import bench
    from epsdist_kernels.eps_loss import backward_launch, forward_launches
    n_sm = 132
    for case, (B, K, h, w, S) in bench.CASES.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                cam = torch.empty((B, K, h, w), dtype=dtype).contiguous(memory_format=fmt)
                sal, labels = torch.empty((B, 1, S, S)), torch.empty((B, K - 1))
                launches, _, _, coef, _ = forward_launches(cam, sal, labels, None, tau=0.4,
                                                           lam=0.5, write_maps=False, n_sm=n_sm)
                pixel = [ln for ln in launches if "BLOCK_P" in ln.meta]
                pixel.append(backward_launch(cam, sal, coef, torch.ones(()), cam, lam=0.5,
                                             n_sm=n_sm))
                for ln in pixel:
                    block_p = ln.meta["BLOCK_P"]
                    assert ln.grid == (B, -(-h * w // block_p))
                    assert B * ln.grid[1] >= 2 * n_sm, (case, dtype, fmt, ln.grid)
                    largest = 4 * 32 * (1 if fmt == torch.channels_last
                                        else 16 // cam.element_size())
                    assert block_p == largest or B * -(-h * w // (2 * block_p)) < 2 * n_sm
    # VOC (8 images of 56 x 56, K = 21, float32): 64 pixels per program, 8 x 49 programs
    # (whole-K tiles of 256 pixels gave 104 programs for 132 SMs)
    cam = torch.empty((8, 21, 56, 56))
    launches = forward_launches(cam, torch.empty((8, 1, 448, 448)), torch.empty((8, 20)), None,
                                tau=0.4, lam=0.5, write_maps=False, n_sm=n_sm)[0]
    assert launches[-1].grid == (8, 49)


def test_probabilities_exactly_at_half(device):
    """p == 0.5 exactly (two equal logits, the rest -100) must not count as > 0.5; with the
    tie everywhere no class has overlap, so at tau=0 every labelled class goes to bg."""
    B, K, h, w = 2, 5, 13, 17
    cam = torch.full((B, K, h, w), -100.0)
    cam[:, 0] = 1.0
    cam[:, K - 1] = 1.0                                     # class 0 ties the background
    cam[:, 2, :4] = 5.0                                     # class 2 clearly wins 4 rows
    sal = torch.zeros(B, 1, 26, 34)
    sal[:, :, :13] = 1.0
    labels = torch.zeros(B, K - 1)
    labels[:, 0] = labels[:, 2] = 1.0
    got, ref = run_both(cam.to(device), sal.to(device), labels.to(device), tau=0.0)
    assert_matches(got, ref, tol=1e-5)
    fg = ref[2].fg                                          # class 0 is bg, class 2 is fg
    p2 = math.exp(5.0) / (math.exp(5.0) + 2 * math.exp(1.0))
    assert torch.allclose(fg[:, 0, :4].double(), torch.full((1,), p2, dtype=torch.float64))
    assert fg[:, 0, 4:].abs().max() < 1e-6


def test_deterministic_run_to_run(device):
    # the atomics make it a question on a GPU (the benchmark size there); the interpreter runs
    # programs one after another, so a small case suffices
    shape = (8, 21, 56, 56, 448, 448) if device.type == "cuda" else (2, 21, 24, 24, 96, 96)
    cam, sal, labels = make_inputs(*shape, seed=7, device=device)
    outs = []
    for _ in range(2):
        x = cam.clone().requires_grad_()
        loss = eps_loss_triton(x, sal, labels)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_forward_only_writes_no_gradient(device):
    cam, sal, labels = make_inputs(3, 21, 13, 17, 40, 40, seed=8, device=device)
    with torch.no_grad():
        loss = eps_loss_triton(cam, sal, labels)
    ref = eps_loss_reference(cam.double().cpu(), sal.double().cpu(), labels.cpu())
    assert not loss.requires_grad
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_second_backward_recomputes_the_same_gradient(device):
    """The backward recomputes from the saved logits (no stored gradient to scale in place),
    so a second backward through the same graph (retain_graph) adds the same gradient again."""
    cam, sal, labels = make_inputs(1, 3, 13, 17, 13, 17, device=device)
    x = cam.clone().requires_grad_()
    loss = eps_loss_triton(x, sal, labels)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert first.abs().max() > 0
    assert torch.equal(x.grad, 2 * first)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nan_logits_give_nan_loss_and_gradient(impl, device):
    cam, sal, labels = make_inputs(2, 21, 13, 17, 26, 34, device=device)
    cam[1, 3, 5, 7] = float("nan")
    x = cam.clone().requires_grad_()
    loss = eps_loss(x, sal, labels, impl=impl)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad[1, :, 5, 7]).all()            # the NaN pixel
    assert torch.isfinite(x.grad[0]).all()                  # the other image is untouched


# ------------------------------------------------------------------------------------------
# The reference against independent expectations
# ------------------------------------------------------------------------------------------

def test_hand_computed_2x2(device):
    """One image, one class (K = 2), a 2x2 map, saliency at the same size.

    Logits: class = [[ln3, ln3], [0, -ln3]], background = 0, so
        p_c  = [[.75, .75], [.50, .25]],   p_bg = 1 - p_c = [[.25, .25], [.50, .75]].
    Saliency s = [[1, 0], [1, 0]], label y = [1].
    n_pred = #(p_c > .5) = 2 (the tie .50 does not count), n_both = 1 (top-left),
    ratio = 1 / (2 + 1e-4 * 4) = 0.49990 > tau = 0.4  ->  class is foreground.
    lam = 0.5: pred = .5 p_c + .5 (1 - p_bg) = p_c, diff = pred - s = [[-.25, .75], [-.5, .25]]
    loss = (.0625 + .5625 + .25 + .0625) / 4 = 0.234375.
    Gradient: a_c = .5, a_bg = -.5, so dL/dcam_c = (2 diff / 4) p_c (.5 - (.5 p_c - .5 p_bg))
              = (diff / 2) p_c p_bg = [[-.0234375, .0703125], [-.0625, .0234375]],
              dL/dcam_bg = -dL/dcam_c.
    With tau = 0.5 the ratio 0.49990 fails: the class joins the background, fg = 0,
    bg = p_bg + p_c = 1, pred = 0, loss = mean(s^2) = 0.5 and the gradient is 0.
    """
    ln3 = math.log(3.0)
    cam = torch.tensor([[[[ln3, ln3], [0.0, -ln3]], [[0.0, 0.0], [0.0, 0.0]]]],
                       dtype=torch.float64)
    sal = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    y = torch.tensor([[1.0]])
    expected_grad_c = torch.tensor([[-0.0234375, 0.0703125], [-0.0625, 0.0234375]],
                                   dtype=torch.float64)
    for impl_fn in (eps_loss_reference, eps_loss_triton):
        x = cam.clone().requires_grad_() if impl_fn is eps_loss_reference else \
            cam.float().to(device).requires_grad_()
        y = y.to(x.device)
        loss = impl_fn(x, sal.to(x), y, tau=0.4, lam=0.5)
        loss.backward()
        assert loss.item() == pytest.approx(0.234375, rel=1e-6)
        assert torch.allclose(x.grad[0, 0].double(), expected_grad_c, atol=1e-7)
        assert torch.allclose(x.grad[0, 1].double(), -expected_grad_c, atol=1e-7)

        x = x.detach().requires_grad_()
        loss = impl_fn(x, sal.to(x), y, tau=0.5, lam=0.5)
        loss.backward()
        assert loss.item() == pytest.approx(0.5, rel=1e-6)
        assert x.grad.abs().max().item() < 1e-7


def authors_eps_loss(cam, saliency, num_classes, label, tau, lam):
    """A direct transcription of ``get_eps_loss`` from the authors' release (CPU, no .cuda())."""
    b, c, h, w = cam.size()
    saliency = F.interpolate(saliency, size=(h, w))
    label_map = label.view(b, num_classes, 1, 1).expand(size=(b, num_classes, h, w)).bool()
    label_map_fg = torch.zeros(size=(b, num_classes + 1, h, w)).bool()
    label_map_bg = torch.zeros(size=(b, num_classes + 1, h, w)).bool()
    label_map_bg[:, num_classes] = True
    label_map_fg[:, :-1] = label_map.clone()
    sal_pred = F.softmax(cam, dim=1)
    iou_saliency = (torch.round(sal_pred[:, :-1].detach()) * torch.round(saliency)).view(
        b, num_classes, -1).sum(-1) / (torch.round(sal_pred[:, :-1].detach()) + 1e-04).view(
        b, num_classes, -1).sum(-1)
    valid_channel = (iou_saliency > tau).view(b, num_classes, 1, 1).expand(
        size=(b, num_classes, h, w))
    label_fg_valid = label_map & valid_channel
    label_map_fg[:, :-1] = label_fg_valid
    label_map_bg[:, :-1] = label_map & (~valid_channel)
    fg_map = torch.zeros_like(sal_pred)
    bg_map = torch.zeros_like(sal_pred)
    fg_map[label_map_fg] = sal_pred[label_map_fg]
    bg_map[label_map_bg] = sal_pred[label_map_bg]
    fg_map = torch.sum(fg_map, dim=1, keepdim=True)
    bg_map = torch.sum(bg_map, dim=1, keepdim=True)
    bg_map = torch.sub(1, bg_map)
    sal_pred = fg_map * lam + bg_map * (1 - lam)
    return F.mse_loss(sal_pred, saliency)


@pytest.mark.parametrize("shape", [(3, 21, 13, 17, 50, 61), (2, 81, 41, 41, 321, 321),
                                   (4, 2, 56, 56, 448, 448)])
@pytest.mark.parametrize("tau,lam", [(0.4, 0.5), (0.4, 0.9), (0.0, 0.3), (0.2, 1.0)])
def test_reference_matches_authors_transcription(shape, tau, lam):
    cam, sal, labels = make_inputs(*shape, seed=11)
    cam, sal = cam.double(), sal.double()
    x1, x2 = cam.clone().requires_grad_(), cam.clone().requires_grad_()
    ours = eps_loss_reference(x1, sal, labels, tau=tau, lam=lam)
    theirs = authors_eps_loss(x2, sal, shape[1] - 1, labels, tau, lam)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-9, atol=1e-15)


def test_classification_loss_matches_formula():
    cam, _, labels = make_inputs(4, 21, 13, 17, 13, 17, seed=12)
    scores = cam.double().mean(dim=(2, 3))[:, :20]
    y = labels.double()
    manual = -(y * F.logsigmoid(scores) + (1 - y) * F.logsigmoid(-scores)).mean()
    assert classification_loss(cam, labels).item() == pytest.approx(manual.item(), rel=1e-5)
    assert classification_loss(cam[:, :20], labels).item() == pytest.approx(manual.item(),
                                                                            rel=1e-5)


# ------------------------------------------------------------------------------------------
# dispatch and bad input
# ------------------------------------------------------------------------------------------

def test_auto_impl_picks_reference_on_cpu_and_triton_on_cuda():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", torch.device("cpu"))


def test_public_entry_point_both_impls_agree(device):
    cam, sal, labels = make_inputs(3, 21, 13, 17, 40, 40, seed=13, device=device)
    a = eps_loss(cam, sal, labels, impl="torch", lam=0.9)
    b, maps = eps_loss(cam, sal, labels, impl="triton", lam=0.9, return_maps=True)
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    assert torch.allclose(maps.pred, 0.9 * maps.fg + 0.1 * (1 - maps.bg), atol=1e-6)


GOOD = dict(cam=(2, 21, 13, 17), sal=(2, 1, 40, 40), labels=(2, 20))


@pytest.mark.parametrize("cam_shape,sal_shape,labels_shape,arg", [
    ((3, 21, 13, 17), (2, 1, 40, 40), (2, 20), "saliency: batch size"),
    ((2, 21, 13, 17), (2, 1, 40, 40), (3, 20), "labels: batch size"),
    ((2, 21, 13, 17), (2, 1, 40, 40), (2, 21), "labels: expected C = K-1 = 20"),
    ((2, 1, 13, 17), (2, 1, 40, 40), (2, 0), r"cam: expected K = C\+1 >= 2"),
    ((2, 21, 13, 17), (2, 3, 40, 40), (2, 20), r"saliency: expected shape \(B, 1, H, W\)"),
    ((2, 21, 13, 17), (2, 40, 40), (2, 20), r"saliency: expected shape \(B, 1, H, W\)"),
    ((21, 13, 17), (2, 1, 40, 40), (2, 20), r"cam: expected logits of shape"),
    ((2, 21, 13, 17), (2, 1, 40, 40), (2, 20, 1), r"labels: expected multi-hot"),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_shapes_name_the_argument(cam_shape, sal_shape, labels_shape, arg, impl):
    with pytest.raises(ValueError, match=arg):
        eps_loss(torch.randn(cam_shape), torch.rand(sal_shape), torch.ones(labels_shape),
                 impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_dtypes_values_and_options(impl):
    cam, sal, labels = (torch.randn(GOOD["cam"]), torch.rand(GOOD["sal"]),
                        torch.ones(GOOD["labels"]))
    with pytest.raises(ValueError, match="cam: expected floating-point"):
        eps_loss(cam.long(), sal, labels, impl=impl)
    with pytest.raises(ValueError, match="saliency: expected a floating-point"):
        eps_loss(cam, (sal * 255).to(torch.uint8), labels, impl=impl)
    with pytest.raises(ValueError, match=r"saliency: expected values in \[0, 1\]"):
        eps_loss(cam, sal * 255, labels, impl=impl)
    with pytest.raises(ValueError, match=r"saliency: expected values in \[0, 1\]"):
        eps_loss(cam, sal - 0.5, labels, impl=impl)
    nan_sal = sal.clone()
    nan_sal[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"saliency: expected values in \[0, 1\]"):
        eps_loss(cam, nan_sal, labels, impl=impl)
    with pytest.raises(ValueError, match="lam"):
        eps_loss(cam, sal, labels, lam=1.5, impl=impl)
    with pytest.raises(ValueError, match="strategy"):
        eps_loss(cam, sal, labels, strategy="oracle", impl=impl)
    with pytest.raises(ValueError, match="bg_classes"):
        eps_loss(cam, sal, labels, strategy="predefined", impl=impl)
    with pytest.raises(ValueError, match="bg_classes"):
        eps_loss(cam, sal, labels, strategy="predefined", bg_classes=[20], impl=impl)
    with pytest.raises(ValueError, match="bg_classes"):
        eps_loss(cam, sal, labels, bg_classes=[2], impl=impl)


def test_triton_rejects_float64_and_cpu_without_interpreter(monkeypatch):
    cam, sal, labels = (torch.randn(GOOD["cam"]), torch.rand(GOOD["sal"]),
                        torch.ones(GOOD["labels"]))
    with pytest.raises(ValueError, match="float64"):
        eps_loss(cam.double(), sal, labels, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        eps_loss(cam, sal, labels, impl="triton")


def test_bool_and_integer_labels_equal_float_labels(device):
    cam, sal, labels = make_inputs(3, 21, 13, 17, 40, 40, seed=14, device=device)
    ref = eps_loss_triton(cam, sal, labels)
    for lab in (labels.bool(), labels.long(), labels * 7):
        assert torch.equal(eps_loss_triton(cam, sal, lab), ref)


# ------------------------------------------------------------------------------------------
# layouts and host synchronisation
# ------------------------------------------------------------------------------------------

def test_layout_classification_and_spatially_sliced_logits(device):
    """The launcher picks the addressing from the strides: flat (h, w) for contiguous,
    channels_last and uniformly strided logits, (y, x) for a spatial slice, which still
    matches the reference."""
    from epsdist_kernels.eps_loss import _layout
    cam, sal, labels = make_inputs(2, 21, 13, 19, 40, 40, seed=16, device=device)
    assert _layout(cam) == (True, False)
    assert _layout(cam.contiguous(memory_format=torch.channels_last)) == (True, True)
    sliced = cam[..., 2:]
    assert _layout(sliced) == (False, False)
    x = sliced.detach().requires_grad_()
    loss = eps_loss_triton(x, sal, labels)
    (loss * 2.0).backward()
    ref_x = sliced.double().cpu().requires_grad_()
    ref = eps_loss_reference(ref_x, sal.double().cpu(), labels.cpu())
    (ref * 2.0).backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert (x.grad.double().cpu() - ref_x.grad).abs().max() <= 1e-5 * ref_x.grad.abs().max()


def test_strategy_flags_are_cached_on_the_device(device):
    """naive / predefined do not copy their class flags to the device on every call."""
    from epsdist_kernels.eps_loss import _force_bg
    cam, sal, labels = make_inputs(1, 5, 3, 4, 3, 4, seed=17, device=device)
    eps_loss_triton(cam, sal, labels, strategy="predefined", bg_classes=[1, 3])
    before = _force_bg.cache_info()
    eps_loss_triton(cam, sal, labels, strategy="predefined", bg_classes=[1, 3])
    after = _force_bg.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    flags = _force_bg(4, (1, 3), cam.device)
    assert flags.device == cam.device and flags.tolist() == [0, 1, 0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
@pytest.mark.parametrize("strategy,bg", [("adaptive", ()), ("naive", ()), ("predefined", (2,))])
def test_training_step_issues_no_host_sync(strategy, bg):
    cam, sal, labels = make_inputs(4, 21, 41, 41, 100, 100, seed=18, device="cuda")
    x = cam.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    eps_loss(x, sal, labels, strategy=strategy, bg_classes=bg, check_inputs=False).backward()
    torch.cuda.synchronize()                                # warm: kernels compiled, cached
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = eps_loss(x, sal, labels, strategy=strategy, bg_classes=bg, check_inputs=False)
        (loss * 65536.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
