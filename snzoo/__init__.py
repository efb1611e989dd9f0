"""snzoo: the model zoo for Switchable Normalization (SN).

    import snzoo
    model = snzoo.create_model("resnet50v1_sn", pretrained=True)
"""

from snzoo.version import __version__
from snzoo.errors import SnzooError
from snzoo.models import list_architectures
from snzoo.zoo import get_entry, list_models
from snzoo._factory import create_model
from snzoo.eval import EvalResult, evaluate

__all__ = [
    "__version__", "SnzooError", "EvalResult", "create_model", "evaluate", "get_entry", "list_architectures",
    "list_models",
]
