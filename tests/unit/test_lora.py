"""LoRA through peft: only adapters train, every targeted module takes effect, merged == unmerged, round trips."""

from __future__ import annotations

import re

import pytest
import torch

from vargpt.checkpoint import load_checkpoint, save_checkpoint
from vargpt.models.vargpt import VARGPT
from vargpt.train.lora import (
    LORA_TARGETS,
    add_lora,
    has_lora,
    load_lora,
    lora_modules,
    merge_lora,
    randomize_lora,
    save_lora,
)

from .helpers import gen_sample, pad_batch, random_images, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(model) -> dict:
    cfg = model.config
    rows = [gen_sample(cfg, [5, 6, 7], [20, 21]), gen_sample(cfg, [8, 9, 10, 11], [22])]
    ids, mask = pad_batch(rows, cfg.special_tokens.endoftext)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                gen_pixel_values=random_images(2))


def _outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()  # clean teacher forcing, no condition dropout
    with torch.no_grad():
        out = model(**batch)
    return out.text_logits_BTV, out.gen_logits_NLV


def test_only_lora_parameters_train_and_start_as_a_no_op():
    model = tiny_model()
    b = _batch(model)
    base = _outputs(model, b)
    add_lora(model, r=4, alpha=8)
    assert isinstance(model, VARGPT)
    names = lora_modules(model)
    assert len(names) == 2 * 7 + 2 * 7  # 2 LLM layers x 7 projections, 2 decoder blocks x 7 linears
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    lora = _outputs(model, b)
    assert torch.equal(base[0], lora[0]) and torch.equal(base[1], lora[1])  # B = 0
    with pytest.raises(ValueError, match="already holds"):
        add_lora(model)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        add_lora(tiny_model(), targets=("vision",))


def test_every_targeted_module_changes_the_outputs():
    """An adapter whose base module is read through ``.weight`` instead of being called would be silently bypassed
    (the decoder attention did that for ``sa.mat_qkv`` and ``ca.mat_kv``): perturb each adapter alone."""
    model = tiny_model()
    b = _batch(model)
    add_lora(model, targets=("llm", "decoder", "projectors"), r=2, alpha=2)
    text0, gen0 = _outputs(model, b)
    wrapped = lora_modules(model)
    assert len(wrapped) == 14 + 14 + 4
    g = torch.Generator().manual_seed(0)
    dead = []
    for name, module in wrapped.items():
        lora_B = module.lora_B["default"].weight
        with torch.no_grad():
            lora_B.copy_(torch.randn(lora_B.shape, generator=g) * 0.5)
        text, gen = _outputs(model, b)
        with torch.no_grad():
            lora_B.zero_()
        text_same = torch.allclose(text, text0, atol=1e-6, rtol=0)
        gen_same = torch.allclose(gen, gen0, atol=1e-6, rtol=0)
        # LLM adapters must change the text logits; decoder and projector adapters the bit logits
        if (text_same if name.startswith("backbone.") else gen_same):
            dead.append(name)
    assert not dead, f"LoRA adapters without effect (module bypassed?): {dead}"
    assert {n.rsplit(".", 1)[-1] for n in wrapped if n.startswith("decoder.")} >= {"mat_qkv", "mat_kv"}


def test_merged_equals_unmerged_after_training_steps_and_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    b = _batch(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, r=4, alpha=8, dropout=0.1)
    randomize_lora(model, std=0.02, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(3):
        loss = model(**b, cond_drop_N=torch.tensor([False, False])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    # base weights untouched (peft keeps them under ``base_layer``)
    sd = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert sd.keys() == base_state.keys() and all(torch.equal(sd[k], base_state[k]) for k in sd)
    text_u, gen_u = _outputs(model, b)

    save_lora(model, tmp_path / "adapter")
    merged = merge_lora(model)
    assert merged is model and not has_lora(merged) and not hasattr(merged, "peft_config")
    assert list(merged.state_dict()) == list(base_state)
    text_m, gen_m = _outputs(merged, b)
    torch.testing.assert_close(text_m, text_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen_m, gen_u, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gen_m, _outputs(tiny_model(), b)[1], atol=1e-3)  # the training did something

    save_checkpoint(merged, tmp_path / "merged")
    loaded = load_checkpoint(tmp_path / "merged")
    text_l, gen_l = _outputs(loaded, b)
    assert torch.equal(text_l, text_m) and torch.equal(gen_l, gen_m)

    # the adapter alone, loaded into a fresh copy of the base model, reproduces the unmerged outputs exactly
    fresh = load_lora(tiny_model(), tmp_path / "adapter")
    text_f, gen_f = _outputs(fresh, b)
    assert torch.equal(text_f, text_u) and torch.equal(gen_f, gen_u)
    assert all(".lora_" in n for n, p in fresh.named_parameters() if p.requires_grad)


def test_target_groups_match_the_full_size_module_names():
    names = ["backbone.model.language_model.layers.27.self_attn.q_proj",
             "backbone.model.language_model.layers.0.mlp.down_proj",
             "decoder.blocks.31.sa.mat_qkv", "decoder.blocks.3.ca.mat_kv", "decoder.blocks.3.ffn.fc2"]
    assert all(any(re.fullmatch(p, n) for p in LORA_TARGETS.values()) for n in names)
    not_targets = ["backbone.model.visual.blocks.0.attn.qkv", "backbone.lm_head", "decoder.head",
                   "decoder.blocks.0.sa.mat_qkv.base_layer", "decoder.shared_ada_lin"]
    assert not any(re.fullmatch(p, n) for p in LORA_TARGETS.values() for n in not_targets)
