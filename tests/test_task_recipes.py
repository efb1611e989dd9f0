"""The task recipes as data and the schedules they use: iteration milestones, Detectron's warm-up, poly."""

import math

import pytest

from snzoo.tasks import TASK_RECIPES, default_task_model, task_recipe
from snzoo.train.launch import task_finetune_recipe
from snzoo.train.recipe import RecipeError, check_recipe, peak_learning_rate, resolve_recipe
from snzoo.train.schedule import learning_rate


def test_detection_recipe_is_the_detection_releases_2x_schedule():
    recipe = task_recipe("detection")
    check_recipe(recipe)
    assert recipe["iterations"] == 180000 and recipe["epochs"] is None
    assert recipe["batch"] == {"devices": 8, "per_device": 2}
    assert peak_learning_rate(recipe) == pytest.approx(0.02)  # 0.02 at 16 images
    assert recipe["optimizer"]["weight_decay"] == 1e-4
    assert recipe["schedule"]["milestone_iters"] == [120000, 160000] and recipe["schedule"]["gamma"] == 0.1
    assert recipe["model_kwargs"] == {"trainable_layers": 3, "min_size": 800, "max_size": 1333}
    # A copy: changing it does not change the package's recipe.
    recipe["batch"]["devices"] = 1
    assert TASK_RECIPES["detection"]["batch"]["devices"] == 8


def test_detection_schedule_warm_up_then_steps_at_iterations():
    schedule, peak = task_recipe("detection")["schedule"], 0.02
    iters_per_epoch, total = 1000, 180000

    def at(t):
        return learning_rate(schedule, peak, t // iters_per_epoch, t % iters_per_epoch, iters_per_epoch, 180, total)

    assert at(0) == pytest.approx(peak / 3)  # Detectron's linear warm-up starts at 1/3
    assert at(250) == pytest.approx(peak * (1 / 3 * 0.5 + 0.5))
    assert at(500) == pytest.approx(peak)
    assert at(119999) == pytest.approx(peak)
    assert at(120000) == pytest.approx(peak * 0.1)  # inside an epoch: milestones count iterations
    assert at(160000) == pytest.approx(peak * 0.01)
    assert at(179999) == pytest.approx(peak * 0.01)


def test_poly_schedule_and_lr_scaled_with_the_batch():
    recipe = task_recipe("segmentation")
    check_recipe(recipe)
    peak = peak_learning_rate(recipe)
    assert peak == pytest.approx(0.02)
    assert learning_rate(recipe["schedule"], peak, 0, 0, 100, 30) == pytest.approx(peak)
    assert learning_rate(recipe["schedule"], peak, 15, 0, 100, 30) == pytest.approx(peak * 0.5 ** 0.9)
    assert learning_rate(recipe["schedule"], peak, 29, 99, 100, 30) == pytest.approx(peak * (1 / 3000) ** 0.9)
    # The linear scaling rule: half the batch, half the lr.
    half = resolve_recipe(recipe, None, ["batch.devices=4"])
    assert peak_learning_rate(half) == pytest.approx(0.01)


def test_finetune_recipe_of_a_task_takes_batch_lr_and_length():
    recipe = task_finetune_recipe("detection", epochs=3, batch="1x2", lr=0.005, norm_decay=False)
    assert recipe["batch"] == {"devices": 1, "per_device": 2}
    assert peak_learning_rate(recipe) == pytest.approx(0.005)
    assert recipe["epochs"] == 3 and recipe["iterations"] is None
    assert recipe["optimizer"]["weight_decay_norm"] is False
    kept = task_finetune_recipe("detection", epochs=None, batch=None, lr=None, norm_decay=True)
    assert kept["iterations"] == 180000 and peak_learning_rate(kept) == pytest.approx(0.02)


def test_default_task_models_follow_the_backbone_depth():
    assert default_task_model("detection", 50) == "fasterrcnn_resnet50_fpn_sn"
    assert default_task_model("detection", 18) == "fasterrcnn_resnet_fpn_sn"
    assert default_task_model("segmentation", 50) == "deeplabv3_resnet50_sn"
    assert default_task_model("segmentation", 101) == "deeplabv3_resnet101_sn"
    assert default_task_model("segmentation", 34) == "deeplabv3_resnet_sn"


@pytest.mark.parametrize("change, message", [
    (["iterations=0"], "iterations must be a positive integer"),
    (["epochs=null", "iterations=null"], "epochs must be a positive integer"),
    (["schedule.type=linear"], "'cosine', 'step' or 'poly'"),
    (["schedule.milestone_iters=[]"], "milestone_iters"),
])
def test_bad_task_recipes_are_one_clear_error(change, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        resolve_recipe(task_recipe("detection"), None, change)


def test_iterations_recipe_without_epochs_is_valid():
    recipe = resolve_recipe(task_recipe("detection"), None, ["iterations=40"])
    assert recipe["iterations"] == 40 and recipe["epochs"] is None
    assert math.isclose(peak_learning_rate(recipe), 0.02)
