"""The network as a denoiser for every diffusion sampler: guidance, soft-mask feedback, the shared knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models.softmask import SoftFeedback
from ..objectives.base import unwrap
from ..objectives.guidance import guided_logits, unconditional_input
from ..objectives.mdlm import MaskedDiffusion
from .base import DrawSettings, RowStreams, SamplingError, check_knobs
from .engine import Chunk, Decoding, Denoise, Sampler

GUIDANCE_SCHEDULES = ("constant", "linear")
BLOCK_CACHES = ("none", "prefix", "dual")  # Fast-dLLM's approximate KV caches of block decoding


def guidance_weight(weight: float, schedule: str, t: torch.Tensor) -> torch.Tensor:
    """Per-row guidance weight at times ``t`` (R,): ``constant`` w, or ``linear`` w t (strongest at the
    first step, t = 1, and fading to 0 as the canvas fills)."""
    if schedule == "constant":
        return torch.full_like(t, weight)
    if schedule == "linear":
        return weight * t
    raise SamplingError(f"unknown guidance schedule {schedule!r} ({' or '.join(GUIDANCE_SCHEDULES)})")


@dataclass
class Prepared:
    """A denoiser call made ready for the network: its rows ``x`` (R, L), ``sigma`` (R,), the ``positions``
    (R, L) bool whose logits the network computes (every masked one for soft-mask feedback), the
    unconditional branch's input (None: no guided row) and the per-position guidance weight (N, 1)."""

    x: torch.Tensor
    sigma: torch.Tensor
    positions: torch.Tensor
    wanted: torch.Tensor
    rows: torch.Tensor
    unconditional: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def guide(self, conditional: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
        """The guided logits ``l_u + (1 + w)(l_c - l_u)`` where the weight is not 0."""
        return torch.where(self.weight != 0, guided_logits(conditional, unconditional, self.weight), conditional)


class Denoiser:
    """The backbone seen by diffusion samplers: logits at the selected positions of some rows. A sampler
    asks through ``denoiser(x, t, positions, rows)``, which makes the :class:`~unmask.samplers.engine.Denoise`
    call to yield; the engine runs the network between :meth:`prepare` and :meth:`finish`.

    The number of rows evaluated changes from step to step (rows finish, cached rows are skipped); the
    engine pads it up to a multiple of ``batch / 8`` with copies of the first row (whose outputs are not
    read), so the network sees a handful of shapes (see :func:`bucketed_positions`).

    Unsupervised classifier-free guidance (SMDM, Nie et al. 2024, eq. 7) with weight ``w != 0``: the
    unconditional branch is the same canvas with every fixed token of the sampler's input canvas (the
    prompt) replaced by the mask, and the logits become ``l_u + (1 + w)(l_c - l_u)``: two forward passes
    per evaluation of a row that has a prompt. With ``w = 0`` (or no prompt) only the conditional pass
    runs, so the result is exactly the unguided one.

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
        self.diffusion, self.batch = diffusion, len(canvas)
        self.feedback: SoftFeedback | None = None
        if soft and unwrap(model).soft_mask is not None:
            self.feedback = SoftFeedback.empty(*canvas.shape, model.soft_mask.top_k, device=canvas.device)
        self.guidance, self.guidance_schedule = guidance, guidance_schedule
        self.prompt = (canvas != diffusion.mask_id) if guidance else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> Denoise:
        """The call for logits (N, V) at ``positions`` (R, L) bool (masked positions, row-major) of the canvases
        ``x`` (R, L) of batch rows ``rows`` (R,) at times ``t`` (R,) float64."""
        return Denoise(self, x, t, positions, rows)

    def prepare(self, call: Denoise) -> Prepared:
        """The network's inputs for ``call``: positions widened to every masked one for soft-mask feedback, the
        unconditional branch and the guidance weights of its guided rows."""
        mask_id = self.diffusion.mask_id
        positions = call.x == mask_id if self.feedback is not None else call.positions
        ready = Prepared(call.x, self.diffusion.model_sigma(call.t), positions, call.positions, call.rows)
        if self.prompt is not None:
            prompt = self.prompt[call.rows]
            guided = prompt.any(dim=1)
            if guided.any():
                ready.unconditional = unconditional_input(call.x, prompt, mask_id)
                w = guidance_weight(self.guidance, self.guidance_schedule, call.t).float()
                ready.weight = (w * guided)[positions.nonzero()[:, 0]][:, None]
        return ready

    def finish(self, ready: Prepared, logits: torch.Tensor) -> torch.Tensor:
        """The call's logits at the positions it asked for; soft-mask feedback stored for its rows."""
        if self.feedback is None:
            return logits
        self.feedback.store(ready.rows, ready.positions, logits, self.diffusion.mask_id)
        return logits[ready.wanted[ready.positions]]


@dataclass(frozen=True)
class DenoiseSettings(DrawSettings):
    """What every masked-diffusion sampler reads besides the draw: soft-mask feedback and guidance."""

    soft_mask: bool = True  # soft-mask models: feed back the previous step (false = binary inputs)
    guidance: float = 0.0  # unsupervised classifier-free guidance weight w (0 = none)
    guidance_schedule: str = "constant"  # constant w, or linear w * t (fading as the canvas fills)

    RANGES: ClassVar[dict[str, str]] = {"guidance": "[-1, inf)"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"guidance_schedule": GUIDANCE_SCHEDULES}
    SWITCHES: ClassVar[tuple[str, ...]] = ("guidance",)


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
        """A :class:`Denoiser` of ``model`` for ``canvas`` with this sampler's soft-mask and guidance settings."""
        return Denoiser(model, self.diffusion, canvas, self.soft_mask, self.guidance, self.guidance_schedule)


class MultinomialSampler(DiffusionSampler):
    """A diffusion sampler whose candidates are multinomial draws, as ``torch.multinomial`` makes them in SDAR's and
    LLaDA2's code (:func:`~unmask.samplers.base.drawn_candidates`, an exponential race in float64), from per-row
    streams (``streams``: a test can give the reference's recorded draws instead); subclasses write ``_decode``."""

    def __init__(self, diffusion: MaskedDiffusion, **knobs):
        super().__init__(diffusion, **knobs)
        if self.precision != "float64":
            raise SamplingError(f"the {type(self).__name__} draws by an exponential race in float64: "
                                f"precision=float32 does not apply")
        self.streams = RowStreams

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        return self._decode(canvas, self.streams(seeds), self.denoiser(model, canvas))

    def _decode(self, canvas: torch.Tensor, streams: RowStreams, denoise) -> Decoding:
        raise NotImplementedError


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


def block_chunk(x: torch.Tensor, call: int, start: int, end: int, mode: str | None, read: torch.Tensor) -> Chunk:
    """Call ``call`` of Fast-dLLM's cached decoding of the block ``[start, end)`` of ``x`` (B, L): the first
    feeds the whole canvas and records the cache (``mode`` prefix or dual); later ones feed the block alone
    (dual) or the canvas from the block on (prefix); without a cache (``mode`` None) every call feeds the
    whole canvas. The chunk's ``length`` is where its first position sits in the canvas; its logits come
    at the positions ``read`` (B, L) bool of the canvas (inside the block), (N, V) row-major."""
    if call == 0 or mode is None:
        return Chunk(x, mode, record=call == 0, positions=read)
    stop = end if mode == "dual" else x.shape[1]
    return Chunk(x[:, start:stop], mode, length=start, positions=read[:, start:stop])
