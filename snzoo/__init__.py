"""snzoo: the model zoo for Switchable Normalization (SN).

    import snzoo
    model = snzoo.create_model("resnet50v1_sn", pretrained=True)
"""

__version__ = "0.1.0"

from snzoo import models as _models  # noqa: F401  (registers the architectures)
from snzoo.errors import SnzooError
from snzoo.factory import create_model
from snzoo.zoo import get_entry, list_models

__all__ = ["__version__", "SnzooError", "create_model", "get_entry", "list_models"]
