"""A KV-cached LLM over a batch of rows with explicit per-row visibility and positions.

All rows of a session share one transformers ``DynamicCache`` of T slots. Which slots a row may attend to is
kept explicitly (``visible_BT``), so that one forward can mix

* left-padded prompts (padding slots are never visible),
* rows that have finished decoding (their new slots are not visible),
* the official *context-free* unconditional CFG rows (they see only the current chunk, causally, and their
  slots are hidden again afterwards), and
* ordinary rows (causal over everything visible).

Every ``step`` builds the additive 4-D mask (B, 1, q, T + q) from that state and passes explicit position ids
(3, B, q); transformers' own position/rope-delta bookkeeping is never used. The session also keeps the final
hidden states of every slot (the cross-attention memory of a generated image is taken from them).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from vargpt.models.vargpt import VARGPT

__all__ = ["LLMSession"]


class LLMSession:
    """Batch state of the LLM: cache, visibility, next text position, hidden states.

    Attributes:
        cache: the transformers KV cache (T slots per row).
        visible_BT: bool, slot t may be attended to by row b in later steps.
        next_pos_B: next M-RoPE text position of each row (= last position + 1; for text-only rows = token count).
        num_tokens_B: visible tokens of each row (the official image-token positions are this raw count).
        hidden_BTC: final hidden states of every slot (after the last RMSNorm).
    """

    def __init__(self, model: VARGPT, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.batch = batch
        self.device, self.dtype = device, dtype
        self.cache = DynamicCache(config=model.backbone.config.text_config)
        self.visible_BT = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.next_pos_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.num_tokens_B = torch.zeros(batch, dtype=torch.long, device=device)
        self._hidden: list[torch.Tensor] = []
        self._all_visible = True  # every slot so far is visible to every row (no padding, nothing hidden)

    @property
    def length(self) -> int:
        return self.visible_BT.shape[1]

    @property
    def hidden_BTC(self) -> torch.Tensor:
        if len(self._hidden) > 1:
            self._hidden = [torch.cat(self._hidden, dim=1)]
        return self._hidden[0]

    def step(self, embeds_BqC: torch.Tensor, position_ids_3Bq: torch.Tensor, valid_Bq: torch.Tensor,
             keep_Bq: torch.Tensor | None = None, see_past_B: torch.Tensor | None = None) -> torch.Tensor:
        """Run q new slots per row through the LLM, appending them to the cache.

        Args:
            embeds_BqC: (B, q, C) input embeddings.
            position_ids_3Bq: (3, B, q) M-RoPE positions (all three equal for text and generation tokens).
            valid_Bq: bool, the slot is a real token in this step (invalid slots attend only to themselves and
                are never attended to).
            keep_Bq: bool, the slot stays visible for later steps (default: ``valid_Bq``).
            see_past_B: bool, the row attends to the visible cache (default True); False = context-free row.
        Returns:
            hidden_BqC: (B, q, C) final hidden states of the new slots.
        """
        B, q, _ = embeds_BqC.shape
        if B != self.batch:
            raise ValueError(f"session has {self.batch} rows, step got {B}")
        keep_Bq = valid_Bq if keep_Bq is None else keep_Bq
        if self._all_visible and see_past_B is None and bool(valid_Bq.all()):
            # plain causal attention over everything (no padding, no hidden slots): let transformers take its
            # mask-free fast path (same result; a q=1 decode step then needs no mask at all)
            mask_4d = None
        else:
            past_BT = self.visible_BT
            if see_past_B is not None:
                past_BT = past_BT & see_past_B[:, None]
            causal_qq = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
            eye_qq = torch.eye(q, dtype=torch.bool, device=self.device)
            new_Bqq = (causal_qq[None] & valid_Bq[:, None, :] & valid_Bq[:, :, None]) | eye_qq[None]
            allowed_BqT = torch.cat([past_BT[:, None, :].expand(B, q, past_BT.shape[1]), new_Bqq], dim=2)
            mask_4d = torch.zeros(allowed_BqT.shape, dtype=embeds_BqC.dtype, device=self.device)
            mask_4d.masked_fill_(~allowed_BqT, torch.finfo(embeds_BqC.dtype).min)
            mask_4d = mask_4d[:, None]
        out = self.model.language_model(
            inputs_embeds=embeds_BqC, attention_mask=mask_4d, position_ids=position_ids_3Bq,
            cache=self.cache, use_cache=True,
        ).last_hidden_state
        self._all_visible = self._all_visible and bool(keep_Bq.all())
        self.visible_BT = torch.cat([self.visible_BT, keep_Bq], dim=1)
        self.num_tokens_B = self.num_tokens_B + keep_Bq.sum(1)
        self._hidden.append(out)
        return out

    # ----- row surgery (new sessions; the cache is rebuilt from tensors through transformers' public API) -----

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _rebuilt(self, kv: list[tuple[torch.Tensor, torch.Tensor]], visible_BT, next_pos_B, num_tokens_B,
                 hidden_BTC) -> LLMSession:
        new = LLMSession(self.model, visible_BT.shape[0], self.device, self.dtype)
        new.cache = DynamicCache(ddp_cache_data=kv, config=self.model.backbone.config.text_config)
        new.visible_BT, new.next_pos_B, new.num_tokens_B = visible_BT, next_pos_B, num_tokens_B
        new._all_visible = bool(visible_BT.all())
        new._hidden = [hidden_BTC]
        return new

    def select_rows(self, rows: torch.Tensor | list[int]) -> LLMSession:
        """A session holding only ``rows`` (e.g. dropping the CFG rows after an image)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        kv = [(k[idx], v[idx]) for k, v in self._layers()]
        return self._rebuilt(kv, self.visible_BT[idx], self.next_pos_B[idx], self.num_tokens_B[idx],
                             self.hidden_BTC[idx])

    def with_blank_rows(self, n: int) -> LLMSession:
        """This session plus ``n`` empty rows (nothing visible; for context-free official CFG rows)."""
        kv = [(torch.cat([k, k.new_zeros((n, *k.shape[1:]))]), torch.cat([v, v.new_zeros((n, *v.shape[1:]))]))
              for k, v in self._layers()]
        h = self.hidden_BTC
        return self._rebuilt(
            kv, torch.cat([self.visible_BT, self.visible_BT.new_zeros(n, self.length)]),
            torch.cat([self.next_pos_B, self.next_pos_B.new_zeros(n)]),
            torch.cat([self.num_tokens_B, self.num_tokens_B.new_zeros(n)]),
            torch.cat([h, h.new_zeros(n, *h.shape[1:])]))

    def concat_rows(self, other: LLMSession) -> LLMSession:
        """Rows of ``self`` then rows of ``other``; the shorter session is left-padded with invisible slots."""
        T = max(self.length, other.length)

        def pad(x: torch.Tensor, dim: int, t: int) -> torch.Tensor:
            if t == 0:
                return x
            shape = list(x.shape)
            shape[dim] = t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        a, b = T - self.length, T - other.length
        kv = [(torch.cat([pad(k1, 2, a), pad(k2, 2, b)]), torch.cat([pad(v1, 2, a), pad(v2, 2, b)]))
              for (k1, v1), (k2, v2) in zip(self._layers(), other._layers(), strict=True)]
        return self._rebuilt(
            kv, torch.cat([pad(self.visible_BT, 1, a), pad(other.visible_BT, 1, b)]),
            torch.cat([self.next_pos_B, other.next_pos_B]), torch.cat([self.num_tokens_B, other.num_tokens_B]),
            torch.cat([pad(self.hidden_BTC, 1, a), pad(other.hidden_BTC, 1, b)]))
