"""Training loop, evaluator, checkpoints, data builders and DDP helpers shared by every bundle."""

from .builders import image_loaders, optimizer
from .checkpoint import CheckpointMismatchError, load_checkpoint, load_network_weights, save_checkpoint
from .distributed import init_distributed, is_distributed, is_main_process, unwrap
from .evaluator import AnomalyEvaluator, calibrate_thresholds
from .steps import DiffusionStep
from .trainer import Trainer, warmup_cosine_schedule

__all__ = [
    "AnomalyEvaluator",
    "CheckpointMismatchError",
    "DiffusionStep",
    "Trainer",
    "calibrate_thresholds",
    "image_loaders",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_network_weights",
    "optimizer",
    "save_checkpoint",
    "unwrap",
    "warmup_cosine_schedule",
]
