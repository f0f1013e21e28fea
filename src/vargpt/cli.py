"""The ``vargpt`` command line (typer). Thin: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="VARGPT-v1.1: understand, generate and edit images.")


@app.callback()
def _main() -> None:
    """VARGPT-v1.1 command line."""


@app.command()
def smoke(
    out: Annotated[Path, typer.Option(help="Folder for the generated image.")] = Path("out/smoke"),
    seed: Annotated[int, typer.Option(help="Seed of the random weights and of the sampler.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 16,
) -> None:
    """Smoke run on a random-weight `tiny` model: answer a question about an image, then draw an image.

    The weights are random, so the answer is gibberish and the image is noise: this checks that every path runs
    end to end (ViT -> LLM -> text; LLM -> visual decoder -> bits -> VAE -> pixels).
    """
    import torch
    from PIL import Image, ImageDraw

    from vargpt.config import get_preset
    from vargpt.engine import Engine
    from vargpt.generation.params import ImageParams, TextParams
    from vargpt.models.vargpt import VARGPT
    from vargpt.processing.processor import Processor
    from vargpt.processing.tokenizer import char_tokenizer

    cfg = get_preset("tiny")
    torch.manual_seed(seed)
    model = VARGPT(cfg).eval()
    engine = Engine(model, Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))

    image = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(image).rectangle([16, 16, 40, 40], fill=(220, 30, 30))
    question = "What color is the square?"
    answer = engine.understand([image], question, TextParams(max_new_tokens=max_new_tokens))
    typer.echo(f"question: {question}\nanswer (random weights): {answer!r}")

    (result,) = engine.generate_images(["Draw a red circle."], ImageParams(seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "image.png"
    result.image.save(path)
    w, h = result.image.size
    typer.echo(f"image: {path} ({w}x{h} px, {len(result.schedule)} scales {list(result.schedule)}, seed {result.seed})")


if __name__ == "__main__":
    app()
