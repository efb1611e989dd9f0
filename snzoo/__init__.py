"""snzoo: the model zoo for Switchable Normalization (SN).

    import snzoo
    model = snzoo.create_model("resnet50v1_sn", pretrained=True)
"""

__version__ = "0.1.0"

from snzoo import models as _models  # noqa: F401  (registers the architectures)
from snzoo.errors import SnzooError
from snzoo.evaluate import EvalResult
from snzoo.evaluate import evaluate as _evaluate
from snzoo.factory import create_model
from snzoo.zoo import get_entry, list_models

# `snzoo.evaluate(model, data)` is the engine; the module stays importable as `from snzoo.evaluate import ...`.
evaluate = _evaluate

__all__ = ["__version__", "SnzooError", "EvalResult", "create_model", "evaluate", "get_entry", "list_models"]
