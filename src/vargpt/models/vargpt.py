"""The unified VARGPT-v1.1 model: Qwen2-VL backbone + generation projectors + visual decoder + BSQ VAE.

``VARGPT.forward`` computes logits and losses for a batch (understanding, generation, editing or mixed; SPEC.md
§1.2, §1.3, §2.10). It never samples and never writes files; inference loops live in ``vargpt.generation`` and the
engine.

Generation training forward, per generated image n (L tokens over K scales, P = L rounded up to
``gen_pad_multiple`` slots in the LLM sequence):

1. VAE-encode the target, bitwise self-correction teacher forcing -> labels Y (L, d), decoder word inputs X (L-1, d).
2. c = pool(RMSNorm(start vector)); Z = [c + pos_start ; word_embed(X)] (L, C), zero rows up to P.
3. GenProjIn(Z) replaces the embeddings at the ``<|image_gen_pad|>`` slots, in order.
4. LLM forward (token-causal); G = GenProjOut(hidden at the first L slots) (no shift: slot j predicts token j).
5. Cross-attention memory = GenProjOut(hidden of the real tokens strictly before ``<|image_gen_start|>``).
6. Visual decoder (block-causal over scales) -> bit logits (L, 2d).
7. Loss = CE_text + bit_loss_weight x CE_bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import VARGPTConfig
from vargpt.models.backbone import build_backbone, mrope_position_ids
from vargpt.models.decoder import VisualDecoder
from vargpt.models.vae import BSQVAE, NoFlips, RandomBitFlips, bsc_teacher_forcing
from vargpt.models.vae.schedules import Schedule, nearest_template, template_steps

__all__ = ["GenProjector", "VARGPT", "VARGPTOutput", "schedule_for_latent", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class GenProjector(nn.Module):
    """Linear -> exact GELU -> Linear (official ``GenPatchMerger`` minus its never-applied LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.fc2 = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class VARGPTOutput:
    """Result of ``VARGPT.forward``. Losses are None when there is nothing to score."""

    loss: torch.Tensor | None
    text_loss: torch.Tensor | None
    bit_loss: torch.Tensor | None
    text_logits_BTV: torch.Tensor
    hidden_BTC: torch.Tensor  # LLM final hidden states (after the last RMSNorm)
    gen_logits_NLV: torch.Tensor | None = None  # V = 2d: pair (2k, 2k+1) = (bit k is 0, bit k is 1)
    gen_labels_NLd: torch.Tensor | None = None
    schedule: Schedule | None = None


def schedule_for_latent(h: int, w: int) -> tuple[Schedule, float]:
    """(schedule, template) whose last scale is the latent grid (h, w), on the template nearest to h/w.

    Raises ValueError when no prefix of that template ends at (h, w).
    """
    template = nearest_template(h / w)
    steps = template_steps(template)
    for k in range(len(steps)):
        if steps[k] == (h, w):
            return steps[: k + 1], template
    raise ValueError(
        f"a generation target with a {h}x{w} latent grid matches no schedule of the {template} aspect template "
        f"(its scales are {list(steps)}); resize targets to 16 x one of those grids"
    )


class VARGPT(nn.Module):
    """The unified model. Constructor takes the config only (no I/O, no seeding); weights are loaded by callers."""

    def __init__(self, config: VARGPTConfig) -> None:
        super().__init__()
        self.config = config
        C, Ht = config.decoder.width, config.text.hidden_size
        self.backbone = build_backbone(config)
        self.gen_proj_in = GenProjector(C, Ht)
        self.gen_proj_out = GenProjector(Ht, C)
        self.decoder = VisualDecoder(config.decoder, config.vae.codebook_dim)
        self.vae = BSQVAE(config.vae)

    # ----------------------------------------------------------------------------------------------- pieces
    @property
    def language_model(self) -> nn.Module:
        return self.backbone.model.language_model

    def embed_tokens(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.backbone.model.get_input_embeddings()(input_ids_BT)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw_N3: torch.Tensor) -> torch.Tensor:
        """Merged ViT features of all understanding images, (sum_i t*h*w/4, Ht), in image order."""
        vis = self.backbone.model.visual
        dtype = next(vis.parameters()).dtype
        return vis(pixel_values.to(dtype), grid_thw=image_grid_thw_N3).pooler_output

    def position_ids(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor | None,
        image_grid_thw_N3: torch.Tensor | None,
        *,
        mode: str | None = None,
    ) -> torch.Tensor:
        """Position ids (3, B, T) for a full sequence: M-RoPE (default) or the official 1-D ``arange`` (``"1d"``)."""
        mode = mode or self.config.train_positions
        B, T = input_ids_BT.shape
        if mode == "1d":
            return torch.arange(T, device=input_ids_BT.device).view(1, 1, T).expand(3, B, T)
        pos, _ = mrope_position_ids(self.backbone, input_ids_BT, attention_mask_BT, image_grid_thw_N3,
                                    self.config.special_tokens.image_pad)
        return pos

    def gen_slots(self, num_tokens: int) -> int:
        """Number of ``<|image_gen_pad|>`` slots for an image of ``num_tokens`` decoder tokens."""
        m = self.config.gen_pad_multiple
        return math.ceil(num_tokens / m) * m

    def prompt_memory(
        self, hidden_BTC: torch.Tensor, attention_mask_BT: torch.Tensor | None, rows_N: torch.Tensor,
        ends_N: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention memory per generated image: GenProjOut of the real tokens of row ``rows_N[n]`` before
        position ``ends_N[n]`` (the image's ``<|image_gen_start|>``). Returns (N, M, C) and a (N, M) bool mask."""
        B, T, _ = hidden_BTC.shape
        keep_BT = attention_mask_BT.bool() if attention_mask_BT is not None else torch.ones(
            B, T, dtype=torch.bool, device=hidden_BTC.device)
        t_T = torch.arange(T, device=hidden_BTC.device)
        sel_NT = keep_BT[rows_N] & (t_T.unsqueeze(0) < ends_N.unsqueeze(1))  # (N, T)
        counts = sel_NT.sum(1)
        if bool((counts == 0).any()):
            raise ValueError("a generated image has no prompt token before its <|image_gen_start|>")
        M = int(counts.max())
        # stable order of selected positions, left-aligned
        order_NT = torch.argsort((~sel_NT).to(torch.int8), dim=1, stable=True)[:, :M]
        mem_NMH = hidden_BTC[rows_N.unsqueeze(1), order_NT]
        mask_NM = torch.arange(M, device=hidden_BTC.device).unsqueeze(0) < counts.unsqueeze(1)
        return self.gen_proj_out(mem_NMH), mask_NM

    def input_embeddings(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        gen_rows_NPC: torch.Tensor | None = None,
        *,
        num_gen_tokens: int | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings (B, T, Ht): token embeddings, understanding images in the ``<|image_pad|>`` slots
        and ``gen_rows_NPC`` (decoder-width rows, N images x P slots, row-major over the batch) through GenProjIn
        in the ``<|image_gen_pad|>`` slots."""
        cfg = self.config
        st = cfg.special_tokens
        embeds_BTC = self.embed_tokens(input_ids)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            feats = self.image_features(pixel_values, image_grid_thw)
            slots = input_ids == st.image_pad
            if int(slots.sum()) != feats.shape[0]:
                raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but the images give {feats.shape[0]} "
                                 "features; expand each image placeholder to t*h*w/4 tokens")
            embeds_BTC = embeds_BTC.masked_scatter(slots.unsqueeze(-1), feats.to(embeds_BTC.dtype))
        slots = input_ids == st.image_gen_pad
        n_rows = 0 if gen_rows_NPC is None else gen_rows_NPC.shape[0] * gen_rows_NPC.shape[1]
        if int(slots.sum()) != n_rows:
            what = (f"{gen_rows_NPC.shape[0]} generated image(s) of {num_gen_tokens or gen_rows_NPC.shape[1]} tokens "
                    f"need {gen_rows_NPC.shape[1]} each (gen_pad_multiple={cfg.gen_pad_multiple})"
                    if gen_rows_NPC is not None else "no generation rows were given")
            raise ValueError(f"input_ids hold {int(slots.sum())} <|image_gen_pad|> tokens but {what}")
        if gen_rows_NPC is not None:
            proj = self.gen_proj_in(gen_rows_NPC.to(embeds_BTC.dtype)).flatten(0, 1)
            # (under autocast the projector returns bf16 while the embedding table stays fp32)
            embeds_BTC = embeds_BTC.masked_scatter(slots.unsqueeze(-1), proj.to(embeds_BTC.dtype))
        return embeds_BTC

    def llm_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        gen_rows_NPC: torch.Tensor | None = None,
        *,
        num_gen_tokens: int | None = None,
    ) -> torch.Tensor:
        """LLM final hidden states (B, T, Ht) of a full sequence (no cache); inputs as in ``input_embeddings``."""
        embeds_BTC = self.input_embeddings(input_ids, pixel_values, image_grid_thw, gen_rows_NPC,
                                           num_gen_tokens=num_gen_tokens)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, attention_mask, image_grid_thw)
        return self.language_model(
            inputs_embeds=embeds_BTC, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        gen_pixel_values: torch.Tensor | None = None,
        flips=None,
        cond_drop_N: torch.Tensor | None = None,
        gen_latents: torch.Tensor | None = None,
        run_decoder: bool = True,
    ) -> VARGPTOutput:
        """Logits and losses of a batch.

        Args:
            input_ids: (B, T) token ids; understanding images as ``<|image_pad|>`` runs, generated images as
                ``<|image_gen_start|>`` + P x ``<|image_gen_pad|>`` + ``<|image_gen_end|>``.
            attention_mask: (B, T) 1 = real token.
            labels: (B, T) next-token targets (-100 = ignored) in the usual unshifted HF convention.
            position_ids: (3, B, T); default computed per ``config.train_positions``.
            pixel_values, image_grid_thw: understanding images in Qwen2-VL patch format, in order of appearance.
            gen_pixel_values: (N, 3, H, W) generation targets in [-1, 1], in order of appearance (row-major over
                the batch); H/16 x W/16 must be the last scale of a schedule of the nearest aspect template.
            flips: bitwise self-correction (a ``vargpt.models.vae`` flips callable); default: in training mode
                ``RandomBitFlips(config.bsc_max_strength)`` on the global RNG, in eval mode no flips.
            cond_drop_N: (N,) bool, replace the start vector by ``cfg_uncond[0]`` (condition dropout).
            gen_latents: (N, d, H/ds, W/ds) the targets' VAE features, ``self.vae.encode(gen_pixel_values)``, given
                instead of ``gen_pixel_values`` (e.g. encoded once for targets seen many times while the VAE is
                frozen, ``vargpt.train.latents.LatentCache``).
            run_decoder: False = the LLM alone: the targets still feed the ``<|image_gen_pad|>`` slots, but the
                decoder does not run (no ``gen_logits_NLV``, ``bit_loss`` None, ``loss`` = the text loss), e.g. to
                train the LLM on the text of records with images to draw while the decoder is frozen.
        """
        cfg = self.config
        st = cfg.special_tokens
        gen = None
        gen_rows = None
        if gen_pixel_values is not None and gen_latents is not None:
            raise ValueError("give the generation targets as gen_pixel_values or as gen_latents, not both")
        if gen_pixel_values is not None and gen_pixel_values.shape[0] > 0:
            gen = self._gen_inputs(self._encode_targets(gen_pixel_values), flips, cond_drop_N)
        elif gen_latents is not None and gen_latents.shape[0] > 0:
            d = self.config.vae.codebook_dim
            if gen_latents.dim() != 4 or gen_latents.shape[1] != d:
                raise ValueError(f"gen_latents must be (N, {d}, h, w) VAE features, got {tuple(gen_latents.shape)}")
            gen = self._gen_inputs(gen_latents, flips, cond_drop_N)
        if gen is not None:
            gen_rows = gen["z_NPC"]
        hidden_BTC = self.llm_hidden(input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
                                     gen_rows, num_gen_tokens=gen["L"] if gen else None)
        text_logits_BTV = self.backbone.lm_head(hidden_BTC)

        out = VARGPTOutput(loss=None, text_loss=None, bit_loss=None, text_logits_BTV=text_logits_BTV,
                           hidden_BTC=hidden_BTC)
        if gen is not None and run_decoder:
            N, P, L = gen["z_NPC"].shape[0], gen["z_NPC"].shape[1], gen["L"]
            slot_hidden = hidden_BTC[input_ids == st.image_gen_pad].view(N, P, -1)[:, :L]
            g_NLC = self.gen_proj_out(slot_hidden)
            rows_N, starts_N = gen_start_positions(input_ids, st.image_gen_start, N)
            mem, mem_mask = self.prompt_memory(hidden_BTC, attention_mask, rows_N, starts_N)
            out.gen_logits_NLV = self.decoder(g_NLC, gen["cond_ND"], mem, mem_mask, gen["schedule"], gen["template"])
            out.gen_labels_NLd = gen["labels_NLd"]
            out.schedule = gen["schedule"]
            out.bit_loss = self.bit_loss(out.gen_logits_NLV, out.gen_labels_NLd, gen["schedule"])

        out.text_loss = self.text_loss(text_logits_BTV, input_ids, labels, has_gen=gen is not None)
        parts = []
        if out.text_loss is not None:
            parts.append(out.text_loss)
        if out.bit_loss is not None:
            parts.append(cfg.bit_loss_weight * out.bit_loss)
        out.loss = sum(parts) if parts else None
        return out

    def _encode_targets(self, gen_pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) generation targets in [-1, 1] -> (N, d, H/ds, W/ds) VAE features (no gradient)."""
        H, W = gen_pixel_values.shape[-2:]
        ds = self.config.vae.downsample
        if H % ds or W % ds:
            raise ValueError(f"generation targets must be multiples of {ds} pixels, got {H}x{W}")
        with torch.no_grad():
            return self.vae.encode(gen_pixel_values)

    def _gen_inputs(self, f_NdHW, flips, cond_drop_N) -> dict:
        """BSC teacher forcing on the targets' VAE features (N, d, h, w) + decoder input sequence Z (N, P, C),
        zero-padded to P slots."""
        N = f_NdHW.shape[0]
        schedule, template = schedule_for_latent(*f_NdHW.shape[-2:])
        if flips is None:
            # training default: official bitwise self-correction (global RNG); evaluation: clean teacher forcing
            flips = (RandomBitFlips(self.config.bsc_max_strength)
                     if self.training and self.config.bsc_max_strength > 0 else NoFlips())
        labels_NLd, inputs_NLd = bsc_teacher_forcing(f_NdHW, schedule, flips)[:2]
        dec = self.decoder
        start_NCm = dec.start_embedding.unsqueeze(0).expand(N, -1)
        if cond_drop_N is None and self.training and self.config.decoder.cond_drop_rate > 0:
            cond_drop_N = torch.rand(N, device=start_NCm.device) < self.config.decoder.cond_drop_rate
        if cond_drop_N is not None:
            start_NCm = torch.where(cond_drop_N.view(N, 1), dec.uncond_embedding[0].unsqueeze(0), start_NCm)
        cond_ND = dec.condition(start_NCm)
        words = dec.embed_words(inputs_NLd.to(cond_ND.dtype))
        z_NLC = torch.cat([dec.start_tokens(cond_ND), words], dim=1)
        L = z_NLC.shape[1]
        P = self.gen_slots(L)
        z_NPC = F.pad(z_NLC, (0, 0, 0, P - L))
        return dict(z_NPC=z_NPC, L=L, cond_ND=cond_ND, labels_NLd=labels_NLd, schedule=schedule, template=template)

    # ------------------------------------------------------------------------------------------------ losses
    def text_loss(self, logits_BTV, input_ids_BT, labels_BT, *, has_gen: bool) -> torch.Tensor | None:
        """Next-token CE. ``text_loss_targets="input_ids"`` (official) trains every input id except gen slots
        whenever the batch holds a generated image; otherwise the dataset labels (gen slots always ignored)."""
        st = self.config.special_tokens
        if has_gen and self.config.text_loss_targets == "input_ids":
            targets = input_ids_BT.masked_fill(input_ids_BT == st.image_gen_pad, IGNORE_INDEX)
        elif labels_BT is not None:
            targets = labels_BT.masked_fill(input_ids_BT == st.image_gen_pad, IGNORE_INDEX)
        else:
            return None
        shift_logits = logits_BTV[:, :-1].float()
        shift_targets = targets[:, 1:]
        if not bool((shift_targets != IGNORE_INDEX).any()):
            return None
        if self.config.text_loss_reduction == "token":
            return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        # "sample": each row's mean over its targets, then the mean over the rows that have any
        ce_BT = F.cross_entropy(shift_logits.transpose(1, 2), shift_targets, ignore_index=IGNORE_INDEX,
                                reduction="none")
        n_B = (shift_targets != IGNORE_INDEX).sum(1)
        has_B = n_B > 0
        return (ce_BT.sum(1)[has_B] / n_B[has_B]).mean()

    def bit_loss(self, logits_NLV: torch.Tensor, labels_NLd: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Bit CE: plain mean over all bits (``"mean"``, official effective behaviour) or Infinity's per-scale
        weighting (``"scale"``: per-token mean over bits, token weight ~ sqrt(area_last / area_scale), normalised
        over the sequence, weighted sum per image, mean over images)."""
        N, L, d = labels_NLd.shape
        logits = logits_NLV.float().view(N, L, d, 2)
        ce = F.cross_entropy(logits.reshape(-1, 2), labels_NLd.reshape(-1), reduction="none").view(N, L, d)
        if self.config.bit_loss_weighting == "mean":
            return ce.mean()
        w_L = scale_loss_weights(schedule, device=ce.device)
        return (ce.mean(-1) * w_L).sum(-1).mean()


def scale_loss_weights(schedule: Schedule, device=None) -> torch.Tensor:
    """Per-token weights (L,) of Infinity's scale reweighting: sqrt(area_K / area_k), normalised to sum 1."""
    area_last = schedule[-1][0] * schedule[-1][1]
    w = torch.cat([torch.full((h * w,), math.sqrt(area_last / (h * w))) for h, w in schedule])
    return (w / w.sum()).to(device=device, dtype=torch.float32)


def gen_start_positions(input_ids_BT: torch.Tensor, start_id: int, expected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every ``<|image_gen_start|>`` in row-major order; checks there are ``expected``."""
    rows, pos = (input_ids_BT == start_id).nonzero(as_tuple=True)
    if rows.numel() != expected:
        raise ValueError(f"input_ids hold {rows.numel()} <|image_gen_start|> tokens but {expected} generated "
                         "image(s) were given")
    return rows, pos
