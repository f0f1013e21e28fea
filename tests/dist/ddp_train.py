"""Training run used by the distributed tests; run from the repository root with the root on PYTHONPATH:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/ddp_train.py OUT_JSON \
        [--batch-size B] [--grad-accum K] [--steps N] [--vargpt]

Default: the deterministic fp32 MLP of ``tests.dist.synthetic`` (no dropout); ``--vargpt``: the tiny VARGPT in stage
1 on the synthetic generation set (DDP over the real model: its output dataclass, frozen parameters, condition
dropout). The main process writes ``{"losses": [...], "world": W, "checkpoint": path}`` to OUT_JSON, every process
SHA-256 digests of its trainable weights to OUT_JSON.rank{r}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--vargpt", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from tests.dist.synthetic import build_mlp, gen_collate, gen_dataset, mlp_collate, mlp_dataset, stage1_model
    from vargpt.train import TrainConfig, train

    out_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "run-vargpt" if args.vargpt else "run-mlp")
    cfg = TrainConfig(lr=1e-2, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      warmup_steps=0, out_dir=out_dir, seed=3)
    if args.vargpt:
        model = stage1_model()
        result = train(model, gen_dataset(model.config, 8), gen_collate(model.config), cfg)
    else:
        model = build_mlp()
        result = train(model, mlp_dataset(), mlp_collate, cfg)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": result.losses, "world": int(os.environ.get("WORLD_SIZE", "1")),
                       "checkpoint": str(result.checkpoint)}, f)
    # every process: exact fingerprints of its trainable weights (replicas must agree)
    digest = {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
              for n, p in model.named_parameters() if p.requires_grad}
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(digest, f)


if __name__ == "__main__":
    main()
