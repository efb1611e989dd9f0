"""Hugging Face model folders: export_hf, and create_model("local-dir:...") / create_model("hf-hub:...").

One ResNet-50 v2 SN entry is converted and exported once per module from an original-format checkpoint
placed in a private snzoo cache; the Hub is a huggingface_hub cache laid out on disk, read offline.
"""

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from photos import photo_batch
from safetensors import safe_open
from safetensors.torch import load_file

import snzoo
from snzoo import hub, zoo
from snzoo.errors import CheckpointError, ExportError, ModelConfigError, SnzooError, UnknownModelError, WeightsNotAvailableError
from snzoo.hub import export_config, export_hf, model_card, publish
from snzoo.weights import UnpinnedWeightsWarning

ENTRY = "resnet50v2_sn.in1k_8x32_cos120"
REPO_ID = "snzoo/resnet50v2_sn-in1k"


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert isinstance(exc, SnzooError) and message and "\n" not in message, message
    return message


def randomise_norms(model: torch.nn.Module) -> None:
    """Move SN parameters and statistics away from their initial values, so a lost tensor shows."""
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith(("mean_weight", "var_weight")):
                tensor.uniform_(-1, 1)
            elif key.endswith(("sn1.weight", "sn2.weight", "sn_out.weight")):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith((".bias", "running_mean")):
                tensor.uniform_(-0.1, 0.1)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The entry's weights converted into a private snzoo cache and exported to a model folder."""
    cache = tmp_path_factory.mktemp("snzoo-cache-hf")
    folder = tmp_path_factory.mktemp("export") / "resnet50v2_sn-in1k"
    # Module scope runs before conftest's per-test isolation, so set the same environment here.
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SNZOO_MANIFEST", "SNZOO_MIRROR", "SNZOO_REQUIRE_PINNED"):
            mp.delenv(name, raising=False)
        mp.setenv("SNZOO_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("SNZOO_CACHE", str(cache))
        zoo.set_overlay(None)
        torch.manual_seed(0)
        source = snzoo.create_model(ENTRY)
        randomise_norms(source)
        entry = snzoo.get_entry(ENTRY)
        torch.save({"epoch": 120, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
                   cache / entry.sources[0].file_name)
        with pytest.warns(UnpinnedWeightsWarning, match="no checksum is published"):
            assert export_hf(ENTRY, folder, repo_id=REPO_ID) == folder
    source.eval()
    with torch.no_grad():
        photos = photo_batch()
        logits = source(photos)
    return SimpleNamespace(folder=folder, cache=cache, model=source, state=source.state_dict(), photos=photos,
                           logits=logits)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(root: Path, repo_id: str, files: dict, commit: str) -> Path:
    """A huggingface_hub cache holding one commit of a model repo: refs/main, snapshots/COMMIT, blobs."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)  # read verbatim: no trailing newline
    for name, path in files.items():
        data = Path(path).read_bytes()
        # Blobs are named by the Hub's etag: sha256 for LFS files, the git blob id for small text files.
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_id(data)
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", etag))
    return root


# huggingface_hub is imported inside the tests: it reads HF_HUB_CACHE once, at import, and importing it while
# pytest collects this file would fix that location for test files that set the variable later.


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub uses for this test."""
    import huggingface_hub.constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    # huggingface_hub reads its cache location once at import; point the live value at this test's cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def assert_same_state(model: torch.nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------ export


def test_export_writes_weights_config_and_card(exported):
    folder = exported.folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert list(folder.parent.iterdir()) == [folder]  # no temporary folder left beside it

    entry = snzoo.get_entry(ENTRY)
    config = json.loads((folder / "config.json").read_text())
    assert config == {
        "library_name": "snzoo",
        "architecture": "resnet50v2_sn",
        "entry": ENTRY,
        "norm": {"type": "sn", "using_bn": True, "using_moving_average": True, "momentum": 0.9, "last_gamma": False},
        "num_classes": 1000,
        "pretrained_cfg": {"dataset": "imagenet-1k-val", "resize": 256, "crop": 224, "crop_pct": 0.875,
                           "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "metrics": {"imagenet-1k-val": {"top1": 77.57, "top5": 93.65}},
        "license": "cc-by-nc-4.0",
        "provenance": entry.provenance,
        "snzoo_version": snzoo.__version__,
    }

    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors.keys() == exported.state.keys()
    assert all(torch.equal(tensors[k], exported.state[k]) for k in tensors)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"entry": ENTRY, "snzoo_version": snzoo.__version__, "format": "pt"}

    from huggingface_hub.repocard import metadata_load

    card = (folder / "README.md").read_text()
    meta = metadata_load(folder / "README.md")
    assert meta["license"] == "cc-by-nc-4.0" and meta["library_name"] == "snzoo"
    assert {"image-classification", "switchable-normalization"} <= set(meta["tags"])
    assert meta["datasets"] == ["imagenet-1k"] and meta["pipeline_tag"] == "image-classification"
    assert f'snzoo.create_model("hf-hub:{REPO_ID}", pretrained=True)' in card
    assert "| imagenet-1k-val | 77.57 | 93.65 |" in card
    assert "centre crop 224x224 (crop_pct 0.875)" in card and "resize the shorter side to 256 (bilinear)" in card
    assert "5 linear warmup epochs, then cosine decay" in card and "8 devices x 32 images = 256" in card
    assert "arXiv:1806.10779" in card and "@article{luo2018switchable" in card and "1903.03793" not in card
    assert "ResNet50v2+SN(8,32)-77.57.pth" in card


def test_ssn_card_cites_both_papers_and_maps_licences():
    card = model_card(snzoo.get_entry("resnet50v1_ssn.in1k_8x2_step100"))
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-nc-4.0" and "ssn" in front["tags"]
    assert "@article{shao2019ssn" in card and "@article{luo2018switchable" in card
    assert "SparsestMax: radius schedule linear_0_to_1" in card and 'hf-hub:ORG/REPO' in card
    assert "step decay x0.1 at epochs 30, 60, 90" in card
    assert hub.hf_license("MIT") == "mit" and hub.hf_license("Custom-1.0") == "other" and hub.hf_license(None) == "unknown"
    entry = snzoo.get_entry(ENTRY)
    custom = replace(entry, provenance={**entry.provenance, "license": "SenseTime Research License 1.0",
                                        "license_url": "https://example.org/license"})
    front = yaml.safe_load(model_card(custom).split("---\n")[1])
    assert front["license"] == "other" and front["license_name"] == "sensetime-research-license-1.0"
    assert front["license_link"] == "https://example.org/license"


def test_export_refuses_a_non_empty_folder_before_fetching(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError) as info:  # the cache is empty: fetching first would fail differently
        export_hf(ENTRY, out)
    assert "overwrite" in one_line(info.value) and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="not a folder"):
        export_hf(ENTRY, tmp_path / "file", overwrite=True)


def test_export_errors_for_unknown_names_and_missing_weights(tmp_path):
    with pytest.raises(UnknownModelError) as info:
        export_hf("resnet18v1_sn", tmp_path / "a")
    assert "no pretrained weights" in one_line(info.value)
    with pytest.raises(WeightsNotAvailableError) as info:
        export_hf(ENTRY, tmp_path / "b")
    assert "offline" in one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_overwrite_replaces_the_folder(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("SNZOO_CACHE", str(exported.cache))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    export_hf(ENTRY, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert list(tmp_path.iterdir()) == [out]
    # Compared as tensors: safetensors writes its metadata in no fixed order, so bytes may differ.
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == exported.state.keys()
    assert all(torch.equal(tensors[k], exported.state[k]) for k in tensors)
    assert json.loads((out / "config.json").read_text()) == json.loads((exported.folder / "config.json").read_text())


def test_a_failure_mid_export_leaves_no_partial_folder(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("SNZOO_CACHE", str(exported.cache))

    def broken_card(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(publish, "model_card", broken_card)
    with pytest.raises(OSError, match="No space left"):
        export_hf(ENTRY, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "previous.txt").write_text("previous export")
    with pytest.raises(OSError, match="No space left"):
        export_hf(ENTRY, kept, overwrite=True)
    assert list(tmp_path.iterdir()) == [kept] and [p.name for p in kept.iterdir()] == ["previous.txt"]


# ------------------------------------------------------------------------------------------------ local-dir


def test_local_dir_model_gives_identical_outputs_on_photographs(exported):
    model = snzoo.create_model(f"local-dir:{exported.folder}", pretrained=True).eval()
    with torch.no_grad():
        logits = model(exported.photos)
    assert torch.equal(logits, exported.logits)
    assert model.architecture == "resnet50v2_sn" and model.sn1.using_bn
    cfg = model.pretrained_cfg
    assert cfg["name"] == ENTRY and cfg["source"] == str(exported.folder)
    assert cfg["eval"]["crop_pct"] == 0.875 and cfg["eval"]["interpolation"] == "bilinear"
    assert cfg["metrics"]["imagenet-1k-val"]["top1"] == 77.57


def test_local_dir_without_pretrained_builds_the_configured_architecture(exported):
    model = snzoo.create_model(f"local-dir:{exported.folder}", drop_rate=0.0)
    assert model.dropout.p == 0.0 and model.sn1.momentum == 0.9
    assert not torch.equal(model.sn1.mean_weight, exported.state["sn1.mean_weight"])


def test_num_classes_override_reinitialises_only_the_classifier(exported):
    model = snzoo.create_model(f"local-dir:{exported.folder}", pretrained=True, num_classes=10)
    state = model.state_dict()
    assert model.fc.weight.shape == (10, 2048) and model.fc.bias.shape == (10,)
    assert all(torch.equal(state[k], exported.state[k]) for k in state if not k.startswith("fc."))
    assert not torch.equal(model.fc.weight, exported.state["fc.weight"][:10])
    same = snzoo.create_model(f"local-dir:{exported.folder}", pretrained=True, num_classes=1000)
    assert torch.equal(same.fc.weight, exported.state["fc.weight"])


def test_overrides_that_contradict_the_weights_fail_in_one_line(exported):
    with pytest.raises(CheckpointError) as info:
        snzoo.create_model(f"local-dir:{exported.folder}", pretrained=True, using_bn=False)
    assert "using_bn" in one_line(info.value)


def write_config(folder: Path, config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return folder


def changed(path: str, value):
    config = export_config(snzoo.get_entry(ENTRY))
    *parents, last = path.split(".")
    target = config
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return config


RAW = object()  # marks a config.json text written as is


@pytest.mark.parametrize("field, value, words", [
    (None, None, "no config.json"),
    (RAW, "{not json", "not valid JSON"),
    (RAW, "[1, 2]", "not a JSON object"),
    ("library_name", "timm", "'library_name'"),
    ("architecture", "resnet50v9_sn", "'architecture'"),
    ("architecture", KeyError, "lacks the field 'architecture'"),
    ("num_classes", "many", "'num_classes' must be a positive integer"),
    ("num_classes", True, "'num_classes'"),
    ("norm.using_bn", "yes", "'norm.using_bn' must be true or false"),
    ("norm.type", "bn", "'norm.type'"),
    ("norm.momentum", 1.5, "'norm.momentum'"),
    ("pretrained_cfg", KeyError, "lacks the field 'pretrained_cfg'"),
    ("pretrained_cfg.std", [0.2, 0.2], "'pretrained_cfg.std'"),
    ("pretrained_cfg.interpolation", "lanczos", "'pretrained_cfg.interpolation'"),
])
def test_missing_or_invalid_config_fails_in_one_line(tmp_path, field, value, words):
    folder = tmp_path / "model"
    folder.mkdir()
    if field is RAW:
        write_config(folder, value)
    elif field is not None:
        write_config(folder, changed(field, value))
    with pytest.raises(ModelConfigError) as info:
        snzoo.create_model(f"local-dir:{folder}", pretrained=True)
    message = one_line(info.value)
    assert words in message and str(folder) in message


def test_missing_folder_or_weights_fail_in_one_line(tmp_path):
    with pytest.raises(WeightsNotAvailableError) as info:
        snzoo.create_model(f"local-dir:{tmp_path / 'nowhere'}", pretrained=True)
    assert "no such model folder" in one_line(info.value)
    folder = write_config(tmp_path / "model", export_config(snzoo.get_entry(ENTRY)))
    with pytest.raises(WeightsNotAvailableError) as info:
        snzoo.create_model(f"local-dir:{folder}", pretrained=True)
    assert "no model.safetensors" in one_line(info.value)
    assert snzoo.create_model(f"local-dir:{folder}").fc.out_features == 1000


def test_checkpoint_path_is_refused_for_folder_and_hub_names(tmp_path):
    for name in (f"local-dir:{tmp_path}", f"hf-hub:{REPO_ID}"):
        with pytest.raises(CheckpointError) as info:
            snzoo.create_model(name, checkpoint_path=tmp_path / "x.pth")
        assert "checkpoint_path" in one_line(info.value)


# ------------------------------------------------------------------------------------------------ hf-hub


def test_hf_hub_loads_the_same_model_from_the_cache_offline(exported, hf_cache, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import hf_hub_download

    commit = hashlib.sha1(b"first upload").hexdigest()
    files = {p.name: p for p in exported.folder.iterdir()}
    hub_cache(hf_cache, REPO_ID, files, commit)
    assert Path(hf_hub_download(REPO_ID, "config.json", local_files_only=True)).parent.name == commit

    model = snzoo.create_model(f"hf-hub:{REPO_ID}@main", pretrained=True)
    assert_same_state(model, exported.state)
    assert model.pretrained_cfg["name"] == ENTRY and model.pretrained_cfg["source"] == f"hf-hub:{REPO_ID}@{commit}"

    pinned = snzoo.create_model(f"hf-hub:{REPO_ID}@{commit}", pretrained=True).eval()
    assert_same_state(pinned, exported.state)
    with torch.no_grad():
        assert torch.equal(pinned(exported.photos), exported.logits)

    # SNZOO_OFFLINE alone keeps the Hub client to its cache too.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    default_branch = snzoo.create_model(f"hf-hub:{REPO_ID}", pretrained=True, num_classes=10)
    assert default_branch.fc.out_features == 10
    assert torch.equal(default_branch.sn1.mean_weight, exported.state["sn1.mean_weight"])


def test_hf_hub_errors_are_one_line(exported, hf_cache, tmp_path):
    with pytest.raises(WeightsNotAvailableError) as info:
        snzoo.create_model("hf-hub:snzoo/not-cached", pretrained=True)
    message = one_line(info.value)
    assert "hf-hub:snzoo/not-cached" in message and "offline" in message

    # A repository whose cache holds the config but not the weights.
    commit = hashlib.sha1(b"config only").hexdigest()
    hub_cache(hf_cache, "snzoo/config-only", {"config.json": exported.folder / "config.json"}, commit)
    assert snzoo.create_model("hf-hub:snzoo/config-only").architecture == "resnet50v2_sn"
    with pytest.raises(WeightsNotAvailableError) as info:
        snzoo.create_model("hf-hub:snzoo/config-only", pretrained=True)
    assert "model.safetensors is not in the Hugging Face cache" in one_line(info.value)
    with pytest.raises(WeightsNotAvailableError) as info:
        snzoo.create_model("hf-hub:snzoo/config-only@v2", pretrained=True)
    assert "@v2" in one_line(info.value)

    bad = tmp_path / "bad-config.json"
    bad.write_text(json.dumps(changed("num_classes", 0)))
    hub_cache(hf_cache, "snzoo/bad-config", {"config.json": bad}, commit)
    with pytest.raises(ModelConfigError) as info:
        snzoo.create_model("hf-hub:snzoo/bad-config", pretrained=True)
    assert f"hf-hub:snzoo/bad-config@{commit}" in one_line(info.value) and "'num_classes'" in str(info.value)

    for spec in ("hf-hub:no-slash", "hf-hub:a/b/c", "hf-hub:org/repo@"):
        with pytest.raises(UnknownModelError) as info:
            snzoo.create_model(spec, pretrained=True)
        assert "ORG/REPO" in one_line(info.value)


def test_hf_module_is_not_imported_by_plain_names():
    import subprocess
    import sys

    code = "import sys, snzoo; snzoo.create_model('resnet18v1_sn'); print('snzoo.hub' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_folder_names_are_model_names_not_files_for_inspect_and_plot(exported, tmp_path):
    from snzoo.tools.inspect import inspect_importance
    from snzoo.tools.plot import checkpoint_importance
    from snzoo.weights import names_a_file

    name = f"local-dir:{exported.folder}"
    assert not names_a_file(name) and not names_a_file("hf-hub:org/repo@main")
    assert names_a_file(str(tmp_path / "missing.pth")) and names_a_file("runs/x.safetensors")
    rows = inspect_importance(name)  # read through create_model, not as a (missing) checkpoint file
    assert rows and all(abs(sum(row["mean"].values()) - 1) < 1e-5 for row in rows)
    assert set(checkpoint_importance(name)) == {row["layer"] for row in rows}
