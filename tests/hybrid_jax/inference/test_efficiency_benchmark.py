"""experiments/efficiency/run.py --smoke: tiny models on CPU; results JSON, tables and plots are written."""

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
