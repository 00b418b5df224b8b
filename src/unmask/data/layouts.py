"""Row layouts (wrap, pad), per-position kinds, and the deterministic batch order."""

from __future__ import annotations

import numpy as np

from ..config import DataConfig
from .cache import TokenStream
from .readers import DataError
from .tokenization import Tokenizer

TOKEN, BOS, EOS, PAD, PROMPT = 0, 1, 2, 3, 4


def starts_with_bos(cfg: DataConfig) -> bool:
    """Whether rows of this layout begin with BOS (pad rows always; wrapped rows when framed), so a canvas
    for the model trained on them does too."""
    return cfg.layout == "pad" or cfg.frame


class Rows:
    """Fixed-length rows of a tokenized split. ``get(indices)`` -> (ids, kinds), both (n, L)."""

    length: int

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids and the per-position kinds (``TOKEN``, ``BOS``, ...) of the rows at ``indices``, both
        (n, L)."""
        raise NotImplementedError


class WrapRows(Rows):
    """MDLM ``wrap=True``: the document stream cut into chunks, framed ``[BOS] chunk [EOS]``."""

    def __init__(self, stream: TokenStream, length: int, frame: bool, tokenizer: Tokenizer):
        self.stream, self.length, self.frame = stream, length, frame
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.chunk = length - 2 if frame else length
        self.n = len(stream) // self.chunk
        if self.n == 0:
            raise DataError(f"{stream.meta['corpus']} {stream.meta['split']} split has {len(stream)} "
                            f"tokens, fewer than one row of {length}")

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` of the stream cut into chunks, framed ``[BOS] chunk [EOS]`` when ``frame``: ids and
        kinds, (n, L)."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = np.empty((len(indices), self.length), dtype=np.int64)
        body = slice(1, -1) if self.frame else slice(None)
        for row, i in enumerate(indices):
            ids[row, body] = self.stream.tokens[i * self.chunk:(i + 1) * self.chunk]
        kinds = np.where(ids == self.eos, EOS, TOKEN).astype(np.int8)
        if self.frame:
            ids[:, 0], ids[:, -1] = self.bos, self.eos
            kinds[:, 0], kinds[:, -1] = BOS, EOS
        return ids, kinds


class PadRows(Rows):
    """MDLM ``wrap=False``: one document per row, ``[BOS] doc [EOS] [PAD]...``, truncated to fit.

    Empty documents are skipped; ``truncated`` counts the documents cut short.
    """

    def __init__(self, stream: TokenStream, length: int, tokenizer: Tokenizer, pad_with_eos: bool = False):
        self.stream, self.length, self.pad_with_eos = stream, length, pad_with_eos
        self.bos, self.eos, self.pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        starts = stream.doc_starts
        ends = np.append(starts[1:], len(stream))
        keep = ends > starts
        self.starts, self.ends = starts[keep], ends[keep]
        self.prompts = None if stream.prompt_lengths is None else stream.prompt_lengths[keep]
        self.truncated = int(((self.ends - self.starts) > length - 2).sum())
        # rows whose prompt fills the row: nothing of their response is left to learn or score
        self.prompt_overflow = 0 if self.prompts is None else int((self.prompts >= length - 2).sum())
        if len(self.starts) == 0:
            raise DataError(f"{stream.meta['corpus']} {stream.meta['split']} split has no documents")

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The documents at ``indices`` as ``[BOS] doc [EOS] [PAD]...`` rows (prompt positions marked ``PROMPT``):
        ids and kinds, (n, L)."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = np.full((len(indices), self.length), self.pad, dtype=np.int64)
        kinds = np.full((len(indices), self.length), PAD, dtype=np.int8)
        for row, i in enumerate(indices):
            doc = self.stream.tokens[self.starts[i]:min(self.ends[i], self.starts[i] + self.length - 2)]
            n = len(doc)
            ids[row, 0], kinds[row, 0] = self.bos, BOS
            ids[row, 1:n + 1], kinds[row, 1:n + 1] = doc, TOKEN
            if self.prompts is not None:
                kinds[row, 1:1 + min(int(self.prompts[i]), n)] = PROMPT
            ids[row, n + 1], kinds[row, n + 1] = self.eos, EOS
            if self.pad_with_eos:
                ids[row, n + 2:], kinds[row, n + 2:] = self.eos, EOS
        return ids, kinds


def random_lengths(ids: np.ndarray, kinds: np.ndarray, selected: np.ndarray, u: np.ndarray,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """SMDM's variable-length training: each ``selected`` row keeps its first ``1 + floor(u L)``
    positions (a length uniform on 1..L) and the rest becomes PAD (not counted, never noised), so a
    model trained on fixed-length rows also sees ends. The pads stay visible to the network: rows
    keep their fixed shape (SMDM feeds genuinely shorter sequences)."""
    ids, kinds = ids.copy(), kinds.copy()
    lengths = 1 + np.floor(u * ids.shape[1]).astype(np.int64)
    cut = selected[:, None] & (np.arange(ids.shape[1])[None, :] >= lengths[:, None])
    ids[cut], kinds[cut] = pad_id, PAD
    return ids, kinds


def counted_positions(kinds: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Which positions count in losses and metrics (and are noised): tokens always; BOS, EOS and
    PAD as configured; prompt positions never. Positions that do not count are kept clean, so a bound is a bound on the
    counted tokens given the others."""
    counted = kinds == TOKEN
    for kind, flag in ((BOS, cfg.count_bos), (EOS, cfg.count_eos), (PAD, cfg.count_pad)):
        if flag:
            counted |= kinds == kind
    return counted


class BatchOrder:
    """Deterministic order of rows: step ``s`` reads positions ``[s*B, (s+1)*B)`` of the endless
    sequence of per-epoch permutations (each seeded by ``(seed, epoch)``). Depends only on the step,
    so resuming at step ``s`` continues exactly."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
        return self._perm

    def epoch_of(self, step: int) -> float:
        """The (fractional) number of passes over the rows completed before step ``step``."""
        return step * self.batch_size / self.n

    def batch(self, step: int) -> np.ndarray:
        """The row indices (B,) that step ``step`` reads."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            sel = positions // self.n == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % self.n]
        return out
