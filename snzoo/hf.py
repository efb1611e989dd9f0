"""Hugging Face Hub model folders: export a zoo entry as one, and build models from one (local or on the Hub).

A folder holds `model.safetensors` (the entry's canonical tensors), `config.json` (what to build and how the
weights were evaluated) and `README.md` (the model card). `snzoo.create_model` reads such folders through
the `hf-hub:ORG/REPO[@REVISION]` and `local-dir:PATH` name prefixes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

import snzoo
from snzoo import zoo
from snzoo.checkpoint import CLASSIFIER_PREFIX, load_checked, read_state_dict
from snzoo.entry import Entry
from snzoo.errors import OutputError, SnzooError, UnknownModelError, WeightsNotAvailableError
from snzoo.models import get_architecture
from snzoo.models.registry import NORMS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "snzoo"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Licence ids the Hub recognises in a model card; anything else is published as "other" with its name.
_HF_LICENSES = frozenset({
    "apache-2.0", "mit", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "eupl-1.1",
    "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "mpl-2.0",
    "odc-by", "odbl", "openrail", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
})
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


class ModelConfigError(SnzooError, ValueError):
    """A model folder whose config.json is missing, unreadable or has a field snzoo cannot use."""


class ExportError(SnzooError, FileExistsError):
    """An export destination that is in the way (an existing file, or a non-empty folder without overwrite)."""


# ------------------------------------------------------------------------------------------------ export


def hf_license(license_id: Optional[str]) -> str:
    """The Hub's licence id for an SPDX-style id (`CC-BY-NC-4.0` -> `cc-by-nc-4.0`); `other` or `unknown` else."""
    if not license_id:
        return "unknown"
    lowered = license_id.strip().lower()
    return lowered if lowered in _HF_LICENSES else "other"


def hf_dataset(dataset: str) -> str:
    """The Hub dataset id for a zoo evaluation set (`imagenet-1k-val` -> `imagenet-1k`)."""
    return re.sub(r"-(val|validation|test|train)$", "", dataset)


def export_config(entry: Entry) -> dict[str, Any]:
    """The config.json of an entry's model folder."""
    ev = entry.eval
    return {
        "library_name": LIBRARY_NAME,
        "architecture": entry.architecture,
        "entry": entry.name,
        "norm": entry.norm.to_dict(),
        "num_classes": entry.num_classes,
        "pretrained_cfg": {"dataset": ev.dataset, "resize": ev.resize, "crop": ev.crop, "crop_pct": ev.crop_pct,
                           "interpolation": ev.interpolation, "mean": list(ev.mean), "std": list(ev.std)},
        "metrics": {k: m.to_dict() for k, m in entry.metrics.items()},
        "license": hf_license(entry.provenance.get("license")),
        "provenance": dict(entry.provenance),
        "snzoo_version": snzoo.__version__,
    }


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


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    ancestor = out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {out_dir}: {ancestor} is a file, not a folder; choose another output folder")
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
    fills in the card's usage example. The weights come from `fetch_weights` (cache, placed files or
    download). The folder is assembled beside out_dir and renamed into place, so a failure leaves no partial
    folder; an existing non-empty out_dir is replaced only with overwrite=True. Returns out_dir.
    """
    from safetensors import safe_open

    from snzoo.weights import fetch_weights
    from snzoo.weights.convert import write_safetensors

    out_dir = Path(out_dir).expanduser()
    entry = zoo.get_entry(name)
    if repo_id is not None:
        _parse_hub_spec(repo_id)
    # Checked before fetching: a download can take minutes and should not end in this refusal.
    _check_destination(out_dir, overwrite)
    weights = fetch_weights(entry)
    state_dict = read_state_dict(weights)
    with safe_open(str(weights), framework="pt") as f:
        source_sha256 = (f.metadata() or {}).get("source_sha256")

    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError.cannot_write(out_dir, exc) from None
    try:
        write_safetensors(state_dict, tmp / WEIGHTS_NAME,
                          {"entry": entry.name, "snzoo_version": snzoo.__version__, "format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(export_config(entry), indent=2) + "\n")
        (tmp / CARD_NAME).write_text(model_card(entry, repo_id, source_sha256))
        _check_destination(out_dir, overwrite)  # something may have appeared there meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------------------ loading


def _type_name(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__


def _bad(where: str, field: str, expected: str, value: Any) -> ModelConfigError:
    return ModelConfigError(f"{where}: {CONFIG_NAME} field '{field}' must be {expected}, got {_type_name(value)}")


def _missing(where: str, field: str) -> ModelConfigError:
    return ModelConfigError(f"{where}: {CONFIG_NAME} lacks the field '{field}'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(obj: Mapping[str, Any], key: str, where: str, prefix: str = "") -> Any:
    if key not in obj:
        raise _missing(where, prefix + key)
    return obj[key]


def read_config(path: Union[str, os.PathLike], where: Optional[str] = None) -> dict[str, Any]:
    """Read and check a model folder's config.json; any problem is one ModelConfigError line naming the field."""
    path = Path(path)
    where = where or str(path.parent)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelConfigError(f"{where}: no {CONFIG_NAME}; not an snzoo model folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{where}: cannot read {CONFIG_NAME} ({type(exc).__name__})") from None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ModelConfigError(f"{where}: {CONFIG_NAME} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{where}: {CONFIG_NAME} holds a {type(config).__name__}, not a JSON object")

    library = config.get("library_name")
    if library != LIBRARY_NAME:
        raise ModelConfigError(f"{where}: {CONFIG_NAME} field 'library_name' is {_type_name(library)}, not "
                               f"\"{LIBRARY_NAME}\"; not an snzoo model folder")
    arch = _require(config, "architecture", where)
    if not isinstance(arch, str):
        raise _bad(where, "architecture", "an architecture name", arch)
    try:
        spec = get_architecture(arch)
    except UnknownModelError as exc:
        raise ModelConfigError(f"{where}: {CONFIG_NAME} field 'architecture': {exc}") from None
    if "entry" in config and not isinstance(config["entry"], str):
        raise _bad(where, "entry", "a zoo entry name", config["entry"])

    norm = _require(config, "norm", where)
    if not isinstance(norm, dict):
        raise _bad(where, "norm", "an object", norm)
    norm_type = _require(norm, "type", where, "norm.")
    if norm_type not in NORMS:
        raise _bad(where, "norm.type", f"one of {', '.join(NORMS)}", norm_type)
    if norm_type != spec.norm:
        raise _bad(where, "norm.type", f"\"{spec.norm}\" for architecture {arch}", norm_type)
    for key in ("using_bn", "using_moving_average", "last_gamma"):
        if not isinstance(_require(norm, key, where, "norm."), bool):
            raise _bad(where, f"norm.{key}", "true or false", norm[key])
    momentum = _require(norm, "momentum", where, "norm.")
    if not (_is_number(momentum) and 0 <= momentum < 1):
        raise _bad(where, "norm.momentum", "a number with 0 <= momentum < 1", momentum)

    num_classes = _require(config, "num_classes", where)
    if not (_is_int(num_classes) and num_classes >= 1):
        raise _bad(where, "num_classes", "a positive integer", num_classes)

    data = _require(config, "pretrained_cfg", where)
    if not isinstance(data, dict):
        raise _bad(where, "pretrained_cfg", "an object", data)
    for key in ("resize", "crop"):
        value = _require(data, key, where, "pretrained_cfg.")
        if not (_is_int(value) and value >= 1):
            raise _bad(where, f"pretrained_cfg.{key}", "a positive integer", value)
    if _require(data, "interpolation", where, "pretrained_cfg.") not in INTERPOLATIONS:
        raise _bad(where, "pretrained_cfg.interpolation", f"one of {', '.join(INTERPOLATIONS)}", data["interpolation"])
    for key in ("mean", "std"):
        value = _require(data, key, where, "pretrained_cfg.")
        if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
                and (key == "mean" or all(v > 0 for v in value))):
            raise _bad(where, f"pretrained_cfg.{key}",
                       "a list of 3 numbers" + (" above 0" if key == "std" else ""), value)
    if "crop_pct" in data and not (_is_number(data["crop_pct"]) and 0 < data["crop_pct"] <= 1):
        raise _bad(where, "pretrained_cfg.crop_pct", "a number in (0, 1]", data["crop_pct"])
    for key in ("metrics", "provenance"):
        if key in config and not isinstance(config[key], dict):
            raise _bad(where, key, "an object", config[key])
    return config


def _build(
    config: Mapping[str, Any],
    weights: Optional[Path],
    where: str,
    num_classes: Optional[int],
    overrides: Mapping[str, Any],
) -> nn.Module:
    """The model a checked config describes, with the weights file loaded when one is given."""
    spec = get_architecture(config["architecture"])
    norm = config["norm"]
    kwargs: dict[str, Any] = {"num_classes": config["num_classes"], "using_bn": norm["using_bn"],
                              "using_moving_average": norm["using_moving_average"],
                              "momentum": float(norm["momentum"]), "last_gamma": norm["last_gamma"]}
    kwargs.update(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = spec.build(**kwargs)
    model.architecture = spec.name
    data = dict(config["pretrained_cfg"])
    data.setdefault("crop_pct", data["crop"] / data["resize"])
    # Keyed like a zoo entry's pretrained_cfg (name, eval, metrics, ...), plus where the model came from.
    model.pretrained_cfg = {
        "name": config.get("entry", spec.name),
        "architecture": spec.name,
        "norm": dict(norm),
        "num_classes": config["num_classes"],
        "eval": data,
        "metrics": dict(config.get("metrics") or {}),
        "license": config.get("license"),
        "provenance": dict(config.get("provenance") or {}),
        "source": where,
    }
    if weights is None:
        return model
    state_dict = read_state_dict(weights)
    weights_classes = state_dict.get(CLASSIFIER_PREFIX + "weight")
    reset_head = (
        num_classes is not None and weights_classes is not None and weights_classes.shape[0] != num_classes
    )
    load_checked(model, state_dict, source=f"{where}/{WEIGHTS_NAME}", skip_classifier=reset_head)
    return model


def model_from_folder(
    folder: Union[str, os.PathLike], pretrained: bool = True, num_classes: Optional[int] = None, **overrides
) -> nn.Module:
    """Build the model of a model folder (config.json, model.safetensors), as `create_model("local-dir:PATH")`.

    The architecture is built with the config's norm arguments and class count (overrides and num_classes
    win); with pretrained, model.safetensors is loaded after checking every key and shape. When num_classes
    differs from the weights', the classifier is re-initialised and the rest loaded.
    """
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
    return _build(config, weights, where, num_classes, overrides)


def _parse_hub_spec(spec: str) -> tuple[str, Optional[str]]:
    """Split `ORG/REPO[@REVISION]` into the repo id and the revision (None: the default branch)."""
    repo_id, at, revision = spec.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (at and not revision):
        raise UnknownModelError(f"{spec!r} is not a Hugging Face Hub model; expected ORG/REPO or ORG/REPO@REVISION")
    return repo_id, revision or None


def _hub_download(repo_id: str, filename: str, revision: Optional[str], label: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from snzoo.weights.sources import offline_mode

    # Transport failures surface as the Hub client's HTTP library errors (requests, httpx or httpx2 by
    # version), which share HfHubHTTPError's parent class but not always OSError.
    transport = tuple(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline_mode(),
                                    library_name=LIBRARY_NAME, library_version=snzoo.__version__))
    except LocalEntryNotFoundError:
        reason = (f"{filename} is not in the Hugging Face cache and the Hub is "
                  + ("offline (SNZOO_OFFLINE / HF_HUB_OFFLINE)" if offline_mode() else "unreachable"))
    except RepositoryNotFoundError:
        reason = "no such repository on the Hub (or it is private or gated: log in with `hf auth login`)"
    except RevisionNotFoundError:
        reason = f"no revision {revision!r} in the repository"
    except EntryNotFoundError:
        reason = f"the repository has no {filename}"
    except (HfHubHTTPError, OSError, ValueError, *transport) as exc:
        lines = str(exc).strip().splitlines()
        reason = f"{filename}: {lines[0] if lines else type(exc).__name__}"
    raise WeightsNotAvailableError(f"{label}: {reason}")


def model_from_hf_hub(
    spec: str, pretrained: bool = True, num_classes: Optional[int] = None, **overrides
) -> nn.Module:
    """Build the model of a Hub repository `ORG/REPO[@REVISION]`, as `create_model("hf-hub:ORG/REPO")`.

    config.json and model.safetensors are fetched with huggingface_hub (its cache; only the cache when
    SNZOO_OFFLINE or HF_HUB_OFFLINE is set), both from the same commit, then built as by `model_from_folder`.
    """
    repo_id, revision = _parse_hub_spec(spec)
    label = f"hf-hub:{spec}"
    config_path = _hub_download(repo_id, CONFIG_NAME, revision, label)
    # Take the weights from the commit the config came from, even if the branch moves in between.
    commit = config_path.parent.name
    if _COMMIT_RE.match(commit):
        revision = commit
    where = f"hf-hub:{repo_id}@{revision}" if revision else label
    config = read_config(config_path, where)
    weights = _hub_download(repo_id, WEIGHTS_NAME, revision, label) if pretrained else None
    return _build(config, weights, where, num_classes, overrides)


__all__ = ["export_hf", "export_config", "model_card", "model_from_folder", "model_from_hf_hub", "read_config",
           "hf_license", "ModelConfigError", "ExportError"]
