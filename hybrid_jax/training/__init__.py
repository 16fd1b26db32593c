"""Training: run configs, the sharded train loop, optimizer, checkpoints, metrics and MFU.

``train_and_evaluate(config, workdir)`` is the whole path (``python -m hybrid_jax.train`` calls it);
``preset_config(name, size)`` and ``parse_arg(arg, **knobs)`` are what ``configs/*.py`` build their
``get_config(arg)`` from.
"""

from hybrid_jax.training.checkpoint import Checkpointer, CheckpointError
from hybrid_jax.training.config import model_config, parse_arg, preset_config, validate
from hybrid_jax.training.flops import flops_per_token, peak_flops
from hybrid_jax.training.metrics import MetricWriter
from hybrid_jax.training.optimizer import learning_rate_schedule, make_optimizer
from hybrid_jax.training.trainer import NonFiniteLossError, Trainer, TrainState, kernel_choices, train_and_evaluate

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "MetricWriter",
    "NonFiniteLossError",
    "TrainState",
    "Trainer",
    "flops_per_token",
    "kernel_choices",
    "learning_rate_schedule",
    "make_optimizer",
    "model_config",
    "parse_arg",
    "peak_flops",
    "preset_config",
    "train_and_evaluate",
    "validate",
]
