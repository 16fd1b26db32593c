"""The run record names the kernels that ran, through pallas_kernels' public registry only."""

from __future__ import annotations

import ast
import json
import os
import re

import pallas_kernels
from hybrid_jax.training import Trainer, kernel_choices, preset_config

TRAINING = os.path.join(os.path.dirname(__file__), "..", "..", "..", "hybrid_jax", "training")


def _tiny(data_dir: str):
    config = preset_config("samba", "tiny")  # Mamba-1 (selective scan, causal conv) and sliding-window attention
    config.model.n_periods = 1
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.data.data_dir = data_dir
    config.data.num_threads = 0
    config.train.steps = 1
    config.optim.warmup_steps = 0
    config.eval.batch_size = 8
    config.eval.max_batches = 1
    config.eval.sample_tokens = 0
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    return config


def test_the_run_record_names_the_kernels_that_ran(data_dir, tmp_path):
    """``kernels_ran`` comes from the ops' own dispatch while the train step is traced; it agrees with the configured
    choice (``kernels_chosen``: explicit names, or what the registry resolves "auto" to) for every op the model runs,
    and lists no op the model does not run."""
    config = _tiny(data_dir)
    config.kernels.sliding_window_attention = "reference"  # explicit, and not what "auto" picks on any platform
    trainer = Trainer(config, str(tmp_path))
    trainer.run()
    record = json.load(open(tmp_path / "config.json"))
    chosen, ran = record["kernels_chosen"], record["kernels_ran"]
    assert chosen == kernel_choices(trainer.model_config)
    assert ran == trainer.kernels_ran
    assert set(ran) == {"selective_scan", "causal_conv1d", "sliding_window_attention"}
    assert ran["sliding_window_attention"] == chosen["sliding_window_attention"] == "reference"
    dtype = trainer.model_config.dtype
    for op in ("selective_scan", "causal_conv1d"):
        assert ran[op] == chosen[op] == pallas_kernels.resolve_implementation(op, "auto", dtype)
        assert ran[op] in pallas_kernels.get_op(op).available


def test_training_uses_only_the_public_kernel_api_and_knows_no_model_family():
    """hybrid_jax.training imports no private pallas_kernels module, and the loop's modules name no model family."""
    for name in sorted(os.listdir(TRAINING)):
        if not name.endswith(".py"):
            continue
        source = open(os.path.join(TRAINING, name)).read()
        for node in ast.walk(ast.parse(source)):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for module in modules:
                if module.startswith("pallas_kernels"):
                    assert not any(part.startswith("_") for part in module.split(".")), (name, module)
        # Recipes (recipes.py), presets (config.py) and per-mixer FLOP formulas (flops.py) cite their papers by name;
        # the loop, the record, checkpoints and metrics do not.
        if name in ("trainer.py", "checkpoint.py", "metrics.py", "__init__.py"):
            families = r"\b(mamba\d?|samba|taipan|jamba|bamba|zamba\d?|granite|nemotron|falcon|sal|swa|ssd)\b"
            assert not re.search(families, source, re.IGNORECASE), (name, re.search(families, source, re.I))
