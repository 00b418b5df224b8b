"""The network as a denoiser for every diffusion sampler: guidance, soft-mask feedback, the shared knobs."""

from __future__ import annotations

import math

import torch

from ..models.common import bucketed_positions
from ..models.softmask import SoftFeedback
from ..objectives.base import unwrap
from ..objectives.guidance import guided_logits, unconditional_input
from ..objectives.mdlm import MaskedDiffusion
from .base import Sampler, SamplingError, check_knobs

GUIDANCE_SCHEDULES = ("constant", "linear")


def guidance_weight(weight: float, schedule: str, t: torch.Tensor) -> torch.Tensor:
    """Per-row guidance weight at times ``t`` (R,): ``constant`` w, or ``linear`` w t (strongest at the
    first step, t = 1, and fading to 0 as the canvas fills)."""
    if schedule == "constant":
        return torch.full_like(t, weight)
    if schedule == "linear":
        return weight * t
    raise SamplingError(f"unknown guidance schedule {schedule!r} ({' or '.join(GUIDANCE_SCHEDULES)})")


class Denoiser:
    """The backbone seen by diffusion samplers: logits at the selected positions of some rows.

    The number of rows evaluated changes from step to step (rows finish, cached rows are skipped);
    it is padded up to a multiple of ``batch / 8`` with copies of the first row (whose outputs are
    not read), so the network sees a handful of shapes (see :func:`bucketed_positions`).

    Unsupervised classifier-free guidance (SMDM, Nie et al. 2024, eq. 7; ``algorithms.md`` section 3)
    with weight ``w != 0``: the unconditional branch is the same canvas with every fixed token of the
    sampler's input canvas (the prompt) replaced by the mask, and the logits become
    ``l_u + (1 + w)(l_c - l_u)``: two forward passes per evaluation of a row that has a prompt. With
    ``w = 0`` (or no prompt) only the conditional pass runs, so the result is exactly the unguided one.

    Soft-masking (a model with a soft-mask module, ``soft=True``): the denoiser keeps, per row, the
    summary of that row's last evaluation at the positions that were masked then, and feeds it back
    at the row's next evaluation (the first evaluation of a row has none). So the feedback is always
    the row's previous forward pass, refreshed only when the row is evaluated: with the cached
    ancestral sampler a row whose canvas did not change keeps its cached logits and its feedback. To
    summarize every masked position, a soft-mask model computes the output layer at all of them, also
    when the sampler asks for fewer (first-hitting). With guidance, the feedback is the guided
    prediction and both branches receive it.
    """

    def __init__(self, model, diffusion: MaskedDiffusion, canvas: torch.Tensor, soft: bool = True,
                 guidance: float = 0.0, guidance_schedule: str = "constant"):
        self.model, self.diffusion = model, diffusion
        self.quantum = max(1, -(-len(canvas) // 8))
        self.calls = 0
        self.feedback: SoftFeedback | None = None
        if soft and unwrap(model).soft_mask is not None:
            self.feedback = SoftFeedback.empty(*canvas.shape, model.soft_mask.top_k, device=canvas.device)
        self.guidance, self.guidance_schedule = guidance, guidance_schedule
        self.prompt = (canvas != diffusion.mask_id) if guidance else None

    def _pad(self, rows: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Pad the row dimension to a multiple of the quantum with copies of the first row."""
        extra = -(-rows // self.quantum) * self.quantum - rows
        return [torch.cat([v, v[:1].expand(extra, *v.shape[1:])]) if extra else v for v in tensors]

    def _forward(self, x, sigma, positions, feedback, rows) -> torch.Tensor:
        index, n = bucketed_positions(positions)
        extra = {} if feedback is None else {"feedback": feedback}
        if getattr(self.model, "takes_rows", False):  # a block diffusion context: which canvas rows these are
            extra["rows"] = rows
        return self.model(x, sigma, positions=index, **extra)[:n].float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (R, L) the canvases of batch rows ``rows`` (R,), t (R,) float64, positions (R, L) bool
        (masked positions) -> logits (N, V) at ``positions`` in row-major order."""
        self.calls += 1
        n_rows = x.shape[0]
        wanted = positions
        if self.feedback is not None:
            positions = x == self.diffusion.mask_id
        feedback = None if self.feedback is None else self.feedback.select(rows)
        padded = self._pad(n_rows, x, t, positions, rows)
        x_p, t_p, pos_p = padded[:3]
        pos_p[n_rows:] = False
        if feedback is not None:
            feedback = self.feedback.select(padded[3])
        sigma = self.diffusion.model_sigma(t_p)
        logits = self._forward(x_p, sigma, pos_p, feedback, padded[3])
        if self.prompt is not None:
            prompt = self.prompt[rows]
            guided = prompt.any(dim=1)
            if guided.any():
                x_u = self._pad(n_rows, unconditional_input(x, prompt, self.diffusion.mask_id))[0]
                l_u = self._forward(x_u, sigma, pos_p, feedback, padded[3])
                w = guidance_weight(self.guidance, self.guidance_schedule, t).to(logits.dtype)
                per_position = (w * guided)[positions.nonzero()[:, 0]][:, None]
                logits = torch.where(per_position != 0, guided_logits(logits, l_u, per_position), logits)
        if self.feedback is not None:
            self.feedback.store(rows, positions, logits, self.diffusion.mask_id)
            return logits[wanted[positions]]
        return logits


class DiffusionSampler(Sampler):
    """What every masked-diffusion sampler shares: the categorical knobs (temperature, top-k, top-p,
    precision), soft-mask feedback (``soft_mask``, for models that have it) and unsupervised
    classifier-free guidance (``guidance`` weight, ``guidance_schedule``); see :class:`Denoiser`."""

    def __init__(self, diffusion: MaskedDiffusion, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 precision: str = "float64", soft_mask: bool = True, guidance: float = 0.0,
                 guidance_schedule: str = "constant"):
        check_knobs(temperature, top_k, top_p, precision)
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise SamplingError(f"unknown guidance schedule {guidance_schedule!r} ({' or '.join(GUIDANCE_SCHEDULES)})")
        if not math.isfinite(guidance):
            raise SamplingError(f"the guidance weight must be finite, got {guidance}")
        self.diffusion, self.mask_id = diffusion, diffusion.mask_id
        self.temperature, self.top_k, self.top_p, self.precision = temperature, top_k, top_p, precision
        self.soft_mask, self.guidance, self.guidance_schedule = soft_mask, guidance, guidance_schedule

    def denoiser(self, model, canvas: torch.Tensor) -> Denoiser:
        return Denoiser(model, self.diffusion, canvas, self.soft_mask, self.guidance, self.guidance_schedule)


def block_cache_start(model, canvas: torch.Tensor, mask_id: int, block_cache: str) -> int:
    """Where the generated part of every row of ``canvas`` starts, for Fast-dLLM's cached block decoding:
    the rows must share it (one batched call per chunk), and a block cache needs a backbone that takes one."""
    free = canvas == mask_id
    first = torch.where(free.any(dim=1), free.float().argmax(dim=1), torch.full_like(free[:, 0], canvas.shape[1],
                                                                                  dtype=torch.long))
    if not bool((first == first[0]).all()):
        raise SamplingError("Fast-dLLM's cached block decoding needs rows whose generated parts start at the same "
                            "position (equal prompt lengths)")
    net = unwrap(model)
    if block_cache != "none" and not getattr(net, "BLOCK_CACHES", False):
        raise SamplingError(f"sample.block_cache needs a backbone that takes block caches (dit, llama, gpt2), not "
                            f"{type(net).__name__}")
    if block_cache != "none" and (net.time_conditioning or net.soft_mask is not None):
        raise SamplingError("Fast-dLLM's block caches call the network directly: not for time-conditioned or "
                            "soft-mask models")
    return int(first[0])
