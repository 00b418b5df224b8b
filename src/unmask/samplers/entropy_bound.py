"""DiffusionGemma's decoding (transformers 5.25 ``DiffusionGemmaForBlockDiffusion.generate`` with its
``EntropyBoundSamplerConfig``): canvases of uniform noise after the prompt, each denoised by a fixed number of
steps that accept the lowest-entropy positions within an entropy budget and renoise the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.base import unwrap
from .base import ORDER, PURPOSES, REMASK, TOKEN, RowStreams, SamplingError, top_index
from .engine import DecodeCanvas, Decoding, Encode, Frame, Outcome, Sampler


@dataclass(frozen=True)
class EntropyBoundSettings:
    """The ``sample.*`` keys of the ``entropy_bound`` sampler (:class:`EntropyBoundSampler`)."""

    steps: int = 128  # denoising steps (per canvas for entropy_bound: max_denoising_steps)
    entropy_bound: float = 0.1  # a step accepts the lowest-entropy positions while their entropies sum to at most this
    temperature_max: float = 0.8  # the first step's temperature (t_max)
    temperature_min: float = 0.4  # the temperature the schedule falls towards (t_min)
    stable_steps: int = 1  # adaptive stop: the argmax canvas equals that of this many previous steps (0: always)
    stop_entropy: float = 0.005  # adaptive stop: and the mean entropy is below this (0: no adaptive stop)

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "entropy_bound": "[0, inf)",
                                        "temperature_max": "(0, inf)", "temperature_min": "(0, inf)",
                                        "stable_steps": "[0, inf)", "stop_entropy": "[0, inf)"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    SWITCHES: ClassVar[tuple[str, ...]] = ()


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy (...,) of ``softmax(z)`` over the last dimension, float32 (as ``Categorical(logits=z).entropy()``)."""
    log_p = z.float().log_softmax(-1)
    return -(log_p.exp() * log_p.clamp(min=torch.finfo(torch.float32).min)).sum(-1)


def accepted(h: torch.Tensor, bound: float) -> torch.Tensor:
    """(R, C) bool: with the entropies ``h`` (R, C) sorted ascending, rank ``r`` is accepted when the entropies
    of the ranks before it sum to at most ``bound`` (the lowest always is)."""
    ordered, order = h.sort(dim=-1, stable=True)
    keep = (ordered.cumsum(-1) - ordered) <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


class EntropyBoundSampler(Sampler):
    """DiffusionGemma's sampler (its ``generate``). The generated region of each row (the masked positions after its
    prompt) is filled canvas by canvas, ``C`` = the model's canvas length (``model.block_size``), the last canvas
    whole. For each canvas: the tokens not yet encoded (the prompt, then the previous canvas) are encoded (an
    :class:`~unmask.samplers.engine.Encode` call, not counted in NFE: NFE counts decoder passes, as the reference);
    the canvas starts as uniform draws over the model's vocabulary; step ``s = steps .. 1`` decodes it (self-conditioned
    on the previous step's tempered logits), tempers with ``T = t_min + (t_max - t_min) s / steps``
    (float32), draws ``x ~ softmax(z / T)`` per position (one float64 inverse-CDF draw each; the reference's
    ``torch.multinomial`` is the race ``argmax p / q``, ``q ~ Exp(1)``: the same distribution, and the tests replay
    its draws that way), accepts the positions :func:`accepted` by ``entropy_bound`` (entropies of the tempered
    distribution), keeps the draws there and renoises every other position with a uniform token. With
    ``stop_entropy > 0`` a row stops denoising the canvas once its argmax canvas has been the same for
    ``stable_steps`` steps and its mean entropy is below ``stop_entropy`` (its canvas, argmax and
    self-conditioning then stay as they were).
    The **argmax** canvas of the last step is appended. A row ends at the first canvas holding an EOS (PAD after it)
    or at the end of its region; PAD fills what follows. Every draw comes from the row's own stream, keyed by
    (canvas, step, position): rows are batch-invariant, and finished or stopped rows are no longer evaluated.
    ``tokens_per_forward`` of a row: its generated non-PAD tokens over the decoder passes it took part in (the
    reference's definition).

    diffusers' ``DiffusionGemmaPipeline`` differs (it appends the sampled canvas, pads nothing after EOS and applies
    the temperature twice); this follows transformers' ``generate``, the model's reference.
    """

    streams = RowStreams  # per-row random streams (tests replay a reference's draws through it)

    def __init__(self, mask_id: int, vocab: int, canvas: int, eos_id: int, pad_id: int, steps: int = 48,
                 entropy_bound: float = 0.1, temperature_max: float = 0.8, temperature_min: float = 0.4,
                 stable_steps: int = 1, stop_entropy: float = 0.005):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        if entropy_bound < 0 or stop_entropy < 0 or stable_steps < 0:
            raise SamplingError("sample.entropy_bound, sample.stop_entropy and sample.stable_steps must be >= 0")
        if not (temperature_min > 0 and temperature_max > 0):
            raise SamplingError("sample.temperature_min and sample.temperature_max must be > 0")
        self.mask_id, self.vocab, self.canvas, self.eos_id, self.pad_id = mask_id, vocab, canvas, eos_id, pad_id
        self.steps, self.entropy_bound, self.stable_steps, self.stop_entropy = steps, entropy_bound, stable_steps, \
            stop_entropy
        self.t_max, self.t_min = temperature_max, temperature_min

    def temperature(self, step: int) -> torch.Tensor:
        """``t_min + (t_max - t_min) step / steps`` in float32 (step = steps .. 1)."""
        t_min, t_max = torch.tensor(self.t_min), torch.tensor(self.t_max)
        return t_min + (t_max - t_min) * (torch.tensor(float(step)) / self.steps)

    revises = True  # renoising redraws accepted tokens
    holds_cache = True  # the encoder cache of the prompt and finished canvases

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check the request (prompts first, then only masked positions) and return its decoding."""
        self.check(canvas, seeds)
        free = canvas == self.mask_id
        prompt = (~free).sum(1)
        column = torch.arange(canvas.shape[1], device=canvas.device)
        if bool(((column[None] >= prompt[:, None]) != free).any()):
            raise SamplingError("a canvas model continues its prompt: the masked positions must all follow the prompt")
        if not bool(free.any(1).all()):
            raise SamplingError("every row needs masked positions to generate")
        if bool(((canvas >= self.vocab) & ~free).any()):
            raise SamplingError(f"a prompt token is outside the model's {self.vocab} ids")
        whole = int((prompt + self.canvas * (-(-(canvas.shape[1] - prompt) // self.canvas))).max())
        limit = unwrap(model).cfg.length
        if whole > limit:
            raise SamplingError(f"{whole} positions (a prompt and its whole canvases of {self.canvas}) exceed the "
                                f"model's length {limit}")
        return self._decode(canvas, prompt, self.streams(seeds))

    def _draws(self, streams: RowStreams, rows: torch.Tensor, counter: int, purpose: int) -> torch.Tensor:
        """Uniform tokens (R, C) of ``rows`` for draw ``counter``."""
        index = torch.arange(self.canvas, device=rows.device).repeat(len(rows))
        drawn = streams.integers(rows.repeat_interleave(self.canvas), counter * PURPOSES + purpose, index, self.vocab)
        return drawn.view(len(rows), self.canvas)

    def _decode(self, canvas: torch.Tensor, prompt: torch.Tensor, streams: RowStreams) -> Decoding:
        b, length = canvas.shape
        c, device = self.canvas, canvas.device
        counts = -(-(length - prompt) // c)  # each row's canvases: its region in whole canvases
        ends = prompt + c * counts
        width = int(ends.max())
        column = torch.arange(width, device=device)
        out = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        out[:, :length] = torch.where(canvas == self.mask_id, self.pad_id, canvas)
        written = column[None] < prompt[:, None]  # the prompt and the canvases appended so far
        row_nfe = torch.zeros(b, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        pending = out[:, :int(prompt.max())]
        valid = written[:, :pending.shape[1]]
        for k in range(int(counts.max())):
            yield Encode(pending, valid & ~done[:, None])
            start = prompt + c * k  # each row's canvas position
            rows = (~done).nonzero()[:, 0]
            x = self._draws(streams, rows, k * (self.steps + 1), ORDER)
            argmax, feedback = x.clone(), None
            history = torch.full((self.stable_steps, len(rows), c), -1, dtype=torch.long, device=device)
            stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for j, step in enumerate(range(self.steps, 0, -1), start=1):
                live = (~stopped).nonzero()[:, 0]
                logits = yield DecodeCanvas(x[live], rows[live], None if feedback is None else feedback[live])
                row_nfe[rows[live].cpu()] += 1
                z = logits / self.temperature(step).to(device)
                counter = (k * (self.steps + 1) + j)
                index = torch.arange(c, device=device).repeat(len(live))
                probs = z.softmax(-1)
                sampled = streams.categorical(probs.view(-1, probs.shape[-1]), rows[live].repeat_interleave(c),
                                              counter * PURPOSES + TOKEN, index).view(len(live), c)
                h = entropy(z)
                keep = accepted(h, self.entropy_bound)
                noise = self._draws(streams, rows[live], counter, REMASK)
                x[live] = torch.where(keep, sampled, noise)
                argmax[live] = top_index(z)
                feedback = z if feedback is None else feedback.index_copy(0, live, z)
                if self.stop_entropy > 0:
                    now = argmax[live]
                    stable = (history[:, live] == now[None]).all(-1).all(0)
                    if self.stable_steps:
                        history[:, live] = torch.cat([history[1:, live], now[None]])
                    stopped[live] = stable & (h.mean(-1) < self.stop_entropy)
                yield Frame(lambda: self._shown(out, written, rows, start, argmax, length))
                if bool(stopped.all()):
                    break
            new = argmax.clone()
            eos = new == self.eos_id
            after = (eos.cumsum(1) - eos.long()) > 0
            new[after] = self.pad_id
            place = start[rows, None] + torch.arange(c, device=device)
            out[rows[:, None], place] = new
            written[rows[:, None], place] = True
            done[rows] = eos.any(1) | (start[rows] + c >= ends[rows])
            if bool(done.all()):
                break
            at = (start[:, None] + c + torch.arange(c, device=device)).clamp(max=width - 1) - c  # (finished: any)
            pending = out.gather(1, at)
            valid = ~done[:, None].expand(-1, c)
        generated = (column[None] >= prompt[:, None]) & (out != self.pad_id)
        return Outcome(out[:, :length], row_nfe, row_tokens=generated.sum(1).cpu())

    def _shown(self, out: torch.Tensor, written: torch.Tensor, rows: torch.Tensor, start: torch.Tensor,
               argmax: torch.Tensor, length: int) -> torch.Tensor:
        """The canvas (B, length) as streamed: the prompt and the appended canvases, the current canvases'
        argmax, masks where nothing is decided yet."""
        shown = torch.where(written, out, self.mask_id)
        place = start[rows, None] + torch.arange(argmax.shape[1], device=out.device)
        shown[rows[:, None], place] = argmax
        return shown[:, :length]
