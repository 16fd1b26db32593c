"""The LM experiments (length extrapolation, full-attention placement, KV heads, Taipan capacity, passkey): their
--size=tiny runs, the paper recipes' values and no-decay groups, the held-out split of the byte-level corpus, equal
parameter counts of the model family, starting a run from another run's checkpoint, and one-line errors."""

import hashlib
import importlib.util
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.experiments import lm
from hybrid_jax.model import LanguageModel
from hybrid_jax.training import Trainer, preset_config
from hybrid_jax.training import config as config_lib
from hybrid_jax.training.optimizer import decay_mask
from hybrid_jax.training.recipes import RECIPES, apply_recipe, get_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
    """One prepared copy of the standard-library corpus for every run in this module (the runs read the default
    data directory, ``$HYBRID_JAX_DATA_DIR``)."""
    path = str(tmp_path_factory.mktemp("lm_data"))
    previous = os.environ.get("HYBRID_JAX_DATA_DIR")
    os.environ["HYBRID_JAX_DATA_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("HYBRID_JAX_DATA_DIR", None)
    else:
        os.environ["HYBRID_JAX_DATA_DIR"] = previous


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _experiment(name):
    return _load(os.path.join(ROOT, "experiments", name, "run.py"), f"exp_{name}")


def _run(name, tmp_path):
    module = _experiment(name)
    out = tmp_path / "out"
    argv = ["--size=tiny", f"--out={out}", f"--workdir={tmp_path / 'work'}", "--no-progress"]
    return module, module.main(module.EXPERIMENT, argv), out


def _done(results):
    assert all(j["status"] == "done" for j in results["jobs"].values()), results["jobs"]
    return results["jobs"]


# ------------------------------------------------------------------------------------------------------ recipes


def test_recipes_hold_the_papers_values():
    taipan, samba, mamba = get_recipe("taipan"), get_recipe("samba"), get_recipe("mamba")
    # Taipan section 4: AdamW, peak 5e-4, 2000 warm-up steps (of its 24,000-step ablation runs), cosine to 1e-5,
    # weight decay 0.01, clip 1.0.
    assert (taipan.learning_rate, taipan.weight_decay, taipan.grad_clip_norm) == (5e-4, 0.01, 1.0)
    assert taipan.floor(5e-4) == 1e-5 and taipan.warmup_steps(24_000) == 2000
    # Samba pretrain.py: AdamW (0.9, 0.95), wd 0.1, peak 4e-4, warm-up 1% of the tokens, cosine to peak / 10, clip 1.
    assert (samba.learning_rate, samba.b1, samba.b2, samba.weight_decay, samba.grad_clip_norm) == (
        4e-4,
        0.9,
        0.95,
        0.1,
        1.0,
    )
    assert samba.floor(4e-4) == pytest.approx(4e-5) and samba.warmup_steps(10_000) == 100
    # Mamba App. E.2: AdamW (0.9, 0.95), wd 0.1, clip 1.0, cosine to 1e-5; peak per size (5x GPT-3's).
    assert mamba.learning_rate is None
    assert (mamba.b1, mamba.b2, mamba.weight_decay, mamba.grad_clip_norm, mamba.floor(3e-3)) == (
        0.9,
        0.95,
        0.1,
        1.0,
        1e-5,
    )
    assert set(RECIPES) == {"mamba", "samba", "taipan"}
    with pytest.raises(ValueError, match=r"recipe 'adam' is not one of \['mamba', 'samba', 'taipan'\]"):
        get_recipe("adam")


def _param_names(name):
    cfg = config_lib.model_config(preset_config(name, "tiny"), vocab_size=256)
    shapes = jax.eval_shape(
        lambda k: LanguageModel(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0)
    )
    return nn.unbox(shapes)


def _not_decayed(params, recipe):
    mask = decay_mask(params, RECIPES[recipe].no_decay)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {jax.tree_util.keystr(k) for k, decayed in flat if not decayed}, len(flat)


@pytest.mark.parametrize("model", ["samba", "taipan"])
def test_no_decay_groups_follow_the_official_code(model):
    params = _param_names(model)
    # Samba's pretrain.py decays every parameter (one group over model.parameters()).
    skipped, total = _not_decayed(params, "samba")
    assert skipped == set() and total > 0
    # Mamba / Taipan (mamba_ssm): SSM dynamics, norm scales and biases are not decayed, the weight matrices are.
    for recipe in ("mamba", "taipan"):
        skipped, _ = _not_decayed(params, recipe)
        names = {k.rsplit("['", 1)[1].rstrip("']") for k in skipped}
        assert names <= {"A_log", "D", "dt_bias", "scale", "bias"}
        assert {"A_log", "D", "dt_bias", "scale"} <= names
        assert not any("kernel" in k or "embedding" in k for k in skipped)
        # Every SSM layer's A_log: one scanned Mamba leaf in tiny Samba, two Mamba-2 layers in tiny Taipan's period.
        assert len([k for k in skipped if "A_log" in k]) == (1 if model == "samba" else 2)


def test_config_files_apply_the_recipes():
    taipan = _load(os.path.join(ROOT, "configs", "taipan.py"), "cfg_taipan")
    samba = _load(os.path.join(ROOT, "configs", "samba.py"), "cfg_samba")
    t = taipan.get_config("size=130m").optim
    assert (t.learning_rate, t.weight_decay, t.min_learning_rate, t.warmup_steps) == (5e-4, 0.01, 1e-5, 1667)
    assert tuple(t.no_decay) == RECIPES["taipan"].no_decay
    s = samba.get_config("size=130m").optim
    assert (s.learning_rate, s.weight_decay, s.warmup_steps, tuple(s.no_decay)) == (4e-4, 0.1, 200, ())
    assert s.min_learning_rate == pytest.approx(4e-5)
    # tiny keeps the size's learning rate (the papers' peaks are for 100M+ models) with the recipe's shape.
    tiny = samba.get_config("size=tiny").optim
    assert tiny.learning_rate == preset_config("samba", "tiny").optim.learning_rate
    assert tiny.min_learning_rate == pytest.approx(tiny.learning_rate / 10) and tuple(tiny.no_decay) == ()
    config = preset_config("mamba", "tiny")
    config.train.steps = 400
    apply_recipe(config, "taipan", learning_rate=2e-3)
    assert (config.optim.learning_rate, config.optim.warmup_steps, config.optim.min_learning_rate) == (2e-3, 33, 1e-5)


# ------------------------------------------------------------------------------------------------------- data


def test_held_out_split_shares_no_file_with_training(data_dir):
    from hybrid_jax.data import TextFiles, make_eval_iterator, tfds_builders

    builder = tfds_builders.prepare_text(TextFiles().corpus, data_dir=data_dir)
    splits = {}
    for split in ("train", "validation"):
        src = builder.as_data_source(split=split)
        splits[split] = [(src[i]["path"], hashlib.sha1(src[i]["text"]).hexdigest(), len(src[i]["text"]))
                         for i in range(len(src))]  # fmt: skip
    train, val = splits["train"], splits["validation"]
    assert len(val) >= 10 and len(train) > 10 * len(val)
    assert not {p for p, _, _ in train} & {p for p, _, _ in val}  # no path in both
    assert not {h for _, h, _ in train} & {h for _, h, _ in val}  # no identical file under two names either
    # The evaluation rows of "stdlib" are the validation files, every byte once: BOS + bytes + EOS per file gives
    # len + 1 scored (input, target) pairs.
    scored = sum(float(b["mask"].sum()) for b in make_eval_iterator("stdlib", seq_len=4096, batch_size=8,
                                                                     data_dir=data_dir, num_threads=0))  # fmt: skip
    assert scored == sum(n + 1 for _, _, n in val)


# ----------------------------------------------------------------------------------------------------- models


def test_lm_family_has_equal_parameter_counts():
    counts = {}
    for name in (*lm.MODELS, "samba_fullfirst", "samba_fullmiddle", "samba_fulllast"):
        config = lm.lm_config(name, "full", seq_len=512, steps=10, batch_size=8, learning_rates=(1e-3,), seeds=(0,))
        counts[name] = lm.count_params(config)
    median = float(np.median(list(counts.values())))
    assert 10e6 <= min(counts.values()) and max(counts.values()) <= 30e6, counts
    assert all(abs(n / median - 1) < 0.10 for n in counts.values()), counts
    # Same model up to positional embeddings: the same count.
    assert counts["samba"] == counts["samba_nope"] and counts["taipan"] == counts["taipan_rope"]
    assert counts["transformer"] == counts["transformer_swa"]
    # Fewer KV heads, wider SwiGLUs: the count stays within 1% (the Samba Table 6 analogue holds it fixed).
    import dataclasses

    size = dataclasses.replace(lm.LM_SIZES["full"], heads=12)
    kv = {}
    for name in ("samba", "samba_kv4", "samba_kv2", "samba_kv1"):
        config = lm.lm_config(name, size, seq_len=512, steps=10, batch_size=8, learning_rates=(1e-3,), seeds=(0,))
        kv[name] = lm.count_params(config)
        assert (config.model.attention.num_kv_heads or 12) == (int(name[-1]) if "kv" in name else 12)
    assert all(abs(n / kv["samba"] - 1) < 0.01 for n in kv.values()), kv


def test_lm_model_names_build_what_they_say():
    c = lm.lm_config(
        "samba_fullmiddle", "full", seq_len=512, steps=10, batch_size=8, learning_rates=(1e-3,), seeds=(0,)
    )
    period = tuple(c.model.period)
    assert c.model.n_periods == 1 and period.count("attention") == 1 and period.count("mamba") == 3
    assert period.index("attention") == 8  # the Mamba layer of block 2 of 4
    nope = lm.lm_config("samba_nope", "tiny", seq_len=64, steps=10, batch_size=8, learning_rates=(1e-3,), seeds=(0,))
    assert nope.model.attention.rope is False and nope.model.attention.window == 32
    t = lm.lm_config("taipan_rope_c0.05", "full", seq_len=512, steps=10, batch_size=8, learning_rates=(1e-3,),
                     seeds=(0,))  # fmt: skip
    assert (t.model.sal.rope, t.model.sal.capacity, t.model.sal.window, t.model.period.count("mamba2")) == (
        True,
        0.05,
        256,
        6,
    )
    for bad, match in (
        ("gpt", r"model 'gpt' is not <base>"),
        ("mamba_rope", r"_rope is an option of taipan"),
        ("mamba_kv2", r"_q / _kv are options of models with attention"),
        ("transformer_fulllast", r"_full<position> is an option of samba"),
        ("taipan_c1.5", r"_c<C> is an option of taipan with 0 < C <= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            lm.parse_lm_model(bad)


# --------------------------------------------------------------------------------------------- train.init_from


def _tiny_run(tmp, *, rates, seeds, steps=2, init_from=None, member=0, model="transformer"):
    """A tiny LM trainer; empty ``rates`` and ``seeds`` give a single run (no member axis)."""
    config = lm.lm_config(
        model, "tiny", seq_len=32, steps=steps, batch_size=4, learning_rates=rates or (1e-3,), seeds=seeds,
        progress=False, source="stdlib?max_documents=2",
    )  # fmt: skip
    config.optim.learning_rates = tuple(rates)
    config.data.num_threads = 0
    config.train.init_from, config.train.init_member = init_from, member
    return Trainer(config, str(tmp))


def _initial_params(trainer):
    with trainer.context():
        return jax.device_get(trainer._params_from(trainer.config.train.init_from))


def test_init_from_starts_a_run_from_another_runs_checkpoint(tmp_path):
    source = _tiny_run(tmp_path / "a", rates=(1e-3, 3e-3), seeds=(0,))
    source.run()
    leaves = jax.tree.leaves(jax.device_get(source.final_state.params))
    assert not all(np.array_equal(x[0], x[1]) for x in leaves)  # the members differ, so picking one matters
    # A single run from member 1 of the population, and a population whose every member starts from member 0.
    single = _initial_params(_tiny_run(tmp_path / "b", rates=(), seeds=(), init_from=str(tmp_path / "a"), member=1))
    assert all(np.array_equal(x[1], y) for x, y in zip(leaves, jax.tree.leaves(single)))
    pop = _initial_params(_tiny_run(tmp_path / "c", rates=(1e-4, 1e-3), seeds=(7,), init_from=str(tmp_path / "a")))
    assert all(np.array_equal(y[i], x[0]) for x, y in zip(leaves, jax.tree.leaves(pop)) for i in range(2))
    # Through the run's own start: the initial state holds those parameters (and a run with its own checkpoints
    # would resume from those instead, as before).
    from hybrid_jax.training.checkpoint import Checkpointer

    trainer = _tiny_run(tmp_path / "d", rates=(), seeds=(), init_from=str(tmp_path / "a" / "checkpoints"))
    with trainer.context():
        trainer.checkpointer = Checkpointer(os.path.join(trainer.workdir, "checkpoints"))
        state, start = trainer._restore_or_init()
        trainer.checkpointer.close()
    assert start == 0 and all(np.array_equal(x[0], y) for x, y in zip(leaves, jax.tree.leaves(state.params)))
    with pytest.raises(ValueError, match=r"train.init_member=5 but train.init_from=.* has 2 members"):
        _initial_params(_tiny_run(tmp_path / "e", rates=(), seeds=(), init_from=str(tmp_path / "a"), member=5))
    with pytest.raises(ValueError, match=r"has other parameters than this model"):
        _initial_params(_tiny_run(tmp_path / "f", rates=(), seeds=(), init_from=str(tmp_path / "a"), model="mamba"))
    from hybrid_jax.training import CheckpointError

    with pytest.raises(CheckpointError, match=r"train.init_from=.*: no such directory"):
        _initial_params(_tiny_run(tmp_path / "g", rates=(), seeds=(), init_from=str(tmp_path / "missing")))


# ----------------------------------------------------------------------------------------------- tiny runs


def _check_bpb_rows(results, lengths):
    jobs = _done(results)
    for key, job in jobs.items():
        rows = [r for r in results["rows"] if r["job"] == key]
        assert sorted({r["length"] for r in rows}) == sorted(lengths), key
        assert len(rows) == len(job["members"]) * len(lengths)
        for r in rows:
            # Bytes: 8 bits is a uniform guess; a few training steps are already below it.
            assert 0.5 < r["bits_per_byte"] < 8.0 and math.isfinite(r["loss"]), r
            assert r["num_params"] == job["num_params"] > 0 and r["wall_s"] > 0
    return jobs


@pytest.mark.parametrize("name", ["length_extrapolation", "full_attention_placement", "kv_heads"])
def test_length_experiments_tiny(name, tmp_path):
    module, results, out = _run(name, tmp_path)
    s = module.SIZES["tiny"]
    jobs = _check_bpb_rows(results, s["lengths"])
    assert sorted(j["tags"]["model"] for j in jobs.values()) == sorted(s["models"])
    for file in ("tiny.json", "tiny.md", "tiny_bpb_vs_length.png"):
        assert (out / file).stat().st_size > 0
    report = (out / "tiny.md").read_text()
    assert all(m in report for m in s["models"]) and "OOM" not in report
    if name == "length_extrapolation":
        beyond = next(j["extra"]["beyond_train"] for j in jobs.values() if j.get("extra"))
        shares = [beyond[str(n)] for n in s["lengths"]]
        assert shares[0] == 0.0 and all(a < b for a, b in zip(shares, shares[1:])) and shares[-1] > 0.5


def test_taipan_capacity_tiny(tmp_path):
    module, results, out = _run("taipan_capacity", tmp_path)
    jobs = _done(results)
    assert sorted(j["tags"]["task"] for j in jobs.values()) == ["lm", "mqar"]
    for job in jobs.values():
        extra = job["extra"]
        assert extra["step_s"] > 0 and extra["rate_curve"]
        rates = np.asarray(extra["eval_rate"])  # (members, SALs)
        assert rates.shape == (len(job["members"]), 1) and np.all((0 <= rates) & (rates <= 1))
    lm_rows = [r for r in results["rows"] if r["task"] == "lm"]
    assert lm_rows and all(0.5 < r["bits_per_byte"] < 8 for r in lm_rows)
    mq = [r for r in results["rows"] if r["task"] == "mqar"]
    assert sorted(r["K"] for r in mq) == [2, 4] and all(0 <= r["accuracy"] <= 1 for r in mq)
    for file in (
        "tiny.md",
        "tiny_lm_bpb.png",
        "tiny_mqar_accuracy.png",
        "tiny_selection_rate.png",
        "tiny_step_time.png",
    ):
        assert (out / file).stat().st_size > 0


def test_passkey_tiny_fine_tunes_from_the_pretrained_checkpoint(tmp_path):
    module, results, out = _run("passkey", tmp_path)
    jobs = _done(results)
    s = module.SIZES["tiny"]
    assert sorted(j["tags"]["stage"] for j in jobs.values()) == ["fine-tuned", "pretrained"]
    window = s["size"].window
    passkey = [r for r in results["rows"] if "windows" in r]
    assert sorted({r["length"] for r in passkey}) == [k * window for k in s["test_windows"]]
    assert all(0 <= r["exact_match"] <= 1 and 0 <= r["accuracy"] <= 1 for r in passkey)
    assert len(passkey) == 2 * len(s["test_windows"])  # before and after, one member each
    # The fine-tune started from the pretrained parameters: its job kept its directory for that.
    finetune = next(j for j in jobs.values() if j["tags"]["stage"] == "fine-tuned")
    assert os.path.isdir(os.path.join(finetune["config"]["train"]["init_from"], "checkpoints"))
    assert (out / "tiny_passkey.png").stat().st_size > 0


EXPERIMENTS = ("length_extrapolation", "full_attention_placement", "kv_heads", "taipan_capacity", "passkey")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_unknown_model_gives_one_line_and_exit_2(name, tmp_path, capsys):
    module = _experiment(name)
    with pytest.raises(SystemExit) as e:
        module.main(module.EXPERIMENT, [f"--out={tmp_path}", f"--workdir={tmp_path}", "--models=gpt"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"experiments/{name}/run.py: error: --models: unknown model(s) ['gpt']" in err[-1]


def test_run_py_from_the_shell_fails_in_one_line(tmp_path):
    script = os.path.join(ROOT, "experiments", "length_extrapolation", "run.py")
    proc = subprocess.run(
        [sys.executable, script, "--models=samba,gpt", f"--out={tmp_path}"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and not proc.stdout
    err = proc.stderr.strip().splitlines()
    assert "error: --models: unknown model(s) ['gpt']" in err[-1] and "Traceback" not in proc.stderr
