"""Every test gets its own token cache and leaves torch's thread count as it found it; ``corpus`` is a
small learnable text file."""

import lzma
from pathlib import Path

import pytest
import torch

from unmask.data.corpora import shipped_corpus_path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "unmask-cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One CPU thread (exact comparisons with reference numbers; the thread count is restored after)."""
    torch.set_num_threads(1)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The first 30,000 characters of tiny-shakespeare (58 symbols): English, so learnable fast."""
    with lzma.open(shipped_corpus_path(), "rt", encoding="utf-8") as f:
        text = f.read(30_000)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path
