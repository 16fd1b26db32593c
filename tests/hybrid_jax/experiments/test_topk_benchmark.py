"""experiments/kernels/topk_attention.py on the CPU: the check that the fused and the XLA block selections pick blocks
of the same scores (``selection_disagreement``), fed selections that differ in known ways."""

import importlib.util
import os
import sys

import jax
import numpy as np

from pallas_kernels.topk_attention.reference import block_scores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(ROOT, "experiments", "kernels", "topk_attention.py")


def _load():
    # The script imports its sibling bench_common as `python experiments/kernels/topk_attention.py` would find it.
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        spec = importlib.util.spec_from_file_location("kernels_topk_attention_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return module


bench = _load()


def _with_fused(monkeypatch, edit):
    """Make the benchmark's "fused" selection the XLA selection passed through ``edit``."""
    original = bench.select_fn

    def select_fn(cfg, which, tiling=None):
        xla = original(cfg, "xla")
        return (lambda q, k: edit(xla(q, k))) if which == "fused" else xla

    monkeypatch.setattr(bench, "select_fn", select_fn)


def test_identical_selections_have_no_differing_rows(monkeypatch):
    cfg = bench.smoke_config()
    q, k, _, _ = bench.make_inputs(jax.random.key(0), cfg, 256)
    _with_fused(monkeypatch, lambda s: s)
    got = bench.selection_disagreement(cfg, q, k)
    assert got["rows_differing"] == 0 and got["max_gap"] == 0.0 and got["rows"] == q.shape[0] * 256 * k.shape[2]


def test_a_reordered_row_differs_with_no_score_gap_and_a_wrong_block_shows_its_gap(monkeypatch):
    cfg = bench.smoke_config()
    q, k, _, _ = bench.make_inputs(jax.random.key(1), cfg, 256)
    selected = bench.select_fn(cfg, "xla")(q, k)
    assert selected.shape[-1] >= 2
    # Row (0, 255, 0): the same blocks in reverse order. Row (1, 200, 0): its best block replaced by its worst.
    row_scores = np.asarray(block_scores(q, k, cfg.block_size))[1, 200, 0]
    best, worst = np.asarray(selected)[1, 200, 0, [0, -1]]
    _with_fused(monkeypatch, lambda s: s.at[0, 255, 0].set(s[0, 255, 0][::-1]).at[1, 200, 0, 0].set(s[1, 200, 0, -1]))
    got = bench.selection_disagreement(cfg, q, k)
    assert got["rows_differing"] == 2 and got["gap_rows"] == 2
    np.testing.assert_allclose(got["max_gap"], row_scores[best] - row_scores[worst], rtol=1e-5)
    assert got["max_gap"] > 0 and 0 < got["max_relative_gap"] < 1
