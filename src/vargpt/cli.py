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


# ------------------------------------------------------------------------------------------- inference commands
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", envvar="VARGPT_CHECKPOINT",
    help="Checkpoint directory, ours or official-layout (default: the shipped Shapes model).")]
DtypeOpt = Annotated[str | None, typer.Option(help="Weights dtype: fp32 or bf16 (default: as stored).")]
DeviceOpt = Annotated[str, typer.Option(help="Device, e.g. cpu or cuda.")]


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _checkpoint_path(checkpoint: Path | None) -> Path:
    from vargpt.checkpoint import SHIPPED_CHECKPOINT

    return checkpoint or SHIPPED_CHECKPOINT  # typer already read $VARGPT_CHECKPOINT into checkpoint


def _engine(checkpoint: Path | None, dtype: str | None, device: str):
    from vargpt.engine import Engine

    path = _checkpoint_path(checkpoint)
    if not path.is_dir():
        _fail(f"checkpoint {path} does not exist" + ("" if checkpoint else
              " (the shipped model is missing from this checkout; pass --checkpoint DIR)"))
    try:
        return Engine.load(path, dtype=dtype, device=device)
    except (OSError, ValueError) as e:
        _fail(f"cannot load {path}: {e}")


def _open_image(path: Path, where: str = ""):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        _fail(f"{where}image {path} not found")
    except (UnidentifiedImageError, OSError) as e:
        _fail(f"{where}image {path} is not a readable image ({e})")


def _jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    import json

    if not path.is_file():
        _fail(f"{path} not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(f"{path}:{n}: malformed JSON ({e.msg})")
        if not isinstance(row, dict) or any(not isinstance(row.get(f), str) for f in fields):
            _fail(f"{path}:{n}: expected an object with string fields {', '.join(fields)}")
        rows.append({**row, "_line": n})
    return rows


def _image_params(seed: int, aspect_ratio: float, cfg: float | None, temperature: float | None,
                  top_p: float | None = None):
    """ImageParams from the command's options (None = the checkpoint's default)."""
    from vargpt.generation.params import ImageParams

    kw = {"seed": seed, "aspect_ratio": aspect_ratio, "cfg_scale": cfg, "temperature": temperature, "top_p": top_p}
    try:
        return ImageParams(**kw)
    except ValueError as e:
        _fail(str(e))


@app.command()
def ask(
    image: Annotated[Path | None, typer.Argument(help="Image file.")] = None,
    question: Annotated[str | None, typer.Argument(help="Question about the image.")] = None,
    questions_file: Annotated[Path | None, typer.Option(help='JSONL of {"image": PATH, "question": TEXT}.')] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Questions per batch (batch form).")] = 16,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Answer a question about an image (or one JSON line per input of --questions-file, in order)."""
    import json

    from tqdm.auto import tqdm

    from vargpt.generation.params import TextParams

    if questions_file is None and (image is None or question is None):
        _fail("give IMAGE and QUESTION, or --questions-file")
    engine = _engine(checkpoint, dtype, device)
    params = TextParams(max_new_tokens=max_new_tokens)
    if questions_file is None:
        typer.echo(engine.understand([_open_image(image)], question, params))
        return
    rows = _jsonl(questions_file, ("image", "question"))
    st = engine.config.special_tokens
    for i in tqdm(range(0, len(rows), batch_size), desc="ask", unit="batch"):
        chunk = rows[i:i + batch_size]
        encs = [engine.processor.encode([{"role": "user", "content": [
            {"type": "image", "image": _open_image(Path(r["image"]), f"{questions_file}:{r['_line']}: ")},
            {"type": "text", "text": r["question"]}]}]) for r in chunk]
        for ids in engine.generate_text(encs, params):
            typer.echo(json.dumps({"answer": engine.processor.decode([t for t in ids if t != st.im_end])}))


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output PNG (single form).")] = Path("out.png"),
    prompts_file: Annotated[Path | None, typer.Option(help="Text file, one prompt per line.")] = None,
    out_dir: Annotated[Path, typer.Option(help="Folder of NNNNN.png (batch form).")] = Path("out/generate"),
    n: Annotated[int, typer.Option(help="Images per prompt (single form: OUTPUT-k.png when > 1).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed; item i uses seed + i.")] = 0,
    aspect_ratio: Annotated[float, typer.Option(help="Height / width (nearest of the 15 templates).")] = 1.0,
    cfg: Annotated[float | None, typer.Option(
        help="Classifier-free guidance scale (default: the checkpoint's).")] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Per-bit sampling temperature (default: the checkpoint's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Text to image: one prompt to -o OUT.png, or --prompts-file to --out-dir/00000.png, 00001.png, ..."""
    from tqdm.auto import tqdm

    params = _image_params(seed, aspect_ratio, cfg, temperature)
    if prompts_file is None and prompt is None:
        _fail("give PROMPT or --prompts-file")
    if n < 1:
        _fail(f"--n {n}: expected >= 1")
    if prompts_file is not None:
        if not prompts_file.is_file():
            _fail(f"{prompts_file} not found")
        prompts = [line for line in prompts_file.read_text().splitlines() if line.strip()]
        targets = [out_dir / f"{i:05d}.png" for i in range(len(prompts))]
    else:
        prompts = [prompt] * n
        targets = [output] if n == 1 else [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(n)]
    engine = _engine(checkpoint, dtype, device)
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=len(prompts) == 1):
        imgs = engine.generate_images(prompts[i:i + batch_size], params,
                                      seeds=[seed + j for j in range(i, min(i + batch_size, len(prompts)))])
        for img, path in zip(imgs, targets[i:i + batch_size], strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            img.image.save(path)
            if prompts_file is None:
                typer.echo(f"{path} (seed {img.seed}, {img.image.width}x{img.image.height})")


@app.command()
def edit(
    image: Annotated[Path | None, typer.Argument(help="Source image.")] = None,
    instruction: Annotated[str | None, typer.Argument(help="Edit instruction.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output PNG (single form).")] = Path("edited.png"),
    edits_file: Annotated[Path | None, typer.Option(help='JSONL of {"image": PATH, "instruction": TEXT}.')] = None,
    out_dir: Annotated[Path, typer.Option(help="Folder of NNNNN.png (batch form).")] = Path("out/edit"),
    seed: Annotated[int, typer.Option(help="Seed; item i uses seed + i.")] = 0,
    cfg: Annotated[float | None, typer.Option(
        help="Classifier-free guidance scale (default: the checkpoint's).")] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Per-bit sampling temperature (default: the checkpoint's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Edits per batch.")] = 16,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Edit an image from an instruction (or every line of --edits-file to --out-dir/NNNNN.png)."""
    from tqdm.auto import tqdm

    params = _image_params(seed, 1.0, cfg, temperature)
    if edits_file is None and (image is None or instruction is None):
        _fail("give IMAGE and INSTRUCTION, or --edits-file")
    engine = _engine(checkpoint, dtype, device)
    if edits_file is None:
        img = engine.edit(_open_image(image), instruction, params)
        output.parent.mkdir(parents=True, exist_ok=True)
        img.image.save(output)
        typer.echo(f"{output} (seed {img.seed})")
        return
    rows = _jsonl(edits_file, ("image", "instruction"))
    for i in tqdm(range(0, len(rows), batch_size), desc="edit", unit="batch"):
        chunk = rows[i:i + batch_size]
        encs = [engine.processor.encode([{"role": "user", "content": [
            {"type": "image", "image": _open_image(Path(r["image"]), f"{edits_file}:{r['_line']}: ")},
            {"type": "text", "text": r["instruction"]}]}]) for r in chunk]
        engine.write_replies(encs)  # the model's reply before each image, as ``Engine.edit`` writes it
        imgs = engine.generate_images(encs, params, seeds=[seed + i + k for k in range(len(chunk))])
        for k, img in enumerate(imgs):
            path = out_dir / f"{i + k:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.image.save(path)


# ------------------------------------------------------------------------------------------------------ training
def _train_shapes(out: Path, *, data, resume: str | None, quick: bool, fast: bool, sets: list[str],
                  stop_after: str | None) -> None:
    """`vargpt train shapes`: a fresh run (the default, --quick or --fast recipe with --set over it) or, with
    --resume latest, the run in OUT after its last finished phase; --stop-after ends either after a phase."""
    from vargpt.train.run_config import TrainCommandError, apply_sets
    from vargpt.train.shapes import ShapesRunConfig, ShapesRunError, run_shapes

    if data:
        _fail("the shapes recipe renders its own data; drop --data")
    if resume is not None:
        if resume != "latest":
            _fail(f"--resume {resume}: a shapes run goes on from its last finished phase; give --resume latest")
        if quick or fast or sets:
            _fail(f"--resume latest keeps the run's own settings ({out / 'run_config.json'}); drop --quick, --fast "
                  "and --set")
        run = None
    else:
        if out.exists() and any(out.iterdir()):
            hint = " (or --resume latest to go on with the run in it)" if (out / "run_config.json").is_file() else ""
            _fail(f"{out} is not empty; the shapes recipe needs a fresh folder{hint}")
        try:
            if quick and fast:
                raise TrainCommandError("--quick and --fast are two different recipes; give one")
            base = ShapesRunConfig.quick() if quick else ShapesRunConfig.fast() if fast else ShapesRunConfig()
            run = apply_sets(base, sets)
        except TrainCommandError as e:
            _fail(str(e))
    try:
        final = run_shapes(out, run, resume=resume is not None, stop_after=stop_after)
    except ShapesRunError as e:
        _fail(str(e))
    if final is None:
        typer.echo(f"stopped after {stop_after}; go on with: vargpt train shapes --out {out} --resume latest")
    else:
        typer.echo(f"checkpoint: {final}")


@app.command("train")
def train_cmd(
    recipe: Annotated[str, typer.Argument(
        help="stage1, stage2, stage3a-d, edit (vargpt.train.RECIPES), vae, or shapes (the whole Shapes model).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, log.jsonl, final/.")],
    data: Annotated[list[Path] | None, typer.Option("--data", help="Records file (.json/.jsonl); repeatable.")]
    = None,
    config: Annotated[Path | None, typer.Option("--config", help="Settings file (.json, or .yaml with PyYAML).")]
    = None,
    init: Annotated[Path | None, typer.Option("--init", help="Starting checkpoint directory.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Start from a fresh preset (small vocabularies).")]
    = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Training checkpoint to continue, or 'latest' (shapes: after the last finished phase).")]
    = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="DPO reference checkpoint (default: the starting weights).")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters; merged before the final save.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip invalid records (and count them).")] = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps (overrides the config).")]
    = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: a TrainConfig field or data./dpo./lora./vae. field (shapes: a ShapesRunConfig "
                      "field, e.g. stage2_curriculum=color:800); repeatable.")] = None,
    gen_schedule: Annotated[str | None, typer.Option(
        "--gen-schedule", help="Generation schedule (default: the recipe's, e.g. 0.06M).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="shapes: a few-minute run that checks the mechanics.")]
    = False,
    fast: Annotated[bool, typer.Option("--fast", help="shapes: the recipe cut to fit 90 minutes on a 2-core CPU "
                                                      "(ShapesRunConfig.fast; lower scores, EVAL.md).")] = False,
    stop_after: Annotated[str | None, typer.Option(
        "--stop-after", help="shapes: end the run after this phase (e.g. stage3d); go on with --resume latest.")]
    = None,
) -> None:
    """Train a recipe on record files and save a complete checkpoint to OUT/final (docs/training.md).

    `vargpt train shapes --out DIR` runs the whole Shapes recipe from nothing (vargpt.train.shapes); after an
    interruption, `vargpt train shapes --out DIR --resume latest` goes on after the last phase it finished."""
    if recipe == "shapes":
        _train_shapes(out, data=data, resume=resume, quick=quick, fast=fast, sets=set_ or [], stop_after=stop_after)
        return
    if stop_after is not None:
        _fail("--stop-after is for the shapes recipe (the other recipes stop at --max-steps)")
    if not data:
        _fail("give at least one --data FILE")
    from vargpt.train.cli import run_train
    from vargpt.train.run_config import TrainCommandError

    try:
        run_train(recipe, data=data, out=out, config=config, init=init, preset=preset, resume=resume,
                  reference=reference, lora=lora, skip_bad=skip_bad, max_steps=max_steps, sets=set_ or [],
                  gen_schedule=gen_schedule, echo=typer.echo)
    except TrainCommandError as e:
        _fail(str(e))


# --------------------------------------------------------------------------------------------------------- serving
@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="VARGPT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most images in one batched generation call.")] = 8,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Serve the model over an OpenAI-style HTTP API (/v1/chat/completions, /v1/images/generations,
    /v1/images/edits, /v1/models, /health)."""
    try:
        import uvicorn

        from vargpt.serve import Limits, create_app
    except ImportError as e:
        _fail(f"serving needs the serve extra ({e.name} is missing): pip install 'vargpt[serve]'")
    if max_batch < 1:
        _fail(f"--max-batch {max_batch}: expected >= 1")
    engine = _engine(checkpoint, dtype, device)
    model_id = _checkpoint_path(checkpoint).resolve().name
    app_ = create_app(engine, api_key=api_key, limits=Limits(max_batch=max_batch), model_id=model_id)
    typer.echo(f"serving {model_id} on http://{host}:{port}" + (" (API key required)" if api_key else ""))
    uvicorn.run(app_, host=host, port=port)


# ------------------------------------------------------------------------------------------------------------ chat
@app.command()
def chat(
    out_dir: Annotated[Path, typer.Option(help="Folder for the images the model draws.")] = Path("out/chat"),
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit (text tokens).")] = 256,
    temperature: Annotated[float, typer.Option(help="Text sampling temperature (0 = greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the text and image samplers (turn k uses seed + k).")] = 0,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Interactive multi-turn chat. `/image PATH` attaches an image to the next message; `/quit` ends."""
    from vargpt.engine import ImageDone, TextDelta
    from vargpt.generation.params import ImageParams, TextParams

    engine = _engine(checkpoint, dtype, device)
    messages: list[dict] = []
    pending: list = []
    turn = 0
    typer.echo("chat: type a message; /image PATH attaches an image; /quit ends")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/image "):
            path = Path(line[len("/image "):].strip())
            try:
                pending.append(_open_image(path))
            except typer.Exit:  # keep the session alive on a bad path
                continue
            typer.echo(f"(attached {path})")
            continue
        content = [{"type": "image", "image": im} for im in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content})
        pending = []
        typer.echo("model> ", nl=False)
        result = None
        for ev in engine.stream(messages, TextParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                     seed=seed + turn), ImageParams(seed=seed + turn),
                                previews=False):
            if isinstance(ev, TextDelta):
                typer.echo(ev.text, nl=False)
            elif isinstance(ev, ImageDone):
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"turn{turn:03d}_{ev.image.seed}.png"
                ev.image.image.save(path)
                typer.echo(f" [image: {path}] ", nl=False)
            else:
                result = ev.result
        typer.echo("")
        messages.append(result.message)
        turn += 1


# ------------------------------------------------------------------------------------------------------------ demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for index.html and the PNG grids.")] = Path("out/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the scenes and the samplers.")] = 0,
    n: Annotated[int, typer.Option(help="Examples per task.")] = 8,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """A gallery of understanding, generation and editing on the (default: shipped Shapes) model: out/index.html."""
    from vargpt.eval.demo import write_demo

    page = write_demo(_engine(checkpoint, dtype, device), out, seed=seed, n=n)
    typer.echo(f"understanding, generation and editing examples: {page}")


# ------------------------------------------------------------------------------------------------------ conversion
@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory to convert (official layout or ours).")],
    dst: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    to: Annotated[str, typer.Option(help="Target layout: ours or official.")] = "ours",
    layout_from: Annotated[Path | None, typer.Option(
        help="to=official: an official directory whose config.json gives the layout (block chunks, start-table "
             "rows, HF config); default: SRC itself when it is official.")] = None,
    dtype: DtypeOpt = None,
) -> None:
    """Convert between the official VARGPT-v1.1 checkpoint layout and ours (tokenizer files are copied)."""
    import shutil

    from vargpt.checkpoint import load_model, save_checkpoint, save_official
    from vargpt.engine import parse_dtype
    from vargpt.models.official import is_official_checkpoint, read_official_config

    if to not in ("ours", "official"):
        _fail(f"--to {to}: expected ours or official")
    if not src.is_dir():
        _fail(f"{src} is not a checkpoint directory")
    if dst.exists():
        _fail(f"{dst} already exists")
    try:
        model = load_model(src, dtype=parse_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        _fail(f"cannot load {src}: {e}")
    if to == "ours":
        save_checkpoint(model, dst)
    else:
        layout_dir = layout_from or (src if is_official_checkpoint(src) else None)
        if layout_dir is None:
            _fail("--to official needs --layout-from OFFICIAL_DIR (our config does not record the official layout)")
        cfg, layout = read_official_config(layout_dir)
        if cfg.to_dict() != model.config.to_dict():
            _fail(f"{layout_dir}'s configuration does not describe {src}'s model")
        save_official(model, layout, dst)
    for f in src.iterdir():  # tokenizer, chat template, preprocessor settings
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "model.safetensors.index.json") and \
                not f.name.startswith("model-"):
            shutil.copy2(f, dst / f.name)
    typer.echo(f"{src} -> {dst} ({to} layout)")


# ------------------------------------------------------------------------------------------------------ evaluation
@app.command("eval")
def eval_cmd(
    world: Annotated[str, typer.Argument(help="Benchmark family: shapes.")],
    suite: Annotated[str, typer.Option(help="understanding, generation, editing or all.")] = "all",
    out: Annotated[Path, typer.Option(help="Folder for <suite>.json, <suite>.md and <suite>_grid.png.")]
    = Path("out/eval"),
    limit: Annotated[int | None, typer.Option(help="Items per category (quick checks; default: the full suite).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Items per engine call.")] = 32,
    cfg: Annotated[float | None, typer.Option(
        help="Generation / editing: guidance scale (default: the checkpoint's).")] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Generation / editing: per-bit temperature (default: the checkpoint's).")] = None,
    top_p: Annotated[float | None, typer.Option(
        help="Generation / editing: per-bit top-p, 0 = off (default: the checkpoint's).")] = None,
    checkpoint: CheckpointOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Score a checkpoint on the held-out Shapes suites (fixed seeds): per-category and overall scores; the
    generation and editing results record the sampling settings they used."""
    if world != "shapes":
        _fail(f"unknown benchmark {world!r}; expected 'shapes'")
    from vargpt.eval.shapes import SUITES, run_suite
    from vargpt.generation.params import SAMPLING_FIELDS

    suites = SUITES if suite == "all" else (suite,)
    if any(s not in SUITES for s in suites):
        _fail(f"--suite {suite}: expected one of {', '.join(SUITES)} or all")
    params = _image_params(0, 1.0, cfg, temperature, top_p)
    engine = _engine(checkpoint, dtype, device)
    for name in suites:
        result = run_suite(engine, name, params=params, batch_size=batch_size, limit=limit, out_dir=out)
        typer.echo(f"\n{result.to_markdown()}")
        if result.params:
            typer.echo("sampling: " + ", ".join(f"{k} {result.params[k]}" for k in SAMPLING_FIELDS))
    typer.echo(f"\nresults in {out}")


if __name__ == "__main__":
    app()
