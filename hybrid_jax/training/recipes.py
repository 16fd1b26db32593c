"""The papers' training recipes (optimizer, schedule, weight-decay groups), in one place for configs and experiments.

=========  ===============================================================================================
recipe     source (papers.md section)
=========  ===============================================================================================
mamba      Mamba App. E.2 (1.7), the GPT-3 recipe improved: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0,
           linear warm-up, cosine to 1e-5, peak 5x GPT-3's learning rate (3e-3 at 125M ... 1e-3 at 1.3B).
           No weight decay on A_log and D (``_no_weight_decay`` in mamba_ssm), dt_bias (Mamba-2), nor on
           biases and norm scales (the GPT-style trainers the Mamba code is trained with group them out).
samba      microsoft/Samba ``pretrain.py`` (3.4): AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, peak 4e-4
           (421M / 1.3B), linear warm-up over 1% of the tokens, cosine to peak / 10. The optimizer is built
           on ``model.parameters()`` with one weight-decay value: every parameter is decayed (A_log, D, norms
           and biases included); there is no no-decay group.
taipan     Taipan section 4 (4.5): AdamW, peak 5e-4, 2000 warm-up steps, cosine to 1e-5, weight decay 0.01,
           clip 1.0. No code was released: betas (0.9, 0.95) and the no-decay group are Mamba-2's (Taipan's
           backbone is "Mamba-2 kept identical to the original work"), both unconfirmed.
=========  ===============================================================================================

Warm-up is a fraction of the run so that a short run keeps the paper's shape: Samba's 1% of tokens; Taipan's 2000 of
the 24,000 steps of its ablation runs (Fig. 5 and 6, the runs our experiments imitate); Mamba's paper gives no length,
and 5% is the 130m preset's (1000 of 20,000 steps; our choice). Floors are absolute (Taipan, Mamba: 1e-5) or relative
to the peak (Samba: peak / 10). In a population run every member's schedule is the configured one scaled by its own
learning rate / ``optim.learning_rate`` (:mod:`hybrid_jax.training.trainer`): floors scale with it.

    config = preset_config("taipan", "130m")
    apply_recipe(config, "taipan")                          # the paper's values, peak 5e-4
    apply_recipe(config, "samba", learning_rate=2e-3)       # Samba's recipe at a small model's learning rate
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimizer recipe (see the module docstring for the sources).

    Attributes:
      name: the recipe's name.
      source: where the values come from.
      learning_rate: the paper's peak learning rate, or None where it depends on the model size (Mamba: the size's
        ``preset_config`` default, which is 5x GPT-3's for the 130m ... 1.3b sizes).
      b1, b2, eps: AdamW moments and epsilon.
      weight_decay: decoupled weight decay.
      grad_clip_norm: global-norm clipping.
      warmup_fraction: linear warm-up length as a fraction of ``train.steps``.
      min_learning_rate: absolute floor of the cosine decay (None: use ``min_lr_ratio``).
      min_lr_ratio: floor as a fraction of the peak (None: use ``min_learning_rate``).
      no_decay: parameter names (the last path component) that get no weight decay.
    """

    name: str
    source: str
    learning_rate: float | None
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float
    warmup_fraction: float
    min_learning_rate: float | None
    min_lr_ratio: float | None
    no_decay: tuple[str, ...]

    def floor(self, peak: float) -> float:
        """The end of the cosine decay for a peak learning rate (never above the peak)."""
        floor = self.min_learning_rate if self.min_learning_rate is not None else self.min_lr_ratio * peak
        return min(floor, peak)

    def warmup_steps(self, steps: int) -> int:
        """Warm-up steps of a run of ``steps`` steps (at least 1 unless the fraction is 0)."""
        return 0 if self.warmup_fraction == 0 else max(1, round(self.warmup_fraction * steps))


# Names of this project's parameters (hybrid_jax.model): SSM dynamics A_log, D, dt_bias (both Mamba mixers), norm
# scales ("scale") and biases (conv1d bias, SAL gate bias).
MAMBA_NO_DECAY = ("A_log", "D", "dt_bias", "scale", "bias")

RECIPES: dict[str, Recipe] = {
    "mamba": Recipe(
        name="mamba",
        source="Mamba arXiv:2312.00752 App. E.2 (papers.md 1.7); warm-up length not given (5%: our choice)",
        learning_rate=None,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
        warmup_fraction=0.05,
        min_learning_rate=1e-5,
        min_lr_ratio=None,
        no_decay=MAMBA_NO_DECAY,
    ),
    "samba": Recipe(
        name="samba",
        source="microsoft/Samba pretrain.py and arXiv:2406.07522 Table 10 (papers.md 3.4)",
        learning_rate=4e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
        warmup_fraction=0.01,
        min_learning_rate=None,
        min_lr_ratio=0.1,
        no_decay=(),
    ),
    "taipan": Recipe(
        name="taipan",
        source="Taipan arXiv:2410.18572 section 4 (papers.md 4.5); betas and no-decay group unconfirmed (Mamba-2's)",
        learning_rate=5e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.01,
        grad_clip_norm=1.0,
        warmup_fraction=2000 / 24000,
        min_learning_rate=1e-5,
        min_lr_ratio=None,
        no_decay=MAMBA_NO_DECAY,
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
      ValueError: an unknown name (one line).
    """
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not one of {sorted(RECIPES)}")
    return RECIPES[name]


def apply_recipe(
    config: ml_collections.ConfigDict, name: str, *, learning_rate: float | None = None
) -> ml_collections.ConfigDict:
    """Sets ``config.optim`` to the recipe ``name`` for a run of ``config.train.steps`` steps (set those first).

    Args:
      config: a run config (:func:`hybrid_jax.training.preset_config`).
      name: a key of :data:`RECIPES`.
      learning_rate: the peak learning rate; None: the recipe's (or, where the recipe has none, the config's).
        A population (``optim.learning_rates``) keeps its rates; the recipe's floor and warm-up apply to each.

    Returns:
      ``config`` (changed in place).
    """
    recipe = get_recipe(name)
    peak = learning_rate or recipe.learning_rate or config.optim.learning_rate
    if not (isinstance(peak, (int, float)) and math.isfinite(peak) and peak > 0):
        raise ValueError(f"apply_recipe({name!r}): learning_rate={peak!r} must be a number > 0")
    o = config.optim
    o.learning_rate = float(peak)
    o.b1, o.b2, o.eps = recipe.b1, recipe.b2, recipe.eps
    o.weight_decay = recipe.weight_decay
    o.grad_clip_norm = recipe.grad_clip_norm
    o.warmup_steps = recipe.warmup_steps(int(config.train.steps))
    o.min_learning_rate = recipe.floor(float(peak))
    o.no_decay = tuple(recipe.no_decay)
    return config


__all__ = ["MAMBA_NO_DECAY", "RECIPES", "Recipe", "apply_recipe", "get_recipe"]
