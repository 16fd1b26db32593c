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


def test_a_decode_kernel_choice_applies_only_to_the_ops_that_have_it(monkeypatch):
    eff = _run_module()
    args = eff.parse_args(["--smoke", "--size=tiny", "--models=samba"])
    default = eff.preset("samba", "tiny").kernels
    cfg, _, _ = eff.build("samba", args, "pallas_gpu")  # both decode ops have a pallas_gpu kernel
    assert (cfg.kernels.selective_state_update, cfg.kernels.decode_attention) == ("pallas_gpu", "pallas_gpu")
    cfg, _, _ = eff.build("samba", args, "xla")
    assert (cfg.kernels.selective_state_update, cfg.kernels.decode_attention) == ("xla", "xla")
    # An op without the chosen implementation keeps its default.
    monkeypatch.setitem(eff.DECODE_OPS, "decode_attention", ("reference", "xla"))
    cfg, _, _ = eff.build("samba", args, "pallas_gpu")
    assert cfg.kernels.selective_state_update == "pallas_gpu"
    assert cfg.kernels.decode_attention == default.decode_attention


def test_an_unknown_decode_kernel_is_refused_by_name(capsys):
    eff = _run_module()
    with pytest.raises(SystemExit):
        eff.parse_args(["--decode-kernels=xla,triton"])
    assert "--decode-kernels: unknown ['triton']" in capsys.readouterr().err


def test_the_gqa_baseline_is_the_transformer_preset_with_8_query_heads_per_kv_head():
    eff = _run_module()
    mha = eff.model_config("transformer", "1.3b", "bfloat16")
    gqa = eff.model_config("transformer_gqa", "1.3b", "bfloat16")
    assert (mha.attention.num_heads, mha.attention.num_kv_heads) == (16, None)
    assert (gqa.attention.num_heads, gqa.attention.num_kv_heads) == (16, 2)
    # Everything else is the preset's: the same model but for the KV heads.
    assert gqa.replace(attention=mha.attention) == mha
    tiny = eff.model_config("transformer_gqa", "tiny", "float32")
    assert tiny.attention.num_kv_heads == max(1, tiny.attention.num_heads // 8)


def test_speedups_divide_tokens_per_s_by_the_baselines_at_each_length():
    eff = _run_module()

    def cell(model, n, status="ok", tps=None, kernels="auto", kind="decode", batch=16):
        c = {"model": model, "kernels": kernels, "kind": kind, "batch": batch, "length": n, "status": status}
        return {**c, "tokens_per_s": tps} if status == "ok" else c

    cells = [
        cell("transformer_gqa", 1024, tps=100.0),
        cell("transformer_gqa", 65536, status="oom"),
        cell("transformer", 1024, tps=50.0),
        cell("samba", 1024, tps=373.0),
        cell("samba", 1024, tps=200.0, kernels="xla"),  # the faster kernel choice counts
        cell("samba", 65536, tps=360.0),
        cell("taipan", 1024, status="error"),  # a failed cell gives no ratio
        cell("samba", 1024, tps=1.0, kind="prefill", batch=1),  # another table
    ]
    assert eff.speedups(cells, "decode", 16, "transformer_gqa") == {
        "samba": {1024: pytest.approx(3.73), 65536: "baseline OOM"}
    }
    assert eff.speedups(cells, "decode", 16, "transformer") == {"samba": {1024: pytest.approx(7.46)}}
    assert eff.speedups(cells, "prefill", 1, "transformer") == {}
    text = "\n".join(eff.speedup_tables(cells))
    assert "### (b) decode, batch 16: tokens/s over Transformer++ GQA's" in text
    assert "| Samba | 3.73x | baseline OOM |" in text
    assert "| Samba | 7.46x |" in text
