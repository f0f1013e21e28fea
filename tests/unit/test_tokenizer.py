"""The offline tokenizers: ``char_tokenizer`` and ``bpe_tokenizer`` (BPE merges over the character vocabulary)."""

from __future__ import annotations

import dataclasses
import random
import string

import pytest
from transformers import PreTrainedTokenizerFast

from vargpt.config import SpecialTokens
from vargpt.data.shapes import CELLS, COLORS, SHAPES, random_scene, sample_gen_prompt, sample_question
from vargpt.data.shapes.grammar import GEN_CATEGORIES, QUESTION_KINDS
from vargpt.processing.tokenizer import SPECIAL_TOKEN_TEXT, bpe_tokenizer, char_tokenizer

SPECIAL = SpecialTokens.from_base(100)


def shapes_texts(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        scene = random_scene(rng)
        qa = sample_question(rng, scene, QUESTION_KINDS[i % len(QUESTION_KINDS)])
        if qa:
            texts += list(qa)
        texts.append(sample_gen_prompt(rng, GEN_CATEGORIES[i % len(GEN_CATEGORIES)]).text)
    return texts


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return bpe_tokenizer(SPECIAL, 384, shapes_texts())


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_bpe_keeps_the_character_ids_and_the_special_ids(bpe) -> None:
    char = char_tokenizer(SPECIAL, 128)
    for ch in string.printable[:95] + "\n":
        assert ids(bpe, ch) == ids(char, ch)  # one character alone: the same id in both
    for k, v in dataclasses.asdict(SPECIAL).items():
        assert bpe.convert_tokens_to_ids(SPECIAL_TOKEN_TEXT[k]) == v
    assert len(bpe) == 384 and sorted(bpe.get_vocab().values()) == list(range(384))


def test_bpe_makes_every_grammar_word_one_token(bpe) -> None:
    for word in [*COLORS, *SHAPES, *" ".join(CELLS).split(), "color", "there", "image"]:
        assert len(ids(bpe, " " + word)) == 1, word  # inside a sentence: the word with its space
    for word in ("What", "Describe", "Is", "How"):
        assert len(ids(bpe, word)) == 1, word  # a sentence's first word
    q = "What color is the square?"
    assert bpe.convert_ids_to_tokens(ids(bpe, q)) == ["What", " color", " is", " the", " square", "?"]


@pytest.mark.parametrize("text", ["What color is the square?", "a small red circle in the top left, a large blue "
                                  "triangle in the bottom right", "Zebras 1234 ~{}|\\ `x`\nq", "reddish squares"])
def test_bpe_round_trips_any_printable_text(bpe, text) -> None:
    assert bpe.decode(ids(bpe, text)) == text


def test_bpe_unknown_characters_map_to_unk_and_chat_markup_to_specials(bpe) -> None:
    assert bpe.convert_ids_to_tokens(ids(bpe, "é")) == ["<unk>"]
    accented = bpe_tokenizer(SPECIAL, 384, ["café crème"] * 20 + shapes_texts(50))  # é stands alone: no merge
    assert accented.decode(ids(accented, " café crème")) == " caf<unk> cr<unk>me"
    got = ids(bpe, "<|im_start|>user\nHi<|im_end|>")
    assert got[0] == SPECIAL.im_start and got[-1] == SPECIAL.im_end


def test_bpe_is_deterministic_and_reloads(bpe, tmp_path) -> None:
    again = bpe_tokenizer(SPECIAL, 384, shapes_texts())
    assert again.get_vocab() == bpe.get_vocab()
    bpe.save_pretrained(str(tmp_path))
    back = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "Is there a purple triangle? Zebra!"
    assert ids(back, text) == ids(bpe, text) and back.get_vocab() == bpe.get_vocab()


def test_bpe_drops_the_rarest_merges_when_the_vocabulary_is_small() -> None:
    small = bpe_tokenizer(SPECIAL, 130, shapes_texts())  # ids 97..129 less the 11 specials: 22 merges
    full = bpe_tokenizer(SPECIAL, 384, shapes_texts())
    merged = {t for t, i in small.get_vocab().items() if i >= 97 and not t.startswith("<|")}
    assert len(merged) == 22
    assert merged <= set(full.get_vocab())  # the same merges, the first ones (most frequent)
    text = "What shape is the cyan object?"
    assert small.decode(ids(small, text)) == text and len(ids(small, text)) > len(ids(full, text))
    with pytest.raises(ValueError, match="leaves no id for BPE merges"):
        bpe_tokenizer(SPECIAL, 97, ["a b"])
