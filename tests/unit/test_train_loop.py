"""The shared training loop: config validation, data order, exact resume, accumulation, schedule, logging, eval,
checkpoints, bf16. Distributed equivalence is in tests/dist/test_ddp.py."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.dist.synthetic import build_mlp, gen_collate, gen_dataset, mlp_collate, mlp_dataset
from vargpt.train import (
    DataPosition,
    ResumableBatchSampler,
    StepInfo,
    TrainConfig,
    TrainConfigError,
    apply_stage,
    latest_checkpoint,
    train,
)

from .helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class NoisyDataset:
    """The MLP regression set with augmentation noise from python ``random`` and numpy's global RNG (restored on
    resume, like torch's)."""

    def __init__(self, n: int = 20) -> None:
        self.items = mlp_dataset(n)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return x + random.gauss(0, 0.1) + float(np.random.normal(0, 0.1)), y


def _config(tmp_path, name, **kw) -> TrainConfig:
    base = dict(lr=1e-2, max_steps=6, batch_size=3, grad_accum=2, warmup_steps=1, out_dir=str(tmp_path / name), seed=7)
    return TrainConfig(**{**base, **kw})


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("betas", (0.9, 1.0)), ("max_steps", 0), ("grad_accum", 0), ("batch_size", 0),
    ("mixed_precision", "fp16"), ("warmup_steps", 11), ("warmup_ratio", 1.5), ("max_grad_norm", -1.0),
    ("save_every", -1), ("weight_decay", -0.1),
])
def test_train_config_errors_name_the_field(field, value):
    with pytest.raises(TrainConfigError, match=rf"TrainConfig\.{field}:"):
        TrainConfig(**{"max_steps": 10, field: value})


def test_train_config_json_round_trip_and_warmup():
    cfg = TrainConfig(lr=3e-4, betas=(0.8, 0.95), max_steps=33, warmup_ratio=0.1, grad_accum=4, out_dir="runs/x")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.betas == (0.8, 0.95)
    assert cfg.num_warmup_steps == 4  # ceil(0.1 * 33), as transformers' TrainingArguments
    assert TrainConfig(max_steps=33, warmup_steps=5, warmup_ratio=0.5).num_warmup_steps == 5
    with pytest.raises(TrainConfigError, match=r"unknown field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


# ------------------------------------------------------------------------------------------------- data order
def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_sampler_shards_global_batches_and_resumes_mid_epoch():
    n = 22  # global batch 4 -> 5 batches per epoch, 2 samples dropped
    single = _take(ResumableBatchSampler(n, 4, seed=1), 12)
    ranks = [_take(ResumableBatchSampler(n, 2, num_replicas=2, rank=r, seed=1), 12) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == single  # 2 x b == 1 x 2b, batch by batch
    first_epoch = sum(single[:5], [])
    assert len(set(first_epoch)) == 20 and sum(single[5:10], []) != first_epoch  # a fresh permutation per epoch
    pos = DataPosition()
    for _ in range(7):
        pos = pos.advance(n, 4)
    assert pos == DataPosition(1, 8)
    assert _take(ResumableBatchSampler(n, 4, seed=1, start=pos), 5) == single[7:12]
    assert _take(ResumableBatchSampler(n, 2, num_replicas=2, rank=1, seed=1, start=pos), 5) == ranks[1][7:12]
    with pytest.raises(ValueError, match="batch boundary"):
        ResumableBatchSampler(n, 3, seed=1, start=pos)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, num_replicas=2)


def test_grouped_sampler_draws_each_batch_from_one_group_and_resumes():
    groups = [0] * 13 + [1] * 9 + [2] * 6  # 28 samples, global batch 4: 7 windows, at most 2 straddle a boundary
    random.Random(3).shuffle(groups)
    n = len(groups)
    single = _take(ResumableBatchSampler(n, 4, seed=1, groups=groups), 14)
    for epoch in (single[:7], single[7:14]):
        assert sorted(sum(epoch, [])) == list(range(n))  # a permutation of every sample
        mixed = [b for b in epoch if len({groups[i] for i in b}) > 1]
        assert len(mixed) <= 2
        first = [groups[b[0]] for b in epoch]
        assert first != sorted(first)  # the one-group batches come in shuffled order, not group by group
    assert single[:7] != single[7:14]  # a fresh order per epoch
    assert single == _take(ResumableBatchSampler(n, 4, seed=1, groups=groups), 14)  # a pure function of the seed
    ranks = [_take(ResumableBatchSampler(n, 2, num_replicas=2, rank=r, seed=1, groups=groups), 14) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == single  # ranks split the same one-group global batches
    pos = DataPosition(1, 12)
    assert _take(ResumableBatchSampler(n, 4, seed=1, start=pos, groups=groups), 4) == single[10:14]
    with pytest.raises(ValueError, match="groups has 3 entries for 28 samples"):
        ResumableBatchSampler(n, 4, groups=[0, 1, 2])


# ---------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("interrupt", ["stop", "crash"])
def test_interrupted_and_resumed_run_reproduces_the_losses_bit_for_bit(tmp_path, interrupt):
    """6 steps x 2 micro-batches of 3 over 20 samples (an epoch boundary at step 3), dropout in the model, python and
    numpy noise in the data. Interrupted after step 3 -- a callback asking to stop (checkpoint at the stop), or a crash
    in step 4 after the periodic checkpoint of step 3 -- then resumed with fresh model, data and config objects."""
    full = train(build_mlp(dropout=0.3), NoisyDataset(), mlp_collate, _config(tmp_path, "full", save_every=3))

    class Crash(Exception):
        pass

    def interrupt_at_3(info: StepInfo):
        if interrupt == "stop":
            return info.step == 3
        if info.step == 4:
            raise Crash

    cfg = _config(tmp_path, "cut", save_every=3)
    if interrupt == "stop":
        first = train(build_mlp(dropout=0.3), NoisyDataset(), mlp_collate, cfg, callbacks=[interrupt_at_3])
        assert first.stopped_early and first.steps == 3
        losses_before = first.losses
    else:
        with pytest.raises(Crash):
            train(build_mlp(dropout=0.3), NoisyDataset(), mlp_collate, cfg, callbacks=[interrupt_at_3])
        losses_before = json.loads((latest_checkpoint(cfg.out_dir) / "trainer_state.json").read_text())["losses"]
    ckpt = latest_checkpoint(cfg.out_dir)
    assert ckpt.name == "step-00000003"

    model = build_mlp(dropout=0.3)
    with torch.no_grad():  # other trainable weights: the checkpoint must overwrite them
        model.fc1.weight.mul_(2.0)
        model.fc2.bias.add_(1.0)
    resumed = train(model, NoisyDataset(), mlp_collate, _config(tmp_path, "cut", save_every=3), resume=ckpt)
    assert resumed.first_step == 3 and resumed.steps == 6
    assert losses_before + resumed.losses == full.losses  # exact float equality
    a = load_file(str(full.checkpoint / "trainable.safetensors"))
    b = load_file(str(resumed.checkpoint / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the crashed run's step-4 record was dropped
    assert [r["loss"] for r in log] == full.losses
    assert not [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_resume_without_restoring_rng_would_differ(tmp_path):
    """Guards the test above: the dropout and data noise really matter (another seed changes every loss)."""
    a = train(build_mlp(dropout=0.3), NoisyDataset(), mlp_collate, _config(tmp_path, "a", max_steps=2))
    b = train(build_mlp(dropout=0.3), NoisyDataset(), mlp_collate, _config(tmp_path, "b", max_steps=2, seed=8))
    assert all(x != y for x, y in zip(a.losses, b.losses, strict=True))


def test_tiny_vargpt_resume_is_bit_exact_and_checkpoint_is_a_model(tmp_path):
    """Stage 3 of the tiny VARGPT in train mode (drop-path, condition dropout, bitwise self-correction: all global
    RNG): 4 steps x 2 micro-batches vs 2 + resume 2. With ``save_full_model`` the checkpoint loads as a model."""
    from vargpt.checkpoint import load_checkpoint

    def model():
        m = tiny_model()
        apply_stage(m, "stage3")
        return m

    data, collate = gen_dataset(model().config, 6), gen_collate(model().config)
    kw = dict(max_steps=4, batch_size=2, grad_accum=2, lr=1e-3)
    full_model = model()
    full = train(full_model, data, collate, _config(tmp_path, "full", save_full_model=True, **kw))
    cut = _config(tmp_path, "cut", **kw)
    first = train(model(), data, collate, cut, callbacks=[lambda info: info.step == 2])
    second = train(model(), data, collate, cut, resume=first.checkpoint)
    assert first.losses + second.losses == full.losses
    other_seed = train(model(), data, collate, _config(tmp_path, "seed", seed=8, **{**kw, "max_steps": 1}))
    assert other_seed.losses[0] != full.losses[0]  # randomness is present, so the equality above is meaningful

    loaded = load_checkpoint(full.checkpoint)
    sd = full_model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    trained = load_file(str(full.checkpoint / "trainable.safetensors"))
    assert sorted(trained) == sorted(n for n, p in full_model.named_parameters() if p.requires_grad)


def test_resume_checks_the_trainable_set_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    cfg = _config(tmp_path, "run", max_steps=2)
    done = train(build_mlp(), mlp_dataset(20), mlp_collate, cfg)
    with pytest.raises(FileExistsError, match="resume"):
        train(build_mlp(), mlp_dataset(20), mlp_collate, cfg)
    other = build_mlp()
    other.fc1.requires_grad_(False)
    with pytest.raises(ValueError, match="other parameters"):
        train(other, mlp_dataset(20), mlp_collate, cfg, resume=done.checkpoint)
    with pytest.warns(UserWarning, match=r"changed settings \['lr'\]"):
        train(build_mlp(), mlp_dataset(20), mlp_collate, _config(tmp_path, "run", max_steps=2, lr=1.0),
              resume=done.checkpoint)
    with pytest.warns(UserWarning, match="frozen weights differ"):  # frozen weights are not in the checkpoint
        train(build_mlp(seed=5), mlp_dataset(20), mlp_collate, cfg, resume=done.checkpoint)


# ------------------------------------------------------------------------------------------- optimisation
def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """batch 2 x 2 micro-batches == batch 4 (same samples per step by construction of the data order)."""
    a = train(build_mlp(), mlp_dataset(), mlp_collate, _config(tmp_path, "a", batch_size=2, grad_accum=2))
    b = train(build_mlp(), mlp_dataset(), mlp_collate, _config(tmp_path, "b", batch_size=4, grad_accum=1))
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-6, atol=1e-7)
    wa = load_file(str(a.checkpoint / "trainable.safetensors"))
    wb = load_file(str(b.checkpoint / "trainable.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_schedule_clipping_frozen_parameters_and_log(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    model = build_mlp()
    frozen_before = model.frozen.weight.detach().clone()
    cfg = _config(tmp_path, "run", max_steps=8, warmup_steps=3, grad_accum=1, max_grad_norm=0.05, log_every=2)
    result = train(model, mlp_dataset(), mlp_collate, cfg)
    assert torch.equal(model.frozen.weight, frozen_before)
    assert result.trainable == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = get_cosine_schedule_with_warmup(opt, 3, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["lr"] for r in log] == lrs[1::2]  # the rate each logged step used
    assert all(r["grad_norm"] > 0.05 for r in log)  # pre-clip norms: clipping was active
    assert {"loss", "samples_per_s", "epoch"} <= log[0].keys()


def test_the_norm_and_the_clipping_ignore_a_frozen_parameters_stale_gradient(tmp_path):
    """A frozen parameter holding a gradient from before (e.g. a tokenizer trained in place) changes neither the
    logged norm nor the clipped update."""
    runs = {}
    for name, stale in (("clean", None), ("stale", 100.0)):
        model = build_mlp()
        if stale is not None:
            model.frozen.weight.grad = torch.full_like(model.frozen.weight, stale)
        cfg = _config(tmp_path, name, max_steps=3, warmup_steps=0, grad_accum=1, max_grad_norm=0.05, log_every=1)
        train(model, mlp_dataset(), mlp_collate, cfg)
        runs[name] = (_weights(model), [json.loads(line)["grad_norm"]
                                        for line in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    (clean, clean_norms), (stale, stale_norms) = runs["clean"], runs["stale"]
    assert stale_norms == clean_norms and all(n > 0.05 for n in clean_norms)  # clipped, by the same factor
    assert all(torch.equal(clean[k], stale[k]) for k in clean)


def test_module_lr_gives_a_module_its_own_rate_and_the_schedule_scales_both(tmp_path):
    """Adam's first update is -rate * sign(grad) per element (|grad| >> eps): fc2 moves by its own rate, fc1 by lr;
    the longest matching prefix wins; the log's lr is the base group's; a resumed run keeps both rates."""
    before = _weights(build_mlp())
    cfg = _config(tmp_path, "one", max_steps=1, warmup_steps=0, grad_accum=1, max_grad_norm=0.0,
                  module_lr={"fc2": 1e-4, "fc2.bias": 3e-3})
    model = build_mlp()
    train(model, mlp_dataset(), mlp_collate, cfg)
    rates = {"fc1.weight": 1e-2, "fc1.bias": 1e-2, "fc2.weight": 1e-4, "fc2.bias": 3e-3}
    for name, p in model.named_parameters():
        if name in rates:
            step = (p.detach() - before[name]).abs()
            torch.testing.assert_close(step, torch.full_like(step, rates[name]), rtol=1e-3, atol=0)
    log = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == 1e-2
    # the schedule multiplies every group's peak rate alike; an interrupted run resumes on the same per-group rates
    multi = dict(max_steps=6, warmup_steps=2, module_lr={"fc2": 1e-4})
    full = train(build_mlp(), mlp_dataset(), mlp_collate, _config(tmp_path, "full", **multi))
    part = _config(tmp_path, "part", **multi)
    cut = train(build_mlp(), mlp_dataset(), mlp_collate, part, callbacks=[lambda info: info.step == 3])
    rest = train(build_mlp(), mlp_dataset(), mlp_collate, part, resume=cut.checkpoint)
    assert full.losses[3:] == rest.losses
    opt = torch.load(full.checkpoint / "optimizer.pt", weights_only=True)
    assert sorted(g["initial_lr"] for g in opt["param_groups"]) == [1e-4, 1e-4, 1e-2, 1e-2]


@pytest.mark.parametrize("module_lr,match", [
    ({"fc3": 1e-3}, r"prefix\(es\) \['fc3'\] match no trainable parameter"),
    ({"frozen": 1e-3}, r"\['frozen'\] match no trainable"),  # frozen parameters are not trained at any rate
    ({"fc": 1e-3}, r"\['fc'\] match no trainable"),  # a prefix ends at a dot: "fc" is not "fc1"
])
def test_module_lr_prefixes_that_match_nothing_are_errors(tmp_path, module_lr, match):
    with pytest.raises(TrainConfigError, match=match):
        train(build_mlp(), mlp_dataset(), mlp_collate, _config(tmp_path, "x", module_lr=module_lr))


@pytest.mark.parametrize("module_lr", [{"fc2": 0.0}, {"fc2.": 1e-3}, {"": 1e-3}, {"fc2": float("nan")}])
def test_module_lr_values_are_checked(module_lr):
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.module_lr:"):
        TrainConfig(module_lr=module_lr)


def test_eval_fn_runs_in_eval_mode_without_grad(tmp_path):
    seen = []

    def eval_fn(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"w": m.fc2.weight.sum()}

    model = build_mlp()
    result = train(model, mlp_dataset(), mlp_collate, _config(tmp_path, "run", max_steps=5, eval_every=2),
                   eval_fn=eval_fn)
    assert [e["step"] for e in result.evals] == [2, 4, 5] and isinstance(result.evals[0]["w"], float)
    assert seen == [(False, False)] * 3 and model.training
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval/w" in r] == [2, 4, 5]


def test_custom_step_fn_metrics_and_keep_last(tmp_path):
    def step_fn(model, batch):
        loss = model(**batch).loss
        return loss, {"double": 2 * loss}

    cfg = _config(tmp_path, "run", max_steps=4, save_every=1, keep_last_checkpoints=2, grad_accum=1)
    result = train(build_mlp(), mlp_dataset(), mlp_collate, cfg, step_fn=step_fn)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["double"] for r in log] == pytest.approx([2 * x for x in result.losses])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    assert result.checkpoint.name == "step-00000004"


def test_bf16_autocast_through_accelerate(tmp_path):
    """bf16 mixed precision: the step runs under CPU autocast, weights and optimizer state stay fp32; a later fp32
    run in the same process is not blocked by accelerate's process-wide state."""
    seen = []

    def step_fn(model, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return model(**batch).loss, {}

    model = build_mlp()
    result = train(model, mlp_dataset(), mlp_collate, _config(tmp_path, "bf16", max_steps=2, mixed_precision="bf16"),
                   step_fn=step_fn)
    assert all(seen) and len(seen) == 4 and all(np.isfinite(result.losses))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32_seen = []

    def fp32_step(model, batch):
        fp32_seen.append(torch.is_autocast_enabled("cpu"))
        return model(**batch).loss, {}

    train(build_mlp(), mlp_dataset(), mlp_collate, _config(tmp_path, "fp32", max_steps=1), step_fn=fp32_step)
    assert fp32_seen == [False, False]
    # the bf16 run leaves the model as it found it: a later call of its forward, or an fp32 run on it, is fp32
    inside = []
    child = next(m for m in model.modules() if not list(m.children()))
    child.register_forward_pre_hook(lambda *_: inside.append(torch.is_autocast_enabled("cpu")))
    model(**mlp_collate([mlp_dataset()[0]]))
    train(model, mlp_dataset(), mlp_collate, _config(tmp_path, "fp32b", max_steps=1))
    assert inside and not any(inside)


def test_nothing_to_train_and_non_finite_loss_are_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        train(build_mlp().requires_grad_(False), mlp_dataset(), mlp_collate, _config(tmp_path, "a"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train(build_mlp(), mlp_dataset(), mlp_collate, _config(tmp_path, "b"),
              step_fn=lambda m, b: (m(**b).loss * float("nan"), {}))


def test_shipped_accelerate_configs_load_and_leave_the_run_settings_to_train_config():
    from pathlib import Path

    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    expected = {"single_gpu": ("NO", 1), "ddp_8gpu": ("MULTI_GPU", 8), "fsdp_8gpu": ("FSDP", 8),
                "deepspeed_zero3": ("DEEPSPEED", 8), "multinode_example": ("FSDP", 16)}
    assert sorted(p.stem for p in root.glob("*.yaml")) == sorted(expected)
    for name, (kind, procs) in expected.items():
        cfg = load_config_from_file(str(root / f"{name}.yaml"))
        assert (cfg.distributed_type.value, cfg.num_processes) == (kind, procs), name
        raw = yaml.safe_load((root / f"{name}.yaml").read_text())
        assert raw["mixed_precision"] == "no"  # TrainConfig.mixed_precision decides
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(raw.get("deepspeed_config", {}))
