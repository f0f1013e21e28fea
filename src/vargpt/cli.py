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
    from vargpt.generation.reference import generate_image_uncached, greedy_text_uncached
    from vargpt.models.vae.schedules import get_schedule
    from vargpt.models.vargpt import VARGPT
    from vargpt.processing.chat import expand_image_pads, preprocess_images, render_prompt
    from vargpt.processing.image import to_pil
    from vargpt.processing.tokenizer import char_tokenizer

    cfg = get_preset("tiny")
    torch.manual_seed(seed)
    model = VARGPT(cfg).eval()
    tok = char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)
    st = cfg.special_tokens

    image = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(image).rectangle([16, 16, 40, 40], fill=(220, 30, 30))
    pixel_values, grid = preprocess_images(cfg, [image])
    question = "What color is the square?"
    text = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])
    ids = expand_image_pads(tok(text)["input_ids"], grid, st.image_pad, cfg.vision.spatial_merge_size)
    answer_ids = greedy_text_uncached(model, torch.tensor([ids]), pixel_values=pixel_values, image_grid_thw=grid,
                                      max_new_tokens=max_new_tokens, stop_ids=(st.im_end,))
    answer = tok.decode([i for i in answer_ids if i != st.im_end], skip_special_tokens=False)
    typer.echo(f"question: {question}\nanswer ({len(answer_ids)} tokens, random weights): {answer!r}")

    prompt = render_prompt([{"role": "user", "content": "Draw a red circle."}])
    schedule = get_schedule(cfg.gen_aspect_ratio, cfg.gen_schedule)
    g = torch.Generator().manual_seed(seed)
    result = generate_image_uncached(model, torch.tensor([tok(prompt)["input_ids"]]), schedule, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "image.png"
    to_pil(result.image_B3HW)[0].save(path)
    h, w = result.image_B3HW.shape[-2:]
    typer.echo(f"image: {path} ({w}x{h} px, {len(schedule)} scales {list(schedule)}, seed {seed})")


if __name__ == "__main__":
    app()
