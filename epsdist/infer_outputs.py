"""The write stage of pseudo-mask inference (``epsdist.infer_pipeline``): the files of one
image -- the mask resized back to the original size, its PNG, the CAMs (.npz), the panel --
each written atomically, the mask last (its existence marks the image as done); and the
``Writer`` threads that write them while the network runs. A failed write is a ``WriteError``
naming the file, raised in the main thread: never a silently missing mask."""
from __future__ import annotations

import io
import queue
import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from epsdist.data.manifest import atomic_write_bytes
from epsdist.data.masks import PALETTE, encode_mask
from epsdist.data.safepath import key_path


class WriteError(Exception):
    """An output could not be written (the message names the file)."""


def resize(array: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """An (H, W) or (H, W, 3) uint8 array resized with Pillow (``resample``: BILINEAR for
    images, which antialiases when shrinking; NEAREST for masks)."""
    return np.array(Image.fromarray(array).resize((width, height), resample))


def cams_at(norm: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The (L, h, w) normalised CAMs as float16 at the original (height, width), bilinearly
    upsampled one class at a time when inference ran at a smaller working size."""
    if tuple(norm.shape[1:]) == (height, width):
        return norm.cpu().numpy().astype(np.float16)
    out = np.empty((norm.shape[0], height, width), np.float16)
    for i, cam in enumerate(norm.float()):
        out[i] = F.interpolate(cam[None, None], size=(height, width), mode="bilinear",
                               align_corners=False)[0, 0].cpu().numpy()
    return out


def panel(image: np.ndarray, sal: np.ndarray | None, norm: np.ndarray, mask: np.ndarray,
          gt: np.ndarray | None) -> np.ndarray:
    """image | saliency | one CAM per labelled class | pseudo-mask | ground truth, side by side."""
    pal = np.array(PALETTE, dtype=np.uint8).reshape(256, 3)
    gray = lambda m: np.repeat((np.clip(m, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)  # noqa: E731
    tiles = [image]
    if sal is not None:
        tiles.append(np.repeat(sal[..., None], 3, -1))
    tiles += [gray(c) for c in norm]
    tiles.append(pal[mask])
    if gt is not None:
        tiles.append(pal[gt])
    sep = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)


def _save(path: str, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except Exception as e:
        raise WriteError(f"cannot write {path}: {type(e).__name__}: {e}") from e


def write_outputs(item, result: tuple, dirs: dict, cams: bool) -> None:
    """The files of one image (an ``infer_pipeline.Item`` and its ``group_masks`` result):
    CAMs, panel (at the working size), then the mask. Raises WriteError naming the file (or
    the image, when making a file's content fails)."""
    try:
        _write_outputs(item, result, dirs, cams)
    except WriteError:
        raise
    except Exception as e:
        raise WriteError(f"cannot make the outputs of {item.key}: {type(e).__name__}: {e}") from e


def _write_outputs(item, result: tuple, dirs: dict, cams: bool) -> None:
    work_mask, norm, classes = result
    H, W = item.height, item.width
    mask = work_mask if work_mask.shape == (H, W) else resize(work_mask, H, W, Image.NEAREST)
    if cams:
        buf = io.BytesIO()
        np.savez_compressed(buf, cams=cams_at(norm, H, W), classes=classes)
        _save(key_path(dirs["cams"], item.key, ".npz"), buf.getvalue())
    if item.panel:
        as_np = lambda t: None if t is None else t.numpy()  # noqa: E731
        grid = panel(item.image.numpy(), as_np(item.sal), norm.float().numpy(), work_mask,
                     as_np(item.gt))
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        _save(key_path(dirs["panels"], item.key, ".png"), buf.getvalue())
    # the mask last: its existence marks the sample as done for a rerun
    _save(key_path(dirs["masks"], item.key, ".png"), encode_mask(mask))


class Writer:
    """Runs write tasks on ``threads`` threads; ``submit`` blocks while ``depth`` tasks wait.
    The first failure is kept: the next ``submit`` and ``close`` raise it (as ``WriteError``),
    and the tasks still queued are dropped."""

    def __init__(self, threads: int = 2, depth: int = 8):
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.aborted = self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"epsdist-writer-{i}",
                                         daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while (task := self.queue.get()) is not None:
            if self.error is None and not self.aborted:
                try:
                    task[0](*task[1:])
                except BaseException as e:      # noqa: BLE001 -- handed to the main thread
                    self.error = self.error or e

    def check(self) -> None:
        e = self.error
        if isinstance(e, WriteError):
            raise e
        if e is not None:
            raise WriteError(f"{type(e).__name__}: {e}") from e

    def submit(self, fn, *args) -> None:
        self.check()
        self.queue.put((fn, *args))

    def close(self, abort: bool = False) -> None:
        """Wait for the queued tasks (``abort``: drop those not started; also after a close
        that was interrupted) and for the threads; then raise a failure (not when aborting)."""
        self.aborted = self.aborted or abort
        if not self.closed:
            self.closed = True
            for _ in self.threads:              # one stop mark per thread, after the tasks
                self.queue.put(None)
        for t in self.threads:
            t.join()
        if not abort:
            self.check()
