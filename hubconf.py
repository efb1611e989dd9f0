"""torch.hub entry points of snzoo: one per architecture, and one per detection and segmentation model.

    model = torch.hub.load("<owner>/snzoo", "resnet50v1_sn", pretrained=True)
    model = torch.hub.load(repo_dir, "resnet50v1_sn", source="local", tag="in1k_8x32_step100", pretrained=True)
    model = torch.hub.load("<owner>/snzoo", "maskrcnn_resnet50_fpn_sn", num_classes=91)   # SN backbone entry's weights
"""

dependencies = ["torch", "torchvision", "safetensors", "jsonschema"]

import snzoo as _snzoo
from snzoo import zoo as _zoo
from snzoo.models import get_architecture as _get_architecture
from snzoo.tasks import task_models as _task_models


def _docstring(arch: str) -> str:
    spec = _get_architecture(arch)
    lines = [f"ResNet-{spec.depth} v{spec.version} with norm '{spec.norm}' (snzoo architecture {arch}).", ""]
    entries = _zoo.list_models(arch, pretrained=True)
    if entries:
        lines.append("Zoo entries (tag: top-1 / top-5 on the entry's dataset):")
        for name in entries:
            entry = _zoo.get_entry(name)
            for dataset, m in entry.metrics.items():
                default = " (default)" if entry.default else ""
                lines.append(f"    {entry.tag}{default}: {m.top1} / {m.top5} on {dataset}")
    else:
        lines.append("No pretrained weights are published for this architecture.")
    lines += [
        "",
        "Args:",
        "    pretrained: load the weights of the entry given by `tag` (default: the default entry).",
        "    tag: the zoo entry's tag, e.g. 'in1k_8x32_cos120'.",
        "    **kwargs: passed to snzoo.create_model (num_classes, checkpoint_path, using_bn, momentum, ...).",
    ]
    return "\n".join(lines)


def _entry_point(arch: str):
    def entry_point(pretrained: bool = False, tag: str = None, **kwargs):
        name = f"{arch}.{tag}" if tag else arch
        return _snzoo.create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = arch
    entry_point.__doc__ = _docstring(arch)
    return entry_point


for _arch in _snzoo.list_models():
    globals()[_arch] = _entry_point(_arch)


# The task builders as they are: their docstrings say what mirrors the original configs.
for _task in ("detection", "segmentation"):
    for _name, _builder in _task_models(_task).items():
        globals()[_name] = _builder
