"""experiments/efficiency/run.py --smoke: tiny models on CPU; results JSON, tables and plots are written."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow  # ~30 s on 2 CPU cores (a subprocess compiling 7 programs)
def test_smoke_run_writes_results(tmp_path):
    out = tmp_path / "eff"
    cmd = [sys.executable, "experiments/efficiency/run.py", "--smoke", f"--out={out}", "--models=samba", "--repeats=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {c["kind"] for c in cells.values()} == {"prefill", "decode"}
    assert all(c["status"] == "ok" for c in cells.values()), [c.get("note") for c in cells.values()]
    decode = [c for c in cells.values() if c["kind"] == "decode"]
    assert all(c["ms_per_step"] > 0 and c["floor_ms_per_step"] > 0 and c["cache_bytes"] > 0 for c in decode)
    assert "(b) decode, batch 2: ms per step" in proc.stdout
    assert (out / "results.md").exists() and (out / "prefill.png").exists()


def _run_module():
    spec = importlib.util.spec_from_file_location("efficiency_run", os.path.join(REPO, "experiments/efficiency/run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_decode_kernel_choice_applies_only_to_the_ops_that_have_it():
    # pallas_gpu is the state update's kernel; decode attention has none, so a hybrid keeps its default there.
    eff = _run_module()
    args = eff.parse_args(["--smoke", "--size=tiny", "--models=samba"])
    default = eff.preset("samba", "tiny").kernels
    cfg, _, _ = eff.build("samba", args, "pallas_gpu")
    assert cfg.kernels.selective_state_update == "pallas_gpu"
    assert cfg.kernels.decode_attention == default.decode_attention
    cfg, _, _ = eff.build("samba", args, "xla")
    assert (cfg.kernels.selective_state_update, cfg.kernels.decode_attention) == ("xla", "xla")


def test_an_unknown_decode_kernel_is_refused_by_name(capsys):
    eff = _run_module()
    with pytest.raises(SystemExit):
        eff.parse_args(["--decode-kernels=xla,triton"])
    assert "--decode-kernels: unknown ['triton']" in capsys.readouterr().err
