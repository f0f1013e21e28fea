"""The two halves of the editing suite's score, from its JSON (``vargpt eval shapes --suite editing``): how often
the model's reply names the expected scene (as a caption or a cell plan), how often the image reads back as the
scene its reply names, the pass rate where the reply is right, and the pass rate by the number of objects in the
edited scene (EVAL.md run 22), and how often an object a parsed reply names is drawn as named: an object of the same
shape, colour and size in its cell (by size, and for triangles; EVAL.md run 30).

usage: python scripts/edit_breakdown.py runs/evalP_final/editing.json
"""

import json
import sys
from collections import Counter

from vargpt.data.shapes.grammar import parse_caption, parse_cell_plan

items = json.loads(open(sys.argv[1]).read())["items"]
n = len(items)
right = drawn = right_and_pass = 0
by_count, passed = Counter(), Counter()
named_n, named_ok = Counter(), Counter()  # objects the parsed replies name, and those drawn as named
for it in items:
    reply = it.get("reply", "")
    text = reply.removeprefix("Here is ").removesuffix(".") if reply.startswith("Here is ") else None
    named = (parse_caption(text) or parse_cell_plan(text)) if text else None  # edit_reply "caption" or "cells"
    expected = parse_caption(it["expected"])
    right += named == expected
    read = parse_caption(it["read"])  # scene key of the image as read back (None: nothing that parses)
    drawn += named is not None and read == named
    right_and_pass += named == expected and it["pass"]
    if named:
        for obj in named:  # (shape, color, size, cell)
            for group in ("all", obj[2], *(("triangle",) if obj[0] == "triangle" else ())):
                named_n[group] += 1
                named_ok[group] += obj in (read or ())
    by_count[len(expected)] += 1
    passed[len(expected)] += it["pass"]
by_objects = {k: round(passed[k] / by_count[k], 3) for k in sorted(by_count)}
print(f"reply names the expected scene {right / n:.3f}; image reads back as its reply {drawn / n:.3f}; "
      f"pass given a right reply {right_and_pass / max(right, 1):.3f}; pass by objects {by_objects}")
drawn_as_named = {g: round(named_ok[g] / named_n[g], 3) for g in ("all", "small", "large", "triangle") if named_n[g]}
print(f"objects drawn as their reply names them {drawn_as_named}")
