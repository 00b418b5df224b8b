"""lm-evaluation-harness model ``unmask``: any model source of :func:`unmask.checkpoints.pretrained.open_source`.

    pip install -e '.[lm-eval]'
    lm_eval --model unmask --model_args pretrained=runs/quickstart,mc_samples=32 --tasks lambada_openai
    python -m unmask.eval.lm_eval --model unmask ...   # the same, for lm-eval versions without plugins

* ``loglikelihood(context, continuation)``: AR models exactly; MDLM models by the NELBO bound of the
  continuation with the context clean (``mc_samples`` Monte-Carlo draws, see
  :func:`unmask.eval.likelihood.continuation_loglikelihoods`). The bound is a lower bound on the
  log-likelihood, so MDLM accuracies compare bounds, as in the MDLM and SMDM papers. The mean
  Monte-Carlo standard error is logged and kept in ``last_stderr``. ``estimator=count`` (default for
  models without time conditioning) or ``time`` selects the Monte-Carlo estimator. ``guidance=w``
  scores with SMDM's unsupervised classifier-free guidance (the context masked in the unconditional
  branch) and guides generation too.
* ``loglikelihood_rolling(text)``: the same bound over disjoint windows of the model's length.
* ``generate_until(context, gen_kwargs)``: any sampler (``sampler=``, ``steps=``, ... are
  ``SampleConfig`` fields given in ``--model_args``); ``max_gen_toks`` new tokens after the context
  (left-truncated to fit), cut at the first EOS or ``until`` string; ``temperature`` in
  ``gen_kwargs`` overrides the configured one (``do_sample=False`` means temperature 0).

The package declares the ``lm_eval.models`` entry point ``unmask``, so lm-eval versions with plugin
discovery find it without flags; importing this module registers it too.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..config import config_from_dict, merge_trees, to_dict
from ..data.layouts import starts_with_bos
from ..families import family_of
from ..pipeline import from_pretrained, make_canvas
from ..runtime import autocast, resolve_precision
from ..samplers.base import row_seeds
from ..samplers.registry import make_sampler
from .likelihood import continuation_loglikelihoods

log = logging.getLogger(__name__)


@register_model("unmask")
class UnmaskLM(LM):
    """An unmask model for EleutherAI's ``lm-evaluation-harness`` (``--model unmask``): log-likelihoods from the
    objective's estimator, generation with the configured sampler."""

    def __init__(self, pretrained: str, mc_samples: int = 32, batch_size: int | str = 64, device: str | None = None,
                 seed: int = 0, tokenizer_path: str | None = None, ema: bool = True, precision: str = "fp32",
                 max_batch_size: int | None = None, estimator: str = "auto", **sample):
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda by default, also on machines without one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.lm = from_pretrained(pretrained, ema=ema, device=self._device, tokenizer_path=tokenizer_path)
        self.mc_samples, self.seed, self.estimator = int(mc_samples), int(seed), estimator
        self.batch_rows = int(batch_size) if str(batch_size).isdigit() else 64
        self.precision = resolve_precision(precision, self._device)
        # sampling options are SampleConfig fields, checked like `sample.*` overrides
        cfg = config_from_dict(merge_trees(to_dict(self.lm.config), {"sample": dict(sample, num_samples=1)}))
        self.sample_cfg = cfg.sample
        self.bos = [self.lm.tokenizer.bos_id] if starts_with_bos(cfg.data) else []
        self.max_length = cfg.model.length
        self.last_stderr: float | None = None

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self._device

    # --- likelihoods -------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.lm.tokenizer.encode(text).tolist()

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, float, bool]]:
        sequences, starts = [], []
        room = self.max_length - len(self.bos)
        for context, continuation in pairs:
            if len(continuation) > room:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's length "
                                 f"{self.max_length}")
            context = context[max(0, len(context) + len(continuation) - room):]
            sequences.append(self.bos + context + continuation)
            starts.append(len(self.bos) + len(context))
        out = continuation_loglikelihoods(self.lm.model, self.lm.objective, sequences, starts, self.mc_samples,
                                          self.batch_rows, self.seed, self.precision, self._device, self.estimator,
                                          self.sample_cfg.guidance)
        errors = [e for _, e, _ in out if e == e]
        if errors:
            self.last_stderr = sum(errors) / len(errors)
            log.info("unmask: mean Monte-Carlo standard error of the log-likelihoods: %.4f nats (K=%d)",
                     self.last_stderr, self.mc_samples)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether it is the greedy one) per (context, continuation) request."""
        pairs = []
        for request in requests:
            context, continuation = request.args
            # tokenize the joined text and split at the context's token count, so a space at the
            # boundary is tokenized as in running text
            whole, ctx = self._encode(context + continuation), self._encode(context)
            split = len(ctx) if whole[:len(ctx)] == ctx else len(ctx) - 1
            pairs.append((whole[:max(split, 0)], whole[max(split, 0):]))
        results = [(ll, greedy) for ll, _, greedy in self._score(pairs)]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each request's whole text, scored in windows of the model's length."""
        window = self.max_length - len(self.bos)
        out = []
        for request in requests:
            tokens = self._encode(request.args[0])
            pairs = [([], tokens[i:i + window]) for i in range(0, len(tokens), window)]
            out.append(sum(ll for ll, _, _ in self._score(pairs)) if pairs else 0.0)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, out[-1])
        return out

    # --- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The generated continuation of each request's context, cut at its first ``until`` string, at most
        ``max_gen_toks`` tokens."""
        lm, tok = self.lm, self.lm.tokenizer
        out = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            cfg = self.sample_cfg
            if "temperature" in gen_kwargs:
                cfg = dataclasses.replace(cfg, temperature=float(gen_kwargs["temperature"]))
            if gen_kwargs.get("do_sample") is False:
                cfg = dataclasses.replace(cfg, temperature=0.0)
            ctx = self._encode(context)
            room = self.max_length - len(self.bos)
            if family_of(lm.config).decoding == "ar":  # left to right up to the model's length
                max_new = min(max_new, room)
            elif max_new > room // 2 and not cfg.window:  # longer than one canvas: semi-autoregressive windows
                cfg = dataclasses.replace(cfg, window=self.max_length, stride=self.max_length // 2)
            keep = max(0, min(len(ctx), room - min(max_new, room // 2 if cfg.window else room)))
            ctx = ctx[len(ctx) - keep:]
            length = len(self.bos) + len(ctx) + max_new
            sampler = make_sampler(cfg, lm.objective, tok, self.max_length)
            canvas = make_canvas(tok, [ctx], length, bool(self.bos)).to(self._device)
            with autocast(self._device, resolve_precision(cfg.model_precision, self._device)):
                result = sampler.sample(lm.model, canvas, row_seeds(cfg.seed, 1, first=index).to(self._device))
            generated = result.tokens[0, len(self.bos) + len(ctx):].tolist()
            if tok.eos_id in generated:
                generated = generated[:generated.index(tok.eos_id)]
            text = tok.decode(generated)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out


def main() -> None:
    """``lm_eval``'s command line with this model registered (for lm-eval versions without plugins)."""
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
