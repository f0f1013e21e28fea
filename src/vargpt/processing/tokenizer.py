"""Tokenizers that need no download.

``char_tokenizer`` builds a character-level tokenizer (printable ASCII + newline) on the ``tokenizers`` library for
small-vocabulary models (the ``tiny`` preset), with every special token at the id the model config gives it. It is
a real ``PreTrainedTokenizerFast``: it saves and reloads offline with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vargpt.config import SpecialTokens

__all__ = ["SPECIAL_TOKEN_TEXT", "char_tokenizer"]

#: Text form of each special token (Qwen2-VL's, plus VARGPT's three generation tokens).
SPECIAL_TOKEN_TEXT: dict[str, str] = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "vision_pad": "<|vision_pad|>",
    "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "image_gen_start": "<|image_gen_start|>",
    "image_gen_end": "<|image_gen_end|>", "image_gen_pad": "<|image_gen_pad|>",
}

_CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline


def char_tokenizer(special: SpecialTokens, vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per character; specials at their configured ids; other ids reserved."""
    ids = dataclasses.asdict(special)
    if len(_CHARS) + 1 > min(ids.values()):
        raise ValueError(f"char_tokenizer needs the special ids above {len(_CHARS)}, got min {min(ids.values())}")
    vocab = {ch: i for i, ch in enumerate(_CHARS)}
    vocab["<unk>"] = len(_CHARS)
    by_id = {v: SPECIAL_TOKEN_TEXT[k] for k, v in ids.items()}
    for i in range(len(vocab), vocab_size):
        vocab[by_id.get(i, f"<|reserved_{i}|>")] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=SPECIAL_TOKEN_TEXT["endoftext"],
        eos_token=SPECIAL_TOKEN_TEXT["im_end"], pad_token=SPECIAL_TOKEN_TEXT["endoftext"],
        additional_special_tokens=[t for k, t in SPECIAL_TOKEN_TEXT.items() if k not in ("endoftext", "im_end")],
    )
    for k, t in SPECIAL_TOKEN_TEXT.items():
        assert fast.convert_tokens_to_ids(t) == ids[k], (k, fast.convert_tokens_to_ids(t), ids[k])
    return fast
