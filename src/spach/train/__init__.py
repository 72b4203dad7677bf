"""Training and evaluation with the paper's DeiT recipe: `TrainConfig`, `train`, `evaluate_checkpoint`."""
from spach.train.config import TrainConfig
from spach.train.engine import train
from spach.train.evaluate import evaluate, evaluate_checkpoint

__all__ = ["TrainConfig", "evaluate", "evaluate_checkpoint", "train"]
