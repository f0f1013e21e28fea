"""GPU run: a preset with random weights (bf16) generating images at several batch sizes.

Prints seconds per image, images per second and peak GPU memory; writes the table to ``--out`` (markdown) too.

    python benchmarks/bench_gpu.py --preset vargpt-v1.1 --schedule 0.25M --batches 1,8 --out gpu.md
    python benchmarks/bench_gpu.py --preset tiny --device cpu --batches 1,2          # dry run on a CPU
"""

from __future__ import annotations

import argparse
import time

import torch

from vargpt.config import get_preset
from vargpt.engine import Engine
from vargpt.generation.params import ImageParams
from vargpt.models.vargpt import VARGPT
from vargpt.processing.processor import EncodedPrompt, Processor
from vargpt.processing.tokenizer import char_tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vargpt-v1.1")
    ap.add_argument("--schedule", default=None, help="pixel budget (default: the preset's)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = get_preset(args.preset)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with device:  # random init directly on the device, in bf16
        model = VARGPT(cfg).eval()
    torch.set_default_dtype(prev)
    nparams = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0
    # a tokenizer is not needed (token ids are fed); the char tokenizer only has to fit the special ids
    tok = char_tokenizer(cfg.special_tokens, cfg.text.vocab_size) if cfg.text.vocab_size < 5000 else None
    engine = Engine(model, Processor(cfg, tok) if tok is not None else _NoTextProcessor(cfg), compat="official")
    params = ImageParams(cfg_scale=3.0, seed=0, schedule=args.schedule)
    schedule = engine.schedule(params)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.special_tokens.endoftext, (args.prompt_len,), generator=g).tolist()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"preset {args.preset}: {nparams / 1e9:.2f} B parameters, bf16, built in {build_s:.0f} s on "
             f"{where}; schedule {params.schedule or cfg.gen_schedule}"
             f" ({len(schedule)} scales, last {schedule[-1]}, {16 * schedule[-1][0]}x{16 * schedule[-1][1]} px), "
             f"CFG 3 (official mode), prompt {args.prompt_len} tokens", "",
             "| B | s / image | images / s | peak GPU memory (GiB) |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [EncodedPrompt(ids)] * B
        engine.generate_images(prompts, params)  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.generate_images(prompts, params)
            sync(device)
            times.append(time.perf_counter() - t)
        t = min(times) / B
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        line = f"| {B} | {t:.3f} | {1 / t:.2f} | {mem:.1f} |"
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


class _NoTextProcessor:
    """Stand-in processor for presets with a real-size vocabulary (no tokenizer here; prompts are token ids)."""

    def __init__(self, cfg) -> None:
        self.config = cfg

    def encode(self, *a, **k):
        raise RuntimeError("bench_gpu feeds token ids; no tokenizer is loaded")


if __name__ == "__main__":
    main()
