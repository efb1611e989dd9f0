"""Training and fine-tuning: reproduce a zoo entry's recipe on one process or many (torchrun, DDP).

    from snzoo.train import train_entry, finetune
    train_entry("resnet50v1_sn.in1k_8x2_step100", data="/data/imagenet", output="runs/r50")
"""

from snzoo.errors import TrainingError
from snzoo.train.engine import train
from snzoo.train.plan import TrainConfig, plan_batches
from snzoo.train.launch import finetune, train_entry
from snzoo.train.run_log import METRICS_FILE, read_metrics

__all__ = ["METRICS_FILE", "TrainConfig", "TrainingError", "finetune", "plan_batches", "read_metrics", "train",
           "train_entry"]
