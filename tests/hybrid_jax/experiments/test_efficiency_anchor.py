"""experiments/efficiency: issue 17's same-run anchor (mamba_ssm_decode.py and run.py --anchor_build) on the CPU.

The anchor's config (our mamba2 preset -> mamba_ssm's MambaConfig) by value, its one-line exits (no build, no CUDA),
run.py's merge of a fake anchor run into results.json with the ratio table, failures recorded, and the timing
arithmetic of a cell on a fake model (torch CPU, when importable). Nothing here needs a GPU or mamba_ssm.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EFFICIENCY = os.path.join(ROOT, "experiments", "efficiency")
SCRIPT = os.path.join(EFFICIENCY, "mamba_ssm_decode.py")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


anchor = _load("efficiency_mamba_ssm_decode", SCRIPT)
run = _load("efficiency_run", os.path.join(EFFICIENCY, "run.py"))


def test_anchor_config_is_the_mamba2_1_3b_preset():
    assert anchor.anchor_config("1.3b") == {
        "d_model": 2048,
        "d_intermediate": 0,
        "n_layer": 48,
        "vocab_size": 50280,  # padded by mamba_ssm to a multiple of 16: 50288 rows
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
        "ssm_cfg": {
            "layer": "Mamba2",
            "d_state": 128,
            "d_conv": 4,
            "expand": 2,
            "headdim": 64,
            "ngroups": 1,
            "chunk_size": 256,
            "conv_bias": True,
            "rmsnorm": True,
            "norm_before_gate": False,
        },
    }


def _script(args, **env):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_missing_build_exits_with_one_line(tmp_path):
    out = tmp_path / "anchor.json"
    proc = _script(["--peers_build", str(tmp_path / "nope"), "--out", str(out)])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba_ssm_decode.py: no build_peers.sh build at"), proc.stderr
    assert "env.sh is missing" in lines[0] and "build_peers.sh .work/peers_src" in lines[0]
    assert not out.exists()


def test_without_cuda_exits_with_one_line(tmp_path):
    (tmp_path / "env.sh").write_text("export PYTHONPATH=\n")
    out = tmp_path / "anchor.json"
    proc = _script(["--peers_build", str(tmp_path), "--out", str(out)])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba_ssm_decode.py: needs"), proc.stderr
    assert not out.exists()


def test_bad_arguments_fail_early():
    with pytest.raises(SystemExit):
        anchor.parse_args(["--steps", "1"])  # the prefill-only call is subtracted: one step leaves nothing
    with pytest.raises(SystemExit):
        anchor.parse_args(["--batches", "16,0"])


def test_run_py_rejects_an_anchor_it_cannot_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--anchor_build", str(tmp_path / "nope")])
    assert "--anchor_build: no build_peers.sh build at" in capsys.readouterr().err
    (tmp_path / "env.sh").write_text("")
    with pytest.raises(SystemExit):
        run.parse_args(["--models=samba", "--anchor_build", str(tmp_path)])
    assert "needs mamba2 in --models" in capsys.readouterr().err
    assert run.parse_args(["--anchor-build", str(tmp_path)]).anchor_build == str(tmp_path)
    assert run.parse_args([]).anchor_build == ""  # no anchor by default


def test_sources_and_version(tmp_path):
    (tmp_path / "sources.txt").write_text("mamba abc123\ncausal-conv1d unknown\n")
    assert anchor.build_sources(str(tmp_path)) == {"mamba": "abc123", "causal-conv1d": "unknown"}
    assert anchor.build_sources(str(tmp_path / "nope")) == {}
    src = tmp_path / "src"
    (src / "mamba" / "mamba_ssm").mkdir(parents=True)
    (src / "mamba" / "COMMIT").write_text("abc123\n")
    (src / "mamba" / "mamba_ssm" / "__init__.py").write_text('__version__ = "2.3.2.post1"\n')
    assert anchor.mamba_ssm_version("abc123", str(src)) == "2.3.2.post1"
    assert anchor.mamba_ssm_version("def456", str(src)) is None  # another commit's source tree: no version


def _results(tmp_path):
    meta = {"device": "NVIDIA H100 80GB HBM3", "size": "1.3b", "dtype": "bfloat16"}
    res = run.Results(str(tmp_path), fresh=True, meta={**meta, "copy_bandwidth_bytes_per_s": 3e12})
    base = {"model": "mamba2", "kernels": "auto", "kind": "decode", "status": "ok", "length": 4096}

    def cell(batch, ms, x_floor, **kw):  # a decode cell as run.py writes it
        sizes = dict(cache_bytes=2**30, program_bytes=2**32, tokens_per_s=batch * 1e3 / ms)
        return {**base, "batch": batch, "ms_per_step": ms, "x_floor": x_floor, "floor_ms_per_step": ms / x_floor,
                **sizes, **kw}  # fmt: skip

    res.put("a", cell(16, 4.0, 1.9))
    res.put("b", cell(1, 2.0, 2.5))
    res.put("c", cell(16, 3.0, 1.5, model="samba"))
    return res


def _args(tmp_path, **kw):
    args = run.parse_args([f"--out={tmp_path}", "--models=mamba2", "--batches=16,1", "--decode-contexts=4096"])
    args.anchor_build, args.decode_steps, args.repeats = "/build", 64, 3
    return types.SimpleNamespace(**{**vars(args), **kw})


def test_anchor_rows_are_merged_with_ratios(tmp_path):
    res = _results(tmp_path)
    calls = []

    def runner(cmd, timeout_s, log_path):  # what mamba_ssm_decode.py writes: b16 measured, b1 out of memory
        calls.append(cmd)
        common = {"impl": "mamba_ssm_cg", "model": "mamba2", "context": 4096, "steps": 64}
        rows = [
            {**common, "batch": 16, "status": "ok", "ms_per_step": 5.0, "ms_per_step_graph": 4.5},
            {**common, "batch": 1, "status": "oom", "note": "OutOfMemoryError: CUDA out of memory"},
        ]
        rows[0].update(weight_bytes=2.7e9, state_bytes=1.6e9, state_dtype="bfloat16", tokens_per_s=3200.0)
        record = {"device": "NVIDIA H100 80GB HBM3", "mamba_ssm_commit": "abc123", "torch": "2.9", "rows": rows}
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump(record, f)
        return {"rc": 1, "timed_out": False, "tail": "wrote ..."}

    record = run.run_anchor(_args(tmp_path), res, runner=runner)
    cmd = calls[0]
    assert cmd[1] == anchor.__file__ or os.path.samefile(cmd[1], SCRIPT)
    flags = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd), 2)}
    assert flags == {
        "--peers_build": "/build",
        "--size": "1.3b",
        "--batches": "16,1",
        "--contexts": "4096",
        "--steps": "64",
        "--repeats": "3",
        "--out": str(tmp_path / "anchor_mamba_ssm.json"),
    }
    assert record["status"] == "partial" and record["reason"] == "b1 4096: OutOfMemoryError: CUDA out of memory"
    assert record["measured"]["mamba_ssm_commit"] == "abc123" and len(record["rows"]) == 2
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["anchor"]["rows"] == record["rows"] and set(on_disk["cells"]) == {"a", "b", "c"}

    rows = run.anchor_comparison(res.data)
    assert [(r["batch"], r["kernels"]) for r in rows] == [(16, "auto"), (1, "auto")]  # Samba is not compared
    b16, b1 = rows
    assert b16["ratio"] == pytest.approx(5.0 / 4.0)  # our tokens/s over mamba_ssm's: > 1, ours is faster
    assert b16["ratio_graph"] == pytest.approx(4.5 / 4.0)
    assert b16["anchor_floor_ms_per_step"] == pytest.approx(1e3 * (2.7e9 + 2 * 1.6e9) / 3e12)
    assert "ratio" not in b1 and b1["anchor_status"] == "oom" and b1["ours_ms_per_step"] == 2.0

    table = run.tables(res)
    assert "Mamba-2 decode against mamba_ssm's CUDA-graph decode (same run)" in table
    assert "| 16 | 4K | 4.000 (auto) | x1.90 | 5.000 | 4.500 | x2.54 | 1.25 | 1.12 |" in table
    assert "| 1 | 4K | 2.000 (auto) | x2.50 | OOM (OutOfMemoryError: CUDA out of memory) | - | - | - | - |" in table
    assert "mamba_ssm anchor partial: b1 4096" in table and "state in bfloat16" in table


def test_anchor_failure_is_recorded_and_the_sweep_kept(tmp_path):
    res = _results(tmp_path)
    line = "mamba_ssm_decode.py: mamba_ssm's fused path is incomplete (causal_conv1d_update missing); nothing measured"
    record = run.run_anchor(_args(tmp_path), res, runner=lambda *a: {"rc": 2, "timed_out": False, "tail": line})
    assert record["status"] == "failed" and record["reason"] == line and record["rows"] == []
    assert run.anchor_comparison(res.data) == []
    table = run.tables(res)
    assert f"mamba_ssm anchor failed: {line}" in table and "(b) decode, batch 16: ms per step" in table
    assert json.loads((tmp_path / "results.json").read_text())["anchor"]["reason"] == line

    def crash(*a):
        raise OSError("no such interpreter")

    record = run.run_anchor(_args(tmp_path), res, runner=crash)
    assert record["status"] == "failed" and record["reason"] == "OSError: no such interpreter"
    timeout = {"rc": -9, "timed_out": True, "tail": ""}
    record = run.run_anchor(_args(tmp_path, anchor_timeout_s=5.0), res, runner=lambda *a: timeout)
    assert record["reason"] == "timed out after 5 s"
    assert "anchor" in run.Results(str(tmp_path), fresh=False, meta={}).data  # kept on a rerun
    assert "anchor" not in run.Results(str(tmp_path), fresh=True, meta={}).data


def test_decode_cell_subtracts_the_prefill_and_times_the_graph(monkeypatch):
    torch = pytest.importorskip("torch")
    # A clock that only the fake model advances: the timings are exact, not at the mercy of a loaded machine's
    # sleeps (a 2 ms time.sleep measured 3.03 ms in a CI run).
    clock = [0.0]

    def sleep(seconds):
        clock[0] += seconds

    monkeypatch.setattr(anchor, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class FakeModel:  # mamba_ssm's generate: prefill 20 ms, then 4 ms per new token after the first
        def __init__(self):
            self.weight = torch.zeros(4)
            self.calls = []

        def parameters(self):
            return iter([self.weight])

        def generate(self, prompt, max_length, cg, top_k):
            self.calls.append((tuple(prompt.shape), max_length, cg, top_k))
            if self._decoding_cache is None:  # what update_graph_cache builds on a fresh cache
                states = {
                    0: (torch.zeros(2, 8, 4, dtype=torch.bfloat16), torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16))
                }
                self._decoding_cache = types.SimpleNamespace(
                    callables={(2, 1): lambda ids, pos, seqlen: sleep(0.002)},
                    inference_params=types.SimpleNamespace(key_value_memory_dict=states),
                )
            sleep(0.020 + 0.004 * (max_length - prompt.shape[1] - 1))

    model = FakeModel()
    row = anchor.decode_cell(model, batch=2, context=16, steps=6, repeats=2, vocab=100)
    assert model.calls[:2] == [((2, 16), 22, True, 1), ((2, 16), 17, True, 1)]  # warm-up: the long call first
    assert len(model.calls) == 2 + 2 * 2
    assert row["ms_per_step"] == pytest.approx(4.0, abs=1.0)
    assert row["tokens_per_s"] == pytest.approx(2 * 1e3 / row["ms_per_step"])
    assert row["ms_per_step_graph"] == pytest.approx(2.0, abs=1.0) and "graph_note" not in row
    assert row["state_bytes"] == 2 * (2 * 8 * 4 + 2 * 3 * 4 * 5) and row["state_dtype"] == "bfloat16"
    assert row["peak_memory_bytes"] is None  # on the CPU
