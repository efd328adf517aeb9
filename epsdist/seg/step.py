"""The segmentation stage's own steps; ``epsdist/segment.py`` strings them together with the
run machinery every stage shares (:mod:`epsdist.runloop`).

check_config -> build_loader (ShardLoader + SegAugment) -> build_seg_model ->
runloop.build_engine (with stage 1's optimizer recipe: SGD with the four parameter groups, the
DeepSpeed config generated from the YAML) -> per iteration: runloop.set_lr (poly), train_step
(forward, loss, the collective NaN check of ``runloop.reduce_losses``, backward, step) ->
log_values / panel / validation -> runloop's checkpoints and export.

Loss: per-pixel cross-entropy against the (pseudo-)mask with ``ignore_index=255``, averaged
over the non-ignored pixels of the rank's batch, on the logits upsampled bilinearly
(``align_corners=False``) from the output stride to the crop size. DeepLab-v2's Caffe code
shrank the labels to the logits' size instead (nearest); upsampling the logits is what the
PyTorch DeepLab implementations do (and keeps thin structures in the labels). A crop with no
labelled pixel at all contributes 0 (not NaN).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dist as D
from ..config import ConfigError, SegConfig, resolve_batch
from ..data.augment import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SegAugment
from ..data.loader import ShardLoader
from ..data.manifest import SEG_FIELD, ManifestError, read_manifest
from ..data.source import fetch_options
from ..runloop import accumulated_step, precision

CRF_PACKAGE = "pydensecrf"


# ------------------------------------------------------------------------------ checks

def _shards(cfg: SegConfig, key: str, what: str) -> dict:
    path = getattr(cfg.data, key)
    if not path:
        raise ConfigError(f"config key 'data.{key}' is empty: give the {what}")
    try:
        manifest = read_manifest(path, fetch_options(cfg.data))
    except ManifestError as e:
        raise ConfigError(f"config key 'data.{key}': {e}") from None
    fields = manifest.get("fields")
    if fields is not None and SEG_FIELD not in fields:
        raise ConfigError(f"config key 'data.{key}': the shards in {path} have no {SEG_FIELD} "
                          f"(fields {fields}); expected the {what}")
    if len(manifest["classes"]) != cfg.data.num_classes:
        raise ConfigError(f"config key 'data.num_classes' is {cfg.data.num_classes} but the "
                          f"shards in {path} (data.{key}) have {len(manifest['classes'])} "
                          f"classes {list(manifest['classes'])}")
    return manifest


def crf_available() -> bool:
    """Whether the dense-CRF extra (``pydensecrf``) imports."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def check_config(cfg: SegConfig, world_size: int | None = None) -> tuple[SegConfig, dict]:
    """Everything that can be checked before a process group starts. Returns the config with
    the per-rank batch resolved and the training shards' manifest."""
    train = _shards(cfg, "train_shards", "pseudo-mask shards (OUT/shards of epsdist/infer.py)")
    val = _shards(cfg, "val_shards", "ground-truth val shards (python -m epsdist.data.shard "
                                     "... --split val)")
    if list(train["classes"]) != list(val["classes"]):
        raise ConfigError(f"data.train_shards and data.val_shards name different classes: "
                          f"{list(train['classes'])} vs {list(val['classes'])}")
    if cfg.model.weights.strip().lower() not in ("none", "") and not os.path.isfile(
            os.path.expanduser(os.path.expandvars(cfg.model.weights))):
        raise ConfigError(f"config key 'model.weights': no file {cfg.model.weights!r} (give the "
                          f"path of the backbone's ImageNet weights, or 'none')")
    if cfg.eval.crf and not crf_available():
        raise ConfigError(f"config key 'eval.crf' is true but the dense-CRF package "
                          f"'{CRF_PACKAGE}' is not installed: pip install pydensecrf (an "
                          f"optional extra; needs a C++ compiler and Cython), or set "
                          f"eval.crf=false")
    if world_size is None:
        world_size = int(D.launcher_env()[0]["WORLD_SIZE"])
    cfg = resolve_batch(cfg, world_size)
    per_epoch = train["num_samples"] // (world_size * cfg.train.batch_size)
    if per_epoch < 1:
        raise ConfigError(f"data.train_shards holds {train['num_samples']} samples: too few for "
                          f"{world_size} ranks x train.batch_size={cfg.train.batch_size}")
    return cfg, train


# ------------------------------------------------------------------------------ build

def build_loader(cfg: SegConfig, info: D.DistInfo) -> ShardLoader:
    augment = SegAugment(scale_range=tuple(cfg.data.scale_range), crop_size=cfg.data.crop_size)
    return ShardLoader(cfg.data.train_shards, batch_size=cfg.train.batch_size, rank=info.rank,
                       world_size=info.world_size, num_workers=cfg.data.num_workers,
                       seed=cfg.seed, augment=augment, shuffle_buffer=cfg.data.shuffle_buffer,
                       device=info.device, fetch=fetch_options(cfg.data))


# ------------------------------------------------------------------------------ step

def seg_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (ignore 255) of logits (B, K, h, w) upsampled bilinearly to the mask's
    (B, H, W) size; float32 math; 0 when no pixel is labelled."""
    logits = logits.float()
    if logits.shape[2:] != mask.shape[1:]:
        logits = F.interpolate(logits, size=mask.shape[1:], mode="bilinear",
                               align_corners=False)
    if not (mask != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)


@dataclass
class SegStep:
    loss: float                 # mean over ranks
    finite: bool
    logits: torch.Tensor | None = None
    stop: bool = False          # some rank got SIGUSR1: checkpoint and exit


def train_step(engine, batches, cfg: SegConfig, info: D.DistInfo, stop: bool = False) -> SegStep:
    """One optimizer step over the iteration's micro-batches (``runloop.accumulated_step``):
    forward, loss, the collective finiteness/stop check, backward, optimizer step."""
    def losses(batch):
        image = batch.image
        if info.device.type == "cuda" and cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        autocast = precision(cfg, info) == "bf16"
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = engine(image)
        loss = seg_loss(logits, batch.mask)
        return loss, [loss], logits.detach()

    (mean,), finite, stop, logits = accumulated_step(engine, batches, losses, info, stop)
    return SegStep(mean, finite, logits, stop)


def log_values(result: SegStep) -> tuple[dict, str]:
    """What ``RunLogger.record`` logs for a step: the losses by name and the console summary."""
    return {"loss/seg": result.loss}, f"loss {result.loss:.4f}"


# ------------------------------------------------------------------------------ panels

def colorize(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) float VOC-palette colours in [0, 1]."""
    from ..data.manifest import voc_palette
    pal = torch.tensor(voc_palette(), dtype=torch.float32, device=mask.device).view(256, 3)
    return pal[mask.long().clamp(0, 255)].permute(2, 0, 1) / 255


def panel(batch, logits: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) grid for the first crop: image | training mask | prediction."""
    from torchvision.utils import make_grid
    with torch.no_grad():
        image = batch.image[:1].float()
        mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
        up = F.interpolate(logits[:1].float(), size=image.shape[2:], mode="bilinear",
                           align_corners=False)
        tiles = [(image * std + mean).clamp(0, 1)[0], colorize(batch.mask[0]),
                 colorize(up.argmax(1)[0])]
        return make_grid(torch.stack(tiles), nrow=len(tiles), padding=2)
