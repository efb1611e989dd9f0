"""Recipe features of `snzoo train` that the README promises, observed inside real training runs.

The batch-average finaliser, the Sparse SN training loop (radius schedule, importance-weight lr and decay,
their gradient clipping, fixed one-hot layers), dropping the BN branch and resetting the importance weights,
and the augmentation in force per epoch (the last-epochs fixed-crop phase, the PCA lighting noise).

Runs go through `snzoo train` / `snzoo finetune` in a subprocess or in this process (CliRunner, `train()`).
In-process runs are observed by wrapping the engine's `build_optimizer`: the real function runs, and the
wrapper registers hooks on the model and optimizer it was given, so the tests read the run's own state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader, Subset

import snzoo
from snzoo import zoo
from snzoo.weights import read_state_dict
from snzoo.data import ImageFolderDataset
from snzoo.data.augment import SeededAugmentation, eval_transform_small, final_phase_transform, train_transform
from snzoo.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from snzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from snzoo.models.registry import ARCHITECTURES, register_architecture
from snzoo.models.resnet_cifar import ResNetCifar
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm2d
from snzoo.nn.functional import use_implementation
from snzoo.train import engine
from snzoo.train.engine import TrainConfig, train
from snzoo_cli.main import cli

from photos import photo_paths
from reference_sn import batch_average_stats
from test_train import COMMON, RECIPE, recipe_file, run_ok, weights

Observer = Callable[[torch.optim.Optimizer, torch.nn.Module], None]


pytestmark = pytest.mark.usefixtures("one_thread")


def observe_runs(monkeypatch: pytest.MonkeyPatch, observer: Observer) -> None:
    """Call observer(optimizer, model) when an in-process run has built its optimizer, before its first step."""
    build = engine.build_optimizer

    def build_and_observe(model, recipe):
        optimizer = build(model, recipe)
        observer(optimizer, model)
        return optimizer

    monkeypatch.setattr(engine, "build_optimizer", build_and_observe)


def copy_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def sn_layer_names(state: dict) -> list[str]:
    """The SN layers of a state dict, by the prefix of their importance weights."""
    return [key.removesuffix(".mean_weight") for key in state if key.endswith(".mean_weight")]


# ---------------------------------------------------------------------------------------------- batch average


def test_batch_average_finaliser_leaves_the_average_over_the_eval_transformed_training_images(tmp_path, capsys):
    """After each epoch the running statistics are recomputed over `iterations` shuffled batches of the training
    set with eval transforms; the exported ones equal that average, computed here from the layer inputs."""
    iterations, subset, per_device = 5, 48, 4
    recipe = copy.deepcopy(RECIPE)
    recipe.update(batch={"devices": 2, "per_device": per_device},
                  batch_average={"iterations": iterations, "every_epoch": True})
    run_dir = tmp_path / "run"
    train(TrainConfig(name="resnet20_sn", recipe=recipe, data="fashion-mnist", output=run_dir, workers=0, seed=5,
                      subset=subset, val_subset=16, model_overrides={"using_moving_average": False}))
    log = capsys.readouterr().err
    for epoch in range(recipe["epochs"]):
        assert f"epoch {epoch}: batch-average statistics over {iterations} batches" in log
    exported = weights(run_dir)

    # The finaliser's pass, repeated: the trained weights, SN layers in training mode (statistics per emulated
    # device of 4 images), the last epoch's shuffle of the eval-transformed training images.
    model = snzoo.create_model("resnet20_sn", num_classes=10, using_moving_average=False)
    model.load_state_dict(exported)
    model.train()
    inputs: dict[str, list[np.ndarray]] = {name: [] for name in sn_layer_names(exported)}
    for name, layer in model.named_modules():
        if isinstance(layer, SwitchNorm2d):
            layer.ghost_batch_size = per_device
            layer.register_forward_pre_hook(
                lambda module, args, name=name: inputs[name].extend(np.split(args[0].double().numpy(), 2)))
    evaluation = eval_transform_small(28, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    train_eval = Subset(FashionMNIST("train", transform=evaluation), range(subset))
    last_epoch = recipe["epochs"] - 1
    loader = DataLoader(train_eval, batch_size=2 * per_device, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(last_epoch))
    assert len(loader) > iterations  # so the recipe's iteration count, not the loader's length, is what counts
    with torch.no_grad(), use_implementation("reference"):
        for images, _, _ in list(loader)[:iterations]:
            model(images)
    for name, groups in inputs.items():
        assert len(groups) == 2 * iterations
        mean, var = batch_average_stats(groups)
        np.testing.assert_allclose(exported[f"{name}.running_mean"].double().numpy(), mean, rtol=1e-4, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(exported[f"{name}.running_var"].double().numpy(), var, rtol=1e-4, atol=1e-5,
                                   err_msg=name)


# ---------------------------------------------------------------------------------------------- Sparse SN


SSN_ARCH = "resnet20_ssn"  # the CIFAR ResNet-20 with SparseSwitchNorm2d, registered for these runs only
SSN_EPOCHS, SSN_SUBSET, SSN_DEVICES, SSN_PER_DEVICE = 3, 48, 2, 4
SSN_STEPS = SSN_EPOCHS * (SSN_SUBSET // (SSN_DEVICES * SSN_PER_DEVICE))


@pytest.fixture(scope="module")
def ssn_run(tmp_path_factory):
    """One SSN run at a constant learning rate (so a fixed layer that moved would show), recorded step by step."""
    recipe = copy.deepcopy(RECIPE)
    recipe.update(epochs=SSN_EPOCHS, batch={"devices": SSN_DEVICES, "per_device": SSN_PER_DEVICE},
                  lr={"base": 0.4, "reference_batch": 64},
                  schedule={"type": "step", "milestones": [100], "gamma": 0.1, "warmup_epochs": 0},
                  sparsestmax=copy.deepcopy(zoo.get_entry("resnet50v1_ssn").recipe["sparsestmax"]))
    recipe["optimizer"] = dict(recipe["optimizer"], weight_decay=1e-3)  # large enough that a leak would show
    steps: list[dict] = []

    def observer(optimizer, model):
        layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseSwitchNorm2d)}
        importance = [p for g in optimizer.param_groups if g["name"] == "sparse_importance" for p in g["params"]]
        default_lr = [g for g in optimizer.param_groups if g["name"] == "default"]
        control = model.fc.weight  # not an importance weight: its gradient must not be clipped
        accumulated: dict[int, torch.Tensor] = {}
        for param in importance + [control]:
            param.register_post_accumulate_grad_hook(lambda p: accumulated.__setitem__(id(p), p.grad.clone()))

        def before_step(opt, args, kwargs):
            steps.append({
                "radius": [float(m.radius) for m in layers.values()],
                "lr": default_lr[0]["lr"],
                "raw_grad": [accumulated.get(id(p)) for p in importance],  # before clipping
                "grad": [copy_or_none(p.grad) for p in importance],  # what the optimizer steps with
                "param": [p.detach().clone() for p in importance],
                "buffer": [copy_or_none(opt.state[p].get("momentum_buffer")) for p in importance],
                "control": (accumulated.get(id(control)), control.grad.clone()),
            })
            accumulated.clear()

        def after_step(opt, args, kwargs):
            steps[-1]["updated"] = [p.detach().clone() for p in importance]
            steps[-1]["fixed"] = {(name, vector): int(getattr(m, f"{vector}_fixed"))
                                  for name, m in layers.items() for vector in ("mean", "var")}
            steps[-1]["weights"] = {(name, vector): getattr(m, f"{vector}_weight").detach().clone()
                                    for name, m in layers.items() for vector in ("mean", "var")}

        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(after_step)

    register_architecture(SSN_ARCH, 20, 1, "ssn", ResNetCifar)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.delenv("SNZOO_MANIFEST", raising=False)
            monkeypatch.setenv("SNZOO_OFFLINE", "1")
            zoo.set_overlay(None)
            observe_runs(monkeypatch, observer)
            run_dir = tmp_path_factory.mktemp("ssn")
            summary = train(TrainConfig(name=SSN_ARCH, recipe=recipe, data="fashion-mnist", output=run_dir,
                                        workers=0, seed=5, subset=SSN_SUBSET, val_subset=16))
            exported = weights(run_dir)
            model = snzoo.create_model(SSN_ARCH, num_classes=10)
    finally:
        ARCHITECTURES.pop(SSN_ARCH)
    model.load_state_dict(exported)
    return {"recipe": recipe, "steps": steps, "summary": summary, "exported": exported, "model": model}


def test_ssn_radius_follows_the_linear_schedule_at_every_step(ssn_run):
    steps = ssn_run["steps"]
    assert ssn_run["summary"]["steps"] == len(steps) == SSN_STEPS
    for t, step in enumerate(steps):
        # every SSN layer holds the fraction of training done when the step's forward pass runs
        assert step["radius"] == pytest.approx([t / SSN_STEPS] * len(step["radius"]), abs=1e-6), f"step {t}"


def test_ssn_importance_weights_take_a_tenth_of_the_lr_and_no_weight_decay(ssn_run):
    recipe, steps = ssn_run["recipe"], ssn_run["steps"]
    peak = recipe["lr"]["base"] * SSN_DEVICES * SSN_PER_DEVICE / recipe["lr"]["reference_batch"]
    momentum = recipe["optimizer"]["momentum"]
    moved = 0
    for t, step in enumerate(steps):
        assert step["lr"] == pytest.approx(peak)  # the other weights' lr (constant schedule)
        for i, grad in enumerate(step["grad"]):
            if grad is None:
                continue
            # plain SGD with momentum: buffer = momentum * buffer + grad (no decay term), w -= lr / 10 * buffer
            buffer = grad if step["buffer"][i] is None else momentum * step["buffer"][i] + grad
            expected = step["param"][i] - (peak / 10) * buffer
            assert torch.allclose(step["updated"][i], expected, rtol=0, atol=3e-7), f"step {t}, weight {i}"
            moved += int(not torch.equal(step["updated"][i], step["param"][i]))
    assert moved > 100  # the check saw real updates, not only zero gradients


def test_ssn_importance_gradients_are_clipped_to_total_norm_one(ssn_run):
    clipped = 0
    for t, step in enumerate(ssn_run["steps"]):
        pairs = [(raw, grad) for raw, grad in zip(step["raw_grad"], step["grad"]) if grad is not None]
        before = torch.stack([raw.norm() for raw, _ in pairs]).norm().item()
        after = torch.stack([grad.norm() for _, grad in pairs]).norm().item()
        if before > 1.0:
            clipped += 1
            assert after == pytest.approx(1.0, abs=1e-5), f"step {t}"
            for raw, grad in pairs:  # scaled together, directions kept
                assert torch.allclose(grad, raw / before, rtol=1e-4, atol=1e-9), f"step {t}"
        else:
            assert all(torch.equal(raw, grad) for raw, grad in pairs), f"step {t}"
        raw_control, control = step["control"]
        assert torch.equal(raw_control, control), f"step {t}: a non-importance gradient was clipped"
    assert clipped >= 3  # the run had gradients above the threshold


def test_ssn_one_hot_layers_stay_fixed_for_the_rest_of_the_run(ssn_run):
    steps, exported, model = ssn_run["steps"], ssn_run["exported"], ssn_run["model"]
    layers = dict(model.named_modules())
    first_fixed = {}
    for t, step in enumerate(steps):
        for key, flag in step["fixed"].items():
            if key in first_fixed:
                assert flag == 1, f"{key} was fixed at step {first_fixed[key]} and released at step {t}"
            elif flag:
                first_fixed[key] = t
    assert first_fixed and min(first_fixed.values()) < len(steps) - 1  # some fixed with steps still to come
    for (name, vector), t in first_fixed.items():
        stored = steps[t]["weights"][(name, vector)]
        for later in steps[t + 1:]:  # no gradient, no momentum, no decay moves a fixed vector
            assert torch.equal(later["weights"][(name, vector)], stored), f"{name}.{vector}_weight moved"
        assert torch.equal(exported[f"{name}.{vector}_weight"], stored)
        assert int(exported[f"{name}.{vector}_fixed"]) == 1
        mean_w, var_w = layers[name].importance_weights()
        used = mean_w if vector == "mean" else var_w
        assert torch.equal(used, torch.nn.functional.one_hot(stored.argmax(), 3).float())


# ---------------------------------------------------------------------------------------------- BN branch, reset


def test_one_image_per_device_drops_the_bn_branch_as_in_the_shipped_8x1_entry(tmp_path):
    """The shipped resnet20_sn.fmnist_8x1_cos2 came from `snzoo train resnet20_sn` with its recipe: at one image
    per device the SN layers lose their BN term, and the weights have the shipped entry's keys and shapes."""
    shipped = zoo.get_entry("resnet20_sn.fmnist_8x1_cos2")
    recipe = recipe_file(tmp_path, **shipped.recipe)
    run_ok(["resnet20_sn", "--recipe", recipe, "-o", tmp_path / "run", "--max-steps", "2", *COMMON])
    (entry,) = json.loads((tmp_path / "run" / "entry.json").read_text())["entries"].values()
    assert entry["norm"]["using_bn"] is False and entry["norm"] == dataclasses.asdict(shipped.norm)
    trained = weights(tmp_path / "run")
    reference = read_state_dict(Path(snzoo.__file__).parent / "pretrained" / "resnet20_sn.fmnist_8x1_cos2.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in reference.items()}
    assert not [key for key in trained if key.endswith(("running_mean", "running_var"))]
    assert {trained[f"{name}.mean_weight"].numel() for name in sn_layer_names(trained)} == {2}


PRETRAINED = "resnet20_sn.fmnist_8x2_cos2"  # using_bn=True, learned (non-uniform) importance weights


@pytest.mark.parametrize("batch, flags, using_bn, reset", [
    pytest.param("4x1", [], False, False, id="drops-by-default-at-1-per-device"),
    pytest.param("4x1", ["--keep-bn"], True, False, id="keep-bn-overrides-the-default"),
    pytest.param("2x2", ["--drop-bn"], False, False, id="drop-bn-at-2-per-device"),
    pytest.param("2x2", ["--reset-importance"], True, True, id="reset-importance-keeps-bn-at-2"),
])
def test_finetune_bn_branch_and_importance_reset_follow_the_flags(tmp_path, monkeypatch, batch, flags, using_bn, reset):
    started: dict[str, torch.Tensor] = {}
    observe_runs(monkeypatch, lambda optimizer, model: started.update(
        {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("mean_weight", "var_weight"))}))
    run_dir = tmp_path / "ft"
    result = CliRunner().invoke(cli, ["finetune", PRETRAINED, "--data", "fashion-mnist", "-o", str(run_dir),
                                      "--epochs", "1", "--max-steps", "2", "--batch", batch, "--subset", "32",
                                      "--val-subset", "16", "-j", "0", *flags])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((run_dir / "entry.json").read_text())["entries"].values()
    assert entry["norm"]["using_bn"] is using_bn
    trained = weights(run_dir)
    layers = sn_layer_names(trained)
    assert len(layers) == 21
    terms = 3 if using_bn else 2
    for name in layers:
        assert trained[f"{name}.mean_weight"].shape == trained[f"{name}.var_weight"].shape == (terms,)
        assert (f"{name}.running_mean" in trained) is using_bn and (f"{name}.running_var" in trained) is using_bn
    pretrained = snzoo.create_model(PRETRAINED, pretrained=True).state_dict()
    assert set(started) == {k for k in pretrained if k.endswith(("mean_weight", "var_weight"))}
    for key, value in started.items():
        assert value.shape == (terms,)
        assert not torch.allclose(pretrained[key], pretrained[key][0].expand(3)), key  # learned, not uniform
        if reset:  # uniform again at the first step: raw weights all equal (softmax 1/3 each)
            assert torch.equal(value, torch.ones(terms)), key
        else:  # the entry's learned preference, cut to IN and LN where BN was dropped
            assert torch.equal(value, pretrained[key][:terms]), key


# ---------------------------------------------------------------------------------------------- augmentation


@pytest.fixture
def photo_train_folder(tmp_path) -> Path:
    """Eight small real photographs in two class folders (two different square crops of four photos)."""
    root = tmp_path / "photos"
    for i, path in enumerate(photo_paths()[:4]):
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        for j, box in enumerate([(0, 0, side, side), (image.width - side * 3 // 4, image.height - side * 3 // 4,
                                                        image.width, image.height)]):
            target = root / "train" / f"class{(i + j) % 2}"
            target.mkdir(parents=True, exist_ok=True)
            image.crop(box).resize((40, 40), Image.BILINEAR).save(target / f"{path.stem}-{j}.png")
    return root


def test_final_phase_switches_on_for_the_last_epochs_and_lighting_noise_is_applied(tmp_path, monkeypatch,
                                                                                 photo_train_folder):
    """Every image the model trains on is the seeded main-phase transform of some training image in the first
    epochs and the final-phase one (resize, fixed crop) in the last `final_phase.epochs`; in both, the PCA
    lighting has added one non-zero offset per colour channel."""
    epochs, seed = 3, 4
    aug = {"crop": 32, "random_resized_crop": True, "hflip": True, "lighting": "original", "color_jitter": None,
           "final_phase": {"epochs": 1, "resize": 36, "crop": "center"}}
    recipe = copy.deepcopy(RECIPE)
    recipe.update(epochs=epochs, batch={"devices": 2, "per_device": 2}, augmentation=aug)
    seen: list[torch.Tensor] = []  # the training inputs in order: two steps of four images per epoch

    def observer(optimizer, model):
        model.conv1.register_forward_pre_hook(
            lambda module, args: seen.extend(args[0].detach().clone()) if module.training else None)

    observe_runs(monkeypatch, observer)
    train(TrainConfig(name="resnet20_sn", recipe=recipe, data=str(photo_train_folder), output=tmp_path / "run",
                      workers=0, seed=seed, model_overrides={"in_chans": 3}))

    images = ImageFolderDataset(photo_train_folder / "train", transform=None)
    phases = {"main": train_transform(aug, IMAGENET_MEAN, IMAGENET_STD),
              "final": final_phase_transform(aug, IMAGENET_MEAN, IMAGENET_STD)}
    unlit_aug = dict(aug, lighting=None)
    unlit = {"main": train_transform(unlit_aug, IMAGENET_MEAN, IMAGENET_STD),
             "final": final_phase_transform(unlit_aug, IMAGENET_MEAN, IMAGENET_STD)}
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert len(seen) == epochs * len(images)
    for epoch in range(epochs):
        batch = seen[epoch * len(images):(epoch + 1) * len(images)]  # every image once per epoch
        phase = "final" if epoch >= epochs - aug["final_phase"]["epochs"] else "main"
        other = "main" if phase == "final" else "final"
        candidates = {}
        for name in phases:
            dataset = SeededAugmentation(images, phases[name], seed)
            dataset.set_epoch(epoch)
            candidates[name] = [dataset[i][0] for i in range(len(images))]
        plain = SeededAugmentation(images, unlit[phase], seed)
        plain.set_epoch(epoch)
        offsets = []
        for image in batch:
            matches = [i for i, c in enumerate(candidates[phase]) if torch.equal(image, c)]
            assert len(matches) == 1, f"epoch {epoch}: an image is not the {phase}-phase transform of a training image"
            assert not any(torch.equal(image, c) for c in candidates[other]), f"epoch {epoch}: {other} phase in force"
            # Lighting: the same crop and flip without it differ by one constant per channel (before Normalize).
            offset = (image - plain[matches[0]][0]) * std
            assert torch.allclose(offset, offset.mean(dim=(1, 2), keepdim=True), atol=1e-5), f"epoch {epoch}"
            offsets.append(offset.mean(dim=(1, 2)))
        offsets = torch.stack(offsets)
        assert offsets.abs().amax(dim=1).min() > 1e-4, f"epoch {epoch}: no lighting noise"
        apart = torch.cdist(offsets, offsets) + torch.eye(len(offsets))
        assert apart.min() > 1e-4, f"epoch {epoch}: the same lighting offset for two images"  # drawn per image
