"""Samplers behind one interface, over one float64 categorical primitive.

``sampler.sample(model, canvas, seeds)``: ``canvas`` (B, L) holds the mask id where tokens are to be
generated and fixed tokens everywhere else (prompts, suffixes, several infill spans, ragged lengths);
fixed tokens are never overwritten. ``seeds`` (B,) gives every row its own random stream: draws are
keyed by (row seed, the row's step, position) through :mod:`unmask.rng`, so a row's sample does not
depend on the other rows or on the batch size. The result carries the tokens, the number of
network calls (``nfe``), how often each row was evaluated (``row_nfe``) and the wall time.

Samplers (``mdlm-reference.md`` section 3, ``algorithms.md`` sections 2, 3, 6):

* :class:`AncestralSampler`: MDLM's ``ddpm`` update on T steps of any schedule; with ``cache=True``
  a row whose canvas did not change reuses its last prediction (decided per row; models without
  time conditioning only).
* :class:`FirstHittingSampler`: Zheng et al. 2024 Alg. 1/2, each row draws its own next unmask
  time and unmasks ``k`` uniformly chosen masked positions per step (exact for ``k = 1``).
* :class:`ConfidenceSampler`: reveal the most confident positions (probability, margin or entropy,
  or random order) on a linear or cosine reveal schedule, with optional random remasking.
* :class:`SemiAutoregressiveSampler`: any of the above in overlapping windows (MDLM's semi-AR), for
  outputs longer than the model, stopping at EOS.
* :class:`AutoregressiveSampler`: left to right for the AR baseline, with a KV cache.

The categorical primitive draws in float64 by inverse CDF with one 53-bit uniform per draw. The
``float32`` option is MDLM's exponential race ``argmax(p / -log u)`` with float32 uniforms, whose
truncated noise lowers the effective temperature (Zheng et al. 2024, section 5); for research
comparisons only.
"""
