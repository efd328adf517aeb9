"""YAML -> nested dataclasses configuration.

A config is a tree of dataclasses (the schema, ``EPSConfig`` below). A YAML file gives any
subset of its keys; missing keys take the dataclass defaults. Every value is checked against
its field annotation, and every error is a ``ConfigError`` naming the full dotted key path
(``train.lr``), so a typo never silently trains with a default.

Command-line overrides are ``key.sub=value`` strings. The value is parsed with
``yaml.safe_load`` (``0.01`` -> float, ``true`` -> bool, ``[1,2]`` -> list, ``null`` -> None)
and then checked like a YAML value. One exception: for a ``str`` field, a value YAML reads as
a non-string scalar keeps its raw text, so ``run.name=001`` gives ``"001"``, not ``1``.
Overriding a whole section (``loss={tau: 0.3}``) needs a mapping and merges it into the section.

PyYAML follows YAML 1.1, which reads ``5e-4`` (no dot) as a string; float fields therefore also
accept strings in that exponent form. Nothing else is coerced: ``1`` is not a bool, ``0.5`` is
not an int, ``"3"`` is not an int.
"""
import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration file, override or value is invalid; the message names the key path."""


# ----------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    """Where and how often a run writes logs and checkpoints."""

    dir: str = "runs/default"
    name: str = "eps"
    log_every: int = 20  # iterations between log lines / TensorBoard scalars
    save_every: int = 1000  # iterations between checkpoints
    keep_last: int = 3  # checkpoints kept on disk; older ones are deleted
    panel_every: int = 500  # iterations between TensorBoard image panels; 0 disables them
    dist_timeout_s: float = 600.0  # a collective waiting longer than this (dead rank) fails


# how data.http_command reads an http(s) URL (the curl flags webdataset's own opener uses, with
# the retries left to epsdist.data.source; ~/.netrc for credentials; stalls > 60 s fail)
DEFAULT_HTTP_COMMAND = ("curl --fail --silent --show-error --location --netrc-optional "
                        "--connect-timeout 30 --speed-limit 1 --speed-time 60 {url}")


@dataclass
class ShardsConfig:
    """What both stages' ``data`` sections share: where the shards are and how they are read.
    A shard location is a directory holding *.tar shards and manifest.json, or its URL."""

    train_shards: str = ""  # stage 1: the dataset's shards; stage 2: OUT/shards of infer.py
    val_shards: str = ""  # ground-truth shards (python -m epsdist.data.shard ... --split val)
    num_classes: int = 20  # foreground classes C (background is extra)
    num_workers: int = 2
    shuffle_buffer: int = 256  # raw samples shuffled per loader worker
    cache_dir: str = ""  # remote shards (URLs) are fetched once per node into this dir; "" = stream
    fetch_retries: int = 3  # a failed fetch of a remote shard or manifest is retried this often
    fetch_backoff_s: float = 1.0  # wait before retry k (0, 1, ...) is fetch_backoff_s * 2**k
    http_command: str = DEFAULT_HTTP_COMMAND  # prints {url} (http/https) to stdout
    s3_command: str = "aws s3 cp {url} -"  # prints {url} (s3://) to stdout; or "mc cat ..."
    gs_command: str = "gsutil cat {url}"  # prints {url} (gs://) to stdout


@dataclass
class DataConfig(ShardsConfig):
    """Stage 1's shards and the augmentation that turns them into batches."""

    crop_size: int = 448
    resize_long: tuple[int, int] = (256, 512)  # random long-side resize range, inclusive


@dataclass
class ModelConfig:
    """The classification backbone and its localization-map head."""

    backbone: Literal["resnet38", "resnet50", "resnet101", "tiny"] = "resnet38"
    weights: str = "none"  # path to ImageNet weights, or "none" for random init
    output_stride: int = 8
    eps_head: bool = True  # True: C+1 maps (EPS); False: C maps (CAM baseline)
    # CAM baseline only (eps_head false): channel dropout (Dropout2d) on the last feature map,
    # before the 1x1 classifier, as the released classification network; EPS models have none
    cam_dropout: float = 0.5


@dataclass
class LossConfig:
    """The EPS saliency loss and its kernel implementation."""

    impl: Literal["auto", "torch", "triton"] = "auto"
    tau: float = 0.4  # a labelled class whose saliency-overlap ratio is > tau is foreground
    lam: float = 0.5  # blend of the foreground map vs 1 - background map (0.5 VOC, 0.9 COCO)
    strategy: Literal["adaptive", "naive", "predefined"] = "adaptive"
    bg_classes: list[int] = field(default_factory=list)  # background classes for "predefined"
    saliency_weight: float = 1.0  # total loss = classification + saliency_weight * saliency


@dataclass
class TrainConfig:
    """Optimisation schedule, precision and DeepSpeed ZeRO settings."""

    max_iters: int = 20000
    # the images of one optimizer step over all ranks (the paper's: 8 VOC, 16 COCO), whatever
    # the rank count: each rank takes global / ranks of them (which must divide), in
    # micro-batches of at most micro_batch_size (0: no cap) with gradient accumulation
    global_batch_size: int = 8
    micro_batch_size: int = 0
    # derived by the trainer from the two above and the rank count (resolve_batch), saved in
    # run.dir/config.yaml: leave them out of recipes (a value that disagrees is an error)
    batch_size: int = 0  # the per-rank micro-batch
    grad_accum: int = 0  # micro-batches per optimizer step
    lr: float = 0.01
    momentum: float = 0.9  # the stage-1 paper recipes set 0.0005, as the released run (README)
    weight_decay: float = 5e-4
    poly_power: float = 0.9  # lr = base_lr * (1 - it / max_iters) ** poly_power
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 0  # DeepSpeed ZeRO stage, 0-3
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/Inf loss: stop the run or skip the step
    # on_nonfinite=skip still fails the run once more than this fraction of train.max_iters
    # was skipped, or this many steps in a row
    max_skipped_fraction: float = 0.1
    max_consecutive_skips: int = 5
    channels_last: bool = True  # on CUDA: channels_last activations
    compile: bool = False  # torch.compile the model (and the reference loss when loss.impl is torch)


@dataclass
class InferConfig:
    """Pseudo-mask inference (epsdist/infer.py): multi-scale + flip CAMs -> masks."""

    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    flip: bool = True  # also run each scale horizontally flipped
    bg_threshold: float = 0.2  # background score against the max-normalised class maps
    impl: Literal["auto", "torch", "triton"] = "auto"  # CAM post-processing kernel
    compile: bool = False  # torch.compile the model for inference (off until measured)
    max_side: int = 1024  # larger images run at this long side; the mask is resized back
    # the network's forward on CUDA: fp32 (as the released run) or bf16 autocast; until a GPU
    # measurement shows bf16 leaves the pseudo-mask mIoU unchanged, the recipes keep fp32
    precision: Literal["fp32", "bf16"] = "fp32"
    # images of one working size whose views share a forward pass (together at most
    # max_side**2 pixels); 1 = one image per forward. Same masks (bit-identical in fp32 on the CPU)
    batch_images: int = 4
    workers: int = 2  # processes decoding the images beside the network (0 = in the main one)


@dataclass
class EPSConfig:
    """A full EPS training configuration."""

    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def validate(self) -> None:
        """Raise ConfigError listing every value outside its allowed range."""
        errors = []
        need = _collector(errors)
        _validate_common(need, self)
        need(self.train.global_batch_size >= 1, "train.global_batch_size", ">= 1 (the images "
             "of one optimizer step over all ranks)", self.train.global_batch_size)
        need(0.0 <= self.model.cam_dropout < 1.0, "model.cam_dropout", "in [0, 1)",
             self.model.cam_dropout)
        need(0.0 <= self.loss.lam <= 1.0, "loss.lam", "in [0, 1]", self.loss.lam)
        need(0.0 <= self.loss.tau <= 1.0, "loss.tau", "in [0, 1]", self.loss.tau)
        need(self.loss.strategy != "predefined" or self.loss.bg_classes, "loss.bg_classes",
             "a non-empty class list when loss.strategy is 'predefined'", self.loss.bg_classes)
        need(len(self.infer.scales) > 0 and all(s > 0 for s in self.infer.scales),
             "infer.scales", "a non-empty list of positive scales", list(self.infer.scales))
        need(0.0 <= self.infer.bg_threshold <= 1.0, "infer.bg_threshold", "in [0, 1]",
             self.infer.bg_threshold)
        need(self.infer.max_side >= 16, "infer.max_side", ">= 16", self.infer.max_side)
        need(self.infer.batch_images >= 1, "infer.batch_images", ">= 1", self.infer.batch_images)
        need(self.infer.workers >= 0, "infer.workers", ">= 0", self.infer.workers)
        lo, hi = self.data.resize_long
        need(1 <= lo <= hi, "data.resize_long", "[lo, hi] with 1 <= lo <= hi",
             list(self.data.resize_long))
        need(self.loss.saliency_weight >= 0, "loss.saliency_weight", ">= 0",
             self.loss.saliency_weight)
        strides = (8,) if self.model.backbone in ("resnet38", "tiny") else (8, 16, 32)
        need(self.model.output_stride in strides, "model.output_stride",
             f"one of {', '.join(map(str, strides))} for model.backbone "
             f"{self.model.backbone!r}", self.model.output_stride)
        for i, c in enumerate(self.loss.bg_classes):
            need(0 <= c < self.data.num_classes, f"loss.bg_classes[{i}]",
                 f"a class index in [0, data.num_classes={self.data.num_classes})", c)
        if errors:
            raise ConfigError("\n".join(errors))


def _collector(errors: list):
    """``need(ok, key, rule, value)``: appends "config key 'key' must be rule" unless ok."""
    def need(ok, key, rule, value):
        if not ok:
            errors.append(f"config key '{key}' must be {rule}, got {value!r}")
    return need


MAX_SEED = 4_000_000       # seed * 1000 + rank seeds numpy, whose seeds are below 2**32


def _validate_finite(need, obj, path="") -> None:
    """Every float of the config tree (lists and tuples included) is finite: ``inf`` or
    ``nan`` (YAML ``.inf``/``.nan``) in a schedule or weight only ever gives a wrong run."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _validate_finite(need, getattr(obj, f.name), _join(path, f.name))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _validate_finite(need, v, f"{path}[{i}]")
    elif isinstance(obj, float):
        need(math.isfinite(obj), path, "a finite number", obj)


def _validate_ranges(need, cfg) -> None:
    """Ranges of the keys both stages share that are not checked elsewhere."""
    r, t = cfg.run, cfg.train
    _validate_finite(need, cfg)
    need(0 <= cfg.seed <= MAX_SEED, "seed", f"in [0, {MAX_SEED}]", cfg.seed)
    need(bool(r.dir.strip()), "run.dir", "a directory (empty would write into the current "
         "directory)", r.dir)
    need(r.panel_every >= 0, "run.panel_every", ">= 0 (0: no panels)", r.panel_every)
    need(0 <= t.momentum < 1, "train.momentum", "in [0, 1)", t.momentum)
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    need(t.poly_power >= 0, "train.poly_power", ">= 0", t.poly_power)
    need(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0: no clipping)", t.grad_clip)
    need(0 <= t.max_skipped_fraction <= 1, "train.max_skipped_fraction", "in [0, 1]",
         t.max_skipped_fraction)
    need(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", ">= 1",
         t.max_consecutive_skips)


def _validate_common(need, cfg) -> None:
    """The checks of the sections both stages have (run, and the shared data/train keys)."""
    _validate_ranges(need, cfg)
    r, d, t = cfg.run, cfg.data, cfg.train
    need(t.batch_size >= 0, "train.batch_size", ">= 0", t.batch_size)
    need(t.max_iters >= 1, "train.max_iters", ">= 1", t.max_iters)
    need(t.grad_accum >= 0, "train.grad_accum", ">= 0", t.grad_accum)
    need(t.micro_batch_size >= 0, "train.micro_batch_size", ">= 0 (0: no per-rank cap)",
         t.micro_batch_size)
    need(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "one of 0, 1, 2, 3", t.zero_stage)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(d.num_classes >= 1, "data.num_classes", ">= 1", d.num_classes)
    need(d.crop_size >= 8, "data.crop_size", ">= 8", d.crop_size)
    need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1", d.shuffle_buffer)
    need(d.fetch_retries >= 0, "data.fetch_retries", ">= 0", d.fetch_retries)
    need(d.fetch_backoff_s >= 0, "data.fetch_backoff_s", ">= 0", d.fetch_backoff_s)
    for key in ("http_command", "s3_command", "gs_command"):
        need("{url}" in getattr(d, key), f"data.{key}", "a command with {url} in it",
             getattr(d, key))
    need(r.log_every >= 1, "run.log_every", ">= 1", r.log_every)
    need(r.save_every >= 1, "run.save_every", ">= 1", r.save_every)
    need(r.keep_last >= 1, "run.keep_last", ">= 1", r.keep_last)
    need(r.dist_timeout_s > 0, "run.dist_timeout_s", "> 0", r.dist_timeout_s)


# ----------------------------------------------------------------------------- segmentation


@dataclass
class SegDataConfig(ShardsConfig):
    """The segmentation stage's shards (train: pseudo-mask shards, seg.png = mask) and its
    DeepLab augmentation; the network predicts C+1 classes (0 = background)."""

    crop_size: int = 321
    scale_range: tuple[float, float] = (0.5, 1.5)  # random rescale factor, uniform in [lo, hi]


@dataclass
class SegModelConfig:
    """The segmentation network (epsdist/seg/models.py)."""

    arch: Literal["deeplabv2", "deeplabv3"] = "deeplabv2"
    backbone: Literal["resnet101", "resnet50", "tiny"] = "resnet101"
    weights: str = "none"  # torchvision ImageNet checkpoint of the backbone, or "none"
    output_stride: int = 8  # deeplabv2: 8 or 16 (resnets), 8 (tiny); deeplabv3: 8
    aspp_rates: tuple[int, ...] = (6, 12, 18, 24)  # deeplabv2 ASPP dilation rates
    sync_bn: bool = True  # deeplabv3 on several CUDA ranks: SyncBatchNorm in the head


@dataclass
class SegTrainConfig(TrainConfig):
    """TrainConfig with the DeepLab-v2 defaults and a total batch size."""

    max_iters: int = 20000
    global_batch_size: int = 10  # the DeepLab-v2 recipe; 0: train.batch_size per rank
    lr: float = 2.5e-4  # backbone; the classifier gets 10x (weights) / 20x (biases)
    weight_decay: float = 5e-4


@dataclass
class SegEvalConfig:
    """Validation of the segmentation network on the ground-truth val shards."""

    every: int = 2000  # iterations between evaluations (and always at the end); 0: end only
    scales: tuple[float, ...] = (1.0,)  # input scales; softmax averaged over scales (+ flips)
    flip: bool = False  # also run every scale horizontally flipped
    crf: bool = False  # dense-CRF post-processing (needs the pydensecrf package)
    crf_iters: int = 10
    crf_bi_w: float = 4.0  # the EPS authors' published CRF parameters
    crf_bi_xy_std: float = 67.0
    crf_bi_rgb_std: float = 3.0
    crf_pos_w: float = 3.0
    crf_pos_xy_std: float = 1.0
    save_pred: bool = True  # write the predicted masks to run.dir/val_pred/iter_NNNNNNNN/
    max_images: int = 0  # > 0: evaluate only the first N val images (quick checks)


@dataclass
class SegConfig:
    """A segmentation-stage configuration (epsdist/segment.py)."""

    seed: int = 0
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/seg", name="seg"))
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)

    def validate(self) -> None:
        """Raise ConfigError listing every value outside its allowed range."""
        errors = []
        need = _collector(errors)
        _validate_common(need, self)
        t, d, m, e = self.train, self.data, self.model, self.eval
        need(t.global_batch_size >= 0, "train.global_batch_size", ">= 0 (0: use "
             "train.batch_size per rank)", t.global_batch_size)
        need(t.global_batch_size > 0 or t.batch_size >= 1, "train.batch_size", ">= 1 (per "
             "rank) when train.global_batch_size is 0", t.batch_size)
        lo, hi = d.scale_range
        need(0 < lo <= hi, "data.scale_range", "[lo, hi] with 0 < lo <= hi", list(d.scale_range))
        need(len(m.aspp_rates) > 0 and all(r >= 1 for r in m.aspp_rates), "model.aspp_rates",
             "a non-empty list of dilation rates >= 1", list(m.aspp_rates))
        if m.arch == "deeplabv3":
            need(m.backbone != "tiny", "model.backbone", "resnet50 or resnet101 with "
                 "model.arch 'deeplabv3' (torchvision's DeepLab-v3)", m.backbone)
            need(m.output_stride == 8, "model.output_stride", "8 with model.arch 'deeplabv3'",
                 m.output_stride)
        elif m.backbone == "tiny":
            need(m.output_stride == 8, "model.output_stride", "8 with the tiny backbone",
                 m.output_stride)
        else:
            need(m.output_stride in (8, 16), "model.output_stride", "8 or 16", m.output_stride)
        need(e.every >= 0, "eval.every", ">= 0 (0: evaluate at the end only)", e.every)
        need(len(e.scales) > 0 and all(s > 0 for s in e.scales), "eval.scales",
             "a non-empty list of positive scales", list(e.scales))
        need(e.crf_iters >= 1, "eval.crf_iters", ">= 1", e.crf_iters)
        for k in ("crf_bi_w", "crf_bi_xy_std", "crf_bi_rgb_std", "crf_pos_w", "crf_pos_xy_std"):
            need(getattr(e, k) > 0, f"eval.{k}", "> 0", getattr(e, k))
        need(e.max_images >= 0, "eval.max_images", ">= 0 (0: all)", e.max_images)
        if errors:
            raise ConfigError("\n".join(errors))


# ----------------------------------------------------------------------------- batch


def resolve_batch(cfg, world_size: int):
    """``cfg`` with ``train.batch_size`` (the per-rank micro-batch) and ``train.grad_accum``
    (micro-batches per optimizer step) derived from ``train.global_batch_size`` over
    ``world_size`` ranks, for both stages: each rank takes global / ranks images per step,
    which must divide; with ``train.micro_batch_size`` > 0 and a larger per-rank share, the
    fewest micro-batches of at most that size that split it evenly. A ConfigError names the
    numbers when they cannot divide, or when a given batch_size / grad_accum disagrees.
    ``train.global_batch_size`` 0 (the segmentation stage only): ``train.batch_size`` per
    rank as given."""
    t = cfg.train
    g = t.global_batch_size
    if g == 0:
        return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=t.grad_accum
                                                                  or 1))
    per_rank, rest = divmod(g, world_size)
    if per_rank < 1 or rest:
        raise ConfigError(
            f"config key 'train.global_batch_size' is {g}, which {world_size} ranks cannot "
            f"split into equal per-rank batches: run on a number of ranks that divides {g}, "
            f"or set train.global_batch_size to a multiple of {world_size} (a different "
            f"recipe)")
    cap = t.micro_batch_size or per_rank
    accum = next(a for a in range(-(-per_rank // cap), per_rank + 1) if per_rank % a == 0)
    micro = per_rank // accum
    if t.batch_size not in (0, micro) or t.grad_accum not in (0, accum):
        raise ConfigError(
            f"config keys 'train.batch_size' ({t.batch_size}) and 'train.grad_accum' "
            f"({t.grad_accum}) are derived: train.global_batch_size={g} over {world_size} ranks"
            + (f" with train.micro_batch_size={t.micro_batch_size}" if t.micro_batch_size
               else "")
            + f" gives batch_size={micro}, grad_accum={accum}. Remove them; set "
              f"train.global_batch_size for the images per step and train.micro_batch_size "
              f"to cap the per-rank batch (gradient accumulation)")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=micro,
                                                              grad_accum=accum))


# ----------------------------------------------------------------------------- checking

_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # "5e-4", which YAML 1.1 reads as str


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fail(path, tp, value):
    raise ConfigError(f"config key '{path}' expects {_type_name(tp)}, "
                      f"got {value!r} ({type(value).__name__})")


def _check(tp, value, path):
    """Return ``value`` checked (and lightly converted) against annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):  # Optional[X] is Union[X, None]
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, path)
            except ConfigError:
                pass
        _fail(path, tp, value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"config key '{path}' must be one of "
                          f"{', '.join(repr(a) for a in args)}; got {value!r}")
    if tp is bool:
        return value if type(value) is bool else _fail(path, tp, value)
    if tp is int:
        return value if type(value) is int else _fail(path, tp, value)
    if tp is float:
        if type(value) in (int, float):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            return float(value)
        _fail(path, tp, value)
    if tp is str:
        return value if isinstance(value, str) else _fail(path, tp, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, tp, value)
        return [_check(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"config key '{path}' expects {len(args)} items "
                              f"({_type_name(tp)}), got {len(value)}: {value!r}")
        return tuple(_check(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    raise ConfigError(f"config key '{path}': unsupported annotation {_type_name(tp)}")


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def _unknown_key(cls, path, key):
    known = [f.name for f in dataclasses.fields(cls)]
    where = f"in '{path}'" if path else "at top level"
    msg = f"unknown config key '{_join(path, key)}' (known keys {where}: {', '.join(known)})"
    close = difflib.get_close_matches(str(key), known, n=1)
    return ConfigError(msg + (f"; did you mean '{_join(path, close[0])}'?" if close else ""))


def from_dict(cls, data, path=""):
    """Build dataclass ``cls`` from a mapping; missing keys take defaults, unknown keys fail."""
    if not isinstance(data, dict):
        where = f"config section '{path}'" if path else "config"
        raise ConfigError(f"{where} must be a mapping, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, path, key)
        kwargs[key] = _check(hints[key], value, _join(path, key))
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides


def _apply_override(cls, data: dict, text: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw mapping ``data`` (checked against ``cls``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {text!r}: expected the form key.sub=value")
    parts = key.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if part not in {f.name for f in dataclasses.fields(node_cls)}:
            raise _unknown_key(node_cls, ".".join(parts[:i]), part)
        tp = typing.get_type_hints(node_cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"bad override {text!r}: '{path}' is a value, not a section")
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config section '{path}' must be a mapping, got {child!r}")
            node, node_cls = child, tp
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML: {e}") from None
    is_union = typing.get_origin(tp) in (Union, types.UnionType)
    accepts_str = tp is str or (is_union and str in typing.get_args(tp))
    if accepts_str and not isinstance(value, (str, list, dict)):
        if not (value is None and type(None) in typing.get_args(tp)):
            value = raw.strip()  # run.name=001 stays "001"
    if dataclasses.is_dataclass(tp) and not isinstance(value, dict):
        raise ConfigError(f"bad override {text!r}: '{key}' is a section; give a mapping "
                          f"like {key}={{name: value}} or set single keys like {key}.name=value")
    try:
        _check(tp, value, key)
    except ConfigError as e:
        raise ConfigError(f"in override {text!r}: {e}") from None
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]].update(value)  # section override merges into the file's section
    else:
        node[parts[-1]] = value


# ----------------------------------------------------------------------------- load / save


def load_config(path=None, overrides=(), cls=EPSConfig):
    """Read YAML ``path`` (None: defaults only), apply ``key=value`` overrides, validate."""
    data = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if data is None:  # an empty file means "all defaults"
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at top level, "
                              f"got {type(data).__name__}")
    for text in overrides:
        _apply_override(cls, data, text)
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"in config file '{path}': {e}" if path is not None else str(e)) from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(obj):
    """Plain Python types (dicts, lists, scalars) for a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj) -> str:
    """The config as YAML text, keys in schema order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def save_config(obj, path) -> None:
    """Write the config as YAML atomically (temp file beside it, then rename; umask mode)."""
    from .atomic import atomic_write_text
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, dump_yaml(obj))


# ----------------------------------------------------------------------------- argparse


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and positional ``key=value`` overrides to ``parser``."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                        help="override config keys, e.g. train.lr=0.02 loss.bg_classes=[0,14]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) as YAML "
                             "and exit without touching data, devices or ranks")
    return parser


def run_cli(main, argv=None) -> int:
    """``main(argv)``, with a ``ConfigError`` printed as one line (``prog: config error: ...``,
    several problems joined by ``; ``) and exit status 2 instead of a traceback."""
    try:
        return main(argv)
    except ConfigError as e:
        prog = os.path.basename(sys.argv[0]) or "epsdist"
        print(f"{prog}: config error: {'; '.join(str(e).splitlines())}", file=sys.stderr,
              flush=True)
        return 2


def config_from_args(args: argparse.Namespace, cls=EPSConfig):
    """The config named by parsed ``--config`` and ``overrides`` arguments."""
    return load_config(args.config, args.overrides, cls)
