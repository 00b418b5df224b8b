"""Samplers as step policies, run by one decoding engine, over one float64 categorical primitive.

``sampler.sample(model, canvas, seeds)``: ``canvas`` (B, L) holds the mask id where tokens are to be
generated and fixed tokens everywhere else (prompts, suffixes, several infill spans, ragged lengths);
fixed tokens are never overwritten. ``seeds`` (B,) gives every row its own random stream: draws are
keyed by (row seed, the row's step, position) through :mod:`unmask.rng`, so a row's sample does not
depend on the other rows or on the batch size. The result carries the tokens, the number of
network calls (``nfe``), how often each row was evaluated (``row_nfe``) and the wall time.

A sampler never calls the network: ``sampler.start(model, canvas, seeds)`` returns a decoding that says
what it needs evaluated next and advances from the output it is given, and the
:class:`~unmask.samplers.engine.DecodingEngine` runs any number of decodings together, one batched
forward per step (:mod:`unmask.samplers.engine`; ``sample`` is one decoding in its own engine).

Samplers (MDLM, Sahoo et al. 2024; first-hitting, Zheng et al. 2024; SMDM, Nie et al. 2024; BD3-LM,
Arriola et al. 2025; LLaDA, Nie et al. 2025; Dream, Ye et al. 2025; Fast-dLLM, Wu et al. 2025):

* :class:`AncestralSampler`: MDLM's ``ddpm`` update on T steps of any schedule; with ``cache=True``
  a row whose canvas did not change reuses its last prediction (decided per row; models without
  time conditioning only).
* :class:`FirstHittingSampler`: Zheng et al. 2024 Alg. 1/2, each row draws its own next unmask
  time and unmasks ``k`` uniformly chosen masked positions per step (exact for ``k = 1``).
* :class:`ConfidenceSampler`: reveal the most confident positions (probability, margin or entropy,
  or random order) on a linear or cosine reveal schedule, with optional random remasking.
* :class:`SemiAutoregressiveSampler`: any of the above in overlapping windows (MDLM's semi-AR), for
  outputs longer than the model, stopping at EOS.
* :class:`LLaDASampler`, :class:`DreamSampler`: LLaDA's and Dream's decoding, with Fast-dLLM's
  thresholds and block caches.
* :class:`BlockDiffusionSampler`: block diffusion, any of the above inside a block, with the exact KV
  cache of the committed blocks.
* :class:`AutoregressiveSampler`: left to right for the AR baseline, with a KV cache.
* :class:`InsertionSampler`: one insertion per step for insertion LMs.

The categorical primitive draws in float64 by inverse CDF with one 53-bit uniform per draw. The
``float32`` option is MDLM's exponential race ``argmax(p / -log u)`` with float32 uniforms, whose
truncated noise lowers the effective temperature (Zheng et al. 2024, section 5); for research
comparisons only.
"""
