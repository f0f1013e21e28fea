"""Tokenizers that need no download.

``char_tokenizer`` builds a character-level tokenizer (printable ASCII + newline) on the ``tokenizers`` library for
small-vocabulary models (the ``tiny`` preset), with every special token at the id the model config gives it.
``bpe_tokenizer`` keeps those characters at the same ids and adds BPE merges learned on a corpus (the Shapes model:
every word of its grammar becomes one token, and any other printable text still encodes, character by character).
Both are real ``PreTrainedTokenizerFast`` objects: they save and reload offline with ``save_pretrained`` /
``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vargpt.config import SpecialTokens

__all__ = ["SPECIAL_TOKEN_TEXT", "WORD_PATTERN", "bpe_tokenizer", "char_tokenizer"]

#: Text form of each special token (Qwen2-VL's, plus VARGPT's three generation tokens).
SPECIAL_TOKEN_TEXT: dict[str, str] = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "vision_pad": "<|vision_pad|>",
    "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "image_gen_start": "<|image_gen_start|>",
    "image_gen_end": "<|image_gen_end|>", "image_gen_pad": "<|image_gen_pad|>",
}

_CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline


#: ``bpe_tokenizer``'s pre-tokenizer: a word with its leading space, a number with its leading space, or one other
#: character -- merges never cross a word boundary.
WORD_PATTERN = r" ?[A-Za-z]+| ?[0-9]+|\s|[^\sA-Za-z0-9]"


def _char_vocab(special: SpecialTokens) -> tuple[dict[str, int], dict[int, str]]:
    """The characters at ids 0..95, ``<unk>`` at 96, and the special tokens' ids -> text."""
    ids = dataclasses.asdict(special)
    if len(_CHARS) + 1 > min(ids.values()):
        raise ValueError(f"the character vocabulary needs the special ids above {len(_CHARS)}, got min "
                         f"{min(ids.values())}")
    vocab = {ch: i for i, ch in enumerate(_CHARS)}
    vocab["<unk>"] = len(_CHARS)
    return vocab, {v: SPECIAL_TOKEN_TEXT[k] for k, v in ids.items()}


def _fill(vocab: dict[str, int], specials: dict[int, str], vocab_size: int) -> None:
    """Every id below ``vocab_size`` not yet taken: its special token, or a reserved placeholder."""
    taken = set(vocab.values())
    for i in range(vocab_size):
        if i not in taken:
            vocab[specials.get(i, f"<|reserved_{i}|>")] = i


def _wrap(tok: Tokenizer, special: SpecialTokens) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=SPECIAL_TOKEN_TEXT["endoftext"],
        eos_token=SPECIAL_TOKEN_TEXT["im_end"], pad_token=SPECIAL_TOKEN_TEXT["endoftext"],
        additional_special_tokens=[t for k, t in SPECIAL_TOKEN_TEXT.items() if k not in ("endoftext", "im_end")],
    )
    for k, want in dataclasses.asdict(special).items():
        got = fast.convert_tokens_to_ids(SPECIAL_TOKEN_TEXT[k])
        if got != want:
            raise ValueError(f"special token {SPECIAL_TOKEN_TEXT[k]} at id {got}, the config expects {want}")
    return fast


def char_tokenizer(special: SpecialTokens, vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per character; specials at their configured ids; other ids reserved."""
    vocab, specials = _char_vocab(special)
    _fill(vocab, specials, vocab_size)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok, special)


def bpe_tokenizer(special: SpecialTokens, vocab_size: int, texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """``char_tokenizer``'s characters (same ids) + BPE merges learned on ``texts`` (``tokenizers``' trainer, within
    the words of ``WORD_PATTERN``), in merge order on the free ids below ``vocab_size`` (the special tokens keep
    their configured ids); merges that do not fit are dropped, the rarest first. Deterministic for a given corpus.

    Raises ValueError when ``vocab_size`` leaves no id for a merge."""
    vocab, specials = _char_vocab(special)
    free = [i for i in range(len(vocab), vocab_size) if i not in specials]
    if not free:
        raise ValueError(f"vocab_size={vocab_size} leaves no id for BPE merges (characters and special tokens "
                         f"take ids 0..{max(specials)})")
    pre = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=len(vocab) + len(free), special_tokens=["<unk>"],
                                  initial_alphabet=list(_CHARS), show_progress=False)
    trainer_tok.train_from_iterator(texts, trainer)
    merges = [tuple(m) for m in json.loads(trainer_tok.to_str())["model"]["merges"]][: len(free)]
    for (a, b), i in zip(merges, free, strict=False):  # merges only join ASCII letters / digits (WORD_PATTERN)
        vocab[a + b] = i
    _fill(vocab, specials, vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    return _wrap(tok, special)
