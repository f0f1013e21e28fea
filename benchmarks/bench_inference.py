"""Inference speed: images per second, cached vs uncached scale loop, understanding decode vs transformers.

Prints one table per measurement; every ratio is measured side by side in this run, except the official code's
times on bench_M, which come from ``../shared/fixtures/bench/bench_M/README.md`` (same kind of 2-core machine,
2 threads, fp32; we cannot run the official code here) -- each is also given as a fraction of the matmul peak
measured in this run, so the comparison can be re-based on another machine.

    python benchmarks/bench_inference.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/bench_inference.py --only gen --models bench_M --batches 1,16
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vargpt.config import get_preset
from vargpt.engine import Engine
from vargpt.generation.params import ImageParams, TextParams
from vargpt.generation.reference import generate_image_uncached
from vargpt.models.official import read_official_config
from vargpt.models.vargpt import VARGPT
from vargpt.processing.processor import EncodedPrompt, Processor
from vargpt.processing.tokenizer import char_tokenizer

BENCH_M = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "bench" / "bench_M"
#: official code on bench_M (README of the fixture): seconds per image at B = 1, fp32; understanding tokens/s
OFFICIAL = {"cfg3": 0.229, "cfg1": 0.158, "understanding_tok_s": 421.0}
PROMPT = "A photo of a small red cube on a wooden table, soft light."


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """Best GFLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(timeit(lambda: a @ b, 1, 1) for _ in range(5))
    return 2 * n**3 / best / 1e9


def load_engine(name: str, dtype: str) -> Engine:
    if name == "bench_M":
        cfg, _ = read_official_config(BENCH_M)
        return Engine.load(BENCH_M, dtype=dtype, tokenizer=char_tokenizer(cfg.special_tokens, cfg.text.vocab_size))
    cfg = get_preset(name)
    torch.manual_seed(0)
    model = VARGPT(cfg).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    return Engine(model, Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)), compat="official")


def image_flops(engine: Engine, params: ImageParams) -> float:
    with FlopCounterMode(display=False) as fc:
        engine.generate_images([PROMPT], params)
    return fc.get_total_flops()


def time_images(engine: Engine, prompts: list, params: ImageParams, repeats: int) -> float:
    return timeit(lambda: engine.generate_images(prompts, params), repeats)


def bench_generation(args, peaks) -> None:
    print("\n## Text-to-image throughput (CFG 3, tau 0.5, top-p 0.97, official CFG mode)\n")
    print("| model | params | dtype | B | s / image | images / s | GFLOP / image | GFLOP/s | of peak | vs official |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for dtype in args.dtypes:
            engine = load_engine(name, dtype)
            nparams = sum(p.numel() for p in engine.model.parameters()) / 1e6
            params = ImageParams(cfg_scale=3.0, seed=0)
            flops = image_flops(engine, params)
            for B in args.batches:
                t = time_images(engine, [PROMPT] * B, params, args.repeats) / B
                gflops = flops / t / 1e9
                peak = peaks[dtype]
                vs = ""
                if name == "bench_M":
                    vs = f"{OFFICIAL['cfg3'] / t:.2f}x"
                print(f"| {name} | {nparams:.1f}M | {dtype} | {B} | {t:.4f} | {1 / t:.2f} | {flops / 1e9:.2f} | "
                      f"{gflops:.0f} | {gflops / peak:.0%} | {vs} |", flush=True)
            del engine
            gc.collect()


def cache_row(name: str, repeats: int) -> str:
    engine = load_engine(name, "fp32")
    params = ImageParams(cfg_scale=1.0, temperature=0.0, positions="mrope", seed=0)
    schedule = engine.schedule(params)
    enc = engine.processor.encode([{"role": "user", "content": PROMPT}])
    ids = torch.tensor([enc.input_ids])
    prompts = [EncodedPrompt(enc.input_ids)]
    cached = timeit(lambda: engine.generate_images(prompts, params), repeats)
    uncached = timeit(lambda: generate_image_uncached(engine.model, ids, schedule, temperature=0.0),
                      max(1, repeats // 2))
    a = engine.generate_images(prompts, params)[0].bits
    b = generate_image_uncached(engine.model, ids, schedule, temperature=0.0).ms_bits_Bld
    same = all(torch.equal(x, y[0]) for x, y in zip(a, b, strict=True))
    return f"| {name} | {cached:.4f} | {uncached:.4f} | {uncached / cached:.1f}x | {same} |"


def bench_cache(args) -> None:
    print("\n## Cached scale loop vs uncached recomputation (B = 1, CFG 1, argmax bits, fp32)\n")
    print("| model | cached s / image | uncached s / image | speed-up | same bits |")
    print("|---|---|---|---|---|")
    for name in args.models:
        print(cache_row(name, args.repeats), flush=True)


def understanding_row(name: str, repeats: int) -> str:
    from PIL import Image

    engine = load_engine(name, "fp32")
    st = engine.config.special_tokens
    img = Image.new("RGB", (112, 112), (200, 40, 40))
    enc = engine.processor.encode([{"role": "user", "content": [{"type": "image", "image": img},
                                                                {"type": "text", "text": "Describe it."}]}])
    n = 32
    params = TextParams(max_new_tokens=n)
    ids = torch.tensor([enc.input_ids])
    hf = engine.model.backbone
    out: dict[str, list[int]] = {}

    def ours() -> None:
        out["ours"] = engine.generate_text([enc], params)[0]

    def theirs() -> None:
        seq = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc.pixel_values,
                          image_grid_thw=enc.image_grid_thw, mm_token_type_ids=(ids == st.image_pad).long(),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=st.endoftext)
        out["hf"] = seq[0, ids.shape[1]:].tolist()

    t_ours = timeit(ours, repeats)
    t_hf = timeit(theirs, repeats)
    # our loop stops at <|im_end|> (transformers is forced to 32 tokens): compare ids on our length, rates per token
    k = len(out["ours"])
    same = out["ours"] == out["hf"][:k]
    r_ours, r_hf = k / t_ours, len(out["hf"]) / t_hf
    vs = f"{r_ours / OFFICIAL['understanding_tok_s']:.2f}x" if name == "bench_M" else ""
    return f"| {name} | {r_ours:.0f} | {r_hf:.0f} | {r_ours / r_hf:.2f}x | {same} ({k} tokens) | {vs} |"


def bench_understanding(args) -> None:
    print("\n## Understanding: 32 greedy tokens after one 112 x 112 image (B = 1, fp32, end to end)\n")
    print("| model | ours tok/s | transformers generate tok/s | ours / transformers | same ids | vs official |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        print(understanding_row(name, args.repeats), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,bench_M,base-100m")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="gen,cache,understanding")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3, best of 5): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    only = args.only.split(",")
    with torch.inference_mode():
        if "gen" in only:
            bench_generation(args, peaks)
        if "cache" in only:
            bench_cache(args)
        if "understanding" in only:
            bench_understanding(args)


if __name__ == "__main__":
    main()
