"""Teacher-forced bit cross-entropy of a Shapes checkpoint's visual decoder, per scale (EVAL.md's probe).

For the last ``--n`` records of a generation record file (the training split of ``vargpt train shapes`` by
default), the checkpoint's own processor and no prompt dropout: the mean cross-entropy (nats per bit) and bit
accuracy of each scale's predictions given the true earlier scales, the number the SFT loss averages. It does not
predict the sampled score well on its own (EVAL.md run 6), but it shows where the decoder's loss sits.

    python benchmarks/shapes_bit_ce.py --checkpoint runs/shapes4/post_dpo --data runs/shapes4/data/generation.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from vargpt.checkpoint import load_checkpoint
from vargpt.data.collate import SFTCollator
from vargpt.data.records import load_records
from vargpt.processing.processor import Processor


@torch.no_grad()
def bit_ce_per_scale(checkpoint: Path, data: Path, n: int = 64, batch_size: int = 16) -> list[dict]:
    """One row per scale: ``scale`` (h, w), ``ce`` (nats per bit) and ``accuracy`` (argmax bit == target)."""
    model = load_checkpoint(checkpoint).eval()
    processor = Processor.from_dir(checkpoint, model.config)
    records = load_records(data).records[-n:]
    collate = SFTCollator(model.config, processor, generator=torch.Generator().manual_seed(0), prompt_drop_rate=0.0)
    ce_sum = acc_sum = None
    schedule = None
    for i in range(0, len(records), batch_size):
        out = model(**collate(records[i:i + batch_size]))
        N, L, d = out.gen_labels_NLd.shape
        logits = out.gen_logits_NLV.float().view(N, L, d, 2)
        ce_L = F.cross_entropy(logits.reshape(-1, 2), out.gen_labels_NLd.reshape(-1), reduction="none").view(N, L, d)
        acc_L = (logits.argmax(-1) == out.gen_labels_NLd).float()
        ce_sum = ce_L.sum((0, 2)) if ce_sum is None else ce_sum + ce_L.sum((0, 2))
        acc_sum = acc_L.sum((0, 2)) if acc_sum is None else acc_sum + acc_L.sum((0, 2))
        schedule = out.schedule
    denom = len(records) * d
    rows, offset = [], 0
    for hw in schedule:
        h, w = hw[-2:]
        rows.append({"scale": (h, w), "ce": float(ce_sum[offset:offset + h * w].mean() / denom),
                     "accuracy": float(acc_sum[offset:offset + h * w].mean() / denom)})
        offset += h * w
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a generation record file (JSONL)")
    ap.add_argument("--n", type=int, default=64, help="records, taken from the end of the file")
    args = ap.parse_args()
    rows = bit_ce_per_scale(args.checkpoint, args.data, args.n)
    print("| scale | bit CE (nats) | bit accuracy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['scale'][0]}x{r['scale'][1]} | {r['ce']:.3f} | {r['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
