"""Training loop, LR schedules, evaluator, checkpoints, data builders and DDP helpers shared by every bundle.

The training steps (what one batch costs) are the methods' own and live in :mod:`medad.methods`.
"""

from .builders import (
    image_folder_loader,
    image_loaders,
    slice_training_transforms,
    volume_input_transforms,
    volume_loaders,
)
from .checkpoint import CheckpointMismatchError, load_checkpoint, load_network_weights, save_checkpoint
from .distributed import (
    all_reduce_mean,
    barrier,
    distributed_network,
    init_distributed,
    is_distributed,
    is_main_process,
    unwrap,
)
from .evaluator import AnomalyEvaluator, calibrate_thresholds
from .export import export_torchscript, load_torchscript, read_calibration, weights_fingerprint
from .grids import to_image_size, to_input_grid, to_native_space
from .monitor import LearningMonitor
from .schedules import (
    ExponentialStepProgressLR,
    MultiStepProgressLR,
    ProgressScheduler,
    WarmupCosineProgressLR,
    multi_step_schedule,
    step_decay_schedule,
    training_length,
    warmup_cosine_schedule,
)
from .trainer import Trainer, TrainingInterrupted

__all__ = [
    "AnomalyEvaluator",
    "CheckpointMismatchError",
    "ExponentialStepProgressLR",
    "LearningMonitor",
    "MultiStepProgressLR",
    "ProgressScheduler",
    "Trainer",
    "TrainingInterrupted",
    "WarmupCosineProgressLR",
    "multi_step_schedule",
    "step_decay_schedule",
    "training_length",
    "all_reduce_mean",
    "barrier",
    "calibrate_thresholds",
    "export_torchscript",
    "load_torchscript",
    "read_calibration",
    "to_image_size",
    "to_input_grid",
    "to_native_space",
    "weights_fingerprint",
    "image_folder_loader",
    "image_loaders",
    "slice_training_transforms",
    "volume_loaders",
    "volume_input_transforms",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_network_weights",
    "save_checkpoint",
    "unwrap",
    "distributed_network",
    "warmup_cosine_schedule",
]
