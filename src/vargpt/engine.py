"""The one inference entry point: ``Engine`` (chat, understand, generate_images, edit, stream).

Examples::

    engine = Engine.load("checkpoints/shapes")
    print(engine.chat([{"role": "user", "content": "Draw a red circle."}]).text)
    images = engine.generate_images(["a red circle", "a blue square"], ImageParams(seed=7))

The engine owns every piece of inference state -- the LLM session (KV cache, visibility, positions), the decoder
KV cache, one ``torch.Generator`` per sample -- and passes it explicitly to the model, whose modules stay pure.
It never writes files: images come back as PIL images with the seed, the parameters and the per-scale bits that
made them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vargpt.checkpoint import default_checkpoint, load_model
from vargpt.generation.image import ImageBatch, ScaleStep, gen_rows_from_bits, image_steps
from vargpt.generation.llm_session import LLMSession
from vargpt.generation.params import SAMPLING_FIELDS, ImageParams, TextParams, load_sampling_defaults, sampling_defaults
from vargpt.generation.results import ChatResult, Done, Event, GeneratedImage, ImageDone, ImagePreview, TextDelta
from vargpt.generation.text import decode_step, extend, left_pad, lm_logits, make_generators, sample_tokens
from vargpt.models.official import is_official_checkpoint
from vargpt.models.vae import multiscale_encode
from vargpt.models.vae.schedules import Schedule, get_schedule, nearest_template, pixel_size, schedule_num_tokens
from vargpt.models.vargpt import VARGPT, schedule_for_latent
from vargpt.processing.image import from_pil, to_pil
from vargpt.processing.processor import EncodedPrompt, Processor

__all__ = ["Engine", "GeneratedImage", "ChatResult", "TextDelta", "ImagePreview", "ImageDone", "Done", "parse_dtype"]

#: The longest reply ``Engine.write_replies`` writes before an image (a Shapes caption of three objects is about 25
#: BPE tokens).
REPLY_TOKENS = 64

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``"fp32"``/``"float32"`` or a torch dtype (None = as stored)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)} (fp16 is not supported on CPU)")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------------------------------------- engine
class Engine:
    """Inference over one loaded model.

    Args:
        model: the unified model (eval mode).
        processor: tokenizer, chat template and image preprocessing matching ``model.config``.
        micro_batch: the most images generated in one batch (larger requests run in consecutive micro-batches;
            default 8 on a CPU, unlimited on an accelerator; 0 = unlimited).
        decode_chunk: the most images the VAE decodes at once (default 2 on a CPU, all on an accelerator).
        compat: ``"official"`` (defaults that reproduce the released sampler: ``cfg_mode="official"``,
            ``positions="official"``) or ``"native"`` (``cfg_mode="null_prompt"``, M-RoPE positions).
        sampling: defaults of the ``ImageParams`` sampling fields left None (``cfg_scale``, ``temperature``,
            ``top_k``, ``top_p``): a mapping of some of them or an ``ImageParams`` (the rest:
            ``OFFICIAL_SAMPLING``). ``Engine.load`` passes the checkpoint's ``image_generation_config.json``.
    """

    def __init__(self, model: VARGPT, processor: Processor, *, compat: str = "native",
                 micro_batch: int | None = None, decode_chunk: int | None = None,
                 sampling: Mapping | ImageParams | None = None) -> None:
        if compat not in ("official", "native"):
            raise ValueError(f"compat={compat!r}: expected 'official' or 'native'")
        #: the defaults of the sampling fields (``ImageParams`` with every one of them set)
        self.sampling = sampling_defaults(sampling)
        self.model = model.eval()
        self.processor = processor
        self.config = model.config
        self.compat = compat
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cpu = self.device.type == "cpu"
        # On a CPU, batches past a few images stop paying (activations fall out of the cache; measured in
        # BENCHMARKS.md): large requests run as consecutive micro-batches, and the VAE decodes two images at a time.
        # Results do not depend on either (every sample has its own generator).
        self.micro_batch = micro_batch if micro_batch is not None else (8 if cpu else 0)
        self.decode_chunk = decode_chunk if decode_chunk is not None else (2 if cpu else 0)

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str | torch.device = "cpu",
             dtype: str | torch.dtype | None = None, tokenizer=None, compat: str | None = None) -> Engine:
        """Load our checkpoint directory or an official-layout one (bf16 weights load into the dtype asked for).

        ``path`` None: ``$VARGPT_CHECKPOINT``, else the shipped Shapes model (``vargpt.checkpoint.default_checkpoint``).
        The tokenizer, chat template and preprocessor settings come from the directory unless ``tokenizer`` is
        given; the default image-sampling settings from its ``image_generation_config.json`` when it has one. ``compat``
        defaults to ``"official"`` for official-layout directories, ``"native"`` otherwise.
        """
        path = Path(path) if path is not None else default_checkpoint()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a checkpoint directory")
        official = is_official_checkpoint(path)
        model = load_model(path, dtype=parse_dtype(dtype), device=device)
        processor = Processor(model.config, tokenizer) if tokenizer is not None else Processor.from_dir(
            path, model.config)
        return cls(model, processor, compat=compat or ("official" if official else "native"),
                   sampling=load_sampling_defaults(path))

    # ------------------------------------------------------------------------------------------ parameters
    def resolve(self, params: ImageParams | None) -> ImageParams:
        """Fill the engine-dependent defaults (sampling settings, cfg_mode, positions, schedule name)."""
        params = params or ImageParams()
        return replace(
            params,
            **{k: getattr(self.sampling, k) for k in SAMPLING_FIELDS if getattr(params, k) is None},
            cfg_mode=params.cfg_mode or ("official" if self.compat == "official" else "null_prompt"),
            positions=params.positions or ("official" if self.compat == "official" else "mrope"),
            schedule=params.schedule or self.config.gen_schedule,
        )

    def schedule(self, params: ImageParams) -> Schedule:
        """Latent grids for the params' aspect ratio and pixel budget (nearest aspect template)."""
        params = self.resolve(params)
        return get_schedule(nearest_template(params.aspect_ratio), params.schedule)

    # -------------------------------------------------------------------------------------- low-level API
    def new_session(self, batch: int) -> LLMSession:
        return LLMSession(self.model, batch, self.device, self.dtype)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[EncodedPrompt], session: LLMSession | None = None
                ) -> tuple[LLMSession, torch.Tensor]:
        """Run B prompts (left-padded into one batch) through the LLM -> (session, last hidden (B, Ht))."""
        st = self.config.special_tokens
        seqs, rows = [], []
        for enc in prompts:
            ids, r = self._expand_history(enc)
            seqs.append(ids)
            rows.extend(r)
        ids_BT, mask_BT = left_pad(seqs, st.endoftext, self.device)
        pv = [p.pixel_values for p in prompts if p.pixel_values is not None]
        grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
        pixel_values = torch.cat(pv).to(self.device) if pv else None
        grid = torch.cat(grids).to(self.device) if grids else None
        gen_rows = torch.cat(rows, dim=0).unsqueeze(0) if rows else None
        session = session or self.new_session(len(prompts))
        hidden = extend(session, ids_BT, mask_BT, pixel_values=pixel_values, image_grid_thw=grid,
                        gen_rows_NPC=gen_rows)
        return session, hidden[:, -1]

    def _expand_history(self, enc: EncodedPrompt) -> tuple[list[int], list[torch.Tensor]]:
        """Expand each generated image of the history into P ``<|image_gen_pad|>`` slots and compute its rows."""
        st = self.config.special_tokens
        if not enc.history_images:
            if st.image_gen_pad in enc.input_ids:
                raise ValueError("the prompt holds <|image_gen_pad|> tokens but no generated image was given")
            return list(enc.input_ids), []
        out, rows, k = [], [], 0
        for t in enc.input_ids:
            if t != st.image_gen_pad:
                out.append(t)
                continue
            if k >= len(enc.history_images):
                raise ValueError("more <|image_gen_pad|> placeholders than generated images in the history")
            z_LC = self._history_rows(enc.history_images[k])
            L = z_LC.shape[0]
            P = self.model.gen_slots(L)
            rows.append(F.pad(z_LC, (0, 0, 0, P - L)))
            out.extend([st.image_gen_pad] * P)
            k += 1
        if k != len(enc.history_images):
            raise ValueError(f"{len(enc.history_images)} generated images but {k} placeholders")
        return out, rows

    @torch.no_grad()
    def _history_rows(self, item) -> torch.Tensor:
        if item.bits is not None:
            schedule = tuple(tuple(hw) for hw in item.schedule)
            bits = [b.to(self.device).view(1, -1, b.shape[-1]) for b in item.bits]
        elif item.image is not None:
            schedule = get_schedule(nearest_template(item.image.height / item.image.width), self.config.gen_schedule)
            H, W = pixel_size(schedule, self.config.vae.downsample)
            img = from_pil([item.image.convert("RGB").resize((W, H), Image.Resampling.LANCZOS)]).to(self.device)
            f = self.model.vae.encode(img.to(self.dtype))
            bits = multiscale_encode(f, schedule)[0]
            schedule, _ = schedule_for_latent(*schedule[-1])
        else:
            raise ValueError("an image_gen history item needs 'bits' (+ 'schedule') or 'image'")
        return gen_rows_from_bits(self.model, bits, schedule)[0]

    def _null_prompts(self, n: int, assistant_prefix: str) -> list[EncodedPrompt]:
        enc = self.processor.encode([{"role": "user", "content": ""}], assistant_prefix=assistant_prefix)
        enc.input_ids = enc.input_ids + [self.config.special_tokens.image_gen_start]
        return [enc] * n

    def _seeds(self, base: int, n: int, seeds: Sequence[int] | None) -> list[int]:
        if seeds is None:
            return [base + i for i in range(n)]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        return [int(s) for s in seeds]

    def _image_loop(self, session: LLMSession, params: ImageParams, seeds: Sequence[int], *,
                    assistant_prefix: str, previews: bool, logits: list | None = None
                    ) -> Iterator[ImagePreview | ImageBatch]:
        """Runs ``image_steps``; yields previews (if asked) and finally the ``ImageBatch``."""
        schedule = self.schedule(params)
        uncond = None
        if params.cfg_scale != 1.0 and params.cfg_mode == "null_prompt":
            uncond, _ = self.prefill(self._null_prompts(session.batch, assistant_prefix))
        steps = image_steps(
            self.model, session, schedule, generators=make_generators(seeds), cfg_scale=params.cfg_scale,
            cfg_mode=params.cfg_mode, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            positions=params.positions, uncond_session=uncond, template=nearest_template(params.aspect_ratio),
            decode_chunk=self.decode_chunk)
        while True:
            try:
                step: ScaleStep = next(steps)
            except StopIteration as stop:
                yield stop.value
                return
            if logits is not None:
                logits.append(step.logits_BlD2.cpu())
            if previews:
                with torch.no_grad():
                    img = self.model.vae.decode(step.summed_BdHW.to(self.dtype)).float()
                for b, pil in enumerate(to_pil(img)):
                    yield ImagePreview(step.index, len(schedule), pil, b)

    def _results(self, batch: ImageBatch, params: ImageParams, seeds: Sequence[int], seconds: float,
                 logits: list | None = None) -> list[GeneratedImage]:
        pils = to_pil(batch.image_B3HW)
        B = len(pils)
        return [GeneratedImage(image=pils[b], seed=int(seeds[b]), params={**params.to_dict(), "seed": int(seeds[b])},
                               schedule=batch.schedule, bits=[x[b].cpu() for x in batch.ms_bits_Bld],
                               seconds=seconds / B, logits=[x[b] for x in logits] if logits else None,
                               decoded=batch.image_B3HW[b].cpu() if logits else None) for b in range(B)]

    # ---------------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str | EncodedPrompt], params: ImageParams | None = None, *,
                        seeds: Sequence[int] | None = None, assistant_prefix: str = "",
                        return_tensors: bool = False) -> list[GeneratedImage]:
        """Text-to-image for B prompts in one batch; image i equals prompt i generated alone with seed i.

        Args:
            prompts: user requests (rendered as one user turn, then ``assistant_prefix`` and
                ``<|image_gen_start|>``), or ready ``EncodedPrompt``s (``<|image_gen_start|>`` is appended).
            params: sampling, guidance, aspect ratio; seeds default to ``params.seed + i``.
            return_tensors: also return each scale's sampler logits and the float decoded image.
        """
        params = self.resolve(params)
        if not prompts:
            return []
        seeds = self._seeds(params.seed, len(prompts), seeds)
        mb = self.micro_batch or len(prompts)
        if len(prompts) > mb:
            return [img for i in range(0, len(prompts), mb)
                    for img in self.generate_images(prompts[i:i + mb], params, seeds=seeds[i:i + mb],
                                                    assistant_prefix=assistant_prefix, return_tensors=return_tensors)]
        t0 = time.perf_counter()
        encs = [self._encode_request(p, assistant_prefix) for p in prompts]
        session, _ = self.prefill(encs)
        batch = None
        logits = [] if return_tensors else None
        for ev in self._image_loop(session, params, seeds, assistant_prefix=assistant_prefix,
                                   previews=False, logits=logits):
            batch = ev
        return self._results(batch, params, seeds, time.perf_counter() - t0, logits)

    def _encode_request(self, p: str | EncodedPrompt, assistant_prefix: str, image: Image.Image | None = None
                        ) -> EncodedPrompt:
        start = self.config.special_tokens.image_gen_start
        if isinstance(p, EncodedPrompt):
            return replace(p, input_ids=list(p.input_ids) + [start])
        content = p if image is None else [{"type": "image", "image": image}, {"type": "text", "text": p}]
        enc = self.processor.encode([{"role": "user", "content": content}], assistant_prefix=assistant_prefix)
        enc.input_ids = enc.input_ids + [start]
        return enc

    @torch.no_grad()
    def edit(self, image: Image.Image, instruction: str, params: ImageParams | None = None, *, seed: int | None = None,
             assistant_prefix: str | None = None) -> GeneratedImage:
        """Instruction-based editing: the source image in the user turn, the answer's text, then the image.

        ``assistant_prefix``: None (default): the model writes its reply before the image (``write_replies``; the
        Shapes model names the edited scene there); a string: that text is the reply."""
        params = self.resolve(params)
        seeds = [params.seed if seed is None else seed]
        t0 = time.perf_counter()
        if assistant_prefix is None:
            enc = self.processor.encode([{"role": "user", "content": [{"type": "image", "image": image},
                                                                      {"type": "text", "text": instruction}]}])
            self.write_replies([enc])
            enc = self._encode_request(enc, "")
        else:
            enc = self._encode_request(instruction, assistant_prefix, image=image)
        session, _ = self.prefill([enc])
        batch = None
        for ev in self._image_loop(session, params, seeds, assistant_prefix=assistant_prefix or "",
                                   previews=False):
            batch = ev
        return self._results(batch, params, seeds, time.perf_counter() - t0)[0]

    @torch.no_grad()
    def generate_text(self, prompts: Sequence[EncodedPrompt], params: TextParams | None = None, *,
                      seeds: Sequence[int] | None = None) -> list[list[int]]:
        """Batched text continuation. No image is drawn: ``<|image_gen_start|>`` is never sampled, unless it is one
        of ``params.stop_token_ids``, where it ends the text (the text an answer writes before its image, e.g. the
        editing suite's replies). Returns the new ids of each prompt (a stop token included when one ended it)."""
        params = params or TextParams()
        st = self.config.special_tokens
        B = len(prompts)
        seeds = self._seeds(params.seed, B, seeds)
        gens = make_generators(seeds)
        session, hidden = self.prefill(prompts)
        stops = {st.im_end, *params.stop_token_ids}
        banned = () if st.image_gen_start in stops else (st.image_gen_start,)
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        out: list[list[int]] = [[] for _ in range(B)]
        for i in range(params.max_new_tokens):
            tok = sample_tokens(lm_logits(self.model, hidden), temperature=params.temperature, top_k=params.top_k,
                                top_p=params.top_p, generators=gens, banned=banned)
            for b in range(B):
                if alive[b]:
                    out[b].append(int(tok[b]))
            alive = alive & ~torch.isin(tok, torch.tensor(sorted(stops), device=tok.device))
            if not bool(alive.any()) or i + 1 == params.max_new_tokens:
                break
            hidden = decode_step(session, tok, alive)[:, -1]
        return out

    def write_replies(self, prompts: Sequence[EncodedPrompt], max_new_tokens: int = REPLY_TOKENS) -> list[str]:
        """The text each answer writes before its image (SHAPES.md: "a short sentence followed by the image"):
        greedy decoding until the model opens the image (``<|image_gen_start|>``), ends its turn, writes any other
        special token (an image placeholder is not text) or writes ``max_new_tokens`` tokens. The reply's ids (up to
        that token) are appended to each prompt's ``input_ids`` in place, so that ``generate_images`` draws the image
        after them (where the turn ended without an image, the image is drawn after the text all the same). Returns
        the replies as text."""
        special = set(asdict(self.config.special_tokens).values())
        outs = self.generate_text(prompts, TextParams(max_new_tokens=max_new_tokens, stop_token_ids=sorted(special)))
        replies = []
        for enc, ids in zip(prompts, outs, strict=True):
            if ids and ids[-1] in special:
                ids = ids[:-1]
            enc.input_ids = list(enc.input_ids) + ids
            replies.append(self.processor.decode(ids).strip())
        return replies

    @torch.no_grad()
    def understand(self, images: Sequence[Image.Image], question: str, params: TextParams | None = None) -> str:
        """Answer one question about one or more images."""
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]
        enc = self.processor.encode([{"role": "user", "content": content}])
        ids = self.generate_text([enc], params)[0]
        return self.processor.decode([t for t in ids if t != self.config.special_tokens.im_end])

    def chat(self, messages: list[dict], text_params: TextParams | None = None,
             image_params: ImageParams | None = None, *, draw: str = "auto", max_images: int = 4) -> ChatResult:
        """One assistant turn; the model may draw (``<|image_gen_start|>``), after which text continues.

        ``draw``: ``"auto"`` (the model decides), ``"first"`` (the answer starts with an image: the first token is
        forced to ``<|image_gen_start|>``) or ``"never"`` (``<|image_gen_start|>`` is never sampled).
        ``max_images``: at most this many images per turn (then ``<|image_gen_start|>`` is no longer sampled).
        ``text_params.max_new_tokens`` counts text tokens only.
        """
        result = None
        for ev in self.stream(messages, text_params, image_params, draw=draw, max_images=max_images,
                              previews=False):
            if isinstance(ev, Done):
                result = ev.result
        return result

    @torch.no_grad()
    def stream(self, messages: list[dict], text_params: TextParams | None = None,
               image_params: ImageParams | None = None, *, draw: str = "auto", max_images: int = 4,
               previews: bool = True) -> Iterator[Event]:
        """Like ``chat``, as events: ``TextDelta``s, one ``ImagePreview`` per finished scale (when ``previews``),
        ``ImageDone`` per image and a final ``Done`` with the ``ChatResult`` (equal to ``chat``'s for the same
        seeds)."""
        if draw not in ("auto", "first", "never"):
            raise ValueError(f"draw={draw!r}: expected 'auto', 'first' or 'never'")
        if max_images < (1 if draw == "first" else 0):
            raise ValueError(f"max_images={max_images}: expected an integer >= {1 if draw == 'first' else 0}")
        tp = text_params or TextParams()
        ip = self.resolve(image_params)
        st = self.config.special_tokens
        proc = self.processor
        enc = proc.encode(messages)
        session, hidden = self.prefill([enc])
        text_gen = make_generators([tp.seed])
        stops = {st.im_end, *tp.stop_token_ids}
        ids: list[int] = []
        text_ids: list[int] = []  # text since the last image, for incremental decoding
        shown = ""
        pieces: list[str] = []
        content: list[dict] = []
        images: list[GeneratedImage] = []
        n_text = 0
        finish = "length"

        def flush_text():
            """The not-yet-shown tail of the text since the last image (also a trailing partial character)."""
            full = proc.decode(text_ids)
            if len(full) > len(shown):
                pieces.append(full[len(shown):])
                yield TextDelta(full[len(shown):])
            content.append({"type": "text", "text": full})

        while True:
            if draw == "first" and not ids:
                tok = torch.tensor([st.image_gen_start], device=self.device)
            elif n_text >= tp.max_new_tokens:
                break
            else:
                # image tokens do not count as text tokens; ``max_images`` bounds the drawing instead
                banned = (st.image_gen_start,) if draw == "never" or len(images) >= max_images else ()
                tok = sample_tokens(lm_logits(self.model, hidden), temperature=tp.temperature, top_k=tp.top_k,
                                    top_p=tp.top_p, generators=text_gen, banned=banned)
            t = int(tok[0])
            if t in stops:
                finish = "stop"
                break
            if t == st.image_gen_start:
                if text_ids:
                    yield from flush_text()
                text_ids, shown = [], ""
                t0 = time.perf_counter()
                decode_step(session, tok)
                seed = ip.seed + len(images)
                batch = None
                for ev in self._image_loop(session, ip, [seed], assistant_prefix="",
                                           previews=previews):
                    if isinstance(ev, ImageBatch):
                        batch = ev
                    else:
                        yield ev
                img = self._results(batch, ip, [seed], time.perf_counter() - t0)[0]
                images.append(img)
                yield ImageDone(img)
                session = batch.session
                hidden = self._close_image(session, schedule_num_tokens(batch.schedule))
                P = self.model.gen_slots(schedule_num_tokens(batch.schedule))
                ids += [st.image_gen_start] + [st.image_gen_pad] * P + [st.image_gen_end]
                content.append({"type": "image_gen", "image": img.image, "bits": img.bits,
                                "schedule": img.schedule})
                pieces.append("<image>")
                continue
            ids.append(t)
            text_ids.append(t)
            n_text += 1
            full = proc.decode(text_ids)
            if len(full) > len(shown) and not full.endswith("\ufffd"):
                delta, shown = full[len(shown):], full
                pieces.append(delta)
                yield TextDelta(delta)
            hidden = decode_step(session, tok)[:, -1]
        if text_ids:
            yield from flush_text()
        result = ChatResult(text="".join(pieces), images=images, token_ids=ids,
                            message={"role": "assistant", "content": content}, finish_reason=finish,
                            text_params=tp.to_dict())
        yield Done(result)

    def _close_image(self, session: LLMSession, num_tokens: int) -> torch.Tensor:
        """After an image: P - L zero rows (through GenProjIn) and ``<|image_gen_end|>``, as in training -> the
        last hidden state (1, Ht)."""
        st = self.config.special_tokens
        P = self.model.gen_slots(num_tokens)
        C = self.config.decoder.width
        zeros = torch.zeros(session.batch, P - num_tokens, C, device=self.device, dtype=self.dtype)
        end = torch.full((session.batch, 1), st.image_gen_end, device=self.device)
        emb = torch.cat([self.model.gen_proj_in(zeros), self.model.embed_tokens(end)], dim=1).to(self.dtype)
        q = emb.shape[1]
        pos = (session.next_pos_B[:, None] + torch.arange(q, device=self.device)[None]).unsqueeze(0).expand(3, -1, -1)
        valid = torch.ones(session.batch, q, dtype=torch.bool, device=self.device)
        hidden = session.step(emb, pos, valid)
        session.next_pos_B = session.next_pos_B + q
        return hidden[:, -1]
