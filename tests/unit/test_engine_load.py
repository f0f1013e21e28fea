"""Engine.load: our checkpoint directories (tokenizer, chat template and preprocessor settings from the directory),
official directories (bf16 into the dtype asked for), and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vargpt.checkpoint import SHIPPED_CHECKPOINT, default_checkpoint, save_checkpoint
from vargpt.config import get_preset
from vargpt.engine import Engine
from vargpt.generation.params import (
    IMAGE_CONFIG_FILE,
    OFFICIAL_SAMPLING,
    ImageParams,
    TextParams,
    load_sampling_defaults,
    save_sampling_defaults,
)
from vargpt.processing.processor import Processor
from vargpt.processing.tokenizer import char_tokenizer

from .helpers import tiny_model

PARITY = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "parity"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Engine]:
    model = tiny_model(3)
    cfg = model.config
    processor = Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size), min_pixels=28 * 28,
                          max_pixels=112 * 112)
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, path)
    processor.save(path)
    return path, Engine(model, processor)


def test_our_directory_round_trips_through_engine_load(saved) -> None:
    path, engine = saved
    loaded = Engine.load(path)
    assert loaded.compat == "native" and loaded.resolve(None).cfg_mode == "null_prompt"
    assert (loaded.processor.min_pixels, loaded.processor.max_pixels) == (28 * 28, 112 * 112)
    params = ImageParams(seed=5, temperature=1.0)
    a, b = engine.generate_images(["a red circle"], params)[0], loaded.generate_images(["a red circle"], params)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    assert a.image.tobytes() == b.image.tobytes()
    tp = TextParams(max_new_tokens=6, temperature=1.0, seed=2)
    enc = engine.processor.encode([{"role": "user", "content": "hello"}])
    assert engine.generate_text([enc], tp) == loaded.generate_text([loaded.processor.encode(
        [{"role": "user", "content": "hello"}])], tp)


def test_no_path_loads_vargpt_checkpoint_or_the_shipped_model(saved, monkeypatch) -> None:
    path, engine = saved
    monkeypatch.setenv("VARGPT_CHECKPOINT", str(path))
    assert default_checkpoint() == path
    tp = TextParams(max_new_tokens=6)
    enc = engine.processor.encode([{"role": "user", "content": "hello"}])
    assert Engine.load().generate_text([enc], tp) == engine.generate_text([enc], tp)
    monkeypatch.delenv("VARGPT_CHECKPOINT")
    assert default_checkpoint() == SHIPPED_CHECKPOINT == Path(__file__).resolve().parents[2] / "checkpoints" / "shapes"


def test_chat_template_in_the_directory_is_used(saved, tmp_path) -> None:
    path, engine = saved
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg_path = tmp_path / "tokenizer_config.json"
    data = json.loads(cfg_path.read_text())
    data["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
    cfg_path.write_text(json.dumps(data))
    loaded = Engine.load(tmp_path)
    assert loaded.processor.template_source == "tokenizer chat_template"
    text = loaded.processor.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user:hi<|im_end|><|im_start|>assistant:"
    assert engine.processor.template_source == "built-in Qwen2-VL"


def test_image_normalisation_round_trips_and_is_validated(saved, tmp_path) -> None:
    from PIL import Image

    from vargpt.train.shapes import SHAPES_IMAGE_STD, shapes_processor

    path, engine = saved
    saved_pre = json.loads((path / "preprocessor_config.json").read_text())  # the Qwen2-VL (CLIP) statistics
    assert saved_pre["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    cfg = engine.model.config
    proc = Processor(cfg, engine.processor.tokenizer, image_mean=[1.0, 1.0, 1.0], image_std=[0.25, 0.25, 0.25])
    proc.save(tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (pre["image_mean"], pre["image_std"]) == ([1.0, 1.0, 1.0], [0.25, 0.25, 0.25])
    loaded = Processor.from_dir(tmp_path, cfg)
    loaded.save(tmp_path / "again")  # a load-save round trip writes the same tokenizer settings
    assert (json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
            == json.loads((tmp_path / "tokenizer_config.json").read_text()))
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    img.putpixel((0, 0), (0, 127, 255))
    a = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    b = loaded.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.equal(a, b) and float(a.min()) == -4.0 and float(a.max()) == 0.0  # white -> 0, black -> -1/0.25
    # the Shapes processor uses it: a white canvas is all zeros for the ViT
    shapes = shapes_processor(get_preset("shapes"))
    assert tuple(shapes.image_processor.image_std) == SHAPES_IMAGE_STD
    white = shapes.image_processor(images=[Image.new("RGB", (64, 64), "white")], return_tensors="pt")["pixel_values"]
    assert white.shape == (64, 1176) and not white.any()
    for bad, msg in (({"image_mean": [1, 1]}, "field 'image_mean': expected a list of 3 numbers"),
                     ({"image_std": [0.5, 0, 0.5]}, "field 'image_std': every value must be > 0")):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, **bad}))
        with pytest.raises(ValueError, match=msg):
            Processor.from_dir(tmp_path, cfg)


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:
    model = tiny_model(0)
    save_checkpoint(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Engine.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype='fp16'"):
        Engine.load(tmp_path, dtype="fp16", tokenizer=char_tokenizer(model.config.special_tokens, 320))


def test_tokenizer_must_match_the_special_ids() -> None:
    from vargpt.config import SpecialTokens

    cfg = tiny_model(0).config
    other = char_tokenizer(SpecialTokens.from_base(cfg.special_tokens.endoftext + 2), cfg.text.vocab_size)
    with pytest.raises(ValueError, match=r"special_tokens\.im_end"):
        Processor(cfg, other)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_official_directory_loads_in_the_dtype_asked_for(dtype) -> None:
    fixture = sorted(p for p in PARITY.iterdir() if p.name.startswith("tiny_"))[0]
    from vargpt.models.official import read_official_config

    cfg, _ = read_official_config(fixture)
    engine = Engine.load(fixture, dtype=dtype, tokenizer=char_tokenizer(cfg.special_tokens, cfg.text.vocab_size))
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert engine.compat == "official" and engine.dtype == want
    assert {p.dtype for p in engine.model.parameters()} == {want}
    (img,) = engine.generate_images(["x"], ImageParams(seed=0, top_k=1))
    assert img.image.size == (64, 64) and img.params["cfg_mode"] == "official"


# ------------------------------------------------------------------------------------ default sampling settings
def test_checkpoint_sampling_defaults_fill_unset_fields_and_explicit_values_win(saved, tmp_path) -> None:
    path, engine = saved
    assert Engine.load(path).sampling == ImageParams(**OFFICIAL_SAMPLING)  # no file: the official settings
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    written = save_sampling_defaults(ckpt, ImageParams(cfg_scale=6.0, temperature=1.0, top_k=0, top_p=0.0))
    assert json.loads(written.read_text()) == {"cfg_scale": 6.0, "temperature": 1.0, "top_k": 0, "top_p": 0.0}
    loaded = Engine.load(ckpt)
    p = loaded.resolve(ImageParams(seed=4))
    assert (p.cfg_scale, p.temperature, p.top_k, p.top_p, p.seed) == (6.0, 1.0, 0, 0.0, 4)
    p = loaded.resolve(ImageParams(seed=4, temperature=0.25, top_p=0.9))  # set fields are kept
    assert (p.cfg_scale, p.temperature, p.top_p) == (6.0, 0.25, 0.9)
    assert engine.resolve(None).temperature == OFFICIAL_SAMPLING["temperature"]
    # the defaults change what is drawn exactly as the same values given explicitly do, and results record them
    explicit = ImageParams(seed=5, cfg_scale=6.0, temperature=1.0, top_k=0, top_p=0.0)
    a = loaded.generate_images(["a red circle"], ImageParams(seed=5))[0]
    b = engine.generate_images(["a red circle"], explicit)[0]
    assert a.image.tobytes() == b.image.tobytes() and all(torch.equal(x, y) for x, y in zip(a.bits, b.bits,
                                                                                           strict=True))
    assert a.params == b.params and a.params["temperature"] == 1.0
    c = engine.generate_images(["a red circle"], ImageParams(seed=5))[0]
    assert c.params["temperature"] == 0.5 and c.params["top_p"] == 0.97


@pytest.mark.parametrize("content, message", [
    ('{"temperature": 1.0, "tau": 2}', "unknown field 'tau'"),
    ('{"temperature": -1}', "temperature=-1: expected a number >= 0"),
    ('{"top_p": 1.5}', "top_p=1.5: expected a number in [0, 1]"),
    ('{"top_k": 1.5}', "top_k=1.5: expected an integer >= 0"),
    ('{"cfg_scale": null}', "cfg_scale=None: expected a value"),
    ('{"cfg_scale": "3"}', "cfg_scale='3': expected a number >= 0"),
    ('[1, 2]', "expected a JSON object"),
    ('{"cfg_scale": 3,\n', ":2: malformed JSON"),
])
def test_bad_sampling_defaults_file_names_the_file_and_field(tmp_path, content, message) -> None:
    f = tmp_path / IMAGE_CONFIG_FILE
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        load_sampling_defaults(tmp_path)
    assert str(e.value).startswith(str(f)) and message in str(e.value)


def test_engine_rejects_unknown_sampling_fields(saved) -> None:
    _, engine = saved
    with pytest.raises(ValueError, match="sampling: unknown field 'seed'"):
        Engine(engine.model, engine.processor, sampling={"seed": 3})
    with pytest.raises(ValueError, match="temperature=-2"):
        Engine(engine.model, engine.processor, sampling={"temperature": -2})


def test_convert_keeps_the_sampling_defaults(saved, tmp_path) -> None:
    from typer.testing import CliRunner

    from vargpt.cli import app

    path, _ = saved
    src = tmp_path / "src"
    shutil.copytree(path, src)
    save_sampling_defaults(src, ImageParams(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=0.0))
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert Engine.load(tmp_path / "bf16").sampling == Engine.load(src).sampling != ImageParams(**OFFICIAL_SAMPLING)
