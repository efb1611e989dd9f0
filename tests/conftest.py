"""Shared test set-up: the shipped manifest, no user overlay, an empty cache, and no network.

Tests that need downloads start their own HTTP server on 127.0.0.1 and lift offline mode themselves.
"""

import pytest
import torch

from snzoo import zoo


@pytest.fixture(autouse=True)
def _isolated_zoo(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("SNZOO_MANIFEST", raising=False)
    monkeypatch.delenv("SNZOO_MIRROR", raising=False)
    monkeypatch.delenv("SNZOO_REQUIRE_PINNED", raising=False)
    monkeypatch.setenv("SNZOO_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SNZOO_CACHE", str(tmp_path_factory.mktemp("snzoo-cache")))
    zoo.set_overlay(None)
    yield
    zoo.set_overlay(None)


@pytest.fixture(scope="module")
def one_thread():
    """Torch runs on one intra-op thread for the module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    for small models a second thread gains little and, on shared CI cores, its spinning slows the runs several
    times; in-process runs then also match subprocess runs started with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kernel_built():
    """Fails the module's tests at once where the CPU kernel does not build (`pytestmark =
    pytest.mark.usefixtures("kernel_built")`), rather than letting them pass on the PyTorch formulation."""
    from snzoo.nn import cpu_kernels

    assert cpu_kernels.available(), "the CPU kernel did not build (a C++ compiler and ninja are needed)"


@pytest.fixture
def kernel_calls(monkeypatch):
    """The keyword arguments of every call of the CPU kernel's whole-layer operator (`cpu_kernels.switch_norm`) while
    the test runs; the operator still runs."""
    from snzoo.nn import cpu_kernels

    calls = []
    kernel = cpu_kernels.switch_norm
    monkeypatch.setattr(cpu_kernels, "switch_norm", lambda *args, **kw: calls.append(kw) or kernel(*args, **kw))
    return calls
