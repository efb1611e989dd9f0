"""The module timm's registry files snzoo's entry points under (`timm.list_models(module="_timm_models")`).

timm's register_model reads `default_cfgs` and adds each entry point's name to `__all__` of the module an
entry point claims to come from; snzoo.integrations.timm.register fills both here, so the public module keeps
a short `__all__`.
"""

from typing import Any

__all__: list[str] = []
default_cfgs: dict[str, Any] = {}
