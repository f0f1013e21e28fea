"""The Shapes recipe's processor and record helpers: the ViT's input normalisation, the chat template, the
tokenizer's corpus, question kinds, batch groups and the copy records (``vargpt.train.shapes`` re-exports them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from vargpt.data.records import Message, SFTRecord, load_records
from vargpt.data.shapes.grammar import DESCRIBE_QUESTION, key_caption, parse_caption, parse_cell_plan, parse_question
from vargpt.data.shapes.tasks import EDIT_PLAN_REPLY, SplitPaths, build_split, eval_scenes
from vargpt.eval.shapes import EVAL_SEED, editing_items, understanding_items
from vargpt.processing.chat import DEFAULT_SYSTEM
from vargpt.processing.processor import Processor
from vargpt.processing.tokenizer import bpe_tokenizer, char_tokenizer
from vargpt.train.shapes_config import ShapesRunConfig

__all__ = ["SHAPES_IMAGE_MEAN", "SHAPES_IMAGE_STD", "SHAPES_CHAT_TEMPLATE", "GROUP_CHARS", "COPY_INSTRUCTION",
           "COPY_REPLY", "shapes_processor", "shapes_corpus", "question_kind", "batch_group", "copy_records",
           "describe_records", "editing_mix", "ShapesData", "render_split"]


#: The ViT's input normalisation for Shapes images: the white background maps to 0 in every channel. With Qwen2-VL's
#: CLIP statistics the background becomes a large constant that swamps the small objects, and a ViT trained from
#: scratch stayed at chance even on "What color is the {shape}?" over one-object scenes (300 steps: 0.22 first-token
#: accuracy; with std 0.5 0.50 at 300 and 0.92 at 600 steps, with std 0.25 0.78 at 300 and 0.94 at 350, EVAL.md).
SHAPES_IMAGE_MEAN, SHAPES_IMAGE_STD = (1.0, 1.0, 1.0), (0.25, 0.25, 0.25)


#: The Shapes chat template: Qwen2-VL's turns without the default system message ("You are a helpful assistant."
#: is 37 of a question row's ~115 character tokens; a system turn given by the caller is rendered as any other).
#: Saved with the tokenizer (``chat_template.jinja``), so every checkpoint carries the template it was trained with.
SHAPES_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def shapes_processor(cfg, system_turn: bool = True, texts: Iterable[str] | None = None) -> Processor:
    """64 px images are shown to the ViT at 112 x 112 (an 8 x 8 patch grid, 16 LLM tokens), normalised so that the
    white background is 0 (``SHAPES_IMAGE_MEAN`` / ``SHAPES_IMAGE_STD``). Tokenizer: ``texts`` given, BPE merges
    learned on them (``bpe_tokenizer``; the recipe passes ``shapes_corpus`` of its training split), else one token
    per character (the tokenizer of runs 1-6). ``system_turn=False``: the tokenizer carries
    ``SHAPES_CHAT_TEMPLATE`` (no default system turn)."""
    if texts is None:
        tokenizer = char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)
    else:
        tokenizer = bpe_tokenizer(cfg.special_tokens, cfg.text.vocab_size, texts)
    if not system_turn:
        tokenizer.chat_template = SHAPES_CHAT_TEMPLATE
    return Processor(cfg, tokenizer, min_pixels=112 * 112, max_pixels=112 * 112, image_mean=SHAPES_IMAGE_MEAN,
                     image_std=SHAPES_IMAGE_STD)


def shapes_corpus(records) -> list[str]:
    """The texts a Shapes tokenizer learns its merges on: every message of ``records`` (image placeholders removed),
    the role names and the default system message of the chat template."""
    texts = [m.content.replace("<image>", "").replace("<image_gen>", "") for r in records for m in r.messages]
    return texts + ["system", "user", "assistant", DEFAULT_SYSTEM]


#: Characters per length bucket of ``batch_group``.
GROUP_CHARS = 48


def question_kind(record) -> str:
    """The question kind (``QUESTION_KINDS``) of a Shapes understanding record."""
    text = record.messages[0].content
    if not isinstance(text, str):
        raise ValueError(f"not a Shapes question record (its first message is not a string): {record.messages[0]}")
    return parse_question(text.replace("<image>", ""))[0]


def batch_group(record) -> tuple[str, int]:
    """The batch group of an SFT record with ``ShapesRunConfig.length_groups``: its task and the length of its text
    in ``GROUP_CHARS`` buckets, so that a batch of one-word answers is not padded to the length of a caption (with
    the Shapes template, a short-answer batch took 0.19 s against 0.33 s for a mixed one, EVAL.md run 6)."""
    return record.task, sum(len(m.content) for m in record.messages) // GROUP_CHARS


#: The copy task (``copy_records``): not in the Shapes grammar, a training-only aid for editing.
COPY_INSTRUCTION, COPY_REPLY = "Draw this image again.", "Here is the image."


def copy_records(edits: Iterable[SFTRecord]) -> list[SFTRecord]:
    """One copy record per editing record: its source image shown with ``COPY_INSTRUCTION``, and the same image as
    the answer's ``<image_gen>`` -- the decoder learns to redraw what the ViT shows the LLM, the part of every edit
    that the instruction leaves unchanged (EVAL.md "Probes after run 13")."""
    return [SFTRecord((Message("user", f"<image>{COPY_INSTRUCTION}"), Message("assistant", f"{COPY_REPLY}<image_gen>")),
                      (r.images[0], r.images[0]), source=f"copy of {r.source}") for r in edits]


def describe_records(captions: Iterable[SFTRecord], limit: int | None = None, min_objects: int = 2) -> list[SFTRecord]:
    """Questions of kind "describe" about the images of caption records (``build_split(n_captions=...)``): user
    ``<image>`` + ``DESCRIBE_QUESTION``, assistant = the canonical caption of the record's scene, for the first
    ``limit`` (None: all) records whose scene has at least ``min_objects`` objects. The caption images are random
    scenes none of which is an evaluation scene, and the LLM learns to describe scenes of several objects, where it
    attaches attributes to the wrong object (from run 24's final, 1,500 more editing-SFT steps with 2,730 of them:
    describe 0.665 -> 0.799 against the same steps without, EVAL.md "Probe after run 24"). A record whose reply is
    not ``EDIT_PLAN_REPLY`` around a caption or a ``cell_plan`` that parses is refused with its ``source``."""
    if limit is not None and limit < 0:
        raise ValueError(f"describe_records(limit={limit}): expected None or >= 0")
    prefix, suffix = EDIT_PLAN_REPLY.split("{caption}")
    suffix += "<image_gen>"
    out = []
    for r in captions:
        if limit is not None and len(out) >= limit:
            break
        reply = r.messages[-1].content
        text = reply[len(prefix):-len(suffix)] if isinstance(reply, str) and reply.startswith(prefix) \
            and reply.endswith(suffix) else None
        key = (parse_caption(text) or parse_cell_plan(text)) if text else None
        if key is None or len(r.images) != 1:
            raise ValueError(f"{r.source}: not a caption record (expected one image and the reply "
                             f"{EDIT_PLAN_REPLY!r} + '<image_gen>' around a Shapes caption or cell plan), "
                             f"got {reply!r}")
        if len(key) >= min_objects:
            out.append(SFTRecord((Message("user", f"<image>{DESCRIBE_QUESTION}"),
                                  Message("assistant", key_caption(key))), r.images,
                                 source=f"describe of {r.source}"))
    return out


def editing_mix(edits: Sequence[SFTRecord], captions: Sequence[SFTRecord], generation: Sequence[SFTRecord],
                questions: Sequence[SFTRecord], describe: Sequence[SFTRecord] = (), *,
                with_questions: bool = True) -> list[SFTRecord]:
    """The editing SFT's mix: every edit and caption record, as many generation records as edits (the generation
    records repeated in order when there are fewer), and, ``with_questions`` (the LLM training too), as many
    questions as edits (the first ones) and the ``describe`` records. With run 24's split (3,000 edits, 6,000
    generation records) this is its mix: edits, captions, generation records and questions, a quarter each."""
    gen = [generation[i % len(generation)] for i in range(len(edits))] if generation else []
    mix = list(edits) + list(captions) + gen
    return mix + list(questions[: len(edits)]) + list(describe) if with_questions else mix


@dataclasses.dataclass
class ShapesData:
    """A run's training split, as ``render_split`` renders it: ``split`` (``build_split``'s paths), the held-out
    scenes it excludes, and its records read back (``desc``: the describe records of ``caps``)."""

    split: SplitPaths
    held_out: list
    und: list
    single: list
    gen: list
    edi: list
    caps: list
    desc: list


def render_split(run: ShapesRunConfig, data_dir: Path) -> ShapesData:
    """Render ``run``'s training split into ``data_dir`` (the same records on every call: a resumed run renders it
    again), the scenes of the held-out suites excluded."""
    suite_edits = editing_items()
    held_out = [it["scene"] for it in understanding_items()] + [it["scene"] for it in suite_edits]
    held_out += eval_scenes(EVAL_SEED, 10)  # belt and braces
    # no caption record of an edited scene of the suite: it would show the decoder an answer (run 22 excluded these
    # from the whole split, which changed its other records from run 21's)
    split = build_split(data_dir, seed=run.seed + 1, n_understanding=run.n_understanding,
                        n_generation=run.n_generation, n_editing=run.n_editing, exclude=held_out,
                        n_single=run.n_single, gen_layout=run.gen_layout, gen_categories=run.gen_categories(),
                        multi_object_kinds=run.multi_object_questions, n_vertical=run.n_vertical,
                        edit_reply=run.edit_reply, n_captions=run.n_captions,
                        exclude_captions=[it["target"] for it in suite_edits])
    und = load_records(split.understanding).records
    single = load_records(split.understanding_single).records if split.understanding_single else []
    gen = load_records(split.generation).records
    edi = load_records(split.editing).records
    caps = load_records(split.captions).records if split.captions else []
    desc = describe_records(caps, run.n_describe)
    return ShapesData(split, held_out, und, single, gen, edi, caps, desc)
