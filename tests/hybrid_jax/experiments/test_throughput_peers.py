"""experiments/throughput peers.py and compare.py on the CPU: the peers' configs (ours -> Llama / mamba_ssm) by value,
the one-line exit without CUDA, the ratio table, and compare.py's job loop, JSON and plot with a fake job runner
(no torch, no GPU needed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
THROUGHPUT = os.path.join(ROOT, "experiments", "throughput")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"throughput_{name}", os.path.join(THROUGHPUT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load("peers")
compare = _load("compare")


def test_llama_config_is_the_transformer_130m_preset():
    cfg = peers.peer_config("transformer", "130m", 50280, 4096)
    assert cfg == {
        "vocab_size": 50280,
        "hidden_size": 768,
        "intermediate_size": 2048,  # 8/3 * 768 rounded up to a multiple of 128
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": False,
    }


def test_mamba_configs_are_the_released_130m_configs():
    m1 = peers.peer_config("mamba", "130m", 50280, 4096)
    m2 = peers.peer_config("mamba2", "130m", 50280, 4096)
    common = dict(d_model=768, d_intermediate=0, n_layer=24, vocab_size=50280, rms_norm=True, residual_in_fp32=True)
    common.update(fused_add_norm=True, tie_embeddings=True)
    assert {k: m1[k] for k in common} == common and {k: m2[k] for k in common} == common
    assert m1["ssm_cfg"] == dict(layer="Mamba1", d_state=16, d_conv=4, expand=2, conv_bias=True)
    assert m2["ssm_cfg"] == dict(
        layer="Mamba2",
        d_state=128,
        d_conv=4,
        expand=2,
        headdim=64,
        ngroups=1,
        chunk_size=256,
        conv_bias=True,
        rmsnorm=True,
        norm_before_gate=False,
    )
    # mamba_ssm pads the vocabulary: 50280 is a multiple of 8 (Mamba-1) but not of 16 (Mamba-2's released config).
    assert (m1["pad_vocab_size_multiple"], m2["pad_vocab_size_multiple"]) == (8, 16)
    assert peers.padded_vocab(50280, 8) == 50280 and peers.padded_vocab(50280, 16) == 50288
    assert peers.padded_vocab(50277, 8) == 50280


def test_peers_without_cuda_exits_with_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(THROUGHPUT, "peers.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peers.py: needs"), proc.stderr
    assert not out.exists()


def _ours(key, tps, mfu=0.2, error=None):
    row = {"model": compare.LABELS[key], "error": error} if error else None
    row = row or {
        "model": compare.LABELS[key],
        "params": 129e6,
        "remat": "none",
        "step_ms": 8 * 4096 / tps * 1e3,
        "tokens_per_sec": tps,
        "mfu_measured_peak": mfu,
        "mfu_spec_peak": mfu * 689 / 989,
    }
    return {"device": "NVIDIA H100 80GB HBM3", "rows": [row]}


def _peer(key, tps=None, skipped=None):
    row = {"model": compare.LABELS[key], "key": key, "peer": peers.PEERS[key][1]}
    if skipped:
        row["skipped"] = skipped
    else:
        row.update(params=129e6, step_ms=8 * 4096 / tps * 1e3, tokens_per_sec=tps, mfu_measured_peak=None)
    return {"device": "NVIDIA H100 80GB HBM3", "rows": [row]}


def test_comparison_ratios_mfu_and_reasons():
    ours = {
        "mamba2": _ours("mamba2", 200e3, 0.2),
        "mamba": _ours("mamba", 0, error="OOM"),
        "samba": _ours("samba", 3e5),
    }
    peers_ = {"mamba2": _peer("mamba2", 100e3), "mamba": _peer("mamba", 150e3), "transformer": _peer("transformer", 1)}
    peers_["transformer"] = _peer("transformer", skipped="transformers import failed")
    jobs = {"ours:transformer": {"status": "not run"}}
    rows = compare.comparison(["mamba2", "mamba", "transformer", "samba"], ours, peers_, jobs)
    by = {r["key"]: r for r in rows}
    assert by["mamba2"]["ratio"] == pytest.approx(2.0)
    assert by["mamba2"]["peer_mfu"] == pytest.approx(0.1)  # same FLOPs per token: half the tokens/s, half the MFU
    assert "ratio" not in by["mamba"] and by["mamba"]["ours_error"] == "OOM" and by["mamba"]["peer_tokens_per_sec"]
    assert by["transformer"]["ours_error"] == "not run (budget)"
    assert by["transformer"]["peer_error"] == "transformers import failed"
    assert "peer" not in by["samba"] and "peer_error" not in by["samba"] and by["samba"]["ours_tokens_per_sec"] == 3e5
    table = compare.markdown(rows)
    assert "| Mamba-2 | 129M | 200.0K |" in table and "| 2.00x | 20.0% | 10.0% |" in table
    assert "- Mamba, ours: OOM" in table and "- Transformer++, peer: transformers import failed" in table


def test_compare_main_with_a_fake_runner(tmp_path):
    calls = []

    def runner(cmd, timeout_s, log_path):
        script = os.path.basename(cmd[1])
        key = cmd[cmd.index("--models") + 1]
        out = cmd[cmd.index("--out") + 1]
        calls.append((script, key, timeout_s))
        record = _ours(key, 200e3) if script == "run.py" else _peer(key, 100e3)
        with open(out, "w") as f:
            json.dump(record, f)
        open(log_path, "w").close()
        return {"rc": 0, "seconds": 1.0, "timed_out": False}

    out_dir = tmp_path / "cmp"
    args = ["--models", "mamba2,samba", "--out_dir", str(out_dir), "--job_timeout_s", "100"]
    assert compare.main(args + ["--peer_args=--compile"], runner=runner) == 0
    assert [c[:2] for c in calls] == [("run.py", "mamba2"), ("peers.py", "mamba2"), ("run.py", "samba")]
    assert all(c[2] <= 100 for c in calls)
    record = json.loads((out_dir / "compare.json").read_text())
    assert [r["key"] for r in record["rows"]] == ["mamba2", "samba"]
    assert record["rows"][0]["ratio"] == pytest.approx(2.0) and record["device"] == "NVIDIA H100 80GB HBM3"
    assert set(record["jobs"]) == {"ours:mamba2", "peer:mamba2", "ours:samba"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out_dir / "compare.png").stat().st_size > 1000
    # Out of budget: nothing runs, every job is recorded as not run, the call fails.
    calls.clear()
    assert compare.main(args + ["--budget_s", "10"], runner=runner) == 1
    assert calls == []
    record = json.loads((out_dir / "compare.json").read_text())
    assert all(j["status"] == "not run" for j in record["jobs"].values())
    assert record["rows"][0]["ours_error"] == "not run (budget)"


def test_compare_job_commands():
    class Args:
        seq_len, batch, steps, warmup, vocab = 4096, 8, 10, 3, 50280
        peers_build, run_args, peer_args = ".work/peers_build", "--loss_chunk 1024", ""

    ours = compare.job_command("ours", "mamba", Args, "/o.json")
    peer = compare.job_command("peer", "mamba", Args, "/p.json")
    assert ours[1].endswith("run.py") and ours[-2:] == ["--loss_chunk", "1024"]
    assert ours[ours.index("--batch") + 1] == "8" and ours[ours.index("--seq_len") + 1] == "4096"
    assert peer[1].endswith("peers.py") and peer[peer.index("--peers_build") + 1] == ".work/peers_build"
    assert peer[peer.index("--vocab") + 1] == "50280"
    assert compare.plan(["samba", "transformer"]) == [
        ("ours", "samba"),
        ("ours", "transformer"),
        ("peer", "transformer"),
    ]
