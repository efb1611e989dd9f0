"""snzoo's architectures and zoo entries in timm's registry, so timm (and segmentation_models_pytorch's `tu-`
encoders, which build through timm) can create SN models by name.

    import snzoo.integrations.timm          # registers on import; register() again after a manifest overlay
    model = timm.create_model("resnet50v1_sn.in1k_8x32_cos120", pretrained=True)

Every architecture is a timm model name and every zoo entry `ARCH.TAG` a timm `model.tag` (the entry marked
default is the architecture's default tag). Models are built by snzoo.create_model, so pretrained weights come
through snzoo's verified path (fetch_weights: pinned checksums, the snzoo cache), never through timm's download;
a local file given as `pretrained_cfg_overlay=dict(file=PATH)` is read by snzoo's checked reader.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections import deque
from typing import Any, Callable, Optional, Union

from torch import nn

from snzoo._factory import create_model
from snzoo.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from snzoo.errors import IntegrationArgumentError, IntegrationImportError
from snzoo.eval import IMAGENET_EVAL
from snzoo.integrations import _timm_models
from snzoo.models import ResNetCifar, get_architecture, list_architectures
from snzoo.zoo import Entry, EvalConfig, get_entry, list_models

try:
    import timm  # noqa: F401  (the registry below is timm's)
    from timm.models import DefaultCfg, PretrainedCfg, register_model, resolve_pretrained_cfg
except ImportError as exc:  # a missing timm, or one blocked with sys.modules["timm"] = None
    raise IntegrationImportError(
        f"snzoo.integrations.timm needs timm, which cannot be imported ({exc}); install it with "
        f"`pip install snzoo[timm]` (or `pip install timm`)"
    ) from None

__all__ = ["URL_SCHEME", "register"]

# The url of a registered entry names it instead of a download location: has_weights is true for timm
# (list_models(pretrained=True), smp's checks) while timm's own loader cannot fetch it.
URL_SCHEME = "snzoo:"
_MODULE = _timm_models.__name__
# Fashion-MNIST's protocol for CIFAR-style architectures without an entry (the shipped entries use it).
_SMALL_EVAL = EvalConfig(dataset="fashion-mnist-test", resize=28, crop=28, interpolation="bilinear",
                         mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
# timm arguments that would change a timm model and have no counterpart here: accepted at these values only.
_NO_EFFECT_VALUES = {
    "global_pool": ("avg",),
    "drop_path_rate": (0, 0.0),
    "drop_block_rate": (0, 0.0),
    "feature_cls": ("list",),
    "output_fmt": ("NCHW",),
}
# timm arguments that do not apply: snzoo keeps its own weights cache; features are not nested modules.
_IGNORED = ("cache_dir", "pretrained_model_args", "flatten_sequential")
_WEIGHT_SOURCES = ("url", "hf_hub_id", "state_dict")
_lock = threading.Lock()
_registered: dict[str, Any] = {}


def register() -> list[str]:
    """Register every snzoo architecture and zoo entry in timm's registry; idempotent.

    Import does it once; call it again after changing the manifest (snzoo.zoo.set_overlay) to add the new
    entries. Returns the names timm now knows from snzoo: architectures and `ARCH.TAG` entries, sorted.
    """
    with _lock:
        for architecture, default_cfg in _default_cfgs().items():
            if _registered.get(architecture) == default_cfg:
                continue
            entry_point = _entry_point(architecture)
            setattr(_timm_models, architecture, entry_point)
            _timm_models.default_cfgs[architecture] = default_cfg
            with warnings.catch_warnings():
                # Registering again replaces our own earlier registration, which is what a changed manifest needs.
                if architecture in _registered:
                    warnings.filterwarnings("ignore", message=f"Overwriting {architecture} in registry")
                register_model(entry_point)
            _registered[architecture] = default_cfg
        names = set(_registered)
        names.update(f"{a}.{t}" for a, d in _registered.items() for t in d.tags if t)
        return sorted(names)


def _entry_point(architecture: str) -> Callable[..., nn.Module]:
    def entry_point(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(architecture, pretrained, **kwargs)

    # register_model files an entry point under its __name__ and __module__.
    entry_point.__name__ = entry_point.__qualname__ = architecture
    entry_point.__module__ = _MODULE
    entry_point.__doc__ = f"snzoo's {architecture}, built by snzoo.create_model (see snzoo.integrations.timm)."
    return entry_point


def _default_cfgs() -> dict[str, DefaultCfg]:
    cfgs = {}
    for architecture in list_architectures():
        entries = [get_entry(n) for n in list_models(architecture, pretrained=True)]
        entries = sorted((e for e in entries if e.architecture == architecture), key=lambda e: (not e.default, e.tag))
        if entries:
            cfgs[architecture] = DefaultCfg(tags=deque(e.tag for e in entries),
                                            cfgs={e.tag: _entry_cfg(e) for e in entries}, is_pretrained=True)
        else:
            cfgs[architecture] = DefaultCfg(tags=deque([""]), cfgs={"": _architecture_cfg(architecture)})
    return cfgs


def _data_cfg(ev: EvalConfig, in_chans: int) -> dict[str, Any]:
    # timm's centre crop resizes the short side to crop / crop_pct, which is the protocol's resize.
    return {"input_size": (in_chans, ev.crop, ev.crop), "interpolation": ev.interpolation,
            "crop_pct": ev.crop_pct, "crop_mode": "center", "mean": tuple(ev.mean), "std": tuple(ev.std),
            "first_conv": "conv1", "classifier": "fc"}


def _entry_cfg(entry: Entry) -> PretrainedCfg:
    provenance = entry.provenance
    return PretrainedCfg(
        url=URL_SCHEME + entry.name, architecture=entry.architecture, tag=entry.tag,
        num_classes=entry.num_classes, license=provenance.get("license"),
        origin_url=provenance.get("repository"), paper_ids=provenance.get("paper"),
        description=f"snzoo zoo entry {entry.name}", notes=entry.notes or None,
        **_data_cfg(entry.eval, len(entry.eval.mean)),
    )


def _builder_defaults(architecture: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(get_architecture(architecture).builder).parameters)


def _architecture_cfg(architecture: str) -> PretrainedCfg:
    defaults = _builder_defaults(architecture)
    in_chans, num_classes = defaults["in_chans"].default, defaults["num_classes"].default
    small = _builder_class(architecture) is ResNetCifar
    ev = _SMALL_EVAL if small else IMAGENET_EVAL
    return PretrainedCfg(architecture=architecture, num_classes=num_classes,
                         description=f"snzoo architecture {architecture} (no zoo entry)", **_data_cfg(ev, in_chans))


def _builder_class(architecture: str) -> Any:
    builder = get_architecture(architecture).builder
    return builder.func if isinstance(builder, functools.partial) else builder


def _create(
    architecture: str,
    pretrained: bool = False,
    pretrained_cfg: Optional[Union[str, dict, PretrainedCfg]] = None,
    pretrained_cfg_overlay: Optional[dict] = None,
    **kwargs: Any,
) -> nn.Module:
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        get_entry(f"{architecture}.{pretrained_cfg}")  # an unknown tag: snzoo's error with the closest names
    cfg = resolve_pretrained_cfg(architecture, pretrained_cfg, pretrained_cfg_overlay)
    entry = get_entry(f"{architecture}.{cfg.tag}") if cfg.tag else None
    checkpoint = _local_weights(architecture, cfg) if pretrained else None
    model_kwargs, placement = _model_kwargs(architecture, kwargs)
    model = create_model(entry.name if entry is not None else architecture,
                         pretrained=pretrained and checkpoint is None, checkpoint_path=checkpoint, **model_kwargs)
    # timm's form of the config (the source checkpoint's data protocol), where snzoo's builder put the entry's.
    timm_cfg = cfg.to_dict()
    if model_kwargs.get("features_only"):
        for key in ("num_classes", "classifier", "global_pool"):
            timm_cfg.pop(key, None)
    model.pretrained_cfg = model.default_cfg = timm_cfg
    return model.to(**placement) if placement else model


def _local_weights(architecture: str, cfg: PretrainedCfg) -> Optional[str]:
    """The file a caller gave for the weights (pretrained_cfg_overlay=dict(file=...)); None: the zoo entry's."""
    foreign = [k for k in _WEIGHT_SOURCES if getattr(cfg, k) and not (k == "url" and str(cfg.url).startswith(URL_SCHEME))]
    if foreign:
        raise IntegrationArgumentError(
            f"{architecture}: snzoo loads weights from its zoo entries or a local file only, not from "
            f"pretrained_cfg {', '.join(foreign)}; download the file and pass pretrained_cfg_overlay=dict(file=PATH) "
            f"or checkpoint_path=PATH"
        )
    return cfg.file or None


def _model_kwargs(architecture: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """snzoo.create_model's arguments from timm's kwargs, and the device / dtype to move the model to."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _IGNORED}
    placement = {k: kwargs.pop(k) for k in ("device", "dtype") if k in kwargs}
    for name, allowed in _NO_EFFECT_VALUES.items():
        if name in kwargs and kwargs[name] in allowed:
            del kwargs[name]
    # timm's norm momentum weighs the new batch statistic; snzoo's (SN's convention) weighs the old value.
    if "bn_momentum" in kwargs:
        kwargs["momentum"] = 1.0 - kwargs.pop("bn_momentum")
    if "bn_eps" in kwargs:
        kwargs["eps"] = kwargs.pop("bn_eps")
    accepted = set(_builder_defaults(architecture)) - {"depth", "norm", "version"}
    accepted |= {"num_classes", "features_only", "out_indices"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        shown = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
        raise IntegrationArgumentError(
            f"{architecture} does not support {shown}; it takes {', '.join(sorted(accepted))} "
            f"(and timm's global_pool='avg', drop_path_rate=0, drop_block_rate=0, bn_momentum, bn_eps, device, dtype)"
        )
    return kwargs, placement


register()
