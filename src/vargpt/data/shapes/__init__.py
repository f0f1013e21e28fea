"""The Shapes world (SHAPES.md, a contract): scenes and rendering, the scorer, the text grammars and datasets."""

from vargpt.data.shapes.grammar import (
    EDIT_KINDS,
    GEN_CATEGORIES,
    QUESTION_KINDS,
    Edit,
    GenPrompt,
    apply_edit,
    caption,
    check_answer,
    check_gen,
    parse_caption,
    parse_edit,
    parse_gen_prompt,
    parse_question,
    sample_edit,
    sample_gen_prompt,
    sample_question,
    scene_for_prompt,
)
from vargpt.data.shapes.scorer import ReadObj, read_image, relation_holds
from vargpt.data.shapes.world import CELLS, COLORS, SHAPES, SIZES, Obj, Scene, random_scene, render

__all__ = [
    "CELLS", "COLORS", "SHAPES", "SIZES", "Obj", "Scene", "random_scene", "render", "ReadObj", "read_image",
    "relation_holds", "GEN_CATEGORIES", "QUESTION_KINDS", "EDIT_KINDS", "GenPrompt", "Edit", "sample_gen_prompt",
    "parse_gen_prompt", "scene_for_prompt", "check_gen", "sample_question", "parse_question", "check_answer",
    "caption", "parse_caption", "sample_edit", "parse_edit", "apply_edit",
]
