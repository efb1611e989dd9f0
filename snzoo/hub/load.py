"""Finding a model folder's config and weights, on disk (`local-dir:PATH`) or on the Hub (`hf-hub:ORG/REPO`).

This module only locates and checks the files; `snzoo.create_model` builds the model from them through the
one builder (`snzoo.models.build_model`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from snzoo._io import PathLike
from snzoo.errors import WeightsNotAvailableError
from snzoo.hub.config import CONFIG_NAME, WEIGHTS_NAME, read_config
from snzoo.weights import hub_download, parse_hub_repo

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelFolder:
    """A checked config.json, the weights file beside it (None when not asked for), and where they came from."""

    config: dict[str, Any]
    weights: Optional[Path]
    where: str


def local_folder(folder: PathLike, pretrained: bool = True) -> ModelFolder:
    """The config (and with pretrained, the weights) of a model folder on disk."""
    folder = Path(folder).expanduser()
    where = str(folder)
    if not folder.is_dir():
        raise WeightsNotAvailableError(f"{folder}: no such model folder")
    config = read_config(folder / CONFIG_NAME, where)
    weights = None
    if pretrained:
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise WeightsNotAvailableError(f"{folder}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    return ModelFolder(config, weights, where)


def hub_folder(spec: str, pretrained: bool = True) -> ModelFolder:
    """The config (and with pretrained, the weights) of a Hub repository `ORG/REPO[@REVISION]`.

    Both files come through the huggingface_hub cache (only the cache when SNZOO_OFFLINE or HF_HUB_OFFLINE is
    set) and from the same commit, even if the branch moves in between.
    """
    repo_id, revision = parse_hub_repo(spec)
    label = f"hf-hub:{spec}"
    config_path = hub_download(repo_id, CONFIG_NAME, revision, label)
    commit = config_path.parent.name
    if _COMMIT_RE.match(commit):
        revision = commit
    where = f"hf-hub:{repo_id}@{revision}" if revision else label
    config = read_config(config_path, where)
    weights = hub_download(repo_id, WEIGHTS_NAME, revision, label) if pretrained else None
    return ModelFolder(config, weights, where)
