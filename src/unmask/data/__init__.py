"""Corpora, tokenized on-disk caches, MDLM row layouts and a deterministic, resumable batch order.

Pipeline: a :class:`Corpus` yields the documents of a split as streams of text pieces; the split
is tokenized once into a memory-mapped token file (:func:`tokenize_split`, cached by a fingerprint
of the source and the tokenizer); a layout cuts it into fixed-length rows:

* ``wrap`` (MDLM for OWT/text8): documents joined (with EOS after each when ``insert_eos``), cut
  into chunks of ``L-2`` tokens framed as ``[BOS] chunk [EOS]`` (or chunks of ``L`` when
  ``frame`` is off); the final partial chunk is dropped.
* ``pad`` (MDLM for LM1B): one document per row, ``[BOS] doc [EOS] [PAD]...``, truncated to ``L``.
  With ``data.prompt_field`` (supervised fine-tuning) a document is a (prompt, response) pair and
  the prompt's positions are of kind PROMPT: never counted, never noised, so the loss is on the
  response given the clean prompt; ``data.pad_with_eos`` fills the rest of the row with counted EOS
  tokens (SMDM), so the model learns where a response ends.

Rows carry a per-position kind (token/BOS/EOS/PAD) so which positions count in the loss is explicit
and does not depend on special ids (GPT-2's PAD is its EOS). Rows are read from the memory map on
demand, so a corpus larger than RAM trains in constant memory. :class:`BatchOrder` maps a step to
row ids through a per-epoch permutation seeded by ``(seed, epoch)``: a resumed run reads exactly
the batches it would have read.
"""
