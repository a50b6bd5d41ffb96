"""Sweep tests run torch on one thread: the machine's two cores are shared, and two threads on a busy machine made
the organism's edits several times slower (OpenMP threads wait for each other at every op)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def organism_cache(ci_organism, cache_root, monkeypatch):
    """The session's CI organism, found by ``load_model("organism:ci")`` through ``$MU_FAST_CACHE_DIR``."""
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))
    return cache_root
