"""Training and fine-tuning: reproduce a zoo entry's recipe on one process or many (torchrun, DDP).

    from snzoo.train import train_entry, finetune
    train_entry("resnet50v1_sn.in1k_8x2_step100", data="/data/imagenet", output="runs/r50")
"""

from snzoo.train.engine import TrainConfig, TrainingError, plan_batches, train
from snzoo.train.launch import finetune, train_entry

__all__ = ["TrainConfig", "TrainingError", "plan_batches", "train", "train_entry", "finetune"]
