"""Publishing a zoo entry as a Hugging Face model folder: model.safetensors, config.json, README.md."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

from snzoo._io import check_output_path
from snzoo.errors import ExportError, OutputError
from snzoo.hub.card import model_card
from snzoo.hub.config import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, export_config
from snzoo.version import __version__
from snzoo.weights import fetch_weights, parse_hub_repo, read_record, read_state_dict, write_safetensors
from snzoo.zoo import get_entry


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    check_output_path(out_dir, "output folder")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a folder; choose another output folder")
        if not overwrite and any(out_dir.iterdir()):
            raise ExportError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary folder to out_dir, replacing any existing one only once it is complete."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous folder back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_hf(
    name: str, out_dir: Union[str, os.PathLike], *, overwrite: bool = False, repo_id: Optional[str] = None
) -> Path:
    """Write a Hugging Face model folder for a zoo entry (`ARCH.TAG`, or `ARCH` for its default entry).

    The folder holds model.safetensors, config.json and README.md (the model card); repo_id (`ORG/REPO`) only
    fills in the card's usage example. The weights come from `snzoo.weights.fetch_weights` (cache, placed files or
    download). The folder is assembled beside out_dir and renamed into place, so a failure leaves no partial
    folder; an existing non-empty out_dir is replaced only with overwrite=True. Returns out_dir.
    """
    out_dir = Path(out_dir).expanduser()
    entry = get_entry(name)
    if repo_id is not None:
        parse_hub_repo(repo_id)
    # Checked before fetching: a download can take minutes and should not end in this refusal.
    _check_destination(out_dir, overwrite)
    weights = fetch_weights(entry)
    state_dict = read_state_dict(weights)
    source_sha256 = (read_record(weights) or {}).get("source_sha256")

    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError.cannot_write(out_dir, exc) from None
    try:
        write_safetensors(state_dict, tmp / WEIGHTS_NAME,
                          {"entry": entry.name, "snzoo_version": __version__, "format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(export_config(entry), indent=2) + "\n")
        (tmp / CARD_NAME).write_text(model_card(entry, repo_id, source_sha256))
        _check_destination(out_dir, overwrite)  # something may have appeared there meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
