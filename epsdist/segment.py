"""Segmentation stage: train DeepLab on pseudo-mask shards, evaluate on ground-truth val shards.

    deepspeed [--num_gpus N | --hostfile H] epsdist/segment.py --config configs/voc_seg.yaml [key=value ...]
    torchrun --nproc_per_node N epsdist/segment.py --config ...
    srun python epsdist/segment.py --config ...          (one task per GPU)
    python epsdist/segment.py --config ...               (one process)

Options: ``--resume auto`` (default: continue from the newest complete checkpoint of
``run.dir``), ``--resume none``, ``--resume RUN/checkpoints/iter_NNNNNNNN``; ``--eval-only``
(evaluate that checkpoint with the current ``eval.*`` settings, e.g. ``eval.scales=[0.5,0.75,1,
1.25,1.5] eval.flip=true eval.crf=true``, and stop). Writes into ``run.dir``: ``config.yaml``,
``tb/`` (TensorBoard), ``metrics.jsonl``, ``checkpoints/``, ``val_pred/iter_NNNNNNNN/`` (the
val predictions of every evaluation), ``report.json`` (the latest val mIoU, per-class IoU,
confusion matrix and the history of every evaluation) and ``export/model.pt``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from epsdist import dist as D
from epsdist import stage1
from epsdist.checkpoint import PREEMPT_EXIT, Checkpointer, StopRequest, tag_for
from epsdist.config import (SegConfig, add_config_args, config_from_args, dump_yaml, run_cli,
                            save_config)
from epsdist.report import write_json
from epsdist.runloop import (LoopControl, RunLogger, batches, build_engine, export, resume,
                             seed_everything, set_lr)
from epsdist.seg import eval as seg_eval
from epsdist.seg import step
from epsdist.seg.models import build_seg_model, sync_batchnorm

log = logging.getLogger("epsdist.segment")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="epsdist/segment.py", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--resume", default="auto",
                    help="'auto' (newest checkpoint of run.dir, if any), 'none', or a checkpoint dir")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the checkpoint named by --resume on data.val_shards and exit")
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="simulate a crash: exit with status 3 right after iteration N "
                         "(no final checkpoint or export); used by the resume tests")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return ap.parse_intermixed_args(argv)        # overrides before and after the options


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopRequest()                                  # SIGUSR1/SIGTERM -> checkpoint, exit 75
    cfg = config_from_args(args, SegConfig)                       # 1. config
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    cfg, manifest = step.check_config(cfg)                        #    checked before any rank waits
    info = D.setup(cfg.run.dist_timeout_s)                        # 2. distributed
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"[rank {info.rank}] %(levelname)s %(name)s: %(message)s")
    if info.is_main and not args.eval_only:
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    seed_everything(cfg.seed)                                     # 3. build: same init on all ranks
    model = build_seg_model(cfg.model, cfg.data.num_classes,
                            log=lambda m: logging.getLogger("epsdist.model").warning(m))
    if cfg.model.sync_bn and info.device.type == "cuda" and info.world_size > 1:
        model = sync_batchnorm(model)
    engine = build_engine(model, cfg, info, stage1.build_optimizer,   # stage 1's recipe: SGD,
                          stage1.deepspeed_config(cfg, info))      # four groups, same config
    loader = step.build_loader(cfg, info)
    ckpt = Checkpointer(os.path.join(cfg.run.dir, "checkpoints"), info, cfg.run.keep_last)
    if args.eval_only and ckpt.resolve(args.resume) is None:
        raise FileNotFoundError(f"--eval-only: no checkpoint to evaluate (--resume "
                                f"{args.resume}, run.dir {cfg.run.dir})")
    start = resume(args.resume, ckpt, engine, loader, cfg, info)
    report = Report(cfg, info, manifest, start)
    if args.eval_only:                                            # 4. evaluate only, or
        report.evaluate(engine, start, suffix="_eval")
    else:                                                         #    the loop
        if train(cfg, info, engine, loader, ckpt, start, report, stop, args.stop_after):
            D.shutdown()
            return PREEMPT_EXIT
        export(cfg, info, engine, manifest)
    D.shutdown()
    return 0


class Report:
    """Evaluations on the val shards -> TensorBoard / metrics.jsonl (``val/*``) and
    ``run.dir/report.json`` (rank 0): the latest result at top level plus the history of all
    evaluations (after a resume, the ones up to the checkpoint are kept)."""

    def __init__(self, cfg: SegConfig, info, manifest: dict, start: int):
        self.cfg, self.info = cfg, info
        self.class_names = ["background"] + list(manifest["classes"])
        self.path = os.path.join(cfg.run.dir, "report.json")
        self.history = []
        if info.is_main and os.path.isfile(self.path):
            with open(self.path) as f:
                self.history = [h for h in json.load(f).get("history", [])
                                if h["iteration"] <= start]
        self.logger = None

    def evaluate(self, engine, iteration: int, suffix: str = "") -> dict:
        pred_dir = (os.path.join(self.cfg.run.dir, "val_pred", tag_for(iteration) + suffix)
                    if self.cfg.eval.save_pred else None)
        result = seg_eval.validate(engine, self.cfg, self.info, pred_dir, self.class_names)
        result = {"iteration": iteration, **result}
        if self.logger is not None:
            self.logger.scalars(iteration, {"val/miou": result["mean_iou"],
                                            "val/pixel_accuracy": result["pixel_accuracy"],
                                            "val/mean_accuracy": result["mean_accuracy"]})
        if self.info.is_main:
            self.history.append({k: result[k] for k in ("iteration", "mean_iou",
                                                        "pixel_accuracy", "mean_accuracy",
                                                        "eval", "images", "seconds")})
            write_json(self.path, {
                **result, "class_names": self.class_names, "run": self.cfg.run.name,
                "train_shards": self.cfg.data.train_shards,
                "val_shards": self.cfg.data.val_shards, "history": self.history})
            ious = "  ".join(f"{n} {100 * v:.1f}" for n, v in result["iou"].items())
            print(f"val it {iteration}: mIoU {100 * result['mean_iou']:.2f} (all-background "
                  f"{100 * result['all_background_mean_iou']:.2f}; pixel acc "
                  f"{100 * result['pixel_accuracy']:.2f}; {result['images']} images, "
                  f"{result['seconds']:.1f} s) | {ious}", flush=True)
        return result


def train(cfg: SegConfig, info, engine, loader, ckpt: Checkpointer, start: int, report: Report,
          stop: StopRequest, stop_after: int | None = None) -> bool:
    """Iterations ``start`` .. ``train.max_iters``; True when stopped by SIGUSR1 (checkpointed)."""
    logger = report.logger = RunLogger(cfg.run.dir, info, cfg, start)
    control = LoopControl(cfg, info, engine, loader, ckpt, logger, stop_after)
    stream = batches(loader)
    for it in range(start, cfg.train.max_iters):
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]   # one optimizer step
        data_wait = time.perf_counter() - t0
        lr = set_lr(engine, cfg, it)
        result = step.train_step(engine, micro, cfg, info, stop.requested)
        control.check(it, result.finite, {"loss": result.loss})
        losses, summary = step.log_values(result)
        logger.record(it, losses, lr, data_wait, summary)
        if info.is_main and cfg.run.panel_every and (it + 1) % cfg.run.panel_every == 0:
            logger.image("panel", step.panel(micro[-1], result.logits), it + 1)
        if it + 1 == cfg.train.max_iters or (cfg.eval.every and (it + 1) % cfg.eval.every == 0):
            t1 = time.perf_counter()                              # before the checkpoint: a
            report.evaluate(engine, it + 1)                       # crash in it repeats it
            logger.exclude(time.perf_counter() - t1)
        if control.finish(it, result.stop):
            return True
    logger.close()
    return False


if __name__ == "__main__":
    sys.exit(run_cli(main))                 # a config error: one line, exit 2
