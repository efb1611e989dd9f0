"""From a zoo entry to its state dict."""

from __future__ import annotations

from torch import Tensor

from snzoo.checkpoint import read_state_dict
from snzoo.entry import Entry
from snzoo.weights.fetch import fetch_weights


def load_entry_state_dict(entry: Entry, **fetch_options) -> dict[str, Tensor]:
    """The state dict of a zoo entry's pretrained weights, fetched, verified and converted as needed."""
    return read_state_dict(fetch_weights(entry, **fetch_options))
