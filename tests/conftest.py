"""Shared test set-up: every test starts from the shipped manifest and no user overlay."""

import pytest

from snzoo import zoo


@pytest.fixture(autouse=True)
def _no_manifest_overlay(monkeypatch):
    monkeypatch.delenv("SNZOO_MANIFEST", raising=False)
    zoo.set_overlay(None)
    yield
    zoo.set_overlay(None)
