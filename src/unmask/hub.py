"""Reaching the Hugging Face hub without waiting on a network that is not there.

Downloads retry with back-off, so an offline machine used to wait ~25 s before an error. Before
any download, :func:`hub_reachable` tries one TCP connection to the hub's host (a few seconds at
most; ``HF_HUB_OFFLINE=1`` skips it); when it fails, callers use the local cache only.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    try:
        with socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False
