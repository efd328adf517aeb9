"""Run K training steps of the real stage-1 engine on a fixed global batch, each rank taking
its slice (in micro-batches when ``train.micro_batch_size`` caps it), and save the resulting
weights and the loss of every step (rank 0). Launched by tests/test_train.py as ``deepspeed
--num_gpus 2`` (2 ranks x b) and as plain python (1 rank x 2b, and 1 rank in micro-batches
with gradient accumulation): ``dp_step.py [key=value ...] OUT``."""
import sys

import torch

from epsdist import dist as D
from epsdist import stage1
from epsdist.config import load_config, resolve_batch
from epsdist.data.loader import Batch
from epsdist.models import build_model
from epsdist.runloop import build_engine, set_lr

GLOBAL_BATCH, STEPS = 4, 3


def main(out_path: str, overrides: list) -> None:
    info = D.setup(60)
    cfg = load_config(None, ["model.backbone=tiny", "data.num_classes=4", "train.lr=0.05",
                             f"train.global_batch_size={GLOBAL_BATCH}", "train.max_iters=10",
                             "loss.impl=torch", *overrides])
    cfg = resolve_batch(cfg, info.world_size)
    micro, per_rank = cfg.train.batch_size, cfg.train.batch_size * cfg.train.grad_accum
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, log=lambda m: None)
    engine = build_engine(model, cfg, info, stage1.build_optimizer,
                          stage1.deepspeed_config(cfg, info))
    g = torch.Generator().manual_seed(1)
    losses = []
    for it in range(STEPS):
        image = torch.randn(GLOBAL_BATCH, 3, 48, 48, generator=g)
        sal = torch.rand(GLOBAL_BATCH, 1, 48, 48, generator=g)
        labels = (torch.rand(GLOBAL_BATCH, 4, generator=g) < 0.5).float()
        start = info.rank * per_rank
        batches = [Batch(image[i:i + micro], sal[i:i + micro], labels[i:i + micro], [])
                   for i in range(start, start + per_rank, micro)]
        set_lr(engine, cfg, it)
        result = stage1.train_step(engine, batches, cfg, info)
        assert result.finite
        losses.append((result.loss_cls, result.loss_sal))
    if info.is_main:
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        torch.save({"state": state, "losses": torch.tensor(losses, dtype=torch.float64),
                    "micro": micro, "accum": cfg.train.grad_accum}, out_path)
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed adds it
    main(args[-1], args[:-1])
