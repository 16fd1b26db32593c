"""The optimizer: AdamW with linear warm-up, cosine decay to a floor, global-norm clipping and a weight-decay mask.

The recipe of the Mamba papers (arXiv:2312.00752 appendix E.2, following GPT-3): AdamW with betas (0.9, 0.95),
weight decay 0.1, gradient clipping at 1.0, linear warm-up then cosine decay to 1e-5. As in mamba_ssm, parameters
that set the SSM dynamics (``A_log``, ``D``, ``dt_bias``) and every norm scale and bias are not decayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, floor: float) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine from ``peak`` to ``floor`` at
    ``total_steps`` (constant ``floor`` afterwards).

    The learning rate of step s (0-based) is ``schedule(s)``: step 0 of a warm-up trains at 0, as in optax.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """A tree of bools like ``params``: True where weight decay applies (the leaf's name is not in ``no_decay``)."""
    skip = set(no_decay)

    def decayed(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return str(name) not in skip

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW as described in the module docstring, from a config's ``optim`` section.

    Args:
      optim: the ``optim`` section (learning_rate, warmup_steps, min_learning_rate, b1, b2, eps, weight_decay,
        no_decay, grad_clip_norm).
      total_steps: ``train.steps``, the schedule's length.

    Returns:
      (the gradient transformation, the learning-rate schedule).
    """
    schedule = learning_rate_schedule(optim.learning_rate, optim.warmup_steps, total_steps, optim.min_learning_rate)
    no_decay = tuple(optim.no_decay)
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=lambda params: decay_mask(params, no_decay),
        )
    )
    return optax.chain(*parts), schedule


__all__ = ["decay_mask", "learning_rate_schedule", "make_optimizer"]
