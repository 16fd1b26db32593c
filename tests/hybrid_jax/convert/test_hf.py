"""Hugging Face parity: tiny random transformers Mamba / Mamba-2 models, saved with save_pretrained and loaded with
load_hf_checkpoint, give the same logits (fp32, 1e-4) as transformers' own forward pass."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.convert import CheckpointError, load_hf_checkpoint

torch = pytest.importorskip("torch", reason="needs the [hf] extra")
transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")

pytestmark = pytest.mark.hf


def _save(model, tmp_path, name):
    path = os.path.join(tmp_path, name)
    model.save_pretrained(path)
    return path


def _forward(model, params, tokens):
    """Our logits for (torch) tokens, jitted: eager dispatch of a whole model took a few seconds per call."""
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(tokens.numpy())))


def _compare(hf_model, path, vocab, t=37, b=2):
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (b, t))
    with torch.no_grad():
        expected = hf_model(tokens).logits.float().numpy()
    model, params = load_hf_checkpoint(path)
    got = _forward(model, params, tokens)
    err = float(np.max(np.abs(got - expected)))
    assert err < 1e-4, f"max |logit diff| = {err:.2e}"
    return model, params


def test_mamba_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4
    )
    hf = transformers.MambaForCausalLM(cfg).eval()
    # Random (not init-default) values for the SSM parameters so the test sees them all.
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.A_log.add_(torch.randn_like(layer.mixer.A_log) * 0.1)
            layer.mixer.D.add_(torch.randn_like(layer.mixer.D) * 0.1)
            layer.norm.weight.add_(torch.randn_like(layer.norm.weight) * 0.1)
    path = _save(hf, tmp_path, "mamba")
    model, _ = _compare(hf, path, 96)
    assert model.config.tie_embeddings


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_parity(tmp_path, ngroups):
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(
        vocab_size=80,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        head_dim=16,
        num_heads=4,
        n_groups=ngroups,
        conv_kernel=4,
        chunk_size=16,
    )
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.norm.weight.add_(torch.randn_like(layer.mixer.norm.weight) * 0.2)
            layer.mixer.D.add_(torch.randn_like(layer.mixer.D) * 0.1)
    path = _save(hf, tmp_path, f"mamba2_g{ngroups}")
    model, _ = _compare(hf, path, 80)
    assert model.config.mamba2.ngroups == ngroups
    assert not model.config.tie_embeddings


def test_state_spaces_layout(tmp_path):
    """The original state-spaces naming: `embedding`, d_model/n_layer/ssm_cfg config, padded vocabulary."""
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=48, hidden_size=32, state_size=8, num_hidden_layers=2, time_step_rank=4)
    hf = transformers.MambaForCausalLM(cfg).eval()
    path = os.path.join(tmp_path, "ss")
    os.makedirs(path)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state.pop("lm_head.weight", None)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {
                "d_model": 32,
                "n_layer": 2,
                "vocab_size": 45,
                "pad_vocab_size_multiple": 8,
                "ssm_cfg": {"d_state": 8, "dt_rank": 4},
                "tie_embeddings": True,
            },
            f,
        )
    _compare(hf, path, 45)


def test_bad_checkpoints_name_the_tensor(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=48, hidden_size=32, state_size=8, num_hidden_layers=2, time_step_rank=4)
    hf = transformers.MambaForCausalLM(cfg)
    from safetensors.torch import save_file

    base = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}

    def write(name, state, config=None):
        path = os.path.join(tmp_path, name)
        os.makedirs(path)
        save_file(state, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config or cfg.to_dict(), f)
        return path

    missing = dict(base)
    missing.pop("backbone.layers.1.mixer.x_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone.layers.1.mixer.x_proj.weight'"):
        load_hf_checkpoint(write("missing", missing))
    wrong = dict(base)
    wrong["backbone.layers.0.mixer.A_log"] = torch.zeros(64, 7)
    with pytest.raises(
        CheckpointError, match=r"'backbone.layers.0.mixer.A_log' has shape \(64, 7\), expected \(64, 8\)"
    ):
        load_hf_checkpoint(write("wrong", wrong))
    with pytest.raises(
        CheckpointError,
        match=r"model_type=.llama. is not supported \(supported: mamba, mamba2, bamba, falcon_h1, granitemoehybrid, "
        r"jamba, nemotron_h, zamba2\)",
    ):
        load_hf_checkpoint(write("llama", base, {"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match=r"is not a directory"):
        load_hf_checkpoint(os.path.join(tmp_path, "nope"))


def test_cli_writes_orbax_checkpoint_atomically(tmp_path):
    import subprocess
    import sys

    from hybrid_jax.convert.orbax_io import load_converted

    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=1, head_dim=16, num_heads=4, n_groups=1
    )
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    src = _save(hf, tmp_path, "src")
    out = os.path.join(tmp_path, "converted")
    cmd = [sys.executable, "-m", "hybrid_jax.convert", f"--checkpoint={src}", f"--out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, params = load_converted(out)
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        expected = hf(tokens).logits.numpy()
    got = _forward(model, params, tokens)
    assert float(np.max(np.abs(got - expected))) < 1e-4
    # A second run refuses to overwrite; a bad source leaves the existing output untouched.
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "exists; pass --overwrite" in r.stderr.strip().splitlines()[-1]
    bad = subprocess.run(
        [sys.executable, "-m", "hybrid_jax.convert", f"--checkpoint={tmp_path}/nope", f"--out={out}", "--overwrite"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "is not a directory" in bad.stderr.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(out, "model.json"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# Sizes every tiny hybrid test model shares (GQA: 4 query heads, 2 kv heads; 4 layers).
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def _perturb(hf):
    """Random (not init-default) norms and SSM parameters, so the test sees them all."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("dt_bias", "A_log", ".D")):
                p.add_(0.3 * torch.randn_like(p))


def _decode_and_generate(hf, model, params, vocab, prompt_len=11, new=9, reference="generate"):
    """Prefill + token-by-token decode equals our forward pass; greedy generation equals transformers' ``generate``
    (``reference="generate"``) or the greedy continuation of transformers' forward pass, one full forward per token
    (``"forward"``)."""
    from hybrid_jax.inference import generate

    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, prompt_len + new))
    full = _forward(model, params, tokens)
    prefill = jax.jit(lambda p, x: model.apply({"params": p}, x, prompt_len + new, method="prefill"))
    last, cache = prefill(params, jnp.asarray(tokens[:, :prompt_len].numpy()))
    np.testing.assert_allclose(np.asarray(last), full[:, prompt_len - 1], rtol=1e-4, atol=1e-4)
    step = jax.jit(lambda p, token, c: model.apply({"params": p}, token, c, method="step"))
    for i in range(prompt_len, prompt_len + new):
        logits, cache = step(params, jnp.asarray(tokens[:, i].numpy()), cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, i], rtol=1e-4, atol=1e-4)
    prompt = tokens[:, :prompt_len]
    with torch.no_grad():
        if reference == "generate":
            # An explicit mask: otherwise generate takes prompt tokens equal to pad_token_id for padding.
            mask = torch.ones_like(prompt)
            theirs = hf.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        else:
            theirs = prompt
            for _ in range(new):
                theirs = torch.cat([theirs, hf(theirs).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ours = np.asarray(generate(model, params, jnp.asarray(prompt.numpy()), new))
    np.testing.assert_array_equal(ours, theirs[:, prompt_len:].numpy())


@pytest.mark.parametrize("ngroups, attn", [(1, [1, 3]), (2, [2])])
def test_bamba_parity_decode_and_generate(tmp_path, ngroups, attn):
    """IBM Bamba: Mamba-2 and attention layers (GQA, partial rotary), SwiGLU MLPs; a repeating layer pattern becomes
    a scanned period, a non-repeating one a single period; sharded safetensors."""
    torch.manual_seed(0)
    cfg = transformers.BambaConfig(
        vocab_size=112,
        intermediate_size=96,
        **TINY,
        attn_layer_indices=attn,
        mamba_n_heads=8,
        mamba_d_state=16,
        mamba_n_groups=ngroups,
        mamba_chunk_size=16,
    )
    hf = transformers.BambaForCausalLM(cfg).eval()
    _perturb(hf)
    path = os.path.join(tmp_path, "bamba")
    hf.save_pretrained(path, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model, params = _compare(hf, path, 112, t=40)
    c = model.config
    assert c.attention.rope_fraction == 0.5 and c.attention.num_kv_heads == 2 and not c.tie_embeddings
    if attn == [1, 3]:
        assert [b.value for b in c.period] == ["mamba2", "mlp", "attention", "mlp"] and c.n_periods == 2
        _decode_and_generate(hf, model, params, 112)  # once per family (CI time): decoding is not per-pattern code
    else:
        assert c.n_periods == 1 and [b.value for b in c.period[::2]] == ["mamba2", "mamba2", "attention", "mamba2"]


@pytest.mark.parametrize("pattern", ["M-*-", "M*-M-"])
def test_nemotron_h_parity_decode_and_generate(tmp_path, pattern):
    """NVIDIA Nemotron-H: one mixer per layer (Mamba-2 with groups, attention without positional embedding,
    squared-ReLU MLP); the pattern given the old way (hybrid_override_pattern) in the saved config.json."""
    torch.manual_seed(0)
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    cfg = transformers.NemotronHConfig(
        vocab_size=96,
        **{k: v for k, v in TINY.items() if k != "num_hidden_layers"},
        layers_block_type=[names[c] for c in pattern],
        head_dim=16,
        intermediate_size=80,
        ssm_state_size=16,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        chunk_size=16,
    )
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    _perturb(hf)
    path = _save(hf, tmp_path, "nemotron_h")
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    saved.pop("layers_block_type", None)
    saved["hybrid_override_pattern"] = pattern
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f)
    model, params = _compare(hf, path, 96, t=40)
    kinds = [b.value for b in model.config.period] * model.config.n_periods
    assert kinds == [{"M": "mamba2", "*": "attention", "-": "relu2_mlp"}[c] for c in pattern]
    assert not model.config.attention.rope
    # transformers' cached generate for Nemotron-H departs from its own forward pass on this model (at step 7 of
    # pattern M-*- its greedy token differs where the forward pass's top-2 logits are 0.014 apart); ours follows the
    # forward pass at every step. Once per family (CI time).
    if pattern == "M-*-":
        _decode_and_generate(hf, model, params, 96, reference="forward")


def test_jamba_parity_decode_and_generate(tmp_path):
    """AI21 Jamba: Mamba-1 layers with RMSNorms on dt, B and C, attention without positional embedding every 4th
    layer, mixture-of-experts SwiGLUs every 2nd (top-2 of a softmax, not renormalised), SwiGLU MLPs elsewhere."""
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(
        vocab_size=96,
        intermediate_size=80,
        **TINY,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=4,
        attn_layer_offset=2,
        mamba_d_state=8,
        mamba_dt_rank=8,
    )
    hf = transformers.JambaForCausalLM(cfg).eval()
    _perturb(hf)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("dt_proj.bias"):
                p.add_(0.3 * torch.randn_like(p))
    path = _save(hf, tmp_path, "jamba")
    model, params = _compare(hf, path, 96, t=30)
    c = model.config
    assert [b.value for b in c.period] == ["mamba", "mlp", "mamba", "moe", "attention", "mlp", "mamba", "moe"]
    assert c.mamba.inner_norms and not c.attention.rope and not c.moe.normalize_top_k
    _decode_and_generate(hf, model, params, 96)


@pytest.mark.parametrize("experts, position", [(4, "rope"), (0, None)])
def test_granite_4_h_parity_decode_and_generate(tmp_path, experts, position):
    """IBM Granite-4.0-H: Mamba-2 and attention layers, each followed by a mixture of SwiGLU experts plus a shared
    SwiGLU (the shared one alone without experts); attention with or without RoPE and a q.k multiplier; muP-style
    embedding, residual and logit multipliers."""
    torch.manual_seed(0)
    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=96,
        intermediate_size=80,
        **TINY,
        num_local_experts=experts,
        num_experts_per_tok=2,
        shared_intermediate_size=48,
        layer_types=["mamba", "attention", "mamba", "attention"],
        mamba_n_heads=8,
        mamba_d_state=16,
        mamba_d_head=16,
        mamba_chunk_size=16,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.1,
        logits_scaling=3.0,
        position_embedding_type=position,
    )
    hf = transformers.GraniteMoeHybridForCausalLM(cfg).eval()
    _perturb(hf)
    path = _save(hf, tmp_path, "granite")
    model, params = _compare(hf, path, 96, t=30)
    c = model.config
    assert (
        c.embedding_multiplier == 2.0 and c.residual_multiplier == 0.5 and c.logits_multiplier == pytest.approx(1 / 3)
    )
    assert c.attention.softmax_scale == 0.1 and c.attention.rope == (position == "rope")
    assert [b.value for b in c.period] == [
        "mamba2",
        "moe" if experts else "mlp",
        "attention",
        "moe" if experts else "mlp",
    ]
    if experts:
        _decode_and_generate(hf, model, params, 96)


@pytest.mark.parametrize(
    "tied, rms_norm, norm_before_gate", [(False, True, True), (True, False, True), (True, True, False)]
)
def test_falcon_h1_parity_decode_and_generate(tmp_path, tied, rms_norm, norm_before_gate):
    """TII Falcon-H1: attention (GQA, RoPE) and Mamba-2 in parallel in every layer, then a SwiGLU MLP; a Mamba-2 inner
    width apart from expand * hidden_size (mamba_d_ssm), with or without the gated RMSNorm (normalising before or after
    the gate); every muP multiplier away from 1 (folded into the weights, or kept at run time for a tied embedding)."""
    torch.manual_seed(0)
    cfg = transformers.FalconH1Config(
        vocab_size=96,
        intermediate_size=80,
        **{k: v for k, v in TINY.items() if k != "num_hidden_layers"},
        num_hidden_layers=2,
        head_dim=16,
        mamba_d_ssm=96,
        mamba_n_heads=6,
        mamba_d_state=16,
        mamba_n_groups=2,
        mamba_chunk_size=16,
        mamba_rms_norm=rms_norm,
        mamba_norm_before_gate=norm_before_gate,
        tie_word_embeddings=tied,
        embedding_multiplier=2.0,
        lm_head_multiplier=0.5,
        key_multiplier=3.0,
        attention_in_multiplier=1.2,
        attention_out_multiplier=0.6,
        ssm_in_multiplier=1.1,
        ssm_out_multiplier=0.7,
        ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.3],
        mlp_multipliers=[1.5, 0.7],
        eos_token_id=None,  # greedy generation runs its full length (a generated eos would stop transformers' rows)
    )
    hf = transformers.FalconH1ForCausalLM(cfg).eval()
    _perturb(hf)
    path = _save(hf, tmp_path, "falcon_h1")
    model, params = _compare(hf, path, 96, t=40)
    c = model.config
    assert [b.value for b in c.period] == ["attention_mamba2", "mlp"] and c.n_periods == 2
    assert c.d_inner2 == 96 and c.mamba2.headdim == 16
    assert (c.mamba2.gated_norm, c.mamba2.norm_before_gate) == (rms_norm, norm_before_gate)
    assert c.tie_embeddings == tied and c.attention.rope and c.attention.num_kv_heads == 2
    # Untied, every multiplier is folded into the weights; tied, the embedding and the head keep theirs.
    assert (c.embedding_multiplier, c.logits_multiplier) == ((2.0, 0.5) if tied else (1.0, 1.0))
    if not tied:
        _decode_and_generate(hf, model, params, 96)  # once per family (CI time)


@pytest.mark.parametrize(
    "adapters, mem_blocks, kv_heads, rope, pattern",
    [
        (True, 1, 4, True, "MHMHMHMH"),
        # slow: the cases around it cover its parts: adapters with RoPE (one block), two blocks taken in turn with
        # decoding and generation (no adapters); decoding with adapters is test_shared_block.py's.
        pytest.param(True, 2, 4, True, "MHMHMHMH", marks=pytest.mark.slow),
        (False, 2, 2, False, "MHMMHHM"),
    ],
)
def test_zamba2_parity_decode_and_generate(tmp_path, adapters, mem_blocks, kv_heads, rope, pattern):
    """Zyphra Zamba2: Mamba-2 layers (groups, a step-size floor) and hybrid layers, where a transformer block shared
    across depths (attention on [h, embeddings] with RoPE or without, GQA where transformers allows it, i.e. without
    attention adapters; a GELU-gated MLP) with per-layer LoRA adapters feeds each layer's Mamba-2 input through a
    per-layer projection; one or two shared blocks taken in turn. A repeating pattern is scanned with the shared blocks
    as single parameters; the irregular one is a single period."""
    torch.manual_seed(0)
    cfg = transformers.Zamba2Config(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=len(pattern),
        layers_block_type=["hybrid" if c == "H" else "linear_attention" for c in pattern],
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=80,
        mamba_d_state=16,
        n_mamba_heads=8,
        mamba_ngroups=2,
        chunk_size=16,
        num_mem_blocks=mem_blocks,
        use_shared_attention_adapter=adapters,
        adapter_rank=8,
        use_mem_rope=rope,
        eos_token_id=None,  # greedy generation runs its full length (a generated eos would stop transformers' rows)
    )
    hf = transformers.Zamba2ForCausalLM(cfg).eval()
    _perturb(hf)
    path = _save(hf, tmp_path, "zamba2")
    model, params = _compare(hf, path, 96, t=40)
    c = model.config
    kinds = ["mamba2" if k == "M" else "shared_attention_mamba2" for k in pattern]
    assert [b.value for b in c.period] * c.n_periods == kinds
    assert c.n_periods == {"MHMHMHMH": 4 // mem_blocks}.get(pattern, 1)
    assert c.shared_block.num_blocks == mem_blocks and c.shared_block.attention_adapters == adapters
    assert c.attention.rope == rope and c.attention.num_kv_heads == kv_heads and c.mamba2.dt_limit[0] == 1e-3
    # Each shared weight is one array (not one per period or per layer); the adapters belong to the layers.
    blocks = params["shared"]["shared_attention_mamba2"]
    assert sorted(blocks) == [f"block_{i}" for i in range(mem_blocks)]
    assert blocks["block_0"]["qkv"]["q_proj"]["kernel"].shape == (128, 128)
    layer = params["periods"]["shared_attention_mamba2_1"]["mixer"]
    assert ("q_adapter" in layer) == adapters and layer["mlp_adapter"]["up"].shape == (c.n_periods, 8, 160)
    if mem_blocks == 1:
        return  # decoding runs the same code for one block as for two (CI time)
    _decode_and_generate(hf, model, params, 96)
    if not adapters:  # once: the convert CLI writes the same model (shared parameters included)
        _convert_with_cli(hf, path, tmp_path, 96)


def _convert_with_cli(hf, path, tmp_path, vocab):
    import subprocess
    import sys

    from hybrid_jax.convert.orbax_io import load_converted

    out = os.path.join(tmp_path, "converted")
    r = subprocess.run(
        [sys.executable, "-m", "hybrid_jax.convert", f"--checkpoint={path}", f"--out={out}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    model, params = load_converted(out)
    tokens = torch.randint(0, vocab, (1, 9))
    with torch.no_grad():
        expected = hf(tokens).logits.numpy()
    got = _forward(model, params, tokens)
    assert float(np.max(np.abs(got - expected))) < 1e-4


def test_zamba2_tied_copies_must_be_equal(tmp_path):
    """A state dict with transformers' tied shared-block weights saved under every layer that uses them (as torch's
    own state_dict has them) imports when the copies are equal, and names the first copy that differs."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = transformers.Zamba2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        layers_block_type=["linear_attention", "hybrid", "hybrid", "hybrid"],
        num_attention_heads=4,
        intermediate_size=48,
        mamba_d_state=8,
        n_mamba_heads=4,
        num_mem_blocks=2,
        use_shared_attention_adapter=True,
        adapter_rank=4,
    )
    hf = transformers.Zamba2ForCausalLM(cfg).eval()
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    copy = "model.layers.3.shared_transformer.self_attn.linear_q_adapter_list.2.0.weight"  # use 2's, in block 0
    assert copy in state

    def write(name):
        path = os.path.join(tmp_path, name)
        os.makedirs(path)
        save_file(state, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        return path

    _compare(hf, write("tied"), 64, t=12)
    state[copy] = state[copy] + 1.0
    with pytest.raises(CheckpointError, match=rf"tied tensor '{copy}' differs from 'model.layers.1.shared_transformer"):
        load_hf_checkpoint(write("untied"))
