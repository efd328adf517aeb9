"""CAM post-processing of pseudo-mask inference: the fused Triton kernels (CPU: Triton's
interpreter, see conftest) against the reference in float64, the reference against hand-computed
cases, ties, dtypes, layouts, determinism and the input checks.

Two float64 references. ``cam_to_mask_reference`` on float64 views is F.interpolate computed
in float64 -- source coordinates included. The kernel, like F.interpolate on float32 views,
computes the source coordinate in float32, which is off the float64 one by up to half an ulp of
src (~4e-6 at src ~ 100): interpolated values then differ by that times the map's local slope.
So the float64 reference is compared with ``TOL64``, and a float64 bilinear that uses the float32
coordinates (``coords32_reference``) pins the rest of the arithmetic down to ``TOL32`` = 1e-6:
masks must be identical to it except at pixels whose two best scores are closer than 1e-6.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epsdist_kernels.cam_post import cam_to_mask, cam_to_mask_triton
from epsdist_kernels.cam_post_ref import cam_to_mask_reference

TOL32 = 1e-6        # vs float64 bilinear on float32 source coordinates: float32 rounding only
TOL64 = 3e-5        # vs F.interpolate in float64: + the float32 source coordinate (see above)
# both scale with max(1, max |norm|): signed (raw CAM) maps normalise to values beyond 1
SCALES = (0.5, 1.0, 1.5, 2.0)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def make_views(H, W, K, *, scales=SCALES, flips=(False, True), kind="softmax", seed=0,
               dtype=torch.float32, stride=1):
    """V = len(scales) * len(flips) maps (K, round(H*s), round(W*s)) -- the sizes inference
    gets from resizing the image by s -- blobby per-class biases so classes win regions.
    ``kind``: softmax over K (EPS), relu (CAM baseline, values up to ~10) or raw (signed)."""
    g = torch.Generator().manual_seed(seed)
    views, fl = [], []
    for s in scales:
        h, w = max(1, round(H * s / stride)), max(1, round(W * s / stride))
        logits = 2.0 * torch.randn(K, h, w, generator=g) + 3.0 * torch.randn(K, 1, 1, generator=g)
        if kind == "softmax":
            m = torch.softmax(logits, dim=0)
        elif kind == "relu":
            m = torch.relu(logits)
        else:
            m = logits
        for f in flips:
            views.append(m.to(dtype))
            fl.append(f)
    return views, fl


def make_labels(C, present):
    y = torch.zeros(C)
    y[list(present)] = 1.0
    return y


def _coords32(n_in, n_out):
    """ATen's align_corners=False source index for size=: scale = fl32(in/out) and
    src = fl32(scale * (dst + 0.5) - 0.5) rounded once (FMA), clamped at 0."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0)).astype(np.float64)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(lam)


def coords32_reference(views, flips, labels, out_size):
    """The reference's norm in float64, but bilinear on float32 source coordinates."""
    H, W = out_size
    classes = torch.nonzero(labels.cpu() != 0).flatten()
    acc = torch.zeros((len(classes), H, W), dtype=torch.float64)
    for v, f in zip(views, flips):
        a = v.detach().cpu().double()[classes]
        y0, y1, ly = _coords32(a.shape[1], H)
        x0, x1, lx = _coords32(a.shape[2], W)
        top = a[:, y0][:, :, x0] * (1 - lx) + a[:, y0][:, :, x1] * lx
        bot = a[:, y1][:, :, x0] * (1 - lx) + a[:, y1][:, :, x1] * lx
        up = top * (1 - ly)[:, None] + bot * ly[:, None]
        acc += up.flip(-1) if f else up
    return acc / (acc.amax(dim=(1, 2), keepdim=True) + 1e-5)


def top2_gap(norm, bg_threshold):
    """Per pixel: best score minus second-best score, background included (float64)."""
    H, W = norm.shape[1:]
    scores = torch.cat([torch.full((1, H, W), bg_threshold, dtype=torch.float64),
                        norm.double().cpu()])
    top = scores.topk(2, dim=0).values
    return top[0] - top[1]


def assert_mask_matches(mask, ref_mask, ref_norm, bg_threshold, gap_tol):
    """Masks equal except at near-ties of the reference scores; returns the count of such
    near-tie pixels that differ."""
    differ = mask.cpu() != ref_mask.cpu()
    if ref_norm.shape[0] == 0:
        assert not differ.any()
        return 0
    near_tie = top2_gap(ref_norm, bg_threshold) < gap_tol
    bad = differ & ~near_tie
    assert not bad.any(), (f"{int(bad.sum())} mask pixels differ away from ties, e.g. at "
                           f"{torch.nonzero(bad)[:5].tolist()}")
    return int(differ.sum())


def check(views, flips, labels, out_size, bg_threshold=0.2):
    """Triton (return_norm) vs both float64 references; returns the Triton result."""
    got = cam_to_mask_triton(views, flips, labels, out_size, bg_threshold, return_norm=True)
    ref = cam_to_mask_reference([v.double() for v in views], flips, labels, out_size,
                                bg_threshold, return_norm=True)
    H, W = out_size
    L = int((labels != 0).sum())
    assert got.mask.shape == (H, W) and got.mask.dtype == torch.uint8
    assert got.norm.shape == (L, H, W) and got.norm.dtype == torch.float32
    assert got.classes.dtype == torch.int64 and torch.equal(got.classes.cpu(), ref.classes)
    if L == 0:
        assert not got.mask.any()
        return got
    norm32 = coords32_reference(views, flips, labels, out_size)
    mag = max(1.0, ref.norm.abs().max().item())     # signed maps: norm can exceed 1
    assert (got.norm.double().cpu() - norm32).abs().max().item() <= TOL32 * mag
    assert (got.norm.double().cpu() - ref.norm).abs().max().item() <= TOL64 * mag
    mask32 = _mask_from_norm(norm32, ref.classes, bg_threshold)
    assert_mask_matches(got.mask, mask32, norm32, bg_threshold, TOL32 * mag)
    assert_mask_matches(got.mask, ref.mask, ref.norm, bg_threshold, TOL64 * mag)
    return got


def _mask_from_norm(norm, classes, bg_threshold):
    H, W = norm.shape[1:]
    scores = torch.cat([torch.full((1, H, W), bg_threshold, dtype=norm.dtype), norm])
    lut = torch.cat([torch.zeros(1, dtype=torch.int64), classes + 1])
    return lut[scores.argmax(0)].to(torch.uint8)


# ------------------------------------------------------------------------------------------
# Triton vs float64 references
# ------------------------------------------------------------------------------------------

# (id, (H, W), K, C, labelled classes, view kind, scales): K = C+1 (EPS) or K = C (baseline)
CASES = [
    ("voc_3cls", (37, 53), 21, 20, (2, 5, 17), "softmax", SCALES),
    ("voc_1cls", (37, 53), 21, 20, (11,), "softmax", SCALES),
    ("voc_all20", (37, 53), 21, 20, range(20), "softmax", SCALES),   # two class chunks
    ("baseline_K_eq_C", (37, 53), 20, 20, (0, 3, 4, 9, 19), "relu", SCALES),
    ("coco_8cls", (29, 41), 81, 80, (0, 7, 13, 24, 39, 56, 62, 79), "softmax", (0.5, 1.0)),
    ("downscale_only", (23, 19), 5, 4, (1, 2), "softmax", (2.0, 3.3)),
    ("one_pixel_out", (1, 1), 3, 2, (0, 1), "softmax", (1.0, 3.0)),
    ("one_column_out", (7, 1), 3, 2, (1,), "relu", (0.5, 2.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference(case, device):
    _, out, K, C, present, kind, scales = case
    views, flips = make_views(*out, K, scales=scales, kind=kind, seed=len(present))
    labels = make_labels(C, present)
    got = check([v.to(device) for v in views], flips, labels, out)
    assert set(got.mask.unique().tolist()) <= {0, *(c + 1 for c in present)}


def test_net_stride_views_voc_like(device):
    """Inference's shape: 1/8-resolution maps of a 4-scale x 2-flip pyramid (bench cam_voc)."""
    views, flips = make_views(75, 100, 21, stride=8, seed=3)
    check([v.to(device) for v in views], flips, make_labels(20, (4, 8, 14)), (75, 100))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_views(dtype, device):
    """Half/bfloat16 maps are upcast on load: the references take the same rounded values."""
    views, flips = make_views(37, 53, 21, dtype=dtype, seed=4)
    got = check([v.to(device) for v in views], flips, make_labels(20, (1, 6, 7)), (37, 53))
    assert got.norm.dtype == torch.float32


def test_negative_maps_use_a_signed_max(device):
    """Raw (signed) CAMs: the per-class max is a true signed max, as in the reference."""
    views, flips = make_views(37, 53, 20, kind="raw", seed=5)
    labels = make_labels(20, (0, 10, 12))
    check([v.to(device) for v in views], flips, labels, (37, 53), bg_threshold=-0.5)
    # a class whose accumulated map is negative everywhere
    neg = [-(v.abs() + 0.1) for v in views[:4]]
    check([v.to(device) for v in neg], flips[:4], labels, (37, 53), bg_threshold=-3.0)


def test_non_contiguous_and_shared_storage_views(device):
    """Strided slices, permuted layouts and views sharing one storage (a batched network output)
    at offsets in any order give bit-identical results to contiguous copies."""
    views, flips = make_views(37, 53, 21, seed=6)
    labels = make_labels(20, (0, 9, 19))
    odd = []
    for i, v in enumerate(views):
        if i % 4 == 0:                                   # stride_x = 3
            big = torch.zeros(v.shape[0], v.shape[1], 3 * v.shape[2])
            big[:, :, ::3] = v
            odd.append(big[:, :, ::3])
        elif i % 4 == 1:                                 # channels-last style strides
            odd.append(v.permute(1, 2, 0).contiguous().permute(2, 0, 1))
        elif i % 4 == 2:                                 # second half of a shared buffer
            pair = torch.stack([torch.zeros_like(v), v])
            odd.append(pair[1])
        else:                                            # channel-sliced (K stride, offset)
            wide = torch.cat([torch.zeros(3, *v.shape[1:]), v])
            odd.append(wide[3:])
    assert not all(v.is_contiguous() for v in odd)
    odd = [v.to(device) for v in odd]
    got = check(odd, flips, labels, (37, 53))
    plain = cam_to_mask_triton([v.contiguous() for v in odd], flips, labels, (37, 53),
                               return_norm=True)
    assert torch.equal(got.mask, plain.mask) and torch.equal(got.norm, plain.norm)


def test_matches_float32_interpolate_per_view(device):
    """One class, one view: the kernel's upsampled map is F.interpolate's on float32 input to
    an ulp or two wherever ATen's kernels round the source index once (FMA: CUDA, AVX2/AVX-512
    CPU builds); a build without FMA moves src by half an ulp, hence the looser bound there."""
    strict = torch.cuda.is_available() or torch.backends.cpu.get_cpu_capability().startswith("AVX")
    g = torch.Generator().manual_seed(7)
    for (H, W), s, flip in [((37, 53), 0.5, False), ((37, 53), 1.5, True),
                            ((75, 100), 0.125, True), ((75, 100), 2.0, False)]:
        v = torch.rand(2, round(H * s), round(W * s), generator=g)
        got = cam_to_mask_triton([v.to(device)], [flip], torch.tensor([1.0, 0.0]), (H, W),
                                 return_norm=True)
        up = F.interpolate(v[None, :1], (H, W), mode="bilinear", align_corners=False)[0]
        up = up.flip(-1) if flip else up
        err = (got.norm.cpu() - up / (up.amax() + 1e-5)).abs().max().item()
        assert err <= (3e-7 if strict else 1e-5), (H, W, s, flip, err)


# ------------------------------------------------------------------------------------------
# ties, empty labels, options
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ties_at_threshold_and_between_classes(impl, device):
    """Scale-1 views are sampled exactly. Class 0 scores exactly bg_threshold (in float32) on
    most pixels: background wins them. Classes 1 and 2 have identical maps: class 1 wins.
    Both implementations must give exactly this mask (float32 reference, no tolerance)."""
    H, W = 9, 11
    M, t = np.float32(0.8), np.float32(0.25)
    thr = float(t / (M + np.float32(1e-5)))              # float32 norm of t, exactly
    view = torch.zeros(4, H, W)                          # K = C+1 = 4
    view[0] = float(t)
    view[0, 0, 0] = float(M)                             # class 0 max
    view[0, 1, 0] = float(np.nextafter(t, np.float32(1)))   # just above the threshold
    view[1, 4:, 5:] = 0.9
    view[2] = view[1]                                    # exact tie between classes 1 and 2
    labels = torch.ones(3)
    res = cam_to_mask([view.to(device)], [False], labels, (H, W), thr, impl=impl)
    expected = torch.zeros(H, W, dtype=torch.uint8)
    expected[0, 0] = expected[1, 0] = 1
    expected[4:, 5:] = 2
    assert torch.equal(res.mask.cpu(), expected)
    # the same with the map split over two views (the first flipped, un-flipped by index)
    halves = [0.5 * view.flip(-1), 0.5 * view]
    res2 = cam_to_mask([v.to(device) for v in halves], [True, False], labels, (H, W), thr,
                       impl=impl)
    assert torch.equal(res2.mask.cpu(), expected)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("K", [21, 20])
def test_no_labelled_class(impl, K, device):
    views, flips = make_views(13, 17, K, scales=(1.0,), seed=8)
    res = cam_to_mask([v.to(device) for v in views], flips, torch.zeros(20), (13, 17),
                      impl=impl, return_norm=True)
    assert res.mask.shape == (13, 17) and res.mask.dtype == torch.uint8 and not res.mask.any()
    assert res.norm.shape == (0, 13, 17) and res.classes.numel() == 0
    assert res.classes.dtype == torch.int64


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_hand_computed(impl, device):
    """Bilinear, align_corners=False: [0, 1] resized to width 4 samples src = max((x + .5)/2 -
    .5, 0) = 0, .25, .75, 1.25 (clamped to the last texel) -> [0, .25, .75, 1]. One class:
    norm = v / (1 + 1e-5); bg_threshold 0.5 -> mask [0, 0, 1, 1]. A flipped view is un-flipped.
    Two classes on a 1x3 identity view: class 0 = [.1, .5, 1], class 1 = [.3, .5, .2]:
    norms [.1, .49999, .99999] and [.59999, .99998, .39999] -> mask [2, 2, 1] (bg 0.2)."""
    ramp = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])            # K = 2, C = 1
    res = cam_to_mask([ramp.to(device)], [False], torch.ones(1), (1, 4), 0.5,
                      return_norm=True, impl=impl)
    want = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float64) / (1 + 1e-5)
    assert torch.allclose(res.norm[0, 0].double().cpu(), want, atol=1e-7)
    assert res.mask.cpu().tolist() == [[0, 0, 1, 1]]
    res = cam_to_mask([ramp.to(device)], [True], torch.ones(1), (1, 4), 0.5, impl=impl)
    assert res.mask.cpu().tolist() == [[1, 1, 0, 0]]

    two = torch.tensor([[[0.1, 0.5, 1.0]], [[0.3, 0.5, 0.2]]])  # K = C = 2
    res = cam_to_mask([two.to(device)], [False], torch.ones(2), (1, 3), impl=impl)
    assert res.mask.cpu().tolist() == [[2, 2, 1]]
    assert res.classes.cpu().tolist() == [0, 1]


def test_return_norm_false_gives_the_same_mask(device):
    views, flips = make_views(37, 53, 21, seed=9)
    labels = make_labels(20, (3, 4))
    a = cam_to_mask_triton([v.to(device) for v in views], flips, labels, (37, 53))
    b = cam_to_mask_triton([v.to(device) for v in views], flips, labels, (37, 53),
                           return_norm=True)
    assert a.norm is None and torch.equal(a.mask, b.mask)


def test_deterministic_run_to_run(device):
    views, flips = make_views(37, 53, 81, scales=(0.5, 1.0), seed=10)
    views = [v.to(device) for v in views]
    labels = make_labels(80, range(0, 80, 9))
    a = cam_to_mask_triton(views, flips, labels, (37, 53), return_norm=True)
    b = cam_to_mask_triton(views, flips, labels, (37, 53), return_norm=True)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.norm, b.norm)


def test_auto_impl_and_labels_dtypes(device):
    views, flips = make_views(13, 17, 21, scales=(0.5, 1.0), seed=11)
    views = [v.to(device) for v in views]
    labels = make_labels(20, (2, 3))
    ref = cam_to_mask(views, flips, labels, (13, 17), impl="torch")
    auto = cam_to_mask(views, flips, labels, (13, 17))     # triton on CUDA, torch on CPU
    assert torch.equal(auto.mask, ref.mask)
    for lab in (labels.bool(), labels.long(), 7 * labels, labels.to(device)):
        assert torch.equal(cam_to_mask(views, flips, lab, (13, 17), impl="triton").mask,
                           cam_to_mask(views, flips, labels, (13, 17), impl="triton").mask)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------

V = torch.rand(21, 5, 7)
BAD = [
    (dict(views=[]), r"views: expected a non-empty list"),
    (dict(views=V), r"views: expected a non-empty list"),
    (dict(views=[V[0]]), r"views\[0\]: expected a \(K, h, w\) map"),
    (dict(views=[V, V.long()], flips=[False, True]), r"views\[1\]: expected a floating-point"),
    (dict(views=[V, V[:20]], flips=[False, True]), r"views\[1\]: has K=20"),
    (dict(views=[V[:, :0]]), r"views\[0\]: expected a non-empty"),
    (dict(flips=[False, True]), r"flips: expected a list of 1 bools"),
    (dict(flips=[2]), r"flips: expected bools"),
    (dict(labels=torch.ones(1, 20)), r"labels: expected the image's multi-hot labels"),
    (dict(labels=torch.ones(19)), r"labels: has C=19 classes but the views have K=21"),
    (dict(out_size=(0, 5)), r"out_size"),
    (dict(out_size=(4, 5, 6)), r"out_size"),
    (dict(out_size=(4.0, 5)), r"out_size"),
    (dict(bg_threshold=float("nan")), r"bg_threshold"),
    (dict(bg_threshold="0.2"), r"bg_threshold"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[f"{i}_{next(iter(kw))}" for i, (kw, _) in
                                                enumerate(BAD)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_names_the_argument(kw, match, impl):
    args = dict(views=[V], flips=[False], labels=torch.ones(20), out_size=(4, 5),
                bg_threshold=0.2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        cam_to_mask(args["views"], args["flips"], args["labels"], args["out_size"],
                    args["bg_threshold"], impl=impl)


def test_triton_specific_checks(monkeypatch):
    labels = torch.ones(20)
    with pytest.raises(ValueError, match=r"views\[0\]: .*float64"):
        cam_to_mask_triton([V.double()], [False], labels, (4, 5))
    with pytest.raises(ValueError, match=r"views\[1\]: dtype torch.float16 differs"):
        cam_to_mask_triton([V, V.half()], [False, True], labels, (4, 5))
    with pytest.raises(ValueError, match="impl"):
        cam_to_mask([V], [False], labels, (4, 5), impl="cuda")
    with pytest.raises(ValueError, match=r"labels: C=300"):
        cam_to_mask_triton([torch.rand(301, 2, 2)], [False], torch.ones(300), (4, 5))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cam_to_mask_triton([V], [False], labels, (4, 5))
