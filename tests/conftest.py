"""Every test gets its own token cache and leaves torch's thread count as it found it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "unmask-cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
