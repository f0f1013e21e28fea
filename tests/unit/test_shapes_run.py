"""`vargpt train shapes --quick`: the whole recipe runs end to end (data -> tokenizer -> stages 1-2 -> stage 3 at
32 and 64 px with DPO rounds -> editing) and leaves loadable checkpoints; `vargpt eval shapes` scores one."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest
import torch
from typer.testing import CliRunner

from vargpt.cli import app
from vargpt.engine import Engine
from vargpt.generation.params import SAMPLING_FIELDS, ImageParams
from vargpt.train.shapes import SAMPLING_CANDIDATES, batch_group, shapes_processor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_shapes_run_end_to_end(tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "run"), "--quick", "--set", "stage1_steps=5"])
    assert r.exit_code == 0, r.output
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "stage1: 5 steps" in log  # --set: a ShapesRunConfig field (quick() has 4)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["stage1_steps"] == 5
    for phase in ("data:", "tokenizer:", "stage1:", "stage2_warmup:", "stage2:", "stage3a (first-3)", "stage3b",
                  "stage3c (first-5)", "stage3c: default sampling", "stage3d", "edit:", "reply:", "edit_dpo:",
                  "edit_dpo_edits:", "done in"):
        assert phase in log, phase
    # the sampling defaults chosen on validation prompts before the last DPO round ship with the DPO checkpoints,
    # those chosen again after the editing SFT with the final one
    chosen = {ckpt: re.search(rf"{phase}: default sampling cfg (\S+) tau (\S+) top-p (\S+)", log).groups()
              for ckpt, phase in (("pre_dpo", "stage3c"), ("post_dpo", "stage3c"), ("final", "edit"))}
    assert log.count("stage3c: sampling cfg") == log.count("edit: sampling cfg") == len(SAMPLING_CANDIDATES)
    for ckpt in ("pre_dpo", "post_dpo", "final"):
        engine = Engine.load(tmp_path / "run" / ckpt)
        assert tuple(map(float, chosen[ckpt])) == (engine.sampling.cfg_scale, engine.sampling.temperature,
                                                   engine.sampling.top_p)
        (img,) = engine.generate_images(["a red circle"], ImageParams(seed=0))
        assert img.image.size == (64, 64)
    assert json.loads((tmp_path / "run" / "final" / "preprocessor_config.json").read_text())["min_pixels"] == 112**2
    r = runner.invoke(app, ["eval", "shapes", "--checkpoint", str(tmp_path / "run" / "final"), "--suite",
                            "generation", "--limit", "1", "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "eval" / "generation.json").read_text())
    assert set(written["scores"]) == {"single_object", "two_objects", "counting", "colors", "position",
                                      "color_attribution", "size", "cell", "overall"}
    # results record the sampling settings: the checkpoint's defaults unless options override them
    defaults = Engine.load(tmp_path / "run" / "final").sampling
    assert {k: written["params"][k] for k in SAMPLING_FIELDS} == {k: getattr(defaults, k) for k in SAMPLING_FIELDS}
    r = runner.invoke(app, ["eval", "shapes", "--checkpoint", str(tmp_path / "run" / "final"), "--suite",
                            "generation", "--limit", "1", "--out", str(tmp_path / "eval2"), "--cfg", "1.5",
                            "--temperature", "0", "--top-p", "0"])
    assert r.exit_code == 0, r.output
    assert "sampling: cfg_scale 1.5, temperature 0.0, top_k 0, top_p 0.0" in r.output
    params = json.loads((tmp_path / "eval2" / "generation.json").read_text())["params"]
    assert (params["cfg_scale"], params["temperature"], params["top_p"], params["top_k"]) == (1.5, 0.0, 0.0,
                                                                                              defaults.top_k)
    r = runner.invoke(app, ["eval", "shapes", "--checkpoint", str(tmp_path / "run" / "final"), "--suite",
                            "generation", "--top-p", "2"])
    assert r.exit_code == 2 and "top_p=2.0: expected a number in [0, 1]" in r.output
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "run"), "--quick"])
    assert r.exit_code == 2 and "not empty" in r.output


@pytest.mark.parametrize(("item", "message"), [
    ("stage1_step=5", "ShapesRunConfig has no field 'stage1_step'"),
    ("stage1_steps=five", "--set stage1_steps: expected int, got 'five'"),
    ("stage2_curriculum=colour:5", "stage2_curriculum[0]='colour:5': unknown question kind"),
    ("stage1_steps", "expected KEY=VALUE"),
    ("preset=tiny", "ShapesRunConfig.preset='tiny': expected one of ('shapes', 'shapes-small')"),
])
def test_shapes_set_errors_name_the_item_and_what_was_expected(tmp_path, item, message) -> None:
    r = CliRunner().invoke(app, ["train", "shapes", "--out", str(tmp_path / "run"), "--set", item])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "run").exists()  # nothing is written before the settings are checked


def test_the_run_trains_the_model_of_its_preset(tmp_path) -> None:
    from vargpt.config import VARGPTConfig, get_preset
    from vargpt.train.shapes import ShapesRunConfig, run_shapes

    run = dataclasses.replace(ShapesRunConfig.quick(), preset="shapes-small")
    assert run_shapes(tmp_path / "run", run, stop_after="stage1") is None
    (snapshot,) = (tmp_path / "run" / "resume").iterdir()
    cfg = VARGPTConfig.load(snapshot / "config.json")
    small, shapes = get_preset("shapes-small"), get_preset("shapes")
    assert (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.decoder.width) == (128, 384, 128)
    assert (cfg.text, cfg.decoder, cfg.vae, cfg.vision) == (small.text, small.decoder, shapes.vae, shapes.vision)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["preset"] == "shapes-small"


def test_fast_recipe_keeps_every_phase_with_fewer_steps(tmp_path) -> None:
    from vargpt.train.shapes import ShapesRunConfig

    full, fast = ShapesRunConfig(), ShapesRunConfig.fast()
    steps = ("vae_steps", "vit_steps", "stage1_steps", "stage2_steps", "stage3c_frozen_steps", "stage3c_steps",
             "edit_steps", "reply_steps", "edit_dpo_prompts", "edit_dpo_edits", "edit_dpo_steps", "sampling_edits")
    for name in steps:  # every phase still runs, shorter
        assert 0 < getattr(fast, name) < getattr(full, name), name
    changed = {f for f in dataclasses.asdict(full) if getattr(full, f) != getattr(fast, f)}
    assert changed == set(steps) | {"monitor_every"}  # the same data, rates and options as the default recipe
    r = CliRunner().invoke(app, ["train", "shapes", "--out", str(tmp_path / "run"), "--quick", "--fast"])
    assert r.exit_code == 2 and "--quick and --fast" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_shapes_template_is_qwen2_vl_without_the_default_system_turn(tmp_path) -> None:
    from vargpt.config import get_preset
    from vargpt.data.collate import SFTCollator
    from vargpt.data.records import Message, SFTRecord
    from vargpt.models.vargpt import IGNORE_INDEX
    from vargpt.processing.chat import render_prompt
    from vargpt.processing.processor import Processor

    cfg = get_preset("shapes")
    assert shapes_processor(cfg).template_source == "built-in Qwen2-VL"  # the shipped recipe's
    shapes_processor(cfg, system_turn=False).save(tmp_path)
    proc = Processor.from_dir(tmp_path, cfg)  # a checkpoint carries the template it was trained with
    assert proc.template_source == "tokenizer chat_template"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle?"}]},
            {"role": "assistant", "content": "no"}, {"role": "user", "content": "Sure?"}]
    builtin = render_prompt(chat)
    assert builtin.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert proc.render(chat) == builtin.removeprefix("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    with_system = [{"role": "system", "content": "Be brief."}, *chat]
    assert proc.render(with_system) == render_prompt(with_system)  # a given system turn renders as before
    # training labels under this template: exactly the answer and its <|im_end|>
    rec = SFTRecord(messages=(Message("user", "Is there a red circle?"), Message("assistant", "no")))
    row = SFTCollator(proc.config, proc).encode(rec)
    ids, labels = row.input_ids, row.labels
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert proc.tokenizer.decode(trained) == "no<|im_end|>"
    assert proc.tokenizer.decode(ids).startswith("<|im_start|>user\nIs there")


def test_batch_group_separates_tasks_and_text_lengths() -> None:
    from vargpt.data.records import Message, SFTRecord

    def rec(question: str, answer: str) -> SFTRecord:
        return SFTRecord(messages=(Message("user", "<image>" + question), Message("assistant", answer)),
                         images=("a.png",))

    short = rec("What color is the square?", "red")  # 7 + 25 + 3 = 35 characters
    caption = rec("Describe the image.", "a small red circle on the left and a large blue square at the bottom")
    assert batch_group(short) == ("understanding", 0)
    assert batch_group(caption) == ("understanding", 1)  # 7 + 19 + 68 = 94 characters
    gen = SFTRecord(messages=(Message("user", "Draw a red circle."), Message("assistant", "Here.<image_gen>")),
                    images=("b.png",))
    assert batch_group(gen) == ("generation", 0)


def test_sampling_choice_keeps_the_earlier_candidate_on_a_float_tie(tmp_path, monkeypatch) -> None:
    # run 6 chose CFG 1.5 over the official settings at "0.055" vs "0.055": the later mean of means was larger in
    # its last bits; a tie must keep the earlier candidate
    import types

    import vargpt.train.shapes as shapes

    overall = iter([0.055, 0.03, 0.0, 0.055 + 1e-15] + [0.04] * (len(SAMPLING_CANDIDATES) - 4))
    monkeypatch.setattr(shapes, "Engine", lambda model, processor, sampling: sampling)
    monkeypatch.setattr(shapes, "run_suite", lambda engine, suite, items: types.SimpleNamespace(
        scores={"overall": next(overall)}))
    model = types.SimpleNamespace(eval=lambda: None)
    run = shapes.ShapesRunConfig(sampling_per_category=1)
    assert shapes._select_sampling(model, None, run, tmp_path, "edit") == SAMPLING_CANDIDATES[0]
    assert "default sampling cfg 3.0 tau 0.5 top-p 0.97" in (tmp_path / "log.txt").read_text()


def test_the_final_sampling_choice_weighs_validation_edits_as_much_as_generation(tmp_path, monkeypatch) -> None:
    # with edits=True (the final checkpoint's choice) a candidate scores the mean of its generation and editing
    # validation scores: here the official settings win on generation alone, CFG 1.5 on the mean
    import types

    import vargpt.train.shapes as shapes
    from vargpt.eval.shapes import editing_items

    gen, edit = (0.92, 0.91, 0.70, 0.89, 0.83), (0.24, 0.25, 0.10, 0.29, 0.20)  # per candidate, in order
    seen = []

    def fake_suite(engine, suite, items):  # the "engine" is its sampling settings here
        seen.append((suite, items))
        return types.SimpleNamespace(scores={"overall": (gen if suite == "generation" else edit)[
            SAMPLING_CANDIDATES.index(engine)]})

    monkeypatch.setattr(shapes, "Engine", lambda model, processor, sampling: sampling)
    monkeypatch.setattr(shapes, "run_suite", fake_suite)
    model = types.SimpleNamespace(eval=lambda: None)
    run = shapes.ShapesRunConfig(sampling_per_category=1, sampling_edits=8)
    for sub in "abc":
        (tmp_path / sub).mkdir()
    assert shapes._select_sampling(model, None, run, tmp_path / "a", "stage3c") == SAMPLING_CANDIDATES[0]
    assert {suite for suite, _ in seen} == {"generation"}
    seen.clear()
    assert shapes._select_sampling(model, None, run, tmp_path / "b", "edit", edits=True) == SAMPLING_CANDIDATES[3]
    # the validation edits: 8, of the four kinds in turn, from the validation seed (not the suite's)
    edits = [items for suite, items in seen if suite == "editing"]
    assert len(edits) == len(SAMPLING_CANDIDATES) and edits[0] == editing_items(8, seed=shapes.VALIDATION_SEED)
    assert edits[0] != editing_items(8)
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "edit: sampling cfg 1.5 tau 1.0 top-p 0.0: validation 0.590 (generation 0.890 on 8 prompts, editing 0.290 " \
           "on 8 edits)" in log
    # sampling_edits=0: generation alone, as in runs 1-23
    seen.clear()
    run = shapes.ShapesRunConfig(sampling_per_category=1, sampling_edits=0)
    assert shapes._select_sampling(model, None, run, tmp_path / "c", "edit", edits=True) == SAMPLING_CANDIDATES[0]
    assert {suite for suite, _ in seen} == {"generation"}
    with pytest.raises(ValueError, match="sampling_edits=-1"):
        shapes.ShapesRunConfig(sampling_edits=-1)


def test_shapes_bpe_processor_trains_on_one_token_answers(tmp_path) -> None:
    from vargpt.config import get_preset
    from vargpt.data.collate import SFTCollator
    from vargpt.data.records import Message, SFTRecord
    from vargpt.models.vargpt import IGNORE_INDEX
    from vargpt.processing.processor import Processor
    from vargpt.train.shapes import ShapesRunConfig, shapes_corpus

    cfg = get_preset("shapes")
    recs = [SFTRecord(messages=(Message("user", "<image>What color is the square?"), Message("assistant", "red"))),
            SFTRecord(messages=(Message("user", "Draw a blue circle."),
                                Message("assistant", "Here is a blue circle.<image_gen>")))]
    corpus = shapes_corpus(recs)
    assert corpus[:4] == ["What color is the square?", "red", "Draw a blue circle.", "Here is a blue circle."]
    assert corpus[4:] == ["system", "user", "assistant", "You are a helpful assistant."]
    shapes_processor(cfg, texts=corpus * 5).save(tmp_path)
    proc = Processor.from_dir(tmp_path, cfg)  # the merges travel with the checkpoint
    rec = SFTRecord(messages=(Message("user", "What color is the square?"), Message("assistant", "red")))
    row = SFTCollator(cfg, proc).encode(rec)
    trained = [t for t, lab in zip(row.input_ids, row.labels, strict=True) if lab != IGNORE_INDEX]
    assert proc.tokenizer.convert_ids_to_tokens(trained) == ["red", "<|im_end|>"]
    # the whole row, system turn and chat markup included, is 3x shorter than in characters (87 -> 28 tokens)
    chars = SFTCollator(cfg, shapes_processor(cfg)).encode(rec)
    assert len(chars.input_ids) == 87 and len(row.input_ids) == 28
    with pytest.raises(ValueError, match="tokenizer='word'"):
        ShapesRunConfig(tokenizer="word")


@pytest.mark.parametrize("edit_llm", [False, True])
def test_edit_llm_decides_whether_the_editing_sft_moves_the_llm(tmp_path, edit_llm) -> None:
    from vargpt.checkpoint import load_model
    from vargpt.train.shapes import ShapesRunConfig, run_shapes

    assert ShapesRunConfig().edit_llm is True  # the shipped recipe (runs 22-23; runs 8-21: False)
    # the True case also sets edit_lr and a stage-2 curriculum (llm_lr, stage3_llm_lr, dpo_bsc: the defaults, 3e-4,
    # 1e-4 and 0; quick()'s 2 stage3c_frozen_steps), the False case edit_lr=None, llm_lr=None, stage3_llm_lr=None,
    # stage3c_frozen_steps=0 and dpo_bsc=None (one quick run per case covers these)
    options = (dict(edit_lr=1e-4, stage2_curriculum=("color:2", "exists+where:3"), stage3_editing=8,
                    stage3_copies=5, edit_reply="caption", n_captions=16, stage3_captions=16,
                    n_describe=100, stage2_describe=3) if edit_llm
               else dict(edit_lr=None, llm_lr=None, stage3_llm_lr=None, stage3c_frozen_steps=0, dpo_bsc=None,
                         edit_reply="fixed", n_captions=0, stage3_editing=0, edit_dpo_prompts=0, edit_dpo_edits=0,
                         reply_steps=0))
    final = run_shapes(tmp_path / "run", dataclasses.replace(ShapesRunConfig.quick(), edit_llm=edit_llm, **options))
    before, after = load_model(tmp_path / "run" / "post_dpo").state_dict(), load_model(final).state_dict()
    llm = [k for k in before if k.startswith("backbone.model.language_model.")]
    kept = all(torch.equal(before[k], after[k]) for k in llm)
    assert llm and kept == (not edit_llm)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    # ``edit_lr``: the editing SFT at its own rate (the shipped recipe: 1e-3, run 30e; runs 23-30: 3e-4; run 21: 1e-6);
    # None: at ``lr``, as stage 3c
    peak = {phase: max(json.loads(line)["lr"] for line in (tmp_path / "run" / phase / "log.jsonl").open())
            for phase in ("edit", "stage3c")}
    assert ShapesRunConfig().edit_lr == 1e-3 and 0 < peak["stage3c"] <= ShapesRunConfig().lr
    # the LLM's own rate there (the shipped recipe: 3e-4, run 31e; runs 22-31: 1e-4)
    assert ShapesRunConfig().edit_llm_lr == 3e-4
    if edit_llm:
        assert peak["edit"] <= 1e-4 < peak["stage3c"]
    else:
        assert peak["edit"] == peak["stage3c"]
    # ``llm_lr``: the LLM's own peak rate in every stage-2 phase (the decoder's stays ``lr``), not in stage 1
    from vargpt.train import latest_checkpoint

    def peak_rates(phase: str) -> set[float]:
        opt = torch.load(latest_checkpoint(tmp_path / "run" / phase) / "optimizer.pt", weights_only=True)
        return {g["initial_lr"] for g in opt["param_groups"]}

    lr = ShapesRunConfig.quick().lr
    assert ShapesRunConfig().llm_lr == 3e-4 and peak_rates("stage1") == {lr}  # the shipped recipe (runs 12-15)
    for phase in ("stage2_warmup", "stage2") + (("stage2_color",) if edit_llm else ()):
        assert peak_rates(phase) == ({lr, 3e-4} if edit_llm else {lr})
    # ``stage3_llm_lr``: stage 3a / 3c train the LLM too, at that rate (None: frozen there, runs 1-12)
    # run 29 (runs 14-28: 1200)
    assert ShapesRunConfig().stage3_llm_lr == 1e-4 and ShapesRunConfig().stage3c_steps == 2000
    for phase in ("stage3a", "stage3c"):
        assert peak_rates(phase) == ({lr, 1e-4} if edit_llm else {lr})
    # ``stage3c_frozen_steps``: a stage-3c phase of the decoder and the projectors alone before it, own schedule
    assert ShapesRunConfig().stage3c_frozen_steps == 1600  # runs 14-21 (run 22: 2400)
    if edit_llm:
        assert peak_rates("stage3c_frozen") == {lr}
        frozen = [json.loads(line) for line in (tmp_path / "run" / "stage3c_frozen" / "log.jsonl").open()]
        assert max(r["step"] for r in frozen) == 2
    log = (tmp_path / "run" / "log.txt").read_text()
    assert ("stage3c_frozen (first-5): 2 steps" in log) == edit_llm
    # stage 3's mix: questions with the LLM trainable; ``n_captions`` captions, ``stage3_editing`` edits and
    # ``stage3_copies`` copy records
    assert ("stage3: 157 records in the mix (64 generation, 16 captions, 64 questions, 8 edits, 5 copies)" if edit_llm
            else "stage3: 64 records in the mix (64 generation, 0 captions, 0 questions, 0 edits, 0 copies)") in log
    assert ("16 caption records (edit replies: caption)" if edit_llm else
            "0 caption records (edit replies: fixed)") in log
    # ``n_describe`` / ``stage2_describe``: describe records of the multi-object caption images (none without them)
    from vargpt.data.records import load_records
    from vargpt.train.shapes import describe_records

    n = len(describe_records(load_records(tmp_path / "run" / "data" / "captions.jsonl").records)) if edit_llm else 0
    assert (n > 3) == edit_llm and f"{n} describe records of the caption images ({min(n, 3)} in stage 2)" in log
    # ``stage2_curriculum``: its phases run in order between the warm-up and stage 2, each for its steps
    phases = [m.group(1) for m in re.finditer(r"\] (stage2\w*(?:\+\w+)*): (\d+) steps", log)]
    assert phases == (["stage2_warmup", "stage2_color", "stage2_exists+where", "stage2"] if edit_llm
                      else ["stage2_warmup", "stage2"])
    if edit_llm:
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "stage2_exists+where" / "log.jsonl").open()]
        assert max(steps) == 3
        # ``edit_dpo_prompts``: a DPO round on the split's first captions after the editing SFT (the shipped recipe:
        # 1,200 prompts, 360 steps at 3e-5, run 31g), before the final sampling choice
        from vargpt.train.shapes import caption_prompts, rerun_editing

        assert (ShapesRunConfig().edit_dpo_prompts, ShapesRunConfig().edit_dpo_steps) == (1200, 360)
        assert re.search(r"edit_dpo: \d+ preference pairs from 4 prompts", log)
        assert log.index("edit_dpo:") > log.index("edit: 3 steps") and log.index("edit_dpo:") < log.index(
            "edit: default sampling")
        pairs = [json.loads(line) for line in (tmp_path / "run" / "edit_dpo" / "pairs" / "pairs.jsonl").open()]
        first = caption_prompts(tmp_path / "run" / "data" / "captions.jsonl")[:4]
        assert pairs and {p["conversations"][0]["value"] for p in pairs} <= set(first)
        # ``edit_dpo_edits``: then one on the split's first edits (the shipped recipe: 1,200 edits, run 31h), each
        # pair with its source image and the record's reply
        assert ShapesRunConfig().edit_dpo_edits == 1200
        assert re.search(r"edit_dpo_edits: \d+ preference pairs from 4 prompts", log)
        assert log.index("edit_dpo: 2 DPO steps") < log.index("edit_dpo_edits:") < log.index("edit: default sampling")
        edits = load_records(tmp_path / "run" / "data" / "editing.jsonl").records[:4]
        asked = {(r.messages[0].content, r.messages[1].content) for r in edits}
        pairs = [json.loads(line) for line in (tmp_path / "run" / "edit_dpo_edits" / "pairs" / "pairs.jsonl").open()]
        assert pairs and {(p["conversations"][0]["value"], p["chosen"]["value"]) for p in pairs} <= asked
        assert all(len(p["images"]) == 3 and p["images"][0].endswith("_input0.png") for p in pairs)
        # from a finished run's final (``start="final"``): the two DPO rounds and the sampling choice alone; they
        # train the decoder and the projectors, not the LLM
        own = dataclasses.replace(ShapesRunConfig.quick(), edit_llm=edit_llm, reply_steps=0, **options)
        refinal = rerun_editing(tmp_path / "run", tmp_path / "refinal", own, start="final")
        relog = (tmp_path / "refinal" / "log.txt").read_text()
        assert "edit_dpo: 2 DPO steps" in relog and "edit_dpo_edits: 2 DPO steps" in relog
        assert "edit: default sampling" in relog and "edit: 3 steps" not in relog
        r = load_model(refinal).state_dict()
        assert all(torch.equal(r[k], after[k]) for k in llm)
        assert any(not torch.equal(r[k], after[k]) for k in r if k.startswith("decoder."))
        # ``reply_steps``: the LLM alone on the replies and questions, on the text loss, after the editing SFT and
        # before the rounds; with the rounds off it moves the LLM and nothing else
        assert log.index("edit: 3 steps") < log.index("reply: 2 steps on 64 records") < log.index("edit_dpo:")
        assert (ShapesRunConfig().reply_steps, ShapesRunConfig().reply_lr) == (3000, 1e-4)  # run 31i
        reply = dataclasses.replace(own, reply_steps=2, edit_dpo_prompts=0, edit_dpo_edits=0)
        rereply = rerun_editing(tmp_path / "run", tmp_path / "rereply", reply, start="final")
        assert re.search(r"reply: 2 steps on 64 records, text loss", (tmp_path / "rereply" / "log.txt").read_text())
        q = load_model(rereply).state_dict()
        assert any(not torch.equal(q[k], after[k]) for k in llm)
        assert all(torch.equal(q[k], after[k]) for k in q if k not in llm)
        with pytest.raises(ValueError, match="reply_steps=2 trains the LLM after the editing SFT"):
            dataclasses.replace(reply, edit_llm=False)
    else:  # ``rerun_editing``: the last two steps again from post_dpo, here at another rate; deterministic
        from vargpt.train.shapes import rerun_editing

        again = dataclasses.replace(ShapesRunConfig.quick(), edit_lr=1e-4, edit_llm=False, edit_dpo_prompts=0,
                                    edit_dpo_edits=0, reply_steps=0)
        finals = [rerun_editing(tmp_path / "run", tmp_path / f"rerun{i}", again) for i in range(2)]
        a, b = (load_model(f).state_dict() for f in finals)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(before[k], a[k]) for k in llm)  # the LLM is post_dpo's
        assert any(not torch.equal(a[k], after[k]) for k in a if k.startswith("decoder."))  # not the run's own edit
        lrs = [json.loads(line)["lr"] for line in (tmp_path / "rerun0" / "edit" / "log.jsonl").open()]
        assert 0 < max(lrs) <= 1e-4
        assert "done in" in (tmp_path / "rerun0" / "log.txt").read_text()
        assert (finals[0] / "image_generation_config.json").is_file()
        # from pre_dpo with the run's own settings, the stage-3d DPO round reproduces the run's post_dpo bit for bit
        # (before the loaded tensors got memory of their own, ``checkpoint._own_memory``, up to 4e-9, and with the
        # clipping over the trained parameters only one candidate image came out otherwise, 1.4e-5; with the SFT
        # phases' bf16 autocast left on the model, as before ``train`` unwrapped it, the in-run policy ran in bf16
        # against an fp32 reference)
        own = dataclasses.replace(ShapesRunConfig.quick(), edit_llm=edit_llm, **options)
        rerun_editing(tmp_path / "run", tmp_path / "rerun3d", own, start="pre_dpo")
        assert "stage3d: 2 DPO steps" in (tmp_path / "rerun3d" / "log.txt").read_text()
        c = load_model(tmp_path / "rerun3d" / "post_dpo").state_dict()
        pre = load_model(tmp_path / "run" / "pre_dpo").state_dict()
        assert max((before[k] - pre[k]).abs().max() for k in pre) > 1e-6  # the round moved the weights
        assert all(torch.equal(c[k], before[k]) for k in before)
        first = json.loads((tmp_path / "run" / "stage3d" / "log.jsonl").open().readline())
        assert first["lr"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference
        with pytest.raises(ValueError, match="start='stage3c'"):
            rerun_editing(tmp_path / "run", tmp_path / "bad", own, start="stage3c")
        # ``dpo_bsc``: the DPO passes' flip rate (None: the model config's 0.3, here); clean teacher forcing moves
        # elsewhere
        assert ShapesRunConfig().dpo_bsc == 0.0 and load_model(final).config.bsc_max_strength == 0.3
        assert (ShapesRunConfig().dpo_prompts, ShapesRunConfig().dpo_steps) == (400, 120)  # runs 14-15: 480
        rerun_editing(tmp_path / "run", tmp_path / "rerun3d0", dataclasses.replace(own, dpo_bsc=0.0),
                      start="pre_dpo")
        d = load_model(tmp_path / "rerun3d0" / "post_dpo").state_dict()
        assert any(not torch.equal(c[k], d[k]) for k in c if k.startswith("decoder."))
        with pytest.raises(ValueError, match=r"dpo_bsc=0.5: expected None .* in \[0, 0.5\)"):
            ShapesRunConfig(dpo_bsc=0.5)


def test_stage2_curriculum_items_are_checked_and_select_their_question_kinds(tmp_path) -> None:
    from vargpt.data.records import load_records
    from vargpt.data.shapes import QUESTION_KINDS
    from vargpt.data.shapes.tasks import build_split
    from vargpt.train.shapes import ShapesRunConfig, question_kind

    assert ShapesRunConfig().stage2_curriculum == ()  # the shipped recipe (run 8)
    assert ShapesRunConfig(stage2_curriculum=("color:800", "exists+where:300")).curriculum() == [
        (("color",), 800), (("exists", "where"), 300)]
    for bad, why in (("color", "expected 'kind\\+kind:steps'"), ("color:0", "steps >= 1"),
                     ("colour:5", r"unknown question kind\(s\) \['colour'\]"), (":5", "expected")):
        with pytest.raises(ValueError, match=rf"stage2_curriculum\[1\]='{bad}'.*{why}"):
            ShapesRunConfig(stage2_curriculum=("shape:1", bad))
    split = build_split(tmp_path, seed=0, n_understanding=120, n_generation=0, n_editing=0)
    records = load_records(split.understanding).records
    kinds = [question_kind(r) for r in records]
    assert set(kinds) == set(QUESTION_KINDS)
    for r, k in zip(records, kinds, strict=True):
        question = r.messages[0].content
        assert question.startswith({"color": "<image>What color is the ", "shape": "<image>What shape is the ",
                                    "count": "<image>How many", "exists": "<image>Is there a",
                                    "where": "<image>Where is the ", "describe": "<image>Describe"}[k]), question


def test_canonical_generation_targets_in_the_split(tmp_path) -> None:
    from PIL import Image

    from vargpt.data.shapes import parse_gen_prompt, read_image
    from vargpt.data.shapes.tasks import build_split
    from vargpt.train.shapes import ShapesRunConfig

    assert ShapesRunConfig().gen_layout == "fixed"  # run 18; runs 8-17: "canonical"
    with pytest.raises(ValueError, match="gen_layout='grid'"):
        ShapesRunConfig(gen_layout="grid")
    for layout in ("canonical", "fixed"):
        split = build_split(tmp_path / layout, seed=0, n_understanding=0, n_generation=16, n_editing=0,
                            gen_layout=layout)
        for rec in map(json.loads, split.generation.read_text().splitlines()):
            category = parse_gen_prompt(rec["meta"]["prompt"]).category
            objs = read_image(Image.open(tmp_path / layout / rec["images"][0]).convert("RGB"))
            if category == "single_object":
                assert [(o.cell, o.size) for o in objs] == [("center", "large")]
                if layout == "fixed":  # the colour the prompt leaves open is the shape's
                    assert objs[0].color == {"circle": "red", "square": "blue", "triangle": "green"}[objs[0].shape]
            if category != "size":
                assert {o.size for o in objs} == {"large"}


def test_multi_object_categories_weigh_more_in_the_generation_split(tmp_path) -> None:
    from collections import Counter

    from vargpt.data.shapes import GEN_CATEGORIES
    from vargpt.data.shapes.grammar import MULTI_OBJECT_CATEGORIES
    from vargpt.data.shapes.tasks import build_split
    from vargpt.train.shapes import ShapesRunConfig

    assert ShapesRunConfig().gen_categories() == GEN_CATEGORIES  # the shipped recipe: uniform (run 8)
    run = ShapesRunConfig(multi_object_weight=2)  # run 9
    assert len(run.gen_categories()) == 12
    with pytest.raises(ValueError, match="multi_object_weight=0"):
        ShapesRunConfig(multi_object_weight=0)
    with pytest.raises(ValueError, match="edit_lr=0.0"):
        ShapesRunConfig(edit_lr=0.0)
    split = build_split(tmp_path, seed=0, n_understanding=0, n_generation=36, n_editing=0,
                        gen_categories=run.gen_categories())
    counts = Counter(json.loads(line)["meta"]["category"] for line in split.generation.open())
    assert counts == {c: 6 if c in MULTI_OBJECT_CATEGORIES else 3 for c in GEN_CATEGORIES}


def test_vertical_position_records_come_after_an_unchanged_split(tmp_path) -> None:
    """``n_vertical``: above/below position records appended to the generation split, each a target that passes the
    scorer, with every other record of the split the same as without them."""
    from PIL import Image

    from vargpt.data.shapes import check_gen, parse_gen_prompt, read_image
    from vargpt.data.shapes.grammar import sample_gen_prompt
    from vargpt.data.shapes.tasks import build_split
    from vargpt.train.shapes import ShapesRunConfig

    for bad in ({"n_vertical": -1}, {"vae_scenes": -1}, {"vae_scenes": 10, "n_understanding": 5}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            ShapesRunConfig(**bad)
    # the shipped recipe's tokenizer learns from 6,000 random scenes too (run 30; runs 1-29 but 19-20: none), and the
    # quick run from 16 of its 64
    assert ShapesRunConfig().vae_scenes == 6000 and ShapesRunConfig.quick().vae_scenes == 16
    with pytest.raises(ValueError, match="relations=.*expected some of"):
        sample_gen_prompt(random.Random(0), "position", relations=("beside",))
    kw = dict(seed=3, n_understanding=4, n_generation=8, n_editing=4, n_single=2, gen_layout="fixed")
    base = build_split(tmp_path / "base", **kw)
    more = build_split(tmp_path / "more", **kw, n_vertical=6)
    for name in ("understanding", "editing", "understanding_single"):
        assert getattr(base, name).read_text() == getattr(more, name).read_text()
    gen = [json.loads(line) for line in more.generation.read_text().splitlines()]
    assert gen[:8] == [json.loads(line) for line in base.generation.read_text().splitlines()]
    relations = []
    for rec in gen[8:]:
        prompt = parse_gen_prompt(rec["meta"]["prompt"])
        relations.append(prompt.p["relation"])
        assert rec["images"][0].startswith("images/v")
        assert check_gen(prompt, read_image(Image.open(tmp_path / "more" / rec["images"][0]).convert("RGB")))
    assert relations == ["above", "below"] * 3


def test_the_shapes_teacher_draws_a_passing_image_per_prompt() -> None:
    """``shapes_teacher``: the DPO teacher candidate passes the scorer for every category, is the same image for
    the same prompt, and follows the layout of the generation targets."""
    import random

    import numpy as np

    from vargpt.data.shapes import GEN_CATEGORIES, check_gen, parse_gen_prompt, read_image, sample_gen_prompt
    from vargpt.train.shapes import shapes_reward, shapes_teacher

    rng = random.Random(0)
    for layout in ("canonical", "random"):
        teacher = shapes_teacher(layout)
        for category in GEN_CATEGORIES:
            for _ in range(5):
                prompt = sample_gen_prompt(rng, category).text
                image = teacher(prompt)
                assert check_gen(parse_gen_prompt(prompt), read_image(image)), (layout, prompt)
                assert shapes_reward(prompt, image) == 1.5
                assert np.array_equal(np.asarray(image), np.asarray(teacher(prompt)))
    canonical = read_image(shapes_teacher("canonical")("a triangle"))
    assert [(o.cell, o.size) for o in canonical] == [("center", "large")]


def test_copy_records_show_the_source_and_ask_for_it_again(tmp_path) -> None:
    """``copy_records``: one editing-task record per edit, whose generation target is the edit's source image, and
    the collator makes the decoder's target from the source image."""
    from PIL import Image

    from vargpt.config import get_preset
    from vargpt.data.collate import SFTCollator, crop_offsets, generation_target, resize_for_crop
    from vargpt.data.records import load_records
    from vargpt.data.shapes.tasks import build_split
    from vargpt.train.shapes import COPY_INSTRUCTION, ShapesRunConfig, copy_records

    # the shipped recipe: none in stage 3's mix (run 22: every edit); no copy records in any full run
    assert (ShapesRunConfig().stage3_editing, ShapesRunConfig().stage3_copies) == (0, 0)
    with pytest.raises(ValueError, match="stage3_copies=-1"):
        ShapesRunConfig(stage3_copies=-1)
    split = build_split(tmp_path, seed=0, n_understanding=0, n_generation=0, n_editing=3)
    edits = load_records(split.editing).records
    copies = copy_records(edits)
    assert [c.images for c in copies] == [(e.images[0], e.images[0]) for e in edits]
    assert all(c.task == "editing" and c.messages[0].content == f"<image>{COPY_INSTRUCTION}" for c in copies)
    assert [e.images[0] != e.images[1] for e in edits] == [True] * 3  # an edit's target is another image
    cfg = get_preset("shapes")
    batch = SFTCollator(cfg, shapes_processor(cfg), crop="center")(copies[:1])
    source = resize_for_crop(Image.open(edits[0].images[0]).convert("RGB"), 64)  # the official resize-crop
    top, left = crop_offsets(source.height, source.width, 64, "center")
    assert torch.equal(batch["gen_pixel_values"][0], generation_target(source, 64, (top, left)))


def test_describe_records_ask_for_the_caption_of_the_multi_object_caption_images(tmp_path) -> None:
    """``describe_records``: "<image>Describe the image." about a caption record's image, answered with its caption,
    for the scenes of two or three objects; the answer is what the scorer reads back from the image."""
    from PIL import Image

    from vargpt.data.records import Message, SFTRecord, load_records
    from vargpt.data.shapes.grammar import DESCRIBE_QUESTION, parse_caption
    from vargpt.data.shapes.scorer import read_image
    from vargpt.data.shapes.tasks import build_split
    from vargpt.train.shapes import ShapesRunConfig, describe_records

    # off by default: run 25 (in both mixes) and run 24's editing SFT with them gained understanding and lost
    # editing (EVAL.md)
    assert (ShapesRunConfig().n_describe, ShapesRunConfig().stage2_describe) == (0, 0)
    for name in ("n_describe", "stage2_describe"):
        with pytest.raises(ValueError, match=f"{name}=-1: expected >= 0"):
            ShapesRunConfig(**{name: -1})
    caps = load_records(build_split(tmp_path, seed=0, n_understanding=0, n_generation=0, n_editing=0,
                                    n_captions=24).captions).records
    desc = describe_records(caps)
    keys = [parse_caption(c.messages[1].content.removeprefix("Here is ").removesuffix(".<image_gen>")) for c in caps]
    assert [c.images for c, k in zip(caps, keys, strict=True) if len(k) >= 2] == [d.images for d in desc]
    assert 0 < len(desc) < len(caps)  # random scenes of 1-3 objects: the one-object ones are left out
    for d in desc:
        assert d.task == "understanding" and d.messages[0] == Message("user", f"<image>{DESCRIBE_QUESTION}")
        read = frozenset((o.shape, o.color, o.size, o.cell) for o in read_image(Image.open(d.images[0])))
        assert parse_caption(d.messages[1].content) == read and len(read) >= 2
    assert describe_records(caps, limit=2) == desc[:2] and describe_records(caps, limit=0) == []
    assert len(describe_records(caps, min_objects=1)) == len(caps)
    bad = SFTRecord((Message("user", "Draw it."), Message("assistant", "Done.<image_gen>")), caps[0].images,
                    source="captions.jsonl: record 7 (line 8)")
    with pytest.raises(ValueError, match=r"captions.jsonl: record 7 \(line 8\): not a caption record .*'Done"):
        describe_records([bad])
    with pytest.raises(ValueError, match="limit=-1"):
        describe_records(caps, limit=-1)
    # caption records whose replies are cell plans (``edit_reply="cells"``): the same describe answers
    planned = load_records(build_split(tmp_path / "cells", seed=0, n_understanding=0, n_generation=0, n_editing=0,
                                       n_captions=24, edit_reply="cells").captions).records
    assert planned[0].messages[1].content.startswith("Here is in the ")
    assert [d.messages for d in describe_records(planned)] == [d.messages for d in desc]


def test_from_run_reads_a_finished_runs_settings_and_names_the_missing_fields(tmp_path) -> None:
    from vargpt.train.shapes import ShapesRunConfig

    saved = dataclasses.asdict(dataclasses.replace(ShapesRunConfig(), edit_steps=7, stage2_curriculum=("color:2",)))
    del saved["n_describe"]  # an option added after the run
    saved["retired_option"] = 1  # an option removed since
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    run, missing = ShapesRunConfig.from_run(tmp_path)
    assert missing == ["n_describe"] and run.n_describe == ShapesRunConfig().n_describe
    assert run == dataclasses.replace(ShapesRunConfig(), edit_steps=7, stage2_curriculum=("color:2",))


def test_editing_mix_takes_a_generation_record_and_a_question_per_edit() -> None:
    from vargpt.train.shapes import ShapesRunConfig
    from vargpt.train.shapes_data import editing_mix

    edits, caps, gen, und, desc = (list(range(k, k + n)) for k, n in ((0, 3), (100, 2), (200, 6), (300, 9), (400, 1)))
    # more generation records than edits: the first ones (run 24's mix, 3,000 edits and 6,000 generation records)
    assert editing_mix(edits, caps, gen, und, desc) == edits + caps + gen[:3] + und[:3] + desc
    assert editing_mix(edits, caps, gen, und, desc, with_questions=False) == edits + caps + gen[:3]
    # fewer: repeated in order, so that each kind keeps its share of the mix
    assert editing_mix(edits, caps, gen[:2], und) == edits + caps + [200, 201, 200] + und[:3]
    assert editing_mix(edits, caps, [], und) == edits + caps + und[:3]
    with pytest.raises(ValueError, match="vae_edits=-1: expected None"):
        ShapesRunConfig(vae_edits=-1)
