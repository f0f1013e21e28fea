"""CPU training-step time of the ``shapes`` preset under each attention implementation, side by side, and with the
generation targets' VAE features taken from a ``LatentCache`` (as an SFT phase does after its first pass over them).

One process, the same weights and batches for every arm: a batch of 16 generation records (the LLM over the prompt
and 121 image slots, the decoder over the 121 tokens of the first-5 schedule) and one of 16 understanding records,
each a forward and backward pass under bf16 autocast as in the recipe's SFT phases. The arms alternate over
``--repeats`` rounds; the table gives the median seconds per step and the ratio to SDPA in both modules.

    python benchmarks/train_step.py                 # about 2 min on the 2-core CPU
    python benchmarks/train_step.py --steps 5 --repeats 2 --out step.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vargpt.config import get_preset
from vargpt.data.collate import SFTCollator
from vargpt.data.records import load_records
from vargpt.data.shapes.tasks import build_split
from vargpt.models.vargpt import VARGPT
from vargpt.train.latents import LatentCache
from vargpt.train.loop import default_step_fn
from vargpt.train.recipes import apply_stage
from vargpt.train.shapes import SHAPES_STAGES, shapes_corpus, shapes_processor
from vargpt.train.shapes_phases import FULL_RES, set_schedule

ARMS = {  # (LLM, decoder)
    "sdpa / sdpa": ("sdpa", "sdpa"),
    "eager / sdpa": ("eager", "sdpa"),
    "sdpa / eager": ("sdpa", "eager"),
    "eager / eager": ("eager", "eager"),
}
#: the eager / eager model with the targets' VAE features from a warm ``LatentCache`` (hashing included)
CACHED = "eager / eager, cached VAE features"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm and round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the arms")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args()

    base = get_preset("shapes")
    with tempfile.TemporaryDirectory() as tmp:
        split = build_split(Path(tmp), seed=0, n_understanding=16 * args.steps, n_generation=16 * args.steps,
                            n_editing=0, gen_layout="canonical")
        data = {"generation": load_records(split.generation).records,
                "understanding": load_records(split.understanding).records}
        processor = shapes_processor(base, texts=shapes_corpus(data["generation"] + data["understanding"]))
        torch.manual_seed(0)
        ref = VARGPT(base).state_dict()
        models = {}
        for name, (llm, dec) in ARMS.items():
            cfg = dataclasses.replace(base, attn_implementation=llm,
                                      decoder=dataclasses.replace(base.decoder, attn_implementation=dec))
            m = VARGPT(cfg)
            m.load_state_dict(ref)
            set_schedule(m, FULL_RES)
            apply_stage(m, SHAPES_STAGES["stage2"])  # the LLM, the decoder and the projectors train
            models[name] = m.train()
        batches = {}
        for task, recs in data.items():
            collate = SFTCollator(base, processor, generator=torch.Generator().manual_seed(0), prompt_drop_rate=0.0)
            batches[task] = [collate(recs[i * 16:(i + 1) * 16]) for i in range(args.steps)]

    cached_step = LatentCache().step_fn()  # the recipe's path (``vargpt.train.shapes_phases.sft_phase``)

    def step(model, batch, cached: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (cached_step if cached else default_step_fn)(model, batch)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)

    runs = [(name, model, False) for name, model in models.items()] + [(CACHED, models["eager / eager"], True)]
    times: dict[tuple[str, str], list[float]] = {(r[0], t): [] for r in runs for t in batches}
    for _, model, cached in runs:  # warm-up; the cached arm's first pass fills the cache
        for bs in batches.values():
            for b in (bs if cached else bs[:1]):
                step(model, b, cached)
    for _ in range(args.repeats):
        for name, model, cached in runs:
            for task, bs in batches.items():
                t0 = time.perf_counter()
                for b in bs:
                    step(model, b, cached)
                times[name, task].append((time.perf_counter() - t0) / len(bs))

    lines = [f"shapes preset, batch 16, bf16 autocast, {torch.get_num_threads()} threads; median of {args.repeats} "
             f"rounds of {args.steps} steps",
             "", "| attention (LLM / decoder) | generation step (s) | vs SDPA | understanding step (s) | vs SDPA |",
             "|---|---|---|---|---|"]
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, _, _ in runs:
        g, u = med[name, "generation"], med[name, "understanding"]
        lines.append(f"| {name} | {g:.3f} | {g / med['sdpa / sdpa', 'generation']:.2f} | {u:.3f} | "
                     f"{u / med['sdpa / sdpa', 'understanding']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
