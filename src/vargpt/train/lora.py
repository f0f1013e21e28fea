"""LoRA adapters on the LLM and the visual decoder through ``peft`` (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

``add_lora`` injects ``peft`` LoRA layers in place (``peft.inject_adapter_in_model``): the model stays a ``VARGPT``
(no ``PeftModel`` wrapper), so the engine, ``DPOStep`` and the training loop use it unchanged; only the LoRA
matrices require grad. ``merge_lora`` folds the adapters into the base weights and removes the wrappers, giving a
plain ``VARGPT`` whose state dict has the original keys (``vargpt.checkpoint.save_checkpoint`` /
``load_checkpoint`` work on it). ``save_lora`` / ``load_lora`` write and read the adapter alone in ``peft``'s
format (``adapter_config.json`` + ``adapter_model.safetensors``).

Target groups (module-name regexes, matched in full against names relative to the ``VARGPT`` module):

* ``llm``: ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`` of every layer of
  ``backbone.model.language_model``;
* ``decoder``: ``sa.mat_qkv, sa.proj, ca.mat_q, ca.mat_kv, ca.proj, ffn.fc1, ffn.fc2`` of every block of
  ``decoder.blocks``;
* ``projectors``: ``fc1, fc2`` of ``gen_proj_in`` and ``gen_proj_out``.

An adapter takes effect only where the wrapped module is *called*. The decoder's attention used to read
``mat_qkv.weight`` / ``mat_kv.weight`` with ``F.linear`` (which silently bypasses a wrapper: ``peft`` layers
expose the base ``weight``); ``tests/unit/test_lora.py`` checks that every targeted module changes the outputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from vargpt.models.vargpt import VARGPT

__all__ = ["LORA_TARGETS", "add_lora", "merge_lora", "save_lora", "load_lora", "lora_modules", "has_lora",
           "randomize_lora", "target_regex"]

LORA_TARGETS: dict[str, str] = {
    "llm": r"backbone\.model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "decoder": r"decoder\.blocks\.\d+\.(sa\.(mat_qkv|proj)|ca\.(mat_q|mat_kv|proj)|ffn\.fc[12])",
    "projectors": r"gen_proj_(in|out)\.fc[12]",
}
ADAPTER = "default"  # peft's adapter name; one adapter per model here
WEIGHTS_NAME = "adapter_model.safetensors"


def target_regex(targets: Sequence[str]) -> str:
    """The full-match regex of the union of the named target groups."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target group(s) {unknown or list(targets)}; expected some of "
                         f"{sorted(LORA_TARGETS)}")
    return "|".join(f"({LORA_TARGETS[t]})" for t in targets)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_modules(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """Name -> LoRA-wrapped module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def add_lora(model: VARGPT, *, targets: Sequence[str] = ("llm", "decoder"), r: int = 8, alpha: float = 16,
             dropout: float = 0.0) -> VARGPT:
    """Inject LoRA adapters (rank ``r``, scaling ``alpha / r``, input dropout ``dropout``) into the target groups,
    in place; afterwards only the LoRA matrices require grad (B starts at 0, so outputs are unchanged).

    Returns:
        ``model`` itself (still a ``VARGPT``).
    """
    if has_lora(model):
        raise ValueError("the model already holds LoRA adapters; merge_lora() them first")
    regex = target_regex(targets)
    for t in targets:
        if not any(re.fullmatch(LORA_TARGETS[t], n) for n, _ in model.named_modules()):
            raise ValueError(f"LoRA target group {t!r} matches no module of this model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def merge_lora(model: VARGPT) -> VARGPT:
    """Fold every adapter into its base weight (W += B A * alpha / r) and put the base modules back, in place.

    Returns:
        ``model``, a plain ``VARGPT`` (no ``peft`` module or attribute left, original state-dict keys). Every
        parameter has ``requires_grad=True`` afterwards (as in a freshly built module): apply a freeze policy before
        training it further.
    """
    wrapped = lora_modules(model)
    if not wrapped:
        raise ValueError("the model holds no LoRA adapter")
    for name, module in wrapped.items():
        module.merge(safe_merge=True)  # safe_merge: raises on non-finite merged weights
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(True)
    return model


def save_lora(model: VARGPT, path: str | Path) -> None:
    """Write the adapter alone: ``path/adapter_config.json`` (peft ``LoraConfig``) + ``adapter_model.safetensors``."""
    if not has_lora(model):
        raise ValueError("the model holds no LoRA adapter")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(str(path))
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path / WEIGHTS_NAME))


def load_lora(model: VARGPT, path: str | Path) -> VARGPT:
    """Inject the adapter saved by ``save_lora`` into a model without adapters and load its weights (every LoRA
    tensor of the model must be in the file and vice versa). Returns ``model``."""
    path = Path(path)
    if has_lora(model):
        raise ValueError("the model already holds LoRA adapters; load into a plain model")
    config = LoraConfig.from_pretrained(str(path))
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    sd = load_file(str(path / WEIGHTS_NAME))
    result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise KeyError(f"{path / WEIGHTS_NAME}: adapter does not match the model: missing {missing[:10]}, "
                       f"unexpected {list(result.unexpected_keys)[:10]}")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


@torch.no_grad()
def randomize_lora(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Fill every LoRA B matrix with N(0, std^2) (they start at 0, i.e. as a no-op); for tests and sanity checks."""
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=generator) * std)
