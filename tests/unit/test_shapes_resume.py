"""`vargpt train shapes` in parts: a run stopped after a phase (``stop_after``) or interrupted goes on from its last
finished phase (``resume``) and ends with what one uninterrupted run computes, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vargpt.cli import app
from vargpt.train.shapes import ShapesRunConfig, ShapesRunError, run_phases, run_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_a_run_in_three_parts_equals_the_uninterrupted_run(tmp_path) -> None:
    run = ShapesRunConfig.quick()
    whole = tmp_path / "whole"
    assert run_shapes(whole, run) == whole / "final"
    parts = tmp_path / "parts"
    # stopped between stage 3c and its DPO round (inside stage 3's loop), then inside the last steps
    assert run_shapes(parts, run, stop_after="stage3c") is None
    state = json.loads(next((parts / "resume").iterdir()).joinpath("state.json").read_text())
    assert state["phases"] == run_phases(run)[: run_phases(run).index("stage3c") + 1]
    assert state["dropout_off"]  # stage 3b's DPO round turned dropout off; the resumed run must keep it off
    assert [p.name for p in (parts / "resume").iterdir()] == [f"{len(state['phases']):02d}-stage3c"]  # the last one
    assert not (parts / "final").exists() and not (parts / "post_dpo").exists()
    assert run_shapes(parts, resume=True, stop_after="edit_dpo") is None
    assert run_shapes(parts, resume=True) == parts / "final"

    for ckpt in ("pre_dpo", "post_dpo", "final"):
        a, b = _weights(whole / ckpt), _weights(parts / ckpt)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), ckpt
        assert (whole / ckpt / "image_generation_config.json").read_text() == \
            (parts / ckpt / "image_generation_config.json").read_text()
    log = (parts / "log.txt").read_text()
    assert "stopped after stage3c" in log and "resumed after stage3c" in log and "resumed after edit_dpo" in log
    assert log.count("stage3d: ") == (whole / "log.txt").read_text().count("stage3d: ")  # no phase ran twice
    # a finished run resumed does nothing more
    n_lines = len(log.splitlines())
    assert run_shapes(parts, resume=True) == parts / "final"
    assert all(torch.equal(a[k], v) for k, v in _weights(parts / "final").items())
    assert [line.split("] ", 1)[1].split(" (")[0] for line in (parts / "log.txt").read_text().splitlines()[n_lines:]
            if "resumed" in line] == ["resumed after final"]


def test_resume_errors_name_what_is_wrong(tmp_path) -> None:
    run = ShapesRunConfig.quick()
    with pytest.raises(ShapesRunError, match="stop_after='stage9': expected one of tokenizer, vit, stage1"):
        run_shapes(tmp_path / "a", run, stop_after="stage9")
    with pytest.raises(ShapesRunError, match="run_config.json not found"):
        run_shapes(tmp_path / "nothing", resume=True)
    assert run_shapes(tmp_path / "b", run, stop_after="tokenizer") is None
    other = ShapesRunConfig.quick()
    other.stage1_steps = 5
    with pytest.raises(ShapesRunError, match=r"settings differ .*stage1_steps=5 \(the run's: 4\)"):
        run_shapes(tmp_path / "b", other, resume=True)
    runner = CliRunner()
    r = runner.invoke(app, ["train", "stage2", "--out", str(tmp_path / "c"), "--data", "x.jsonl",
                            "--stop-after", "vit"])
    assert r.exit_code == 2 and "--stop-after is for the shapes recipe" in r.output
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "b"), "--quick"])
    assert r.exit_code == 2 and "or --resume latest to go on with the run in it" in r.output
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "b"), "--resume", "latest", "--quick"])
    assert r.exit_code == 2 and "keeps the run's own settings" in r.output
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "b"), "--resume", "step-3"])
    assert r.exit_code == 2 and "give --resume latest" in r.output
    with pytest.raises(ShapesRunError, match="stop_after='tokenizer': that phase is done already"):
        run_shapes(tmp_path / "b", resume=True, stop_after="tokenizer")
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "b"), "--resume", "latest",
                            "--stop-after", "vit"])
    assert r.exit_code == 0, r.output
    assert "stopped after vit; go on with: vargpt train shapes" in r.output
    assert [p.name for p in (tmp_path / "b" / "resume").iterdir()] == ["02-vit"]
