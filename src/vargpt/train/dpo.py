"""Direct preference optimisation on image tokens (SPEC.md §4.6; defect D5 in §6).

Pieces, smallest first:

* ``bit_logps`` / ``image_logps``: log-likelihood of a teacher-forced image under the model = sum over every scale,
  token and bit of ``log_softmax(pair logits)[label bit]`` (official ``get_batch_image_logps`` with
  ``bitloss_type='sum'``), or its mean over the L*d bits (``average=True``, for length-normalised variants).
* ``dpo_loss``: the sigmoid DPO loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) with cDPO label
  smoothing, on per-pair log-likelihoods; pure, tested on hand numbers.
* ``DPOStep``: a ``step_fn(policy, batch) -> (loss, metrics)`` for the generic training loop. A batch is
  ``VARGPT.forward`` keyword arguments holding ``num_pairs`` chosen sequences followed by the ``num_pairs``
  rejected ones (images likewise), plus ``num_pairs``.
* ``build_pairs``: sample candidates with the engine, score them with a pluggable reward, write the chosen/rejected
  PNGs and a JSONL in the official DPO record format (SPEC.md §4.7); a request is a plain prompt or a
  ``PairPrompt`` (understanding images and the answer's text before the image, e.g. an edit).

Shared randomness (the D5 correction). The teacher-forcing targets depend on the bitwise-self-correction flips (the
labels of scale k are the bits of the residual against the *corrupted* running sum) and the start vector depends on
condition dropout. The official trainer draws both independently in the policy and in the reference pass, so the
log-ratio ``log pi(y|x) - log pi_ref(y|x)`` compares two different targets. ``DPOStep`` (``randomness="shared"``,
the default) draws one flip seed and one condition-dropout vector per call and hands the *same* ones to both passes
(a fresh ``RandomBitFlips`` over ``torch.Generator().manual_seed(flip_seed)`` for each pass replays identical flips),
then checks that both passes scored the same labels. ``randomness="independent"`` reproduces the official behaviour
(separate draws per pass) and exists to measure the difference.

Randomness left in the policy pass: the decoder's stochastic depth (drop-path, global torch RNG) and any dropout
(LLM attention dropout, LoRA dropout). With ``disable_dropout=True`` (default, as TRL's DPO trainer) the step sets
all of those rates of the policy to 0 before its forward, so with policy == reference the loss is exactly log 2;
with ``disable_dropout=False`` they stay active as in the official trainer (the policy stays in train mode either
way; the reference is frozen, in eval mode and run under ``torch.no_grad``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vargpt.data.records import IMAGE_PLACEHOLDER, split_placeholders
from vargpt.models.vae import NoFlips, RandomBitFlips
from vargpt.models.vargpt import VARGPT, VARGPTOutput

__all__ = ["bit_logps", "image_logps", "dpo_loss", "DPOStep", "disable_dropout", "build_pairs", "PairPrompt",
           "IMAGE_GEN_TEXT"]

log = logging.getLogger(__name__)

IMAGE_GEN_TEXT = "<image_gen>"  # the placeholder of a generated image in dataset records


# ------------------------------------------------------------------------------------------------ log-likelihoods
def bit_logps(gen_logits_NLV: torch.Tensor, gen_labels_NLd: torch.Tensor) -> torch.Tensor:
    """Log-probability of every label bit, (N, L, d) float32.

    Args:
        gen_logits_NLV: (N, L, 2d) decoder logits; pair (2k, 2k+1) scores bit k = 0 / 1.
        gen_labels_NLd: (N, L, d) int64 label bits in {0, 1}.
    """
    N, L, d = gen_labels_NLd.shape
    logp_NLd2 = F.log_softmax(gen_logits_NLV.float().view(N, L, d, 2), dim=-1)
    return logp_NLd2.gather(-1, gen_labels_NLd.unsqueeze(-1)).squeeze(-1)


def image_logps(out: VARGPTOutput, *, average: bool = False) -> torch.Tensor:
    """Per-image log-likelihood (N,) of the teacher-forced targets of ``out``: the sum over all scales, tokens and
    bits (SPEC.md §4.6, ``bitloss_type='sum'``), or with ``average=True`` that sum divided by L*d."""
    if out.gen_logits_NLV is None or out.gen_labels_NLd is None:
        raise ValueError("the forward output holds no generated image (gen_pixel_values was not given)")
    lp_NLd = bit_logps(out.gen_logits_NLV, out.gen_labels_NLd)
    return lp_NLd.mean((1, 2)) if average else lp_NLd.sum((1, 2))


# ------------------------------------------------------------------------------------------------------- the loss
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO with cDPO label smoothing, averaged over pairs.

    With r_w = beta (pi_w - ref_w), r_l = beta (pi_l - ref_l) and z = r_w - r_l (all log-likelihoods per pair, (P,)):
    ``loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (eps = ``label_smoothing``: the probability that a
    pair's preference label is flipped; 0 = plain DPO).

    Returns:
        (scalar loss, metrics) with ``rewards/chosen`` (mean r_w), ``rewards/rejected``, ``rewards/margin`` (mean z)
        and ``rewards/accuracy`` (fraction of pairs with r_w > r_l).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_P = beta * (policy_chosen.float() - ref_chosen.float())
    rejected_P = beta * (policy_rejected.float() - ref_rejected.float())
    z_P = chosen_P - rejected_P
    losses_P = -(1 - label_smoothing) * F.logsigmoid(z_P) - label_smoothing * F.logsigmoid(-z_P)
    metrics = {
        "rewards/chosen": chosen_P.detach().mean().item(),
        "rewards/rejected": rejected_P.detach().mean().item(),
        "rewards/margin": z_P.detach().mean().item(),
        "rewards/accuracy": (chosen_P > rejected_P).float().mean().item(),
    }
    return losses_P.mean(), metrics


# --------------------------------------------------------------------------------------------------- step function
def disable_dropout(model: nn.Module) -> None:
    """Set every dropout and drop-path rate of ``model`` to 0, in place: ``nn.Dropout`` modules (LoRA dropout
    included), the decoder blocks' ``drop_path_rate`` and Hugging Face ``attention_dropout`` attributes."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if isinstance(getattr(m, "drop_path_rate", None), float):
            m.drop_path_rate = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


class DPOStep:
    """``step_fn(policy, batch) -> (loss, metrics)`` for DPO on generated images.

    Args:
        reference_model: the frozen reference (normally a copy of the policy's starting checkpoint); this
            constructor calls ``requires_grad_(False)`` and ``eval()`` on it.
        beta, label_smoothing: see ``dpo_loss``.
        sft_weight: weight of the optional SFT term ``-log pi(y_w|x) / (L d)`` (mean over pairs; official
            ``pref_ftx``, default 0).
        bsc_max_strength: bitwise self-correction in both passes (flip rate per scale drawn from
            {0, 0.01, ..., this}); None = the reference config's ``bsc_max_strength``; 0 = clean teacher forcing.
        cond_drop_rate: probability per pair of replacing the start vector by ``cfg_uncond[0]`` (same decision for
            the chosen and the rejected image of a pair and for both passes). Default 0: SPEC.md D5 recommends no
            condition dropout in DPO.
        seed: None (default): each call draws its seed from the global torch RNG, which the training loop seeds
            with ``seed + process index`` and saves in every checkpoint (so ranks differ and a resumed run replays
            the same flips). An int: call number c uses ``SeedSequence([seed, c])`` (``state_dict()`` /
            ``load_state_dict()`` carry the call counter; pass a different seed per data-parallel rank).
        average: use length-normalised log-likelihoods (``image_logps(average=True)``) in the DPO term (SimPO/ORPO
            style); default False = the official sum.
        disable_dropout: zero the policy's dropout/drop-path rates before its forward (see the module docstring).
        randomness: ``"shared"`` (default) or ``"independent"`` (official: each pass draws its own flips and
            condition dropout; the labels of the two passes then differ).

    Metrics (floats): ``loss/dpo``, ``loss/sft`` (reported even when ``sft_weight`` is 0), the ``rewards/*`` of
    ``dpo_loss``, ``logps/chosen``, ``logps/rejected`` (policy, summed) and ``logps/ref_chosen``,
    ``logps/ref_rejected``. (No plain ``loss`` key: the loop logs its own, reduced over processes.)
    """

    def __init__(self, reference_model: VARGPT, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0, bsc_max_strength: float | None = None, cond_drop_rate: float = 0.0,
                 seed: int | None = None, average: bool = False, disable_dropout: bool = True,
                 randomness: Literal["shared", "independent"] = "shared") -> None:
        if randomness not in ("shared", "independent"):
            raise ValueError(f"randomness={randomness!r}: expected 'shared' or 'independent'")
        if not 0.0 <= cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {cond_drop_rate}")
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta,
                 label_smoothing=label_smoothing)  # validates beta and label_smoothing
        self.reference = reference_model.requires_grad_(False).eval()
        self.beta, self.label_smoothing, self.sft_weight = beta, label_smoothing, sft_weight
        self.bsc_max_strength = (reference_model.config.bsc_max_strength if bsc_max_strength is None
                                 else bsc_max_strength)
        self.cond_drop_rate = cond_drop_rate
        self.seed = seed
        self.average = average
        self.disable_dropout = disable_dropout
        self.randomness = randomness
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.seed = int(state["calls"]), state["seed"]

    def _flips(self, flip_seed: int):
        if self.bsc_max_strength <= 0:
            return NoFlips()
        # a CPU generator: the same flips on every device (the masks are moved to the bits' device)
        return RandomBitFlips(self.bsc_max_strength, torch.Generator().manual_seed(flip_seed))

    def _draw(self, g: torch.Generator, num_pairs: int, device) -> tuple[int, torch.Tensor]:
        """(flip seed, cond_drop_N) for one pass; cond_drop_N = the per-pair decisions for chosen then rejected."""
        flip_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        drop_P = torch.rand(num_pairs, generator=g) < self.cond_drop_rate
        return flip_seed, torch.cat([drop_P, drop_P]).to(device)

    def __call__(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        batch = dict(batch)
        P = int(batch.pop("num_pairs"))
        for k in ("flips", "cond_drop_N"):
            if k in batch:
                raise ValueError(f"batch['{k}'] is set by DPOStep (shared randomness); remove it from the batch")
        gen = batch.get("gen_pixel_values")
        if gen is None or gen.shape[0] != 2 * P:
            n = None if gen is None else gen.shape[0]
            raise ValueError(f"a DPO batch holds 2 * num_pairs = {2 * P} generation images "
                             f"(chosen first, then rejected); got {n}")
        if self.seed is None:
            step_seed = int(torch.randint(0, 2**62, (1,)))
        else:
            step_seed = int(np.random.SeedSequence([self.seed, self.calls]).generate_state(1, dtype=np.uint64)[0])
        self.calls += 1
        if next(self.reference.parameters()).device != gen.device:
            self.reference.to(gen.device)
        g = torch.Generator().manual_seed(step_seed)
        policy_seed, policy_drop = self._draw(g, P, gen.device)
        ref_seed, ref_drop = ((policy_seed, policy_drop) if self.randomness == "shared"
                              else self._draw(g, P, gen.device))

        with torch.no_grad():
            ref_out = self.reference(**batch, flips=self._flips(ref_seed), cond_drop_N=ref_drop)
        if self.disable_dropout:
            disable_dropout(policy)
        out = policy(**batch, flips=self._flips(policy_seed), cond_drop_N=policy_drop)
        if self.randomness == "shared" and not torch.equal(out.gen_labels_NLd, ref_out.gen_labels_NLd):
            raise RuntimeError("policy and reference scored different targets under the same flips: their VAE "
                               "weights differ (the VAE must be frozen and identical in both models)")

        lp_N = image_logps(out)
        ref_lp_N = image_logps(ref_out)
        if self.average:
            Ld = out.gen_labels_NLd.shape[1] * out.gen_labels_NLd.shape[2]
            dpo_lp_N, dpo_ref_N = lp_N / Ld, ref_lp_N / Ld
        else:
            dpo_lp_N, dpo_ref_N = lp_N, ref_lp_N
        loss_dpo, metrics = dpo_loss(dpo_lp_N[:P], dpo_lp_N[P:], dpo_ref_N[:P], dpo_ref_N[P:], beta=self.beta,
                                     label_smoothing=self.label_smoothing)
        L, d = out.gen_labels_NLd.shape[1:]
        loss_sft = -(lp_N[:P] / (L * d)).mean()
        loss = loss_dpo + self.sft_weight * loss_sft if self.sft_weight > 0 else loss_dpo
        metrics.update({
            "loss/dpo": loss_dpo.detach().item(),
            "loss/sft": loss_sft.detach().item(),
            "logps/chosen": lp_N[:P].detach().mean().item(),
            "logps/rejected": lp_N[P:].detach().mean().item(),
            "logps/ref_chosen": ref_lp_N[:P].mean().item(),
            "logps/ref_rejected": ref_lp_N[P:].mean().item(),
        })
        return loss, metrics


# ------------------------------------------------------------------------------------------- preference pairs
@dataclass(frozen=True)
class PairPrompt:
    """A ``build_pairs`` request with understanding images and its own answer text, e.g. an edit: the source image
    and the instruction, then the answer's words before the image (the edited scene, as the model would write it).

    Args:
        text: the user turn, with one ``<image>`` placeholder per image (as in SFT records).
        images: the understanding images, in placeholder order.
        response: the answer's text, ending with ``<image_gen>``.
        key: what ``reward_fn`` and ``teacher_fn`` receive in place of the prompt (e.g. the caption of the scene
            the answer names).
    """

    text: str
    images: tuple[Image.Image, ...]
    response: str
    key: str

    def __post_init__(self) -> None:
        n = self.text.count(IMAGE_PLACEHOLDER)
        if n != len(self.images):
            raise ValueError(f"PairPrompt: {len(self.images)} image(s) for {n} {IMAGE_PLACEHOLDER} placeholder(s) "
                             f"in {self.text!r:.80}")
        if not self.response.endswith(IMAGE_GEN_TEXT) or self.response.count(IMAGE_GEN_TEXT) != 1:
            raise ValueError(f"PairPrompt.response must hold one {IMAGE_GEN_TEXT!r}, at its end (the image follows "
                             f"the answer's text); got {self.response!r:.80}")

    def encode(self, processor):
        """The user turn and the answer's text as an ``EncodedPrompt`` (``<|image_gen_start|>`` not yet added)."""
        it = iter(self.images)
        content = [{"type": "image", "image": next(it)} if piece == IMAGE_PLACEHOLDER
                   else {"type": "text", "text": piece} for piece in split_placeholders(self.text)]
        return processor.encode([{"role": "user", "content": content}],
                                assistant_prefix=self.response[: -len(IMAGE_GEN_TEXT)])


def build_pairs(engine, prompts: Sequence[str | PairPrompt], *, n_candidates: int,
                reward_fn: Callable[[str, Image.Image], float], params=None, out_dir: str | Path, seed: int = 0,
                response: str = IMAGE_GEN_TEXT, jsonl_name: str = "pairs.jsonl",
                teacher_fn: Callable[[str], Image.Image] | None = None) -> Path:
    """Sample ``n_candidates`` images per prompt, keep the best as chosen and the worst as rejected.

    A prompt is a plain user request (answered with ``response``) or a ``PairPrompt``: then its images are in the
    user turn, its ``response`` is the answer, and ``reward_fn`` / ``teacher_fn`` receive its ``key``. A
    ``PairPrompt``'s candidates are drawn as the engine draws an image after a reply the model wrote
    (``Engine.write_replies``, the editing suite): the answer's text is part of the conditional prompt only, the
    classifier-free-guidance branch's null prompt has none; its images are written as
    ``images/{j:06d}_input{k}.png`` for the record.

    ``teacher_fn``: an extra candidate per prompt from another generator (the official 256-px round's chosen images
    are thought to come from Flux, SPEC.md §4.6), scored like the samples; it can be chosen, never rejected (its
    seed is recorded as null). Without it, every candidate is the policy's own.

    Candidate i of prompt j is generated with seed ``seed + j * n_candidates + i`` (recorded in the record), with
    ``engine.generate_images([prompt] * n, params, seeds=..., assistant_prefix=<response before <image_gen>>)``, and
    scored with ``reward_fn(prompt, image)``. Prompts whose best and worst scores tie are skipped and counted.

    Writes ``out_dir/images/{j:06d}_chosen.png``, ``..._rejected.png``, ``out_dir/<jsonl_name>`` with one record per
    kept prompt in the official DPO format (SPEC.md §4.7), paths relative to ``out_dir``::

        {"conversations": [{"from": "human", "value": prompt}], "chosen": {"from": "gpt", "value": response},
         "rejected": {"from": "gpt", "value": response}, "images": [chosen.png, rejected.png],
         "scores": [chosen, rejected], "seeds": [chosen, rejected]}

    and ``out_dir/<jsonl stem>.summary.json`` (counts written / skipped for ties, the seeds rule, the params).
    Training re-encodes the stored PNGs with the VAE, so its targets are the VAE tokens of the decoded image, not
    necessarily the sampled bits (as in the official pipeline; a lossless PNG avoids any further change).

    Returns:
        the JSONL path.
    """
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2, got {n_candidates}")
    if not response.endswith(IMAGE_GEN_TEXT):
        raise ValueError(f"response must end with {IMAGE_GEN_TEXT!r} (the image follows the response text)")
    prefix = response[: -len(IMAGE_GEN_TEXT)]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / jsonl_name
    tmp = path.with_name(path.name + ".tmp")
    written = skipped = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for j, prompt in enumerate(prompts):
            seeds = [seed + j * n_candidates + i for i in range(n_candidates)]
            if isinstance(prompt, PairPrompt):
                key, text, answer = prompt.key, prompt.text, prompt.response
                request, request_prefix = prompt.encode(engine.processor), ""
            else:
                key, text, answer = prompt, prompt, response
                request, request_prefix = prompt, prefix
            images = [g.image for g in engine.generate_images([request] * n_candidates, params, seeds=seeds,
                                                               assistant_prefix=request_prefix)]
            if teacher_fn is not None:  # the last candidate, chosen over samples that score as well
                images.append(teacher_fn(key))
                seeds.append(None)
            scores = [float(reward_fn(key, image)) for image in images]
            if any(math.isnan(s) for s in scores):
                raise ValueError(f"reward_fn returned NaN for prompt {j} ({key!r}): {scores}")
            best = max(range(n_candidates), key=lambda i: scores[i])
            if teacher_fn is not None and scores[-1] >= scores[best]:
                best = n_candidates
            worst = min(range(n_candidates), key=lambda i: scores[i])
            if scores[best] == scores[worst]:
                skipped += 1
                continue
            inputs = list(prompt.images) if isinstance(prompt, PairPrompt) else []
            names = [f"images/{j:06d}_input{k}.png" for k in range(len(inputs))]
            names += [f"images/{j:06d}_chosen.png", f"images/{j:06d}_rejected.png"]
            for name, image in zip(names, inputs + [images[best], images[worst]], strict=True):
                image.save(out_dir / name)
            record = {
                "conversations": [{"from": "human", "value": text}],
                "chosen": {"from": "gpt", "value": answer},
                "rejected": {"from": "gpt", "value": answer},
                "images": names,
                "scores": [scores[best], scores[worst]],
                "seeds": [seeds[best], seeds[worst]],
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    os.replace(tmp, path)
    summary = {"jsonl": path.name, "prompts": len(prompts), "written": written, "skipped_ties": skipped,
               "n_candidates": n_candidates, "seed_rule": "seed + prompt_index * n_candidates + candidate_index",
               "teacher": teacher_fn is not None,
               "seed": seed, "params": _params_dict(engine, params)}
    path.with_name(path.stem + ".summary.json").write_text(json.dumps(summary, indent=1))
    log.info("build_pairs: %d pair(s) written to %s, %d prompt(s) skipped (best and worst scores tie)",
             written, path, skipped)
    return path


def _params_dict(engine, params) -> dict:
    resolve = getattr(engine, "resolve", None)
    p = resolve(params) if resolve is not None else params
    return p.to_dict() if hasattr(p, "to_dict") else {}
