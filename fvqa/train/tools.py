"""The search service's HTTP client, one per process, for the veRL agent loop.

The agent loop never talks to a backend directly: it calls the search service (``fvqa search
serve``) through its HTTP client, so every rollout worker on every node shares one cache and one
rate limit. What a search call becomes for the model (result text, bounded thumbnails, the record
of the call) is the episode core's job, `fvqa.protocol.episode`, shared with the probe and eval.
"""

from __future__ import annotations

import threading

from fvqa.protocol import SearchTools

_CLIENTS: dict[tuple[str, float], SearchTools] = {}
_CLIENTS_LOCK = threading.Lock()


def search_client_for(url: str, timeout_s: float = 120.0) -> SearchTools:
    """One HTTP client per (service URL, timeout) per process, shared by every trajectory.

    veRL builds a new agent-loop object for every sample, so the client (and its connection pool)
    must live outside it.
    """
    key = (url, timeout_s)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            from fvqa.search.client import SearchClient as HttpSearchClient

            client = HttpSearchClient(url, timeout_s=timeout_s)
            _CLIENTS[key] = client
        return client
