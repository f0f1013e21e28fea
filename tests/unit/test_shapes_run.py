"""`vargpt train shapes --quick`: the whole recipe runs end to end (data -> tokenizer -> stages 1-2 -> stage 3 at
32 and 64 px with DPO rounds -> editing) and leaves loadable checkpoints; `vargpt eval shapes` scores one."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from vargpt.cli import app
from vargpt.engine import Engine
from vargpt.generation.params import SAMPLING_FIELDS, ImageParams
from vargpt.train.shapes import SAMPLING_CANDIDATES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_shapes_run_end_to_end(tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["train", "shapes", "--out", str(tmp_path / "run"), "--quick"])
    assert r.exit_code == 0, r.output
    log = (tmp_path / "run" / "log.txt").read_text()
    for phase in ("data:", "tokenizer:", "stage1:", "stage2_warmup:", "stage2:", "stage3a (first-3)", "stage3b",
                  "stage3c (first-5)", "stage3c: default sampling", "stage3d", "edit:", "done in"):
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
