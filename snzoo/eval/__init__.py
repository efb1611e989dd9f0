"""Evaluation: the engine (a model and a data set to top-1 / top-5 and throughput), the runner that evaluates
zoo entries and checkpoints with their 1-crop protocol, results files, and the task metrics (COCO box / mask AP
through pycocotools, segmentation mIoU)."""

from snzoo._torch_utils import check_device
from snzoo.eval.detection import COCO_STATS, DetectionResult, evaluate_detection
from snzoo.eval.segmentation import SegmentationResult, evaluate_segmentation
from snzoo.eval.engine import EvalResult, default_workers, evaluate, make_loader
from snzoo.eval.results import RESULT_COLUMNS, append_results, check_results_file, result_row
from snzoo.eval.real_labels import REAL_SOURCE, load_real_labels, real_label_sets, real_labels_file
from snzoo.eval.runner import IMAGENET_EVAL, class_names_for, classes_present, evaluate_model, imagenet_wnids
from snzoo.eval.tasks import TaskEvalResult, append_task_results, evaluate_task_model, task_result_line
from snzoo.eval.suite import ROBUSTNESS, SUITES, TestSet, find_sets, run_suite, with_diffs, write_suite_results

__all__ = [
    "TaskEvalResult", "append_task_results", "evaluate_task_model", "task_result_line",
    "COCO_STATS", "DetectionResult", "SegmentationResult", "evaluate_detection", "evaluate_segmentation",
    "REAL_SOURCE", "ROBUSTNESS", "SUITES", "TestSet", "classes_present", "find_sets", "load_real_labels",
    "real_label_sets", "real_labels_file", "run_suite", "with_diffs", "write_suite_results",
    "IMAGENET_EVAL", "RESULT_COLUMNS", "EvalResult", "append_results", "check_device", "check_results_file",
    "class_names_for", "default_workers",
    "evaluate", "evaluate_model", "imagenet_wnids", "make_loader", "result_row",
]
