"""``vargpt train``: recipes run end to end from record files on the tiny preset and leave a ``final/`` checkpoint
that ``Engine.load`` uses; settings resolve recipe < --config < --set < --max-steps; resume is exact; bad input is one
line with exit code 2.

Every run uses ``--gen-schedule first-3`` (64 px targets, the tiny preset's size; the recipes' own 256/512 px
schedules are minutes per step here) and ``mixed_precision=no`` (bf16 autocast is ~40x slower on a CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from typer.testing import CliRunner

from vargpt.checkpoint import save_checkpoint
from vargpt.cli import app
from vargpt.config import get_preset
from vargpt.engine import Engine
from vargpt.generation.params import ImageParams
from vargpt.models.vargpt import VARGPT
from vargpt.processing.processor import Processor
from vargpt.processing.tokenizer import char_tokenizer
from vargpt.train.run_config import TrainCommandError, resolve_config

from .helpers import tiny_model

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 190, 40), "yellow": (230, 210, 30)}
FAST = ["--preset", "tiny", "--gen-schedule", "first-3", "--set", "mixed_precision=no"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four 72 px squares (one per colour) and SFT, DPO and partly-bad SFT files referring to them."""
    d = tmp_path_factory.mktemp("data")
    for name, rgb in COLOURS.items():
        im = Image.new("RGB", (72, 72), "white")
        ImageDraw.Draw(im).rectangle([12, 12, 60, 60], fill=rgb)
        im.save(d / f"{name}.png")
    names = list(COLOURS)
    sft = [{"messages": [{"role": "user", "content": f"Draw a {n} square."},
                         {"role": "assistant", "content": "Here it is: <image_gen>"}], "images": [f"{n}.png"]}
           for n in names]
    dpo = [{"conversations": [{"from": "human", "value": f"Draw a {n} square."}],
            "chosen": {"from": "gpt", "value": "<image_gen>"}, "rejected": {"from": "gpt", "value": "<image_gen>"},
            "images": [f"{n}.png", f"{names[(i + 1) % 4]}.png"]} for i, n in enumerate(names)]
    missing = {"messages": [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": "<image_gen>"}],
               "images": ["missing.png"]}
    bad = [sft[0], missing, *sft[1:]]
    return {"sft": write_jsonl(d / "sft.jsonl", sft), "dpo": write_jsonl(d / "dpo.jsonl", dpo),
            "bad": write_jsonl(d / "bad.jsonl", bad), "dir": d}


def train(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def start_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights ``--preset tiny`` starts from (built under ``manual_seed(TrainConfig.seed)``)."""
    torch.manual_seed(seed)
    return VARGPT(get_preset("tiny")).state_dict()


def changed(final_dir, before=None) -> set[str]:
    """Names of the tensors of ``final_dir`` that differ from ``before`` (default: the ``--preset tiny`` start)."""
    after, before = load_file(str(final_dir / "model.safetensors")), before or start_weights()
    assert after.keys() == before.keys()
    return {k for k in after if not torch.equal(after[k], before[k])}


@pytest.mark.parametrize("recipe, trained", [
    ("stage1", ("gen_proj_in.", "gen_proj_out.", "decoder.start_embedding")),
    ("stage3a", ("gen_proj_in.", "gen_proj_out.", "decoder.")),
])
def test_recipe_run_writes_a_final_checkpoint_the_engine_uses(data, tmp_path, recipe, trained):
    """Three steps; exactly the stage's parameters change (``decoder.uncond_embedding`` trains only under condition
    dropout, which SFT does not use); the checkpoint loads and draws a 64 px image."""
    out = tmp_path / "run"
    r = ok(train(recipe, "--data", data["sft"], "--out", out, *FAST, "--max-steps", 3, "--set", "lr=1e-3"))
    assert f"final checkpoint: {out / 'final'} (step 3" in r.output
    names = changed(out / "final")
    assert names and all(n.startswith(trained) for n in names), sorted(names)[:5]
    assert {n.split(".")[0] for n in names} == {t.split(".")[0] for t in trained}
    run = json.loads((out / "final" / "run.json").read_text())
    assert (run["recipe"], run["steps"], run["gen_schedule"]) == (recipe, 3, "first-3")
    engine = Engine.load(out / "final")
    assert engine.config.gen_schedule == "first-3"
    (img,) = engine.generate_images(["Draw a red square."], ImageParams(seed=0))
    assert img.image.size == (64, 64)


def test_settings_resolve_recipe_then_config_then_set_then_max_steps(data, tmp_path):
    """--set lr / grad_accum reach the TrainConfig saved in the training checkpoint and in final/, over the values of
    --config (which overrides the recipe), and --max-steps wins over both."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lr": 3e-3, "grad_accum": 4, "warmup_steps": 1, "max_steps": 50,
                               "data": {"crop": "center"}}))
    out = tmp_path / "run"
    ok(train("stage1", "--data", data["sft"], "--out", out, *FAST, "--config", cfg, "--set", "lr=1e-3",
             "--set", "grad_accum=2", "--max-steps", 2))
    saved = json.loads((out / "checkpoints" / "step-00000002" / "train_config.json").read_text())
    assert (saved["lr"], saved["grad_accum"], saved["warmup_steps"], saved["max_steps"]) == (1e-3, 2, 1, 2)
    assert (saved["mixed_precision"], saved["batch_size"], saved["out_dir"]) == ("no", 1, str(out))
    final = json.loads((out / "final" / "train_config.json").read_text())
    assert {k: final[k] for k in saved} == saved and final["data"] == {"image_size": None, "crop": "center",
                                                                       "prompt_drop_rate": 0.0}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [0.0, 1e-3]  # one warm-up step, then the peak rate
    # the saved settings are a valid --config for the same recipe
    again = resolve_config("stage1", out_dir=tmp_path / "x", config_file=out / "final" / "train_config.json")
    assert again.train.lr == 1e-3 and again.data.crop == "center"


def test_yaml_config_and_typed_set_values(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 0.002\nbetas: [0.8, 0.9]\ndpo:\n  beta: 0.5\n")
    run = resolve_config("stage3b", out_dir=tmp_path, config_file=cfg,
                         sets=["warmup_steps=none", "dpo.average=true", "eps=1e-6"], max_steps=7)
    t = run.train
    assert (t.lr, t.betas, t.warmup_steps, t.eps, t.max_steps) == (2e-3, (0.8, 0.9), None, 1e-6, 7)
    assert (run.dpo.beta, run.dpo.average, run.lora) == (0.5, True, None)
    run = resolve_config("stage2", out_dir=tmp_path, sets=["lora.targets=llm,decoder", "lora.r=4"], lora=True)
    assert (run.lora.targets, run.lora.r) == (("llm", "decoder"), 4)
    with pytest.raises(TrainCommandError, match=r"cfg.yaml: dpo.beta: expected float, got 'x'"):
        cfg.write_text("dpo:\n  beta: x\n")
        resolve_config("stage3b", out_dir=tmp_path, config_file=cfg)


def test_module_lr_from_set_and_from_a_config_file(tmp_path):
    """``module_lr`` (a dict field): KEY:VALUE pairs on the command line, an object in a file; a bad value names its
    key."""
    run = resolve_config("stage2", out_dir=tmp_path, sets=["module_lr=backbone.lm_head:3e-4, backbone.model:1e-4"])
    assert run.train.module_lr == {"backbone.lm_head": 3e-4, "backbone.model": 1e-4}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"module_lr": {"decoder": 2e-3}}))
    assert resolve_config("stage3a", out_dir=tmp_path, config_file=cfg).train.module_lr == {"decoder": 2e-3}
    assert resolve_config("stage2", out_dir=tmp_path, sets=["module_lr="]).train.module_lr == {}
    for bad in ("decoder", ":1e-3"):
        with pytest.raises(TrainCommandError, match=r"--set module_lr: expected comma-separated KEY:VALUE pairs"):
            resolve_config("stage2", out_dir=tmp_path, sets=[f"module_lr={bad}"])
    with pytest.raises(TrainCommandError, match=r"--set module_lr\['decoder'\]: expected float, got 'fast'"):
        resolve_config("stage2", out_dir=tmp_path, sets=["module_lr=decoder:fast"])
    with pytest.raises(TrainCommandError, match=r"TrainConfig.module_lr: 'decoder': must be a positive number"):
        resolve_config("stage2", out_dir=tmp_path, sets=["module_lr=decoder:-1"])


def test_resume_latest_continues_an_interrupted_run_exactly(data, tmp_path, monkeypatch):
    """A 4-step run stopped after step 2 (as a preempted job: the loop writes a checkpoint and the process ends),
    then ``--resume latest``, ends with the same weights, bit for bit, as an uninterrupted 4-step run.

    The stop is injected through the loop's callbacks, so the interrupted run keeps the 4-step LR schedule. (Ending
    the first run with ``--max-steps 2`` instead changes the schedule: its optimizer state carries the 2-step
    schedule's final rate, 0, into step 3, and the loop warns that the resumed run will not match.)"""
    import vargpt.train.loop as loop

    args = ["stage3a", "--data", data["sft"], *FAST, "--set", "lr=1e-3", "--max-steps", 4]
    ok(train(*args, "--out", tmp_path / "straight"))

    real_train = loop.train

    def stopped_after_2(*a, **kw):
        return real_train(*a, **kw, callbacks=[lambda info: info.step == 2])

    monkeypatch.setattr(loop, "train", stopped_after_2)
    ok(train(*args, "--out", tmp_path / "resumed"))
    monkeypatch.setattr(loop, "train", real_train)
    assert json.loads((tmp_path / "resumed" / "final" / "run.json").read_text())["steps"] == 2

    r = train(*args, "--out", tmp_path / "resumed")  # without --resume: refuses to mix two runs
    assert r.exit_code == 2 and "--resume latest" in r.output
    r = ok(train(*args, "--out", tmp_path / "resumed", "--resume", "latest"))
    assert "resuming " + str(tmp_path / "resumed" / "checkpoints" / "step-00000002") in r.output
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("straight", "resumed")]
    assert logs[0] == logs[1] and len(logs[0]) == 4


def test_bad_record_is_one_line_naming_file_record_and_field(data, tmp_path):
    r = train("stage1", "--data", data["bad"], "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 2 and r.output.count("error:") == 1
    assert f"{data['bad']}: record 1 (line 2): images[0]: image file not found" in r.output
    r = train("stage3b", "--data", data["sft"], "--out", tmp_path / "run", *FAST)  # SFT records for a DPO recipe
    assert r.exit_code == 2 and "record 0 (line 1): messages: unknown field" in r.output
    assert "(recipe stage3b reads DPO records)" in r.output
    assert not (tmp_path / "run").exists()


def test_skip_bad_counts_and_trains_on_the_rest(data, tmp_path):
    r = ok(train("stage1", "--data", data["bad"], "--data", data["sft"], "--out", tmp_path / "run", *FAST,
                 "--skip-bad", "--max-steps", 1))
    assert f"{data['bad']}: skipped 1 bad record(s) (first: {data['bad']}: record 1 (line 2)" in r.output
    assert "data: 8 record(s) from 2 file(s), 1 skipped" in r.output


@pytest.mark.parametrize("args, message", [
    (["--set", "lrr=1"], "--set: unknown key 'lrr'; valid keys: batch_size, betas, eps"),
    (["--set", "dpo.beta=1"], "'dpo.beta' is not used by recipe stage1 (dpo.* applies to DPO recipes"),
    (["--set", "lr=fast"], "--set lr: expected float, got 'fast'"),
    (["--set", "max_steps=0"], "TrainConfig.max_steps: must be >= 1"),
    (["--set", "lr"], "expected KEY=VALUE"),
    (["--resume", "latest"], "--resume latest: no checkpoint under"),
    (["--reference", "x"], "--reference applies to DPO recipes only"),
    (["--preset", "vargpt-v1.1"], "the character tokenizer of --preset suits small vocabularies"),
    (["--init", "nowhere"], "exactly one of --init CHECKPOINT_DIR and --preset NAME"),
    (["--gen-schedule", "2M"], "--gen-schedule 2M"),
])
def test_bad_options_are_one_line_and_exit_code_2(data, tmp_path, args, message):
    r = train("stage1", "--data", data["sft"], "--out", tmp_path / "run", *FAST, *args)
    assert r.exit_code == 2 and message in r.output and r.output.count("error:") == 1, r.output


def test_unknown_recipe_lists_the_recipes(data, tmp_path):
    r = train("stage9", "--data", data["sft"], "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 2 and "unknown recipe 'stage9'; expected one of ['edit', 'stage1'" in r.output
    assert "'vae'" in r.output


def save_start(path, model) -> None:
    """A complete starting checkpoint (weights + character tokenizer), as ``--init`` reads it."""
    save_checkpoint(model, path)
    Processor(model.config, char_tokenizer(model.config.special_tokens, model.config.text.vocab_size)).save(path)


def test_dpo_recipe_from_init_uses_the_reference(data, tmp_path):
    """--init a saved checkpoint. Default reference = the starting weights: policy == reference, so step 1 has the
    DPO loss log 2 exactly. ``--reference`` (the same model with another decoder) moves it off log 2; only the
    stage-3 set trains."""
    init, ref = tmp_path / "init", tmp_path / "ref"
    model = tiny_model(1)
    save_start(init, model)
    ok(train("stage3b", "--data", data["dpo"], "--out", tmp_path / "self", "--init", init, "--gen-schedule",
             "first-3", "--set", "mixed_precision=no", "--max-steps", 1))
    log = json.loads((tmp_path / "self" / "log.jsonl").read_text().splitlines()[0])
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-6) and log["rewards/margin"] == 0.0

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the VAE must stay the policy's (DPOStep checks that both score the same targets)
        for name, p in model.named_parameters():
            if name.startswith("decoder."):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_checkpoint(model, ref)
    out = tmp_path / "run"
    ok(train("stage3b", "--data", data["dpo"], "--out", out, "--init", init, "--gen-schedule", "first-3",
             "--set", "mixed_precision=no", "--reference", ref, "--max-steps", 3, "--set", "lr=1e-3",
             "--set", "dpo.beta=0.5"))
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert abs(losses[0] - math.log(2)) > 1e-3
    run = json.loads((out / "final" / "run.json").read_text())
    assert (run["init"], run["reference"]) == (str(init), str(ref))
    assert json.loads((out / "final" / "train_config.json").read_text())["dpo"]["beta"] == 0.5
    names = changed(out / "final", load_file(str(init / "model.safetensors")))
    assert names and all(n.startswith(("decoder.", "gen_proj_in.", "gen_proj_out.")) for n in names)


def test_vae_recipe_trains_the_tokenizer_from_the_record_images(data, tmp_path):
    """Images of SFT and DPO files (deduplicated: 4), batch 2, 3 steps: only ``vae.*`` changes and the result still
    loads in the engine."""
    out = tmp_path / "run"
    r = ok(train("vae", "--data", data["sft"], "--data", data["dpo"], "--out", out, "--preset", "tiny",
                 "--max-steps", 3, "--set", "batch_size=2", "--set", "vae.commit_weight=0.5"))
    assert "data: 8 record(s) from 2 file(s)" in r.output
    names = changed(out / "final")
    assert names and all(n.startswith("vae.") for n in names)
    cfg = json.loads((out / "final" / "train_config.json").read_text())
    assert cfg["vae"]["commit_weight"] == 0.5 and "prompt_drop_rate" not in cfg["data"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and {"recon", "commit", "codebook_entropy"} <= log[0].keys()
    Engine.load(out / "final").generate_images(["x"], ImageParams(seed=0))


def test_lora_run_saves_a_merged_plain_checkpoint(data, tmp_path):
    """--lora (stage 3 groups: decoder + projectors, rank 4): the adapters are merged, so final/ has the original
    keys and only weights of targeted linear layers differ from the start."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    ok(train("stage3a", "--data", data["sft"], "--out", out, *FAST, "--lora", "--set", "lora.r=4",
             "--set", "lr=1e-2", "--max-steps", 3))
    names = changed(out / "final")
    assert names and all(n.startswith(("decoder.blocks.", "gen_proj_")) and n.endswith(".weight") for n in names)
    Engine.load(out / "final")
