"""Training data: record validation (every error names file, record, line and field), collation into
``VARGPT.forward`` kwargs (exact labels, placeholder expansion, target transform, DPO pair layout, prompt dropout),
training positions == the engine's prefill, and an end-to-end forward with a hand-computed text loss."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.config import get_preset
from vargpt.data import DPOCollator, RecordError, SFTCollator, load_records
from vargpt.engine import Engine
from vargpt.generation.text import extend
from vargpt.models.vargpt import IGNORE_INDEX, VARGPT
from vargpt.processing.processor import Processor
from vargpt.processing.tokenizer import char_tokenizer

from .helpers import tiny_model

S, L = 64, 21  # tiny preset: "first-3" schedule (1x1, 2x2, 4x4) -> 64 px targets, 21 decoder tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def proc(cfg) -> Processor:
    return Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size))


def noise_image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_jsonl(path: Path, records: list, blank_lines: bool = False) -> Path:
    lines = [json.dumps(r) for r in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


@pytest.fixture()
def imgs(tmp_path) -> Path:
    """a.png 60x50 (understanding), b.png 100x80 (target), c.png 72x72 (target already at 1.125 S)."""
    noise_image(tmp_path / "a.png", 60, 50, 1)
    noise_image(tmp_path / "b.png", 100, 80, 2)
    noise_image(tmp_path / "c.png", 72, 72, 3)
    return tmp_path


UND = {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cube."}],
       "images": ["a.png"]}
T2I = {"messages": [{"role": "user", "content": "Draw a cube"}, {"role": "assistant", "content": "Here: <image_gen>"}],
       "images": ["b.png"]}
EDIT = {"messages": [{"role": "user", "content": "Make <image> red"},
                     {"role": "assistant", "content": "The output image is: <image_gen>"}],
        "images": ["a.png", "c.png"]}
DPO = {"conversations": [{"from": "human", "value": "Draw a cube"}],
       "chosen": {"from": "gpt", "value": "Here: <image_gen>"},
       "rejected": {"from": "gpt", "value": "Here it is: <image_gen>"},
       "images": ["b.png", "b2.png"]}


def load_one(tmp_path: Path, record: dict, kind: str = "sft"):
    return load_records(write_jsonl(tmp_path / f"one_{kind}.jsonl", [record]), kind).records[0]


# ------------------------------------------------------------------------------------------------- records
def test_json_and_jsonl_load_the_same_records(imgs) -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    recs = [UND, T2I, EDIT, chat]
    text = json.dumps(recs, indent=2)
    (imgs / "d.json").write_text(text)
    line1 = [i for i, ln in enumerate(text.splitlines(), 1) if ln == "  {"][1]  # where record 1 starts
    a = load_records(imgs / "d.json")
    b = load_records(write_jsonl(imgs / "d.jsonl", recs))
    assert [r.messages for r in a] == [r.messages for r in b] and [r.images for r in a] == [r.images for r in b]
    assert [r.task for r in a] == ["understanding", "generation", "editing", "text"]
    assert a[2].images == ((imgs / "a.png").resolve(), (imgs / "c.png").resolve())
    assert a.skipped == 0 and a.errors == []
    assert a[1].source.endswith(f"d.json: record 1 (line {line1})")
    assert b[1].source.endswith("d.jsonl: record 1 (line 2)")


def test_image_root_and_absolute_paths(imgs) -> None:
    sub = imgs / "data"
    sub.mkdir()
    rec = dict(EDIT, images=["a.png", str(imgs / "c.png")])
    path = write_jsonl(sub / "d.jsonl", [rec])
    with pytest.raises(RecordError, match=r"images\[0\]: image file not found"):
        load_records(path)  # relative to data/ by default
    r = load_records(path, image_root=imgs)[0]
    assert r.images == ((imgs / "a.png").resolve(), (imgs / "c.png").resolve())
    assert load_records(path, check_images=False)[0].images[0] == (sub / "a.png").resolve()


def test_dpo_records(imgs) -> None:
    shutil.copy(imgs / "b.png", imgs / "b2.png")
    with_image = dict(DPO, conversations=[{"from": "human", "value": "Like <image> but blue"}],
                      images=["a.png", "b.png", "b2.png"])
    r0, r1 = load_records(write_jsonl(imgs / "p.jsonl", [DPO, with_image]), "dpo")
    assert r0.prompt_images == () and r0.chosen_image.name == "b.png" and r0.rejected_image.name == "b2.png"
    assert r1.prompt_images == ((imgs / "a.png").resolve(),) and r1.rejected == "Here it is: <image_gen>"
    side = r1.side("rejected")
    assert side.task == "editing" and side.images == (r1.prompt_images[0], r1.rejected_image)
    assert [m.role for m in side.messages] == ["user", "assistant"]


def _sft_cases():
    u, a = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    return [
        ({"messages": [u("<image>x"), a("y")], "images": ["missing.png"]}, "images[0]", "not found"),
        ({"messages": [u("<image>x"), a("y")], "images": ["bad.png"]}, "images[0]", "unreadable image"),
        ({"messages": [u("<image> <image>x"), a("y")], "images": ["a.png"]}, "images", "1 image path(s) for 2"),
        ({"messages": [u("x"), a("y <image_gen>")], "images": []}, "images", "0 image path(s) for 1"),
        ({"messages": [u("x"), u("y"), a("z")]}, "messages[1].role", "expected role 'assistant'"),
        ({"messages": [a("x"), u("y")]}, "messages[0].role", "expected role 'user'"),
        ({"messages": [u("x"), a("y"), u("z")]}, "messages[2].role", "must end with a turn of role 'assistant'"),
        ({"messages": [u("x"), {"role": "system", "content": "s"}, a("z")]}, "messages[1].role", "expected role"),
        ({"messages": [u("x <image_gen>"), a("y")], "images": ["a.png"]}, "messages[0].content",
         "only appear in an assistant turn"),
        ({"messages": [u("x"), a("y <image>")], "images": ["a.png"]}, "messages[1].content",
         "only appear in a user turn"),
        ({"messages": [u("x"), a("y")], "foo": 1}, "foo", "unknown field"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}, a("y")]}, "messages[0].name", "unknown field"),
        ({"images": []}, "messages", "missing"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [u("x"), {"role": "assistant"}]}, "messages[1].content", "missing"),
        ({"messages": [u("x"), a(3)]}, "messages[1].content", "expected a string, got int"),
        ({"messages": [{"role": "bot", "content": "x"}, a("y")]}, "messages[0].role", "expected 'system', 'user'"),
        ({"messages": [u("x"), "y"]}, "messages[1]", "expected an object"),
        ({"messages": [u("<image>x"), a("y")], "images": "a.png"}, "images", "expected a list"),
        ({"messages": [u("<image>x"), a("y")], "images": [7]}, "images[0]", "expected an image path"),
        ({"messages": [u("x<|im_end|>"), a("y")]}, "messages[0].content", "special token <|im_end|>"),
    ]


@pytest.mark.parametrize("bad,field,phrase", _sft_cases())
def test_sft_record_errors_name_file_record_line_and_field(imgs, bad, field, phrase) -> None:
    (imgs / "bad.png").write_bytes(b"not an image at all")
    path = write_jsonl(imgs / "train.jsonl", [UND, bad], blank_lines=True)  # the bad record sits on line 3
    with pytest.raises(RecordError) as e:
        load_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record 1 (line 3): {field}: "), msg
    assert phrase in msg and "train.jsonl" in msg
    assert (e.value.index, e.value.line, e.value.field) == (1, 3, field)
    skipped = load_records(path, skip_bad=True)
    assert len(skipped) == 1 and skipped.skipped == 1 and skipped.errors == [msg]


def _dpo_cases():
    g = {"from": "gpt", "value": "ok"}
    return [
        ({k: v for k, v in DPO.items() if k != "chosen"}, "chosen", "missing"),
        (dict(DPO, chosen={"from": "human", "value": "<image_gen>"}), "chosen.from", "expected 'gpt'"),
        (dict(DPO, rejected={"from": "gpt", "value": "no image"}), "rejected.value", "exactly one <image_gen>"),
        (dict(DPO, chosen={"from": "gpt", "value": "<image_gen><image_gen>"}), "chosen.value", "found 2"),
        (dict(DPO, chosen={"from": "gpt", "value": 5}), "chosen.value", "expected a string"),
        (dict(DPO, conversations=[{"from": "human", "value": "x"}, g]), "conversations[1].from",
         "must end with a turn of role 'human'"),
        (dict(DPO, conversations=[{"from": "human", "value": "x <image_gen>"}]), "conversations[0].value",
         "only appear in an assistant turn"),
        (dict(DPO, conversations=[{"from": "user", "value": "x"}]), "conversations[0].from", "expected 'system'"),
        (dict(DPO, images=["b.png"]), "images", "1 image path(s) for 2"),
        (dict(DPO, conversations=[{"from": "human", "value": "<image> x"}]), "images", "2 image path(s) for 3"),
        (dict(DPO, messages=[]), "messages", "unknown field"),
        (dict(DPO, images=["b.png", "nope.png"]), "images[1]", "not found"),
    ]


@pytest.mark.parametrize("bad,field,phrase", _dpo_cases())
def test_dpo_record_errors(imgs, bad, field, phrase) -> None:
    shutil.copy(imgs / "b.png", imgs / "b2.png")
    path = imgs / "pairs.json"
    path.write_text(json.dumps([DPO, bad], indent=1))
    with pytest.raises(RecordError) as e:
        load_records(path, "dpo")
    msg = str(e.value)
    assert f"pairs.json: record 1 (line {e.value.line}): {field}: " in msg and phrase in msg, msg
    assert e.value.line == [i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln == " {"][1]


def test_record_that_is_not_an_object(imgs) -> None:
    path = write_jsonl(imgs / "x.jsonl", [UND, ["not", "a", "record"]])
    with pytest.raises(RecordError, match=r"x\.jsonl: record 1 \(line 2\): expected an object with 'messages'"):
        load_records(path)


def test_malformed_json_names_file_and_line(imgs) -> None:
    jl = imgs / "m.jsonl"
    jl.write_text(json.dumps(UND) + "\n\n{\"messages\": [oops}\n" + json.dumps(T2I) + "\n")
    with pytest.raises(RecordError, match=r"m\.jsonl: record 1 \(line 3\): invalid JSON at column"):
        load_records(jl)
    loaded = load_records(jl, skip_bad=True)
    assert [r.task for r in loaded] == ["understanding", "generation"] and loaded.skipped == 1
    assert loaded[1].source.endswith("m.jsonl: record 2 (line 4)")
    js = imgs / "m.json"
    js.write_text("[\n" + json.dumps(UND) + ",\n" + json.dumps(T2I) + ",\n  {\"messages\": oops}\n]\n")
    for skip in (False, True):  # a broken .json cannot be read past the error
        with pytest.raises(RecordError, match=r"m\.json: record 2 \(line 4\): invalid JSON"):
            load_records(js, skip_bad=skip)
    (imgs / "o.json").write_text(json.dumps(UND))
    with pytest.raises(RecordError, match=r"o\.json: line 1: expected a JSON list"):
        load_records(imgs / "o.json")
    (imgs / "t.json").write_text(json.dumps([UND]) + " []")
    with pytest.raises(RecordError, match=r"t\.json: line 1: invalid JSON \(extra data"):
        load_records(imgs / "t.json")


def test_skip_bad_counts_and_keeps_every_message(imgs) -> None:
    bad1 = dict(UND, images=["missing.png"])
    bad2 = {"messages": [{"role": "assistant", "content": "x"}]}
    path = write_jsonl(imgs / "mix.jsonl", [UND, bad1, T2I, bad2, EDIT])
    loaded = load_records(path, skip_bad=True)
    assert [r.task for r in loaded] == ["understanding", "generation", "editing"]
    assert loaded.skipped == 2
    assert "record 1 (line 2): images[0]" in loaded.errors[0] and "record 3 (line 4): messages[0].role" in \
        loaded.errors[1]
    assert load_records(path, skip_bad=True, check_images=False).skipped == 1  # existence not checked


def test_loader_argument_errors(imgs) -> None:
    with pytest.raises(ValueError, match="expected 'sft' or 'dpo'"):
        load_records(imgs / "x.jsonl", "rm")
    with pytest.raises(ValueError, match=r"\.csv: expected a \.json"):
        load_records(imgs / "x.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        load_records(imgs / "nope.jsonl")


# ------------------------------------------------------------------------------------------------- collation
def test_labels_train_exactly_the_assistant_answers(imgs, cfg, proc) -> None:
    rec = load_one(imgs, {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": "A cube."}, {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Red."}], "images": ["a.png"]})
    batch = SFTCollator(cfg, proc)([rec])
    # a.png is 60 x 50 -> smart_resize 56 x 56 -> grid (1, 4, 4) -> 16 patches, 4 LLM tokens
    ref = proc.image_processor(images=[Image.open(imgs / "a.png").convert("RGB")], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4
            + "<|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\nA cube.<|im_end|>\n"
            "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n")
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids == proc.encode_text(text)
    assert batch["attention_mask"].tolist() == [[1] * len(ids)]
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert proc.decode(trained) == "A cube.<|im_end|>Red.<|im_end|>"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
    # exactly the two answer spans: after "<|im_start|>assistant\n", through <|im_end|>, not the newline after it
    header = proc.encode_text("<|im_start|>assistant\n")
    spans, t = [], 0
    while t < len(ids):
        if ids[t:t + len(header)] == header:
            start = t + len(header)
            end = ids.index(cfg.special_tokens.im_end, start) + 1
            spans.append((start, end))
        t += 1
    expect = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        expect[s:e] = ids[s:e]
    assert labels == expect and len(spans) == 2


@pytest.mark.parametrize("multiple,slots", [(1, 21), (8, 24)])
def test_generation_row_layout(imgs, cfg, proc, multiple, slots) -> None:
    st = cfg.special_tokens
    c = replace(cfg, gen_pad_multiple=multiple)
    batch = SFTCollator(c, Processor(c, proc.tokenizer), crop="center")([load_one(imgs, T2I)])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    s = ids.index(st.image_gen_start)
    assert ids[s + 1:s + 1 + slots] == [st.image_gen_pad] * slots
    assert ids[s + 1 + slots:] == [st.image_gen_end, st.im_end] + proc.encode_text("\n")
    assert labels[s + 1:s + 1 + slots] == [IGNORE_INDEX] * slots
    assert labels[s] == st.image_gen_start and labels[s + 1 + slots:] == [st.image_gen_end, st.im_end, IGNORE_INDEX]
    assert proc.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]) == \
        "Here: <|image_gen_start|><|image_gen_end|><|im_end|>"
    assert batch["gen_pixel_values"].shape == (1, 3, S, S) and "pixel_values" not in batch


def test_mixed_batch_padding_and_image_order(imgs, cfg, proc) -> None:
    recs = [load_one(imgs, r) for r in (EDIT, UND, T2I)]
    batch = SFTCollator(cfg, proc, crop="center")(recs)
    rows = [SFTCollator(cfg, proc, crop="center")([r]) for r in recs]
    st = cfg.special_tokens
    for b, one in enumerate(rows):
        n = one["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][b, :n], one["input_ids"][0])
        assert torch.equal(batch["labels"][b, :n], one["labels"][0])
        assert (batch["input_ids"][b, n:] == st.endoftext).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    # understanding images in row order (EDIT's a.png, then UND's a.png); targets in row order (c.png, b.png)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert torch.equal(batch["gen_pixel_values"], torch.cat([rows[0]["gen_pixel_values"],
                                                             rows[2]["gen_pixel_values"]]))


def _hand_target(img: Image.Image, top: int, left: int) -> torch.Tensor:
    a = np.asarray(img.convert("RGB").crop((left, top, left + S, top + S)), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1


def test_center_crop_target_equals_a_single_lanczos_resample(imgs, cfg, proc) -> None:
    big = noise_image(imgs / "big.png", 600, 520, 4)  # above the official 512 x 512 nearest-neighbour cap
    for name, (w, h) in (("b.png", (90, 72)), ("big.png", (83, 72)), ("c.png", (72, 72))):
        rec = load_one(imgs, dict(T2I, images=[name]))
        got = SFTCollator(cfg, proc, crop="center")([rec])["gen_pixel_values"][0]
        src = Image.open(imgs / name).convert("RGB")
        # shorter side -> round(1.125 * 64) = 72, longer side int(72 * long / short); c.png is already 72 x 72
        resized = src if src.size == (w, h) else src.resize((w, h), Image.Resampling.LANCZOS)
        top, left = round((h - S) / 2), round((w - S) / 2)
        assert torch.equal(got, _hand_target(resized, top, left)), name
        assert got.min() >= -1 and got.max() <= 1
    # the official double resampling (nearest-neighbour area cap, then Lanczos) gives another image
    src = Image.open(big).convert("RGB")
    f = math.sqrt(512 * 512 / (600 * 520))
    capped = src.resize((int(600 * f), int(520 * f)), Image.Resampling.NEAREST)
    official = capped.resize((int(72 * capped.width / capped.height), 72), Image.Resampling.LANCZOS)
    rec = load_one(imgs, dict(T2I, images=["big.png"]))
    ours = SFTCollator(cfg, proc, crop="center")([rec])["gen_pixel_values"][0]
    assert not torch.equal(ours, _hand_target(official, 4, round((official.width - S) / 2)))


def test_random_crop_uses_the_generator(imgs, cfg, proc) -> None:
    noise_image(imgs / "wide.png", 300, 80, 5)  # resized to 270 x 72: 207 x 9 possible windows
    rec = load_one(imgs, dict(T2I, images=["wide.png"]))
    resized = Image.open(imgs / "wide.png").convert("RGB").resize((270, 72), Image.Resampling.LANCZOS)
    outs = []
    for seed in (0, 0, 1):
        got = SFTCollator(cfg, proc, generator=torch.Generator().manual_seed(seed))([rec])["gen_pixel_values"][0]
        g = torch.Generator().manual_seed(seed)
        top = int(torch.randint(0, 72 - S + 1, (1,), generator=g))
        left = int(torch.randint(0, 270 - S + 1, (1,), generator=g))
        assert torch.equal(got, _hand_target(resized, top, left))
        outs.append(got)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_dpo_batch_layout_and_shared_crop(imgs, cfg, proc) -> None:
    noise_image(imgs / "w1.png", 300, 80, 6)
    shutil.copy(imgs / "w1.png", imgs / "w2.png")  # same pixels: equal targets <=> same crop window
    r0 = dict(DPO, images=["w1.png", "w2.png"])
    r1 = dict(DPO, conversations=[{"from": "human", "value": "Like <image> but blue"}],
              images=["a.png", "w2.png", "w1.png"])
    recs = load_records(write_jsonl(imgs / "p.jsonl", [r0, r1]), "dpo").records
    st = cfg.special_tokens
    seen = set()
    for seed in range(4):
        batch = DPOCollator(cfg, proc, generator=torch.Generator().manual_seed(seed))(recs)
        g = batch["gen_pixel_values"]
        assert batch["num_pairs"] == 2 and g.shape == (4, 3, S, S) and batch["input_ids"].shape[0] == 4
        assert torch.equal(g[0], g[2]) and torch.equal(g[1], g[3])
        seen.add(g[0].sum().item())
    assert len(seen) > 1  # the window is random, only shared within a pair
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; the prompt image is in both halves
    sft = SFTCollator(cfg, proc, crop="center")
    expect = [sft.encode(r.side(s)) for s in ("chosen", "rejected") for r in recs]
    batch = DPOCollator(cfg, proc, crop="center")(recs)
    for b, row in enumerate(expect):
        assert batch["input_ids"][b, :len(row.input_ids)].tolist() == row.input_ids
        assert batch["labels"][b, :len(row.labels)].tolist() == row.labels
        assert torch.equal(batch["gen_pixel_values"][b], row.gen_targets[0])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert (batch["input_ids"] == st.image_pad).sum(1).tolist() == [0, 4, 0, 4]


def test_dpo_pair_of_different_sizes_shares_the_relative_window(imgs, cfg, proc) -> None:
    noise_image(imgs / "w1.png", 300, 80, 6)  # -> 270 x 72
    noise_image(imgs / "w3.png", 200, 80, 8)  # -> 180 x 72
    rec = load_one(imgs, dict(DPO, images=["w1.png", "w3.png"]), "dpo")
    g = DPOCollator(cfg, proc, generator=torch.Generator().manual_seed(3))([rec])["gen_pixel_values"]
    r = torch.Generator().manual_seed(3)
    top, left = int(torch.randint(0, 9, (1,), generator=r)), int(torch.randint(0, 207, (1,), generator=r))
    ft, fl = top / 8, left / 206
    for k, (name, w) in enumerate((("w1.png", 270), ("w3.png", 180))):
        resized = Image.open(imgs / name).convert("RGB").resize((w, 72), Image.Resampling.LANCZOS)
        assert torch.equal(g[k], _hand_target(resized, round(ft * 8), round(fl * (w - S))))


def test_prompt_dropout_rate_and_what_it_drops(imgs, cfg, proc) -> None:
    t2i = load_one(imgs, dict(T2I, images=["c.png"]))
    empty = load_one(imgs, {"messages": [{"role": "user", "content": ""}, T2I["messages"][1]], "images": ["c.png"]})
    full_ids = SFTCollator(cfg, proc).encode(t2i).input_ids
    empty_ids = SFTCollator(cfg, proc).encode(empty).input_ids
    col = SFTCollator(cfg, proc, crop="center", generator=torch.Generator().manual_seed(0), prompt_drop_rate=0.25)
    drops = []
    for _ in range(600):
        ids = col.encode(t2i).input_ids
        assert ids in (full_ids, empty_ids)
        drops.append(ids == empty_ids)
    assert abs(np.mean(drops) - 0.25) < 0.06  # binomial sd 0.018
    again = SFTCollator(cfg, proc, crop="center", generator=torch.Generator().manual_seed(0), prompt_drop_rate=0.25)
    assert [again.encode(t2i).input_ids == empty_ids for _ in range(50)] == drops[:50]
    # only single-turn text-to-image records: understanding / editing records keep their prompt
    always = SFTCollator(cfg, proc, crop="center", prompt_drop_rate=1.0)
    assert always.encode(t2i).input_ids == empty_ids
    for r in (UND, EDIT):
        rec = load_one(imgs, r)
        assert always.encode(rec).input_ids == SFTCollator(cfg, proc, crop="center").encode(rec).input_ids


def test_collation_errors(imgs, cfg, proc) -> None:
    path = write_jsonl(imgs / "late.jsonl", [UND, dict(EDIT, images=["a.png", "gone.png"])])
    rec = load_records(path, check_images=False)[1]
    with pytest.raises(RecordError, match=r"late\.jsonl: record 1 \(line 2\): images\[1\]: image file not found"):
        SFTCollator(cfg, proc)([rec])
    with pytest.raises(ValueError, match="image_size=72"):
        SFTCollator(cfg, proc, image_size=72)
    with pytest.raises(ValueError, match="no schedule"):
        SFTCollator(cfg, proc, image_size=48)  # 3x3 latent grid is not a 1:1 step
    with pytest.raises(ValueError, match="crop='top'"):
        SFTCollator(cfg, proc, crop="top")
    with pytest.raises(ValueError, match="prompt_drop_rate"):
        SFTCollator(cfg, proc, prompt_drop_rate=1.5)
    assert SFTCollator(cfg, proc, image_size=32).image_size == 32


# ---------------------------------------------------------------------------------------- model integration
def _mixing_model(cfg) -> VARGPT:
    """Tiny model whose backbone mixes context (unit-variance weights; see test_engine.mixing_model)."""
    model = tiny_model(0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_training_positions_and_states_equal_the_engine_prefill(imgs, cfg, proc) -> None:
    """The prompt part of a training row (through <|image_gen_start|>) gets the engine's M-RoPE positions and
    hence its hidden states (the prefix is causal)."""
    model = _mixing_model(cfg)
    engine = Engine(model, proc)
    st = cfg.special_tokens
    noise_image(imgs / "tall.png", 60, 130, 7)  # non-square grid: M-RoPE height/width ids differ from 1-D
    edit = load_one(imgs, dict(EDIT, images=["tall.png", "c.png"]))
    t2i = load_one(imgs, T2I)
    batch = SFTCollator(cfg, proc, crop="center")([edit, t2i])
    assert "position_ids" not in batch
    with torch.no_grad():
        out = model(**batch)
    pos_train = model.position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    src = Image.open(imgs / "tall.png")
    prompts = [([{"type": "text", "text": "Make "}, {"type": "image", "image": src}, {"type": "text", "text": " red"}],
                "The output image is: "), ("Draw a cube", "Here: ")]
    for b, (content, prefix) in enumerate(prompts):
        enc = proc.encode([{"role": "user", "content": content}], assistant_prefix=prefix)
        enc.input_ids = enc.input_ids + [st.image_gen_start]  # what Engine.generate_images / edit prefill
        n = len(enc.input_ids)
        assert batch["input_ids"][b, :n].tolist() == enc.input_ids
        ids = torch.tensor([enc.input_ids])
        pos_engine = model.position_ids(ids, torch.ones_like(ids), enc.image_grid_thw, mode="mrope")
        assert torch.equal(pos_train[:, b:b + 1, :n], pos_engine)
        session = engine.new_session(1)
        hidden = extend(session, ids, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
        torch.testing.assert_close(out.hidden_BTC[b:b + 1, :n], hidden, atol=1e-5, rtol=1e-5)
        _, last = engine.prefill([replace(enc, input_ids=enc.input_ids[:-1])])  # prefill appends nothing
        torch.testing.assert_close(out.hidden_BTC[b, n - 2], last[0], atol=1e-5, rtol=1e-5)
    # the check is sensitive: official 1-D training positions differ after the understanding image
    pos_1d = model.position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], mode="1d")
    assert not torch.equal(pos_1d[:, 0], pos_train[:, 0])


def test_end_to_end_mixed_batch_losses(imgs, cfg, proc) -> None:
    torch.manual_seed(0)
    model = VARGPT(get_preset("tiny")).eval()
    recs = [load_one(imgs, r) for r in (UND, T2I, EDIT)]
    col = SFTCollator(cfg, proc, generator=torch.Generator().manual_seed(0))
    assert col.encoder.gen_slots == model.gen_slots(L)
    batch = col(recs)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.text_loss) and torch.isfinite(out.bit_loss)
    assert out.gen_labels_NLd.shape == (2, L, cfg.vae.codebook_dim)
    # hand cross-entropy over exactly the label positions (next-token: logits at t predict labels at t + 1)
    logits, labels = out.text_logits_BTV.double(), batch["labels"]
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
             for b in range(labels.shape[0]) for t in range(1, labels.shape[1]) if labels[b, t] != IGNORE_INDEX]
    answers = ["A cube.", "Here: <|image_gen_start|><|image_gen_end|>", "The output image is: "
               "<|image_gen_start|><|image_gen_end|>"]
    assert len(terms) == sum(len(proc.encode_text(a)) + 1 for a in answers)  # + <|im_end|> each
    torch.testing.assert_close(out.text_loss.double(), torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, out.text_loss + cfg.bit_loss_weight * out.bit_loss)
