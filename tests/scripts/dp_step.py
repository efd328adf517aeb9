"""Run K training steps of the real stage-1 engine on a fixed global batch, each rank taking
its slice, and save the resulting weights (rank 0). Launched by tests/test_train.py both as
``deepspeed --num_gpus 2`` (2 ranks x b) and as plain python (1 rank x 2b)."""
import sys

import torch

from epsdist import dist as D
from epsdist import stage1
from epsdist.config import load_config
from epsdist.data.loader import Batch
from epsdist.models import build_model
from epsdist.runloop import build_engine, set_lr

GLOBAL_BATCH, STEPS = 8, 3


def main(out_path: str) -> None:
    info = D.setup(60)
    per_rank = GLOBAL_BATCH // info.world_size
    cfg = load_config(None, ["model.backbone=tiny", "data.num_classes=4", "train.lr=0.05",
                             f"train.batch_size={per_rank}", "train.max_iters=10",
                             "loss.impl=torch"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, log=lambda m: None)
    engine = build_engine(model, cfg, info, stage1.build_optimizer,
                          stage1.deepspeed_config(cfg, info))
    g = torch.Generator().manual_seed(1)
    for it in range(STEPS):
        image = torch.randn(GLOBAL_BATCH, 3, 48, 48, generator=g)
        sal = torch.rand(GLOBAL_BATCH, 1, 48, 48, generator=g)
        labels = (torch.rand(GLOBAL_BATCH, 4, generator=g) < 0.5).float()
        mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        batch = Batch(image[mine], sal[mine], labels[mine], [])
        set_lr(engine, cfg, it)
        assert stage1.train_step(engine, batch, cfg, info).finite
    if info.is_main:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                   out_path)
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    main(sys.argv[-1])            # the deepspeed launcher adds --local_rank=N first
