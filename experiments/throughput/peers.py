"""Training throughput of the PyTorch peers of issue 19 on one GPU, measured like ``run.py`` measures ours.

Peers (130M class, the sizes of our presets at ``--size``):

* ``mamba``: mamba_ssm ``MambaLMHeadModel``, Mamba-1 layers on the fused ``mamba_inner_fn`` path (causal-conv1d +
  the CUDA selective scan); the state-spaces/mamba-130m config (d_model 768, 24 layers, vocabulary padded to a
  multiple of 8, tied embeddings, RMSNorm, fused add+norm, residual in fp32).
* ``mamba2``: the same model with Mamba-2 layers on the fused ``mamba_split_conv1d_scan_combined`` path (Triton SSD
  + causal-conv1d); the state-spaces/mamba2-130m config (d_state 128, headdim 64, chunk 256, vocabulary padded to a
  multiple of 16, so 50280 becomes 50288 rows of the embedding and LM head).
* ``transformer``: Hugging Face ``LlamaForCausalLM`` with ``attn_implementation="sdpa"``, sized as our
  transformer-130m preset (12 layers of d_model 768, 12 heads, SwiGLU 2048, RoPE base 10000, tied embeddings).

Each step: bf16 autocast over the forward pass and the cross-entropy (which autocast runs in fp32), fp32 master
weights, backward, global-norm clipping at ``--clip`` (ours clips at 1.0), ``torch.optim.AdamW(fused=True)``
(betas 0.9/0.95, weight decay 0.1 on matrices, none on vectors and A_log), on one device-resident batch of random
token ids (the input pipeline is not measured). ``--warmup`` steps (Triton autotuning happens there), then
``--steps`` steps each closed by ``torch.cuda.synchronize()`` (median: ``step_ms``, ``tokens_per_sec``) and the same
number back to back with one synchronisation at the end (``step_ms_pipelined``: how run.py times ours).

    bash experiments/throughput/build_peers.sh .work/peers_src .work/peers_build     # once per machine
    python experiments/throughput/peers.py --peers_build .work/peers_build --out /tmp/peers.json

A peer whose import fails, or whose fused path is not available (causal-conv1d or selective_scan_cuda missing:
mamba_ssm would silently fall back to slower unfused code), is skipped with the reason in its row
(``--allow_unfused`` measures the fallback instead). MFU uses the FLOPs per token of the matching preset of ours
(hybrid_jax.training.flops, computed on the CPU backend in this process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_BUILD = os.path.join(ROOT, ".work", "peers_build")

# key -> (our model label as in run.py, the peer's description)
PEERS = {
    "mamba": ("Mamba", "mamba_ssm Mamba-1, fused mamba_inner_fn"),
    "mamba2": ("Mamba-2", "mamba_ssm Mamba-2, fused mamba_split_conv1d_scan_combined"),
    "transformer": ("Transformer++", "HF LlamaForCausalLM, SDPA"),
}
# pad_vocab_size_multiple of the released configs (state-spaces/mamba-130m: 8, state-spaces/mamba2-130m: 16).
PAD_VOCAB_MULTIPLE = {"mamba": 8, "mamba2": 16}


class PeerUnavailable(Exception):
    """The peer cannot be measured here (import failed, fused path missing); the message is the recorded reason."""


# ----- configs (pure Python: checked by value in the CPU tests) --------------------------------------------------


def our_preset(key: str, size: str, vocab: int):
    from hybrid_jax.model.config import preset

    return preset(key, size, vocab_size=vocab)


def padded_vocab(vocab: int, multiple: int) -> int:
    """mamba_ssm's rule: round the vocabulary up to a multiple of ``pad_vocab_size_multiple``."""
    return vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple


def mamba_config(key: str, config) -> dict:
    """The ``MambaConfig`` fields of the mamba_ssm peer of our preset ``config`` (a mamba or mamba2 ModelConfig)."""
    common = dict(
        d_model=config.d_model,
        d_intermediate=0,  # no MLP between the mixers, as in our preset
        n_layer=config.n_periods * len(config.period),
        vocab_size=config.vocab_size,
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=PAD_VOCAB_MULTIPLE[key],
        tie_embeddings=config.tie_embeddings,
    )
    if key == "mamba":
        m = config.mamba
        if m.dt_rank not in (None, math.ceil(config.d_model / 16)):
            raise ValueError(f"mamba_config: dt_rank={m.dt_rank} is not mamba_ssm's 'auto'")
        ssm_cfg = dict(layer="Mamba1", d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, conv_bias=m.conv_bias)
    elif key == "mamba2":
        m = config.mamba2
        ssm_cfg = dict(
            layer="Mamba2",
            d_state=m.d_state,
            d_conv=m.d_conv,
            expand=m.expand,
            headdim=m.headdim,
            ngroups=m.ngroups,
            chunk_size=m.chunk_size,
            conv_bias=m.conv_bias,
            rmsnorm=m.gated_norm,
            norm_before_gate=m.norm_before_gate,
        )
    else:
        raise ValueError(f"mamba_config: no mamba_ssm peer for {key!r}")
    return dict(common, ssm_cfg=ssm_cfg)


def llama_config(config, seq_len: int) -> dict:
    """The ``LlamaConfig`` fields of the Hugging Face peer of our transformer preset ``config``."""
    a = config.attention
    if tuple(b.value for b in config.period) != ("attention", "mlp"):
        raise ValueError(f"llama_config: period {config.period} is not Llama's (attention, mlp)")
    if not a.rope or a.rope_fraction != 1.0 or a.softmax_scale is not None or a.conv:
        raise ValueError("llama_config: only full RoPE, the default softmax scale and no attention conv map to Llama")
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.n_periods,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads or a.num_heads,
        head_dim=a.head_dim or config.d_model // a.num_heads,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_base},
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def peer_config(key: str, size: str, vocab: int, seq_len: int) -> dict:
    config = our_preset(key, size, vocab)
    return llama_config(config, seq_len) if key == "transformer" else mamba_config(key, config)


# ----- building the peers -----------------------------------------------------------------------------------------


def add_build_to_path(build: str | None) -> str | None:
    """Puts the folders of build_peers.sh's BUILD_DIR in front of sys.path; returns the folder used (None: none)."""
    build = (
        build or os.environ.get("HYBRID_JAX_PEERS_BUILD") or (DEFAULT_BUILD if os.path.isdir(DEFAULT_BUILD) else None)
    )
    if build is None:
        return None
    build = os.path.abspath(build)
    for sub in ("conv", "conv/py", "mamba", "mamba/py"):  # inserted at 0 in turn: mamba/py ends up first
        path = os.path.join(build, sub)
        if os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
    return build


def mamba_ssm_fused_path(key: str) -> dict:
    """``{check: bool}`` of mamba_ssm's fused training path for ``key`` (mamba or mamba2); raises PeerUnavailable
    when mamba_ssm or its model classes do not import. Also used by experiments/efficiency/mamba_ssm_decode.py."""
    try:
        import mamba_ssm.modules.mamba_simple as mamba_simple
        import mamba_ssm.ops.selective_scan_interface as ssi
        import mamba_ssm.ops.triton.ssd_combined as ssd_combined
        from mamba_ssm.models.config_mamba import MambaConfig  # noqa: F401
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    except Exception as e:
        raise PeerUnavailable(
            f"mamba_ssm import failed ({type(e).__name__}: {_first_line(e)}); build it with build_peers.sh and "
            "pass --peers_build"
        ) from None
    if key == "mamba":
        return {
            "causal_conv1d_fn": mamba_simple.causal_conv1d_fn is not None,
            "causal_conv1d_cuda": ssi.causal_conv1d_fwd_function is not None,
            "selective_scan_cuda": ssi.selective_scan_cuda is not None,
        }
    return {"causal_conv1d_cuda": ssd_combined.causal_conv1d_fwd_function is not None}


def build_model(key: str, cfg: dict, allow_unfused: bool):
    """``(model on the GPU in fp32, {check: bool} of the fused path)``; raises PeerUnavailable."""
    import torch

    if key == "transformer":
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except Exception as e:
            raise PeerUnavailable(f"transformers import failed: {type(e).__name__}: {_first_line(e)}") from None
        model = LlamaForCausalLM._from_config(LlamaConfig(**cfg), attn_implementation="sdpa", dtype=torch.float32)
        fused = {"attn_implementation_sdpa": model.config._attn_implementation == "sdpa"}
    else:
        fused = mamba_ssm_fused_path(key)
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        if not all(fused.values()) and not allow_unfused:
            missing = ", ".join(k for k, v in fused.items() if not v)
            raise PeerUnavailable(f"fused path unavailable ({missing} missing); --allow_unfused measures the fallback")
        if key == "mamba2" and not all(fused.values()):  # the fused Mamba-2 path cannot run without causal-conv1d
            cfg = dict(cfg, ssm_cfg=dict(cfg["ssm_cfg"], use_mem_eff_path=False))
            fused["use_mem_eff_path"] = False
        model = MambaLMHeadModel(MambaConfig(**cfg), dtype=torch.float32)
    return model, fused


def param_groups(model, weight_decay: float):
    """AdamW groups as ours (hybrid_jax.training.optimizer): decay on matrices, none on vectors, norms and A_log."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("A_log") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def measure(key: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    device = torch.device(args.device)
    cfg = peer_config(key, args.size, args.vocab, args.seq_len)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, fused = build_model(key, cfg, args.allow_unfused)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    vocab_rows = model.lm_head.weight.shape[0]  # padded rows of the LM head (mamba_ssm pads the vocabulary)
    fused_adamw = device.type == "cuda"
    opt = torch.optim.AdamW(
        param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused_adamw else {})
    )
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g).to(device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip, foreach=fused_adamw)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        loss = step()
    sync()
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    pipelined = (time.perf_counter() - t) / args.steps
    step_s = statistics.median(times)
    tokens = args.batch * args.seq_len
    tokens_per_sec = tokens / step_s
    row = {
        "model": PEERS[key][0],
        "key": key,
        "peer": PEERS[key][1],
        "params": n_params,
        "vocab_rows": vocab_rows,
        "seq_len": args.seq_len,
        "global_batch": args.batch,
        "dtype": "bfloat16 autocast, float32 master weights",
        "optimizer": f"torch.optim.AdamW(fused={fused_adamw}), clip {args.clip}",
        "compiled": bool(args.compile),
        "fused_path": fused,
        "step_ms": 1e3 * step_s,
        "step_ms_mean": 1e3 * statistics.fmean(times),
        "step_ms_min": 1e3 * min(times),
        "step_ms_pipelined": 1e3 * pipelined,
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_pipelined": tokens / pipelined,
        "flops_per_token": None,  # filled in by add_mfu once every peer is measured
        "model_tflops_per_sec_per_device": None,
        "mfu_spec_peak": None,
        "mfu_measured_peak": None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "setup_s": setup_s,
        "final_loss": float(loss),
        "config": cfg,
    }
    return row


# ----- FLOPs, versions, report ------------------------------------------------------------------------------------


def model_flops(key: str, size: str, vocab: int, seq_len: int) -> tuple[float | None, str | None]:
    """Training FLOPs per token of our matching preset, on the CPU backend (this process never uses JAX's GPU)."""
    try:
        from hybrid_jax.training.flops import flops_per_token

        return flops_per_token(our_preset(key, size, vocab), seq_len)["total"], None
    except Exception as e:
        return None, f"{type(e).__name__}: {_first_line(e)}"


def add_mfu(rows: list[dict], device_name: str, args) -> None:
    """Fills each measured row's FLOPs per token (of our matching preset) and MFU; after the measurements, so that
    nothing JAX does can overlap them."""
    spec, measured = device_peaks(device_name)
    for row in rows:
        if "tokens_per_sec" not in row:
            continue
        flops, error = model_flops(row["key"], args.size, args.vocab, args.seq_len)
        if error:
            row["flops_error"] = error
            continue
        tps = row["tokens_per_sec"]
        row["flops_per_token"] = flops
        row["model_tflops_per_sec_per_device"] = flops * tps / 1e12
        row["mfu_spec_peak"] = None if spec is None else flops * tps / spec
        row["mfu_measured_peak"] = None if measured is None else flops * tps / measured


def device_peaks(device_name: str) -> tuple[float | None, float | None]:
    try:
        from hybrid_jax.training.flops import MEASURED_PEAK_FLOPS, peak_flops
    except Exception:
        return None, None
    kind = device_name.lower()
    return peak_flops(kind), next((v for k, v in MEASURED_PEAK_FLOPS.items() if k in kind), None)


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "triton", "einops"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def format_table(rows: list[dict]) -> str:
    header = f"{'peer':<60}{'params':>8}{'step ms':>9}{'pipelined':>10}{'tokens/s':>11}{'peak GiB':>9}{'MFU meas.':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        name = f"{r['model']}: {r['peer']}"
        if "tokens_per_sec" not in r:
            lines.append(f"{name:<60} {'skipped' if 'skipped' in r else 'error'}: {r.get('skipped') or r.get('error')}")
            continue
        mfu = "-" if r["mfu_measured_peak"] is None else f"{100 * r['mfu_measured_peak']:.1f}%"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"{name:<60}{r['params'] / 1e6:>7.0f}M{r['step_ms']:>9.1f}{r['step_ms_pipelined']:>10.1f}"
            f"{r['tokens_per_sec']:>11,.0f}{mem:>9}{mfu:>10}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="mamba,mamba2,transformer", help="comma-separated subset of " + ",".join(PEERS)
    )
    parser.add_argument("--size", default="130m", help="our preset size the peers are built to")
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip", type=float, default=1.0, help="global-norm clipping (0: none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    parser.add_argument("--allow_unfused", action="store_true", help="measure mamba_ssm without its fused path")
    parser.add_argument("--peers_build", default=None, help="BUILD_DIR of build_peers.sh (default .work/peers_build)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test at --size tiny")
    parser.add_argument("--out", default=None, help="JSON path (default: results/peers_<device>.json here)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; choose from {list(PEERS)}")
    try:
        import torch
    except ImportError:
        print("peers.py: needs PyTorch with CUDA, and torch is not importable here; nothing measured", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("peers.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured", file=sys.stderr)
        return 2
    if "jax" not in sys.modules:  # the FLOP counts use JAX on the CPU only: keep it off the GPU that torch measures
        os.environ["JAX_PLATFORMS"] = "cpu"
    build = add_build_to_path(args.peers_build)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = []
    for key in models:
        try:
            row = measure(key, args)
        except PeerUnavailable as e:
            row = {"model": PEERS[key][0], "key": key, "peer": PEERS[key][1], "skipped": str(e)}
        except Exception as e:  # out of memory, a kernel failing to compile: record it, go on with the next peer
            row = {
                "model": PEERS[key][0],
                "key": key,
                "peer": PEERS[key][1],
                "error": f"{type(e).__name__}: {_first_line(e)}",
            }
        rows.append(row)
        print(f"{key}: " + ("done" if "tokens_per_sec" in row else row.get("skipped") or row["error"]), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    sources = os.path.join(build, "sources.txt") if build else None
    record = {
        "device": device_name,
        "versions": versions(),
        "command": sys.argv if argv is None else ["peers.py", *argv],
        "peers_build": build,
        "sources": open(sources).read().strip() if sources and os.path.exists(sources) else None,
        "rows": rows,
    }
    out = args.out or os.path.join(HERE, "results", f"peers_{device_name.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for stage in ("measured", "with MFU"):  # written before the FLOP counts too, in case they fail hard
        if stage == "with MFU":
            add_mfu(rows, device_name, args)
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
    print(f"\n{device_name}, torch {torch.__version__}, seq {args.seq_len}, batch {args.batch}")
    print(format_table(rows))
    print(f"\nwrote {out}")
    return 0 if all("tokens_per_sec" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
