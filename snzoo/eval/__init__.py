"""Evaluation: the engine (a model and a data set to top-1 / top-5 and throughput), the runner that evaluates
zoo entries and checkpoints with their 1-crop protocol, and results files."""

from snzoo._torch_utils import check_device
from snzoo.eval.engine import EvalResult, default_workers, evaluate, make_loader
from snzoo.eval.results import RESULT_COLUMNS, append_results, check_results_file, result_row
from snzoo.eval.runner import IMAGENET_EVAL, class_names_for, evaluate_model, imagenet_wnids

__all__ = [
    "IMAGENET_EVAL", "RESULT_COLUMNS", "EvalResult", "append_results", "check_device", "check_results_file",
    "class_names_for", "default_workers",
    "evaluate", "evaluate_model", "imagenet_wnids", "make_loader", "result_row",
]
