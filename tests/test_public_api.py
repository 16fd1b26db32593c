"""The package's public API: every name in __all__ resolves; model-only use does not load the trainer's stack."""

import subprocess
import sys


def test_all_public_names_resolve():
    import hybrid_jax

    for name in hybrid_jax.__all__:
        assert getattr(hybrid_jax, name) is not None, name


def test_model_import_does_not_load_training_stack():
    code = (
        "import sys, hybrid_jax; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('orbax', 'tensorflow_datasets', 'grain', 'ml_collections')]; print(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
