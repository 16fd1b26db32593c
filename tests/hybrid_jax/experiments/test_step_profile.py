"""experiments/throughput/step_profile.py on the CPU: source paths read from compiled-HLO text, the phase and model
part of designed paths, the per-step sums of a designed trace, and the paths of a real compiled training step."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
spec = importlib.util.spec_from_file_location(
    "throughput_step_profile", os.path.join(ROOT, "experiments", "throughput", "step_profile.py")
)
sp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sp)

FWD = "jit(train_step)/jvp(LanguageModel)/LanguageModel._run"
BWD = "jit(train_step)/transpose(jvp(LanguageModel))/LanguageModel._run"
LAYER = "while/body/closed_call/periods/mamba2_3/mixer"

TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'
HLO = "\n".join(
    [
        "ENTRY %main {",
        f'  %fusion.12 = f32[8] fusion(%p), kind=kLoop, metadata={{op_name="{FWD}/{LAYER}/in_proj/dot_general"}}',
        f"  ROOT %loop_multiply_fusion.48 = f32[8] fusion(%a), "
        f'metadata={{op_name="{BWD}/{LAYER}/jit(ssd_chunked)/mul"}}',
        f"  %custom-call.3 = f32[8] custom-call(%x), {TRITON}, "
        f'metadata={{op_name="{FWD}/{LAYER}/jit(ssd)/pallas_call"}}, '
        'backend_config={"name":"ssd_fwd","ir":""}',
        "  %add.1 = f32[8] add(%a, %b)",
        "}",
    ]
)


def test_hlo_sources_key_each_instruction_by_its_kernel_name():
    sources = sp.hlo_sources(HLO)
    assert sources == {
        "fusion_12": f"{FWD}/{LAYER}/in_proj/dot_general",
        "loop_multiply_fusion_48": f"{BWD}/{LAYER}/jit(ssd_chunked)/mul",
        "custom_call_3": f"{FWD}/{LAYER}/jit(ssd)/pallas_call",
        "ssd_fwd": f"{FWD}/{LAYER}/jit(ssd)/pallas_call",  # a Pallas kernel runs under its own name
    }


@pytest.mark.parametrize(
    "path,part,phase",
    [
        (f"{FWD}/{LAYER}/in_proj/dot_general", "projections", "forward"),
        (f"{BWD}/{LAYER}/jit(ssd_chunked)/checkpoint/rematted_computation/mul", "SSM scan / SSD", "recompute"),
        (f"{BWD}/{LAYER}/convNd/jit(causal_conv1d_xla)/add", "causal conv", "backward"),
        (f"{FWD}/{LAYER}/mixer._gate/norm/mul", "gate + norm", "forward"),
        (f"{FWD}/while/body/closed_call/periods/mamba2_3/mamba2_3._inputs/norm/rsqrt", "norms", "forward"),
        (f"{FWD}/{LAYER}/exp", sp.OTHER_LAYER_OPS, "forward"),
        # A SAL layer's own ops (its gate, Gumbel noise) belong to attention by the layer's kind.
        (f"{FWD}/while/body/closed_call/periods/sal_1/mixer/jit(_gumbel)/log", "attention", "forward"),
        (f"{BWD}/while/body/closed_call/periods/mlp_0/mixer/down_proj/dot_general", "MLP / MoE", "backward"),
        (f"{FWD}/embed/jit(_take)/gather", "embedding", "forward"),
        (f"{BWD}/norm_f/mul", "final norm", "backward"),
        (f"{FWD}/btd,vd->btv/dot_general", "LM head + cross-entropy", "forward"),
        (f"{FWD}/jit(take_along_axis)/gather", "LM head + cross-entropy", "forward"),
        ("jit(train_step)/jit(clip)/max", "optimizer & other", "other"),
        # A layer's op whose path lost its phase prefix still belongs to its layer.
        ("periods/sal_6/sal_6._inputs/norm/checkpoint/reduce_sum", "norms", "other"),
    ],
)
def test_part_and_phase_of_designed_paths(path, part, phase):
    assert (sp.part_of(path), sp.phase_of(path)) == (part, phase)


def test_breakdown_sums_kernel_time_per_step_by_part_and_phase():
    sources = sp.hlo_sources(HLO)
    events = [  # two steps; durations in microseconds
        {"name": "fusion_12", "dur": 300.0},
        {"name": "fusion_12", "dur": 100.0},
        {"name": "loop_multiply_fusion_48", "dur": 1000.0},
        {"name": "loop_multiply_fusion_48", "dur": 1000.0},
        {"name": "ssd_fwd", "dur": 500.0},
        {"name": "ssd_fwd", "dur": 500.0},
        {"name": "memcpy128", "dur": 600.0},  # no instruction of that name: unattributed
        # The profiler's own name for the instruction wins over the kernel's.
        {"name": "nvjet_sm90_gemm", "dur": 200.0, "args": {"hlo_op": "fusion.12"}},
        # Launched from a CUDA graph: the hlo_op names the graph, the kernel's own name is tried next.
        {"name": "fusion_12", "dur": 0.0, "args": {"hlo_op": "command_buffer_36"}},
    ]
    out = sp.breakdown(events, sources, steps=2)
    assert out["gpu_ms_per_step"] == pytest.approx(4.2 / 2)
    assert out["kernels_per_step"] == 4.5
    parts = {r["part"]: r for r in out["by_part"]}
    assert parts["SSM scan / SSD"]["backward"] == pytest.approx(1.0)
    assert parts["SSM scan / SSD"]["forward"] == pytest.approx(0.5)
    assert parts["SSM scan / SSD"]["ms"] == pytest.approx(1.5)
    assert parts["projections"]["forward"] == pytest.approx(0.3)
    assert parts["unattributed"]["other"] == pytest.approx(0.3)
    assert [r["part"] for r in out["by_part"]] == ["SSM scan / SSD", "projections", "unattributed"]
    assert sum(r["share"] for r in out["by_part"]) == pytest.approx(1.0)
    assert parts["SSM scan / SSD"]["share"] == pytest.approx(1.5 / 2.1)
    assert out["by_phase"] == pytest.approx({"forward": 0.8, "backward": 1.0, "recompute": 0.0, "other": 0.3})
    top = out["top_kernels"][0]
    assert (top["name"], top["part"], top["phase"], top["ms"], top["calls"]) == (
        "loop_multiply_fusion_48",
        "SSM scan / SSD",
        "backward",
        pytest.approx(1.0),
        1.0,
    )
    gemm = next(k for k in out["top_kernels"] if k["name"] == "nvjet_sm90_gemm")
    assert (gemm["part"], gemm["hlo_op"]) == ("projections", "fusion.12")
    text = sp.markdown(out, "designed")
    assert "| SSM scan / SSD | 0.50 | 1.00 | 0.00 | 0.00 | 1.50 | 71.4% |" in text


def test_a_compiled_training_step_maps_onto_model_parts():
    """The paths of a real (tiny, CPU) Mamba-2 training step: every part of the model is found and most
    instructions with a source path fall in a named part."""
    import types

    spec = importlib.util.spec_from_file_location(
        "throughput_run", os.path.join(ROOT, "experiments", "throughput", "run.py")
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    args = types.SimpleNamespace(
        size="tiny", dtype="float32", kernels="xla", kernel="", seq_len=32, batch=1, warmup=0, steps=1
    )
    config = run.build_config("mamba2", args, "none")
    config.model.vocab_size = 512
    with run.compiled(config) as (_, step, _, _):
        sources = sp.hlo_sources(step.as_text())
    parts = {sp.part_of(p) for p in sources.values()}
    for part in ("SSM scan / SSD", "causal conv", "projections", "gate + norm", "norms", "embedding",
                 "LM head + cross-entropy", "final norm", "optimizer & other"):  # fmt: skip
        assert part in parts, part
    phases = {sp.phase_of(p) for p in sources.values()}
    assert {"forward", "backward", "other"} <= phases


def test_ab_tied_head_smoke_run_compares_the_heads(tmp_path):
    """The head A/B benchmark on a CPU-sized shape: all three variants timed, the same loss, gradients within bf16
    rounding of the cotangent (the only difference from autodiff)."""
    spec = importlib.util.spec_from_file_location(
        "throughput_ab_tied_head", os.path.join(ROOT, "experiments", "throughput", "ab_tied_head.py")
    )
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    out = tmp_path / "ab.json"
    assert ab.main(["--shape", "2x16x32x96", "--rounds", "1", "--calls", "2", "--out", str(out)]) == 0
    import json

    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"autodiff", "tied_logits", "tied_ce"} and all(r["wall_ms"] > 0 for r in rows.values())
    for name in ("tied_logits", "tied_ce"):
        diff = rows[name]["vs_autodiff"]
        assert diff["loss"] < 1e-6 and 0 < diff["dh"] < 1e-2 and 0 < diff["dembedding"] < 1e-2


def test_profiling_flags_turn_command_buffers_off_unless_set():
    assert sp.profiling_xla_flags("") == "--xla_gpu_enable_command_buffer="
    assert sp.profiling_xla_flags("--xla_dump_to=/tmp/x") == "--xla_dump_to=/tmp/x --xla_gpu_enable_command_buffer="
    mine = "--xla_gpu_enable_command_buffer=FUSION"
    assert sp.profiling_xla_flags(mine) == mine
