"""Hugging Face Hub model folders: publish a zoo entry as one, and find the config and weights of one.

A folder holds `model.safetensors` (the entry's canonical tensors), `config.json` (what to build and how the
weights were evaluated) and `README.md` (the model card). `snzoo.create_model` builds models from such folders
through the `hf-hub:ORG/REPO[@REVISION]` and `local-dir:PATH` name prefixes.
"""

from snzoo.hub.card import model_card
from snzoo.hub.config import CARD_NAME, CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, export_config, hf_license, read_config
from snzoo.hub.load import ModelFolder, hub_folder, local_folder
from snzoo.hub.publish import export_hf

__all__ = [
    "CARD_NAME", "CONFIG_NAME", "LIBRARY_NAME", "WEIGHTS_NAME", "ModelFolder", "export_config", "export_hf",
    "hf_license", "hub_folder", "local_folder", "model_card", "read_config",
]
