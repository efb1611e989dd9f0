"""The model card (README.md) of a Hugging Face model folder: YAML front matter, then Markdown."""

from __future__ import annotations

import json
import re
from typing import Optional

from snzoo.hub.config import LIBRARY_NAME, export_config
from snzoo.models import get_architecture
from snzoo.zoo import Entry

_PAPERS = {
    "sn": ("arXiv:1806.10779", "Differentiable Learning-to-Normalize via Switchable Normalization (ICLR 2019)",
           "@article{luo2018switchable,\n"
           "  title   = {Differentiable Learning-to-Normalize via Switchable Normalization},\n"
           "  author  = {Luo, Ping and Ren, Jiamin and Peng, Zhanglin and Zhang, Ruimao and Li, Jingyu},\n"
           "  journal = {arXiv preprint arXiv:1806.10779},\n"
           "  year    = {2018}\n"
           "}"),
    "ssn": ("arXiv:1903.03793", "SSN: Learning Sparse Switchable Normalization via SparsestMax (CVPR 2019)",
            "@article{shao2019ssn,\n"
            "  title   = {SSN: Learning Sparse Switchable Normalization via SparsestMax},\n"
            "  author  = {Shao, Wenqi and Meng, Tianjian and Li, Jingyu and Zhang, Ruimao and Li, Yudian and\n"
            "             Wang, Xiaogang and Luo, Ping},\n"
            "  journal = {arXiv preprint arXiv:1903.03793},\n"
            "  year    = {2019}\n"
            "}"),
}
_NORM_WORDS = {"sn": "Switchable Normalization (SN)", "ssn": "Sparse Switchable Normalization (SSN)",
               "bn": "Batch Normalization", "gn": "Group Normalization"}


def hf_dataset(dataset: str) -> str:
    """The Hub dataset id for a zoo evaluation set (`imagenet-1k-val` -> `imagenet-1k`)."""
    return re.sub(r"-(val|validation|test|train)$", "", dataset)


def _yaml_str(value: str) -> str:
    # A JSON string is a valid double-quoted YAML scalar, so no YAML writer is needed.
    return json.dumps(value)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _model_words(entry: Entry) -> str:
    spec = get_architecture(entry.architecture)
    version = "v1" if spec.version == 1 else "v2 (pre-activation)"
    norm = _NORM_WORDS.get(spec.norm, spec.norm)
    if spec.norm in ("sn", "ssn"):
        terms = "IN, LN and BN" if entry.norm.using_bn else "IN and LN"
        norm += f" mixing {terms} statistics"
    return f"ResNet-{spec.depth} {version} with {norm} in every normalization layer"


def _recipe_lines(entry: Entry) -> list[str]:
    r = entry.recipe
    batch, opt, sched, aug = r["batch"], r["optimizer"], r["schedule"], r["augmentation"]
    if sched["type"] == "step":
        schedule = (f"step decay x{sched['gamma']} at epochs {', '.join(str(m) for m in sched['milestones'])}")
    else:
        schedule = "cosine decay to 0"
    if sched.get("warmup_epochs"):
        schedule = f"{sched['warmup_epochs']} linear warmup epochs, then {schedule}"
    total = batch["devices"] * batch["per_device"]
    stats = "synchronized across devices" if r["statistics"] == "synchronized" else "computed per device"
    augment = [f"random-resized crop {aug['crop']}" if aug["random_resized_crop"] else f"random crop {aug['crop']}"]
    if aug["hflip"]:
        augment.append("horizontal flip")
    if aug["lighting"]:
        augment.append("PCA lighting noise (0.1)")
    if aug["color_jitter"]:
        augment.append(f"colour jitter {aug['color_jitter']}")
    lines = [
        f"- Epochs: {r['epochs']}; learning rate {entry.learning_rate():g} "
        f"({r['lr']['base']:g} x {total} / {r['lr']['reference_batch']}), {schedule}",
        f"- Batch: {batch['devices']} devices x {batch['per_device']} images = {total}; normalization statistics "
        f"{stats}",
        f"- Optimizer: SGD, momentum {opt['momentum']:g}{', Nesterov' if opt['nesterov'] else ''}, weight decay "
        f"{opt['weight_decay']:g}" + ("" if opt["weight_decay_norm"] else " (not on normalization parameters)"),
        f"- Augmentation: {', '.join(augment)}",
        f"- Dropout before the classifier: {r['dropout']:g}; label smoothing: {r['label_smoothing']:g}",
    ]
    final = aug.get("final_phase")
    if final:
        lines.append(f"- Last {final['epochs']} epochs: resize {final['resize']}, {final['crop']} crop {aug['crop']}")
    norm = entry.norm
    if norm.type in ("sn", "ssn"):
        avg = (f"moving averages with momentum {norm.momentum:g}" if norm.using_moving_average
               else "batch averages")
        lines.append(f"- {norm.type.upper()} layers: using_bn={norm.using_bn}, running statistics as {avg}, "
                     f"last_gamma={norm.last_gamma}")
    if r.get("batch_average"):
        ba = r["batch_average"]
        lines.append(f"- Running statistics re-estimated over {ba['iterations']} iterations"
                     + (" every epoch" if ba["every_epoch"] else ""))
    if r.get("average_running_stats_before_eval"):
        lines.append("- Running statistics averaged across devices before each evaluation")
    if r.get("sparsestmax"):
        sm = r["sparsestmax"]
        lines.append(f"- SparsestMax: radius schedule {sm['radius_schedule']}, importance lr scale "
                     f"{sm['importance_lr_scale']:g}, importance weight decay {sm['importance_weight_decay']:g}, "
                     f"gradient clipping to norm {sm['grad_clip_norm']:g}")
    return lines


def model_card(entry: Entry, repo_id: Optional[str] = None, source_sha256: Optional[str] = None) -> str:
    """The README.md model card of an entry's model folder: YAML front matter, then Markdown."""
    cfg = export_config(entry)
    ev = entry.eval
    license_id = cfg["license"]
    front = [
        "---",
        f"license: {license_id}",
    ]
    if license_id == "other":
        slug = re.sub(r"[^a-z0-9.]+", "-", str(entry.provenance["license"]).lower()).strip("-")
        front.append(f"license_name: {_yaml_str(slug)}")
        if entry.provenance.get("license_url"):
            front.append(f"license_link: {_yaml_str(str(entry.provenance['license_url']))}")
    datasets = sorted({hf_dataset(d) for d in [ev.dataset, *entry.metrics]})
    front += [
        f"library_name: {LIBRARY_NAME}",
        "pipeline_tag: image-classification",
        "tags:",
        "- image-classification",
        "- switchable-normalization",
        f"- {entry.norm.type}",
        f"- {LIBRARY_NAME}",
        "datasets:",
        *(f"- {_yaml_str(d)}" for d in datasets),
        "---",
    ]
    repo = repo_id or "ORG/REPO"
    paper_key = "ssn" if entry.norm.type == "ssn" else "sn"
    arxiv, paper_title, bibtex = _PAPERS[paper_key]
    prov = entry.provenance
    source = entry.sources[0]
    origin = f"`{prov.get('published_file_name') or source.file_name}`"
    if prov.get("repository"):
        origin += f" from {prov['repository']}"
    body = [
        f"# {entry.name}",
        "",
        f"{_model_words(entry)}, trained for {entry.num_classes}-class image classification on "
        f"{hf_dataset(ev.dataset)} ({paper_title}, [{arxiv}](https://arxiv.org/abs/{arxiv.split(':', 1)[1]})).",
        "",
        f"The weights are the published checkpoint {origin}, stored as safetensors with the tensors unchanged "
        "(only the `module.` prefix of data-parallel training is removed)."
        + (f" sha256 of the original file: `{source_sha256}`." if source_sha256 else ""),
        "",
        "## Usage",
        "",
        "```python",
        "import snzoo",
        "import torch",
        "from PIL import Image",
        "from torchvision import transforms",
        "",
        f'model = snzoo.create_model("hf-hub:{repo}", pretrained=True).eval()',
        "preprocess = transforms.Compose([",
        f"    transforms.Resize({ev.resize}, interpolation=transforms.InterpolationMode.{ev.interpolation.upper()}),",
        f"    transforms.CenterCrop({ev.crop}),",
        "    transforms.ToTensor(),",
        f"    transforms.Normalize({list(ev.mean)}, {list(ev.std)}),",
        "])",
        "with torch.no_grad():",
        '    logits = model(preprocess(Image.open("image.jpg").convert("RGB")).unsqueeze(0))',
        "```",
        "",
        "Pass `num_classes=N` to fine-tune: the classifier is re-initialised and every other tensor loaded.",
        "",
        "## Results",
        "",
        "| Dataset | Top-1 (%) | Top-5 (%) |",
        "|---|---:|---:|",
        *(f"| {d} | {_pct(m.top1)} | {_pct(m.top5)} |" for d, m in entry.metrics.items()),
        "",
        "## Evaluation protocol",
        "",
        f"Single crop on {ev.dataset}: resize the shorter side to {ev.resize} ({ev.interpolation}), centre crop "
        f"{ev.crop}x{ev.crop} (crop_pct {ev.crop_pct:.3f}), scale to [0, 1] and normalise with mean "
        f"{list(ev.mean)} and std {list(ev.std)}. The model runs in eval mode, so every normalization layer uses "
        "its running statistics.",
        "",
        "## Training recipe",
        "",
        *_recipe_lines(entry),
    ]
    if entry.notes:
        body += ["", "## Notes", "", *(f"- {note}" for note in entry.notes)]
    body += [
        "",
        "## License",
        "",
        f"{prov.get('license', 'unknown')}, as published with the original weights"
        + (f" ({prov['repository']})." if prov.get("repository") else "."),
        "",
        "## Citation",
        "",
        "```bibtex",
        bibtex,
        "```",
    ]
    if paper_key == "ssn":
        body[-1:-1] = ["", _PAPERS["sn"][2]]
    return "\n".join(front + [""] + body) + "\n"
