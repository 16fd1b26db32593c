"""Run configs: every configs/*.py file builds a complete, valid config; knobs parse; bad fields fail in one line."""

import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from hybrid_jax.model import PRESETS, KernelConfig, ModelConfig, preset
from hybrid_jax.training import config as config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs")
CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not os.path.basename(f).startswith("_"))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_is_a_config_file_per_preset():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    assert set(PRESETS) <= names
    assert "mqar" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_config_file_gives_all_sections_and_every_model_field(path):
    config = load(path).get_config("size=tiny")
    assert set(config.keys()) == set(config_lib.SECTIONS)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"kernels"}
    assert set(config.model.keys()) == model_fields
    for section in ("mamba", "mamba2", "attention", "sal"):
        cls = type(getattr(preset("taipan"), section))
        assert set(config.model[section].keys()) == {f.name for f in dataclasses.fields(cls)}, section
    assert set(config.kernels.keys()) == {f.name for f in dataclasses.fields(KernelConfig)}
    for name in ("train.steps", "train.seed", "train.checkpoint_every", "train.log_every", "train.eval_every",
                 "data.seq_len", "data.batch_size"):  # fmt: skip
        section, field = name.split(".")
        assert field in config[section], name
    config_lib.validate(config)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", ["tiny", "130m"])
def test_config_rebuilds_the_preset_exactly(name, size):
    config = config_lib.preset_config(name, size)
    built = config_lib.model_config(config, vocab_size=512)
    t = config_lib._TRAIN_DEFAULTS[size]
    assert built == preset(name, size, vocab_size=512, dtype=t["dtype"], remat_policy=t["remat"])


def test_config_file_knobs_reach_the_model():
    taipan = load(os.path.join(CONFIG_DIR, "taipan.py")).get_config("size=small,capacity=0.25,window=64")
    built = config_lib.model_config(taipan, vocab_size=256)
    assert (built.d_model, built.sal.capacity, built.sal.window) == (256, 0.25, 64)
    with pytest.raises(ValueError, match=r"config argument 'capcity' is not one of"):
        load(os.path.join(CONFIG_DIR, "taipan.py")).get_config("capcity=0.2")


def test_parse_arg_converts_to_the_default_types():
    args = config_lib.parse_arg("size=130m,steps=10,lr=0.5,flag=false,any=3", size="tiny", steps=1, lr=1.0,
                                flag=True, any=None)  # fmt: skip
    assert (args.size, args.steps, args.lr, args.flag, args.any) == ("130m", 10, 0.5, False, 3)
    with pytest.raises(ValueError, match=r"config argument steps='x' must be a int"):
        config_lib.parse_arg("steps=x", steps=1)
    with pytest.raises(ValueError, match=r"config argument 'size' must be key=value"):
        config_lib.parse_arg("size", size="tiny")


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("train.steps", -5, r"config: train.steps=-5 must be an integer >= 1"),
        ("train.log_every", 0, r"config: train.log_every=0 must be an integer >= 1"),
        ("data.batch_size", 0, r"config: data.batch_size=0 must be an integer >= 1"),
        ("optim.learning_rate", 0.0, r"config: optim.learning_rate=0.0 must be a number > 0.0"),
        ("optim.b2", 1.5, r"config: optim.b2=1.5 must be < 1"),
        ("train.grad_accum_steps", 3, r"data.batch_size=8 must be divisible by train.grad_accum_steps=3"),
        ("model.d_model", -1, r"ModelConfig: d_model=-1 must be an integer >= 1"),
        ("model.remat_policy", "most", r"remat_policy='most' must be one of"),
        ("kernels.ssd", "cuda", r"kernels.ssd='cuda' is not one of"),
        ("mesh.rules", (("embed", "model"),), r"names mesh axes \['model'\]"),
    ],
)
def test_validate_names_the_bad_field(path, value, match):
    config = config_lib.preset_config("taipan", "tiny")
    section, field = path.split(".")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ValueError, match=match) as info:
        config_lib.validate(config)
    assert "\n" not in str(info.value)


def test_model_config_rejects_unknown_fields():
    config = config_lib.preset_config("mamba", "tiny")
    with config.unlocked():
        config.model.mamba.d_stat = 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) model.mamba.\['d_stat'\]"):
        config_lib.model_config(config, vocab_size=256)


def test_set_kernels_applies_items_in_order_and_names_bad_ones():
    config = config_lib.preset_config("mamba2", "tiny")
    config_lib.set_kernels(config, "xla, ssd=pallas_gpu,")
    want = {op: "xla" for op in dataclasses.asdict(KernelConfig())} | {"ssd": "pallas_gpu"}
    assert dict(config.kernels) == want
    assert dict(config_lib.set_kernels(config, "").kernels) == want  # nothing to set
    config_lib.set_kernels(config, "ssd=reference,auto")  # a later item overrides an earlier one
    assert set(config.kernels.values()) == {"auto"}
    with pytest.raises(ValueError, match=r"kernels 'sdd=xla': unknown op 'sdd' \(known: causal_conv1d, "):
        config_lib.set_kernels(config, "sdd=xla")
    with pytest.raises(ValueError, match=r"kernels 'ssd=cuda': 'cuda' is not one of \('auto', "):
        config_lib.set_kernels(config, "ssd=cuda")
    with pytest.raises(ValueError, match=r"kernels 'fast': 'fast' is not one of"):
        config_lib.set_kernels(config, "fast")
    assert set(config.kernels.values()) == {"auto"}  # a bad item alone changes nothing


def test_padded_vocab():
    assert [config_lib.padded_vocab(v, 128) for v in (1, 128, 129, 259)] == [128, 128, 256, 384]


def test_trainer_rejects_a_kernel_this_platform_cannot_run(tmp_path):
    import jax

    from hybrid_jax.training import Trainer

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU refusal of GPU kernels")
    config = config_lib.preset_config("taipan", "tiny")
    config.kernels.ssd = "pallas_gpu"
    with pytest.raises(ValueError, match=r"config: kernels.ssd: ssd: implementation='pallas_gpu' needs a GPU"):
        Trainer(config, str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing was created


def test_the_run_config_model_section_is_derived_from_the_dataclasses():
    """Every dataclass field appears in the ``model`` / ``kernels`` sections with its preset value (None fields as
    typed placeholders), and the sections round-trip to the same ModelConfig."""
    import dataclasses

    from hybrid_jax.model import preset
    from hybrid_jax.training.config import kernels_section, model_config, model_section

    cfg = preset("taipan", "tiny", vocab_size=64)
    m, k = model_section(cfg), kernels_section(cfg.kernels)

    def check(section, obj, where):
        for f in dataclasses.fields(obj):
            if where == "model" and f.name == "kernels":
                assert "kernels" not in section
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                check(section[f.name], value, f"{where}.{f.name}")
            elif where == "model" and f.name == "vocab_size":
                assert section.vocab_size is None
            elif value is None:
                ref = section.get_ref(f.name)
                assert ref.get() is None and ref.get_type() in (int, float), f"{where}.{f.name}"
            elif f.name == "period":
                assert section.period == tuple(b.value for b in value)
            else:
                assert section[f.name] == value, f"{where}.{f.name}"

    check(m, cfg, "model")
    check(k, cfg.kernels, "kernels")
    assert model_config({"model": m, "kernels": k}, vocab_size=64) == cfg
    m.sal.capacity_factor = 2.0  # a typed placeholder takes a value of its type
    assert model_config({"model": m, "kernels": k}, vocab_size=64).sal.capacity_factor == 2.0


def test_configs_import_from_the_installed_package_outside_a_checkout(tmp_path):
    """Notebooks and scripts outside the repository get the same configs through ``import configs``."""
    code = (
        "import configs, os; c = configs.get('taipan', 'size=tiny,capacity=0.3'); "
        "print(c.model.sal.capacity, os.path.basename(os.path.dirname(configs.__file__)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0.3", "configs"]
    names = {os.path.basename(f)[:-3] for f in CONFIG_FILES}
    import configs

    assert set(configs.NAMES) == names
    with pytest.raises(ValueError, match="configs.get: name='nope' is not one of"):
        configs.get("nope")
