"""The arithmetic of the default Shapes recipe (``vargpt train shapes``) against this machine's matmul peak: a lower
bound on the one command's time that no kernel, compiler or threading change can beat.

For each training phase, the matmul, convolution and attention FLOPs of one step as the recipe trains it (forward
and backward under bf16 autocast, the stage's trainable set, the VAE features of the targets cached as in an SFT
phase; the replies' phase without the decoder, as ``text_loss_step`` trains it), counted with
``torch.utils.flop_counter`` on one batch per (task, length) group of the phase's records and weighted by the
group's share of them (the loop draws each batch from one group). The phases and their record sets
mirror ``vargpt.train.shapes._run_phases``; the model has random weights (the count depends on shapes only).
Not counted (so the total is a lower bound): the ViT's pre-training, the four DPO rounds (sampling their candidates
and their steps), the sampling choices and the monitors' evaluations, and every elementwise operation.

The peak: bf16 matmuls at the shapes of the steps' largest layers (the MLPs of the LLM and the decoder over a
batch's tokens), best of ``--repeats``, on as many threads as the recipe uses. The achieved rate: ``--timed-steps``
real steps of the editing SFT's mix (forward, backward, AdamW), in the same process. With ``--profile``, where
those steps' time goes by kind of operator, and the rate their matmuls reach.

    python benchmarks/recipe_flops.py                              # renders the default split first (about 1 min)
    python benchmarks/recipe_flops.py --data runs/shapes41/data    # a split rendered by an earlier run
    python benchmarks/recipe_flops.py --data runs/shapes41/data --profile
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vargpt.config import get_preset
from vargpt.data.collate import SFTCollator
from vargpt.data.records import load_records
from vargpt.models.vargpt import VARGPT
from vargpt.train.latents import LatentCache
from vargpt.train.recipes import apply_stage
from vargpt.train.shapes import (
    SHAPES_STAGES,
    ShapesData,
    ShapesRunConfig,
    batch_group,
    copy_records,
    describe_records,
    render_split,
    run_phases,
    shapes_corpus,
    shapes_processor,
)
from vargpt.train.shapes_data import editing_mix
from vargpt.train.shapes_phases import FULL_RES, LOW_RES, set_schedule, text_loss_step
from vargpt.train.vae import VAELoss, VAETrainConfig


@dataclasses.dataclass
class Phase:
    name: str
    stage: str
    records: list
    steps: int
    schedule: str = FULL_RES
    text_only: bool = False  # the replies' phase: the text loss alone sends gradients


def sft_phases(run: ShapesRunConfig, d: ShapesData) -> list[Phase]:
    """The SFT phases of ``_run_phases`` with their record sets (``run.stage2_curriculum``: not mirrored)."""
    if run.stage2_curriculum:
        raise SystemExit("stage2_curriculum runs are not mirrored here")
    stage2 = "stage2_frozen_vit" if run.vit_steps else "stage2"
    stage3 = "stage3_llm" if run.stage3_llm_lr else "stage3"
    questions = d.und[: run.stage3_questions] if run.stage3_llm_lr else []
    edits3 = d.edi[: run.stage3_editing]
    caps3 = d.caps[: run.stage3_captions]
    recs3 = d.gen + caps3 + questions + edits3 + copy_records(d.edi[: run.stage3_copies])
    return [
        Phase("stage1", "stage1", d.gen, run.stage1_steps),
        Phase("stage2_warmup", stage2, d.single, run.stage2_warmup_steps),
        Phase("stage2", stage2, d.und + d.gen[: run.stage2_generation] + d.edi[: run.stage2_editing]
              + d.desc[: run.stage2_describe], run.stage2_steps),
        Phase("stage3a", stage3, recs3, run.stage3a_steps, LOW_RES),
        Phase("stage3c_frozen", "stage3", d.gen + caps3 + (edits3 if run.edit_reply != "fixed" else []),
              run.stage3c_frozen_steps),
        Phase("stage3c", stage3, recs3, run.stage3c_steps),
        Phase("edit", "edit" if run.edit_llm else "edit_frozen_llm",
              editing_mix(d.edi, d.caps, d.gen, d.und, d.desc, with_questions=run.edit_llm), run.edit_steps),
        Phase("reply", "reply", editing_mix(d.edi, (), (), d.und, with_questions=True), run.reply_steps,
              text_only=True),
    ]


def _loss(model, batch, text_only: bool, cache: LatentCache):
    """The phase's step loss as ``sft_phase`` computes it (the targets' features through ``cache``)."""
    return (cache.step_fn(text_loss_step) if text_only else cache.step_fn())(model, batch)[0]


def _prepare(model, phase: Phase, run: ShapesRunConfig) -> dict:
    """Set ``model`` up as ``sft_phase`` does for ``phase`` (stage, schedule, training mode); its records by batch
    group, as the loop draws them."""
    apply_stage(model, SHAPES_STAGES[phase.stage])
    set_schedule(model, phase.schedule)
    model.train()
    groups = collections.defaultdict(list)
    for r in phase.records:
        groups[batch_group(r) if run.length_groups else r.task].append(r)
    return groups


def step_flops(model, collate, phase: Phase, run: ShapesRunConfig, gen: torch.Generator) -> float:
    """The mean FLOPs of one of ``phase``'s steps (one batch per group, weighted by the group's records)."""
    groups = _prepare(model, phase, run)
    total = 0.0
    for rs in groups.values():
        batch = collate([rs[i] for i in torch.randint(len(rs), (run.batch_size,), generator=gen).tolist()])
        cache = LatentCache()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a phase encodes a target on first sight
            _loss(model, batch, phase.text_only, cache)
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            _loss(model, batch, phase.text_only, cache).backward()
        model.zero_grad(set_to_none=True)
        total += counter.get_total_flops() * len(rs) / len(phase.records)
    return total


def tokenizer_flops(model, run: ShapesRunConfig) -> float:
    """FLOPs of one tokenizer step (``train_vae``'s loss, forward and backward, a batch of ``run.vae_batch``)."""
    cfg = VAETrainConfig(steps=run.vae_steps, batch_size=run.vae_batch, lr=run.vae_lr,
                         foreground_weight=run.vae_foreground_weight, mixed_precision=run.vae_mixed_precision)
    module = VAELoss(model.vae.train().requires_grad_(True), cfg).train()
    module.hard = True
    x = torch.rand(run.vae_batch, 3, 64, 64) * 2 - 1
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.vae_mixed_precision == "bf16"):
        module(x)[0].backward()
    model.vae.zero_grad(set_to_none=True)
    model.vae.eval().requires_grad_(False)
    return float(counter.get_total_flops())


def matmul_peak(shapes: list[tuple[int, int, int]], repeats: int) -> dict[tuple[int, int, int], float]:
    """Best bf16 matmul rate (FLOP/s) over ``repeats`` rounds of 20 products, per (m, k, n)."""
    best = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(5):
            a @ b
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(20):
                a @ b
            rates.append(2 * m * k * n * 20 / (time.perf_counter() - t))
        best[(m, k, n)] = max(rates)
    return best


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::convolution_backward")
CAST_OPS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::empty_strided")


def timed_steps(model, collate, phase: Phase, run: ShapesRunConfig, n: int, gen: torch.Generator,
                profile: bool = False) -> tuple[float, dict[str, float]]:
    """Median seconds of ``n`` real steps (forward, backward, AdamW) of ``phase``, batches drawn as the loop does
    (a group by its share of the records, then a batch from it), after one untimed step; with ``profile``, also
    the mean seconds a step spends in each kind of ``aten`` operator (``torch.profiler``'s self CPU time, over
    ``n`` more steps on the same batches): matmuls and convolutions, casts and copies (autocast's), every other
    operator (elementwise, norms, softmax, indexing, the optimizer's arithmetic); and the optimizer's update
    alone (its operators are in the kinds too)."""
    groups = _prepare(model, phase, run)
    keys = list(groups)
    weights = torch.tensor([len(groups[k]) for k in keys], dtype=torch.float)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    cache = LatentCache()
    batches = []
    for _ in range(n + 1):
        rs = groups[keys[int(torch.multinomial(weights, 1, generator=gen))]]
        batches.append(collate([rs[j] for j in torch.randint(len(rs), (run.batch_size,), generator=gen).tolist()]))

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, batch, phase.text_only, cache)
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        step(batch)
        if i:
            times.append(time.perf_counter() - t)
    kinds: dict[str, float] = {}
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for batch in batches[1:]:
                step(batch)
        for e in prof.key_averages():
            if e.key == "optimizer":  # a range: its operators are counted in the kinds too
                kinds["optimizer update (all its operators)"] = e.cpu_time_total / 1e6 / n
            elif e.key.startswith("aten::"):
                kind = ("matmuls and convolutions" if e.key in MATMUL_OPS
                        else "casts and copies" if e.key in CAST_OPS else "other operators")
                kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6 / n
    return statistics.median(times), kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a run's rendered split (its data folder; default: render the "
                    "default recipe's split into a temporary folder)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the matmul peak")
    ap.add_argument("--timed-steps", type=int, default=8, help="real editing-SFT steps timed for the achieved rate")
    ap.add_argument("--preset", default="shapes", help="the model's preset (ShapesRunConfig.preset)")
    ap.add_argument("--profile", action="store_true", help="also profile the timed steps: their time by kind of "
                    "operator, and the rate the matmuls reach")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args()

    run = ShapesRunConfig(preset=args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            d = Path(args.data)
            load = lambda name: load_records(d / f"{name}.jsonl").records  # noqa: E731
            caps = load("captions")
            data = ShapesData(None, [], load("understanding"), load("understanding_single"), load("generation"),
                              load("editing"), caps, describe_records(caps, run.n_describe))
        else:
            data = render_split(run, Path(tmp) / "data")
        cfg = dataclasses.replace(get_preset(run.preset), text_loss_reduction=run.text_loss_reduction)
        processor = shapes_processor(cfg, system_turn=run.system_turn,
                                     texts=shapes_corpus(data.und + data.single + data.gen + data.edi + data.caps)
                                     if run.tokenizer == "bpe" else None)
        torch.manual_seed(0)
        model = VARGPT(cfg)
        collate = SFTCollator(model.config, processor, generator=torch.Generator().manual_seed(0),
                              prompt_drop_rate=run.prompt_drop_rate)
        gen = torch.Generator().manual_seed(0)
        phases = sft_phases(run, data)
        names = [p.name for p in phases]
        if names != [n for n in run_phases(run) if n in names]:
            raise SystemExit(f"the mirrored phases {names} are out of order against run_phases: {run_phases(run)}")
        rows = [("tokenizer", run.vae_steps, tokenizer_flops(model, run))]
        rows += [(p.name, p.steps, step_flops(model, collate, p, run, gen)) for p in phases if p.steps]
        edit = next(p for p in phases if p.name == "edit")
        edit_flops = next(f for name, _, f in rows if name == "edit")
        step_s, kinds = timed_steps(model, collate, edit, run, args.timed_steps, gen, args.profile)

    tokens = run.batch_size * 190  # a generation or edit batch: 16 rows of about 190 tokens (121 image slots)
    peaks = matmul_peak([(tokens, cfg.text.hidden_size, cfg.text.intermediate_size),
                         (tokens, cfg.text.intermediate_size, cfg.text.hidden_size),
                         (run.batch_size * 121, cfg.decoder.width, int(cfg.decoder.width * cfg.decoder.mlp_ratio))],
                        args.repeats)
    peak = max(peaks.values())
    total = sum(steps * f for _, steps, f in rows)
    lines = [f"threads {torch.get_num_threads()}; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s (best of "
             + ", ".join(f"{m}x{k}x{n} {r / 1e9:.0f}" for (m, k, n), r in peaks.items()) + ")",
             f"editing SFT step: {edit_flops / 1e9:.1f} GFLOP in {step_s:.3f} s (median of {args.timed_steps}, "
             f"the targets encoded on first sight) = "
             f"{edit_flops / step_s / 1e9:.0f} GFLOP/s, {edit_flops / step_s / peak:.0%} of the peak", "",
             "| phase | steps | GFLOP / step | TFLOP | min at the peak |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {steps} | {f / 1e9:.1f} | {steps * f / 1e12:.1f} | {steps * f / peak / 60:.1f} |"
              for name, steps, f in rows]
    lines.append(f"| **counted phases** | | | **{total / 1e12:.0f}** | **{total / peak / 60:.0f}** |")
    if kinds:
        ops = sum(v for k, v in kinds.items() if not k.startswith("optimizer"))
        mm = kinds.get("matmuls and convolutions", 0.0)
        lines += ["", f"editing SFT step, profiled ({args.timed_steps} steps, the same batches again, so their "
                  f"targets' features come from the cache; self CPU time of the aten operators {ops:.3f} s a step):",
                  "", "| kind | s / step | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {v / ops:.0%} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
        lines += ["", f"the matmuls and convolutions run at {edit_flops / mm / 1e9:.0f} GFLOP/s "
                  f"({edit_flops / mm / peak:.0%} of the peak); at that rate the counted phases' arithmetic alone "
                  f"takes {total * mm / edit_flops / 60:.0f} min"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
