"""Training record formats (LLaMA-Factory sharegpt, SPEC.md §4.4, §4.7) and their validation.

SFT record (understanding, text-to-image, editing)::

    {"messages": [{"role": "user", "content": "Transform this image <image> into a watercolour"},
                  {"role": "assistant", "content": "The output image is: <image_gen>"}],
     "images": ["source.jpg", "edited.jpg"]}

``<image>`` is an understanding input (user turns only), ``<image_gen>`` a generated image (assistant turns only);
``images`` lists one path per placeholder, in placeholder order over the whole conversation. Turns: an optional
system turn first, then user / assistant alternating, starting with user and ending with assistant.

DPO record (one preference pair for image generation)::

    {"conversations": [{"from": "human", "value": "Draw a red cube"}],
     "chosen": {"from": "gpt", "value": "Here it is. <image_gen>"},
     "rejected": {"from": "gpt", "value": "Here it is. <image_gen>"},
     "images": ["chosen.png", "rejected.png"]}

The prompt may hold ``<image>`` placeholders in human turns (then ``images`` = [understanding images...,
chosen, rejected]); each answer holds exactly one ``<image_gen>``.

Files: ``.json`` (one list of records) or ``.jsonl`` (one record per line, blank lines ignored). Relative image
paths are resolved against ``image_root`` (default: the data file's folder). Every problem is a ``RecordError``
naming the file, the record index (and its line), the field path (``messages[2].content``) and what was expected.
Record text may not contain the chat template's special tokens (``<|im_end|>`` ...): they would be parsed as
structure and silently shift the labels.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from vargpt.processing.tokenizer import SPECIAL_TOKEN_TEXT

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_GEN_PLACEHOLDER",
    "RecordError",
    "Message",
    "SFTRecord",
    "DPORecord",
    "LoadedRecords",
    "load_records",
    "parse_record",
    "split_placeholders",
]

IMAGE_PLACEHOLDER = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"
_PLACEHOLDER_RE = re.compile(r"(<image_gen>|<image>)")

RecordKind = Literal["sft", "dpo"]
Task = Literal["text", "understanding", "generation", "editing"]


class RecordError(ValueError):
    """A bad data record. ``str(err)`` = ``"{file}: record {index} (line {line}): {field}: {what}"``."""

    def __init__(self, location: str, field: str, what: str, *, file: str | None = None,
                 index: int | None = None, line: int | None = None) -> None:
        self.location, self.field, self.what = location, field, what
        self.file, self.index, self.line = file, index, line
        super().__init__(f"{location}: {field}: {what}" if field else f"{location}: {what}")


class _Bad(Exception):
    """Internal: a validation failure at ``field`` (the loader adds file / record / line)."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(field, what)
        self.field, self.what = field, what


def _location(file: str, index: int | None, line: int | None) -> str:
    loc = file
    if index is not None:
        loc += f": record {index}"
        if line is not None:
            loc += f" (line {line})"
    elif line is not None:
        loc += f": line {line}"
    return loc


# --------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Message:
    """One chat turn; ``content`` may hold ``<image>`` / ``<image_gen>`` placeholders."""

    role: Literal["system", "user", "assistant"]
    content: str


def split_placeholders(text: str) -> list[str]:
    """``"a <image> b<image_gen>"`` -> ``["a ", "<image>", " b", "<image_gen>"]`` (empty pieces dropped)."""
    return [p for p in _PLACEHOLDER_RE.split(text) if p]


def _placeholders(messages: tuple[Message, ...]) -> tuple[str, ...]:
    return tuple(p for m in messages for p in _PLACEHOLDER_RE.findall(m.content))


@dataclass(frozen=True)
class SFTRecord:
    """A validated SFT conversation; ``images`` are absolute paths, one per placeholder, in order.

    ``source`` locates the record (``"data.jsonl: record 3 (line 4)"``) for errors raised later (collation).
    """

    messages: tuple[Message, ...]
    images: tuple[Path, ...] = ()
    source: str = "<record>"

    @property
    def placeholders(self) -> tuple[str, ...]:
        """``"<image>"`` / ``"<image_gen>"`` in conversation order (matches ``images``)."""
        return _placeholders(self.messages)

    @property
    def task(self) -> Task:
        """``"understanding"`` (only ``<image>``), ``"generation"`` (only ``<image_gen>``), ``"editing"`` (both)
        or ``"text"`` (neither)."""
        kinds = set(self.placeholders)
        if IMAGE_GEN_PLACEHOLDER in kinds:
            return "editing" if IMAGE_PLACEHOLDER in kinds else "generation"
        return "understanding" if kinds else "text"


@dataclass(frozen=True)
class DPORecord:
    """A validated preference pair: a prompt (ends with a user turn) and two answers with one image each."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    prompt_images: tuple[Path, ...]
    chosen_image: Path
    rejected_image: Path
    source: str = "<record>"

    def side(self, which: Literal["chosen", "rejected"]) -> SFTRecord:
        """The prompt + one answer as an SFT conversation."""
        if which not in ("chosen", "rejected"):
            raise ValueError(f"which={which!r}: expected 'chosen' or 'rejected'")
        text, image = (self.chosen, self.chosen_image) if which == "chosen" else (self.rejected, self.rejected_image)
        return SFTRecord(self.prompt + (Message("assistant", text),), self.prompt_images + (image,), self.source)


@dataclass
class LoadedRecords:
    """Result of ``load_records``: the good records, how many were skipped and why (``skip_bad=True``)."""

    records: list[SFTRecord] | list[DPORecord]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.records[i]

    def __iter__(self):
        return iter(self.records)


# ------------------------------------------------------------------------------------------------ validation
def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _require_keys(obj: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """``obj`` is a dict with all ``required`` keys and no key outside ``required + optional``."""
    expected = ", ".join(map(repr, required + optional))
    if not isinstance(obj, dict):
        raise _Bad(where, f"expected an object with {expected}, got {_type_name(obj)}")
    prefix = f"{where}." if where else ""
    for k in obj:
        if k not in required and k not in optional:
            raise _Bad(f"{prefix}{k}", f"unknown field; expected {expected}")
    for k in required:
        if k not in obj:
            raise _Bad(f"{prefix}{k}", f"missing; expected {expected}")


def _check_text(text: Any, where: str, role: str) -> str:
    """A turn's text: a string without template special tokens; placeholders only in the right roles."""
    if not isinstance(text, str):
        raise _Bad(where, f"expected a string, got {_type_name(text)}")
    for tok in SPECIAL_TOKEN_TEXT.values():
        if tok in text:
            raise _Bad(where, f"contains the special token {tok}; the chat template adds special tokens itself "
                              "(write images as <image> / <image_gen>)")
    if IMAGE_GEN_PLACEHOLDER in text and role != "assistant":
        raise _Bad(where, f"{IMAGE_GEN_PLACEHOLDER} (a generated image) may only appear in an assistant turn, "
                          f"found in a {role} turn")
    if IMAGE_PLACEHOLDER in text and role != "user":
        raise _Bad(where, f"{IMAGE_PLACEHOLDER} (an understanding input) may only appear in a user turn, "
                          f"found in a {role} turn")
    return text


def _check_order(roles: list[str], where: str, key: str, user: str, assistant: str, last: str) -> None:
    """Optional system first, then ``user`` / ``assistant`` alternating from ``user``, ending with ``last``."""
    start = 1 if roles and roles[0] == "system" else 0
    if len(roles) == start:
        raise _Bad(where, f"no {user!r} turn; expected an optional 'system' turn, then {user!r} and {assistant!r} "
                          "alternating")
    for j, role in enumerate(roles[start:]):
        want = user if j % 2 == 0 else assistant
        if role != want:
            raise _Bad(f"{where}[{start + j}].{key}",
                       f"expected role {want!r} here (an optional 'system' turn first, then {user!r} and "
                       f"{assistant!r} alternating), got {role!r}")
    if roles[-1] != last:
        raise _Bad(f"{where}[{len(roles) - 1}].{key}",
                   f"the conversation must end with a turn of role {last!r}, got {roles[-1]!r}")


class _ImageChecker:
    """Resolves image paths and (optionally) checks each file once with PIL ``verify``."""

    def __init__(self, root: Path, check: bool) -> None:
        self.root, self.check = root, check
        self._seen: dict[Path, str | None] = {}

    def __call__(self, value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value:
            raise _Bad(where, f"expected an image path (a non-empty string), got {value!r:.80}")
        p = Path(value)
        path = Path(os.path.normpath(p if p.is_absolute() else os.path.abspath(self.root / p)))
        if self.check:
            if path not in self._seen:
                self._seen[path] = _image_problem(path)
            if self._seen[path] is not None:
                raise _Bad(where, self._seen[path])
        return path


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        return f"unreadable image {path} ({type(e).__name__}: {e})"
    return None


def _check_images(obj: dict, placeholders: list[str], images: _ImageChecker) -> tuple[Path, ...]:
    n_img = placeholders.count(IMAGE_PLACEHOLDER)
    n_gen = placeholders.count(IMAGE_GEN_PLACEHOLDER)
    raw = obj.get("images", [])
    if not isinstance(raw, list):
        raise _Bad("images", f"expected a list of image paths, got {_type_name(raw)}")
    if len(raw) != len(placeholders):
        raise _Bad("images", f"{len(raw)} image path(s) for {len(placeholders)} placeholder(s) ({n_img} x "
                             f"{IMAGE_PLACEHOLDER}, {n_gen} x {IMAGE_GEN_PLACEHOLDER}); list one path per "
                             "placeholder, in conversation order")
    return tuple(images(v, f"images[{j}]") for j, v in enumerate(raw))


def _check_meta(obj: dict) -> None:
    """Optional free-form metadata (ignored by training), e.g. a generation prompt's category."""
    if "meta" in obj and not isinstance(obj["meta"], dict):
        raise _Bad("meta", f"expected an object of metadata, got {_type_name(obj['meta'])}")


def _parse_sft(obj: Any, images: _ImageChecker, source: str) -> SFTRecord:
    _require_keys(obj, "", ("messages",), ("images", "meta"))
    _check_meta(obj)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("messages", f"expected a non-empty list of {{role, content}} turns, got {msgs!r:.80}")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        _require_keys(m, where, ("role", "content"))
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise _Bad(f"{where}.role", f"expected 'system', 'user' or 'assistant', got {role!r:.80}")
        out.append(Message(role, _check_text(m["content"], f"{where}.content", role)))
    _check_order([m.role for m in out], "messages", "role", "user", "assistant", "assistant")
    messages = tuple(out)
    paths = _check_images(obj, list(_placeholders(messages)), images)
    return SFTRecord(messages, paths, source)


_DPO_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _parse_dpo(obj: Any, images: _ImageChecker, source: str) -> DPORecord:
    _require_keys(obj, "", ("conversations", "chosen", "rejected", "images"), ("meta", "scores", "seeds"))
    _check_meta(obj)
    conv = obj["conversations"]
    if not isinstance(conv, list) or not conv:
        raise _Bad("conversations", f"expected a non-empty list of {{from, value}} turns, got {conv!r:.80}")
    prompt = []
    for i, m in enumerate(conv):
        where = f"conversations[{i}]"
        _require_keys(m, where, ("from", "value"))
        frm = m["from"]
        if frm not in _DPO_ROLES:
            raise _Bad(f"{where}.from", f"expected 'system', 'human' or 'gpt', got {frm!r:.80}")
        role = _DPO_ROLES[frm]
        text = _check_text(m["value"], f"{where}.value", role)
        if IMAGE_GEN_PLACEHOLDER in text:
            raise _Bad(f"{where}.value", f"a DPO prompt may not contain {IMAGE_GEN_PLACEHOLDER}; only 'chosen' and "
                                         "'rejected' draw an image")
        prompt.append(Message(role, text))
    _check_order([_inverse_role(m.role) for m in prompt], "conversations", "from", "human", "gpt", "human")
    answers = []
    for side in ("chosen", "rejected"):
        a = obj[side]
        _require_keys(a, side, ("from", "value"))
        if a["from"] != "gpt":
            raise _Bad(f"{side}.from", f"expected 'gpt', got {a['from']!r:.80}")
        text = _check_text(a["value"], f"{side}.value", "assistant")
        n = text.count(IMAGE_GEN_PLACEHOLDER)
        if n != 1:
            raise _Bad(f"{side}.value", f"expected exactly one {IMAGE_GEN_PLACEHOLDER} (the image being ranked), "
                                        f"found {n}")
        answers.append(text)
    prompt_t = tuple(prompt)
    ph = list(_placeholders(prompt_t)) + [IMAGE_GEN_PLACEHOLDER, IMAGE_GEN_PLACEHOLDER]
    paths = _check_images(obj, ph, images)
    return DPORecord(prompt_t, answers[0], answers[1], paths[:-2], paths[-2], paths[-1], source)


def _inverse_role(role: str) -> str:
    return {v: k for k, v in _DPO_ROLES.items()}[role]


_PARSERS = {"sft": _parse_sft, "dpo": _parse_dpo}


def parse_record(obj: Any, kind: RecordKind = "sft", *, base_dir: str | Path = ".", check_images: bool = True,
                 source: str = "<record>") -> SFTRecord | DPORecord:
    """Validate one record (a decoded JSON object); relative image paths are resolved against ``base_dir``.

    Raises ``RecordError`` located at ``source``.
    """
    if kind not in _PARSERS:
        raise ValueError(f"kind={kind!r}: expected 'sft' or 'dpo'")
    try:
        return _PARSERS[kind](obj, _ImageChecker(Path(base_dir), check_images), source)
    except _Bad as e:
        raise RecordError(source, e.field, e.what) from None


# ------------------------------------------------------------------------------------------------------ files
def _raw_records(path: Path) -> Iterator[tuple[int, int, Any, RecordError | None]]:
    """(record index, line, decoded object, JSON error) for each record of a ``.json`` / ``.jsonl`` file.

    A malformed ``.jsonl`` line is reported as that record's error; a malformed ``.json`` file cannot be resumed
    after the error and raises.
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(file, "", f"not UTF-8 text ({e})", file=file) from None
    if path.suffix == ".jsonl":
        index = 0
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                yield index, lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield index, lineno, None, RecordError(_location(file, index, lineno), "",
                                                       f"invalid JSON at column {e.colno} ({e.msg})", file=file,
                                                       index=index, line=lineno)
            index += 1
        return
    # .json: one list; decode element by element to know each record's line
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos, line, counted = ws.match(text, 0).end(), 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def fail(i: int, index: int | None, what: str) -> RecordError:
        ln = line_at(i)
        return RecordError(_location(file, index, ln), "", what, file=file, index=index, line=ln)

    if pos >= len(text) or text[pos] != "[":
        raise fail(pos, None, "expected a JSON list of records ('[...]'); use .jsonl for one record per line")
    pos = ws.match(text, pos + 1).end()
    index = 0
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, index, f"invalid JSON ({e.msg}); the file cannot be read past this point") from None
            yield index, line_at(pos), obj, None
            index += 1
            pos = ws.match(text, end).end()
            if pos < len(text) and text[pos] == ",":
                pos = ws.match(text, pos + 1).end()
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, index, "invalid JSON (expected ',' or ']' after a record)")
    pos = ws.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, None, "invalid JSON (extra data after the list of records)")


def load_records(path: str | Path, kind: RecordKind = "sft", *, skip_bad: bool = False, check_images: bool = True,
                 image_root: str | Path | None = None) -> LoadedRecords:
    """Read and validate a ``.json`` / ``.jsonl`` file of SFT or DPO records.

    Args:
        path: the data file.
        kind: ``"sft"`` (``messages`` + ``images``) or ``"dpo"`` (``conversations`` + ``chosen`` + ``rejected`` +
            ``images``).
        skip_bad: skip invalid records (their messages are kept in ``errors``) instead of raising.
        check_images: check that every image exists and passes PIL ``verify`` (off: paths are only resolved).
        image_root: folder that relative image paths are relative to (default: the data file's folder).
    Raises:
        RecordError on the first bad record (``skip_bad=False``) or on a malformed ``.json`` file.
    """
    path = Path(path)
    if kind not in _PARSERS:
        raise ValueError(f"kind={kind!r}: expected 'sft' or 'dpo'")
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: expected a .json (list of records) or .jsonl (one record per line) file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    images = _ImageChecker(Path(image_root) if image_root is not None else path.parent, check_images)
    parse = _PARSERS[kind]
    out = LoadedRecords(records=[])
    for index, line, obj, err in _raw_records(path):
        loc = _location(str(path), index, line)
        if err is None:
            try:
                out.records.append(parse(obj, images, loc))
                continue
            except _Bad as e:
                err = RecordError(loc, e.field, e.what, file=str(path), index=index, line=line)
        if not skip_bad:
            raise err
        out.skipped += 1
        out.errors.append(str(err))
    return out
