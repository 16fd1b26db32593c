"""Typed model configuration: the layer pattern as BlockType members, mixer settings, and the presets.

A model is ``n_periods`` repetitions of ``period``, a tuple of :class:`BlockType` (each one pre-norm residual layer),
e.g. Taipan's period is six Mamba-2 layers, a Selective Attention Layer and its SwiGLU. Everything is a frozen
dataclass so that configs hash (they are static arguments under ``jit``) and cannot drift during a run. ConfigDict
stops at the trainer: :meth:`ModelConfig.from_dict` builds this from plain nested dicts.

Presets follow the papers (papers.md sections 1-4); sizes that a paper does not give are marked as our choice.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any


class BlockType(enum.Enum):
    """One residual layer of the stack: ``h <- h + layer(norm(h))`` (SAL: Taipan's gated update)."""

    MAMBA = "mamba"  # Mamba-1 selective SSM (S6), arXiv:2312.00752
    MAMBA2 = "mamba2"  # Mamba-2 SSD, arXiv:2405.21060
    ATTENTION = "attention"  # full causal attention (GQA, RoPE optional)
    SWA = "swa"  # sliding-window causal attention (Samba)
    SAL = "sal"  # Taipan Selective Attention Layer, arXiv:2410.18572
    TOPK = "topk"  # top-k block-sparse attention (own key block + the top_k best earlier blocks), issue 22
    MLP = "mlp"  # SwiGLU MLP
    RELU2_MLP = "relu2_mlp"  # squared-ReLU MLP (Nemotron-H)
    MOE = "moe"  # mixture of SwiGLU experts, top-k routing (Jamba, Granite-4.0-H, Mixtral)
    # Attention and Mamba-2 side by side on the same normalised input, their updates summed (Falcon-H1's hybrid
    # heads, arXiv:2507.22448); uses the attention and mamba2 sections.
    ATTENTION_MAMBA2 = "attention_mamba2"
    # Zamba2's hybrid layer (arXiv:2411.15242): a transformer block whose weights are shared across depths (attention
    # and MLP on [h, embedding], per-layer LoRA adapters) feeds, through a per-layer projection, a Mamba-2 layer's
    # input; uses the shared_block, attention and mamba2 sections.
    SHARED_ATTENTION_MAMBA2 = "shared_attention_mamba2"


# Composite kinds: the kinds a layer is made of (config validation and decoding see each part).
PARTS: dict[BlockType, tuple[BlockType, ...]] = {
    BlockType.ATTENTION_MAMBA2: (BlockType.ATTENTION, BlockType.MAMBA2),
    BlockType.SHARED_ATTENTION_MAMBA2: (BlockType.ATTENTION, BlockType.MAMBA2),
}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Mamba-1 (S6) mixer, arXiv:2312.00752 (mamba_ssm ``Mamba`` defaults)."""

    d_state: int = 16  # N, state size per channel
    d_conv: int = 4  # causal depthwise conv width
    expand: int = 2  # E = expand * d_model inner channels
    dt_rank: int | None = None  # rank of the dt projection; None: ceil(d_model / 16)
    dt_min: float = 1e-3  # dt initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt
    dt_scale: float = 1.0  # scale of the dt projection init
    conv_bias: bool = True  # bias in the causal conv
    # LTI ablation (Mamba section 4.1.1): delta, B and C become learned constants instead of projections of the input.
    lti: bool = False
    # RMSNorms (eps norm_eps) on the low-rank dt, on B and on C after x_proj (Jamba's Mamba layers).
    inner_norms: bool = False


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 (SSD) mixer, arXiv:2405.21060 (mamba_ssm ``Mamba2`` defaults)."""

    d_state: int = 128  # N, state size per head
    d_conv: int = 4  # causal depthwise conv width
    expand: int = 2  # inner width = expand * d_model
    d_inner: int | None = None  # inner width when it is not expand * d_model (Falcon-H1's mamba_d_ssm); None: expand
    headdim: int = 64  # P, channels per SSM head
    ngroups: int = 1  # G, groups sharing B and C
    chunk_size: int = 256  # L of the chunked SSD algorithm
    A_init_range: tuple[float, float] = (1.0, 16.0)  # A = -U(range) per head at init
    dt_min: float = 1e-3  # dt initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt
    dt_limit: tuple[float, float] = (0.0, float("inf"))  # clamp of softplus(dt + dt_bias); (0, inf): none
    conv_bias: bool = True  # bias in the causal conv
    norm_eps: float = 1e-5  # epsilon of the gated RMSNorm
    # The gated RMSNorm before out_proj; False: the output is y * silu(z), unnormalised (Falcon-H1's mamba_rms_norm).
    gated_norm: bool = True
    # With gated_norm: RMSNorm(y) * silu(z) (Falcon-H1's mamba_norm_before_gate) instead of mamba_ssm's
    # RMSNorm(y * silu(z)).
    norm_before_gate: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Full and sliding-window attention (ATTENTION and SWA layers)."""

    num_heads: int = 12  # query heads
    num_kv_heads: int | None = None  # GQA key/value heads; None: num_heads (MHA)
    head_dim: int | None = None  # None: d_model // num_heads
    rope: bool = True  # rotary position embedding on q and k
    rope_base: float = 10000.0
    # Partial rotary: only the first rope_fraction of each head's channels rotate (Bamba, GPT-NeoX: 0.5).
    rope_fraction: float = 1.0
    softmax_scale: float | None = None  # scale of q.k; None: head_dim ** -0.5 (Granite: attention_multiplier)
    window: int = 2048  # SWA layers only: a query sees the last `window` tokens (itself included)
    # Width of a causal depthwise conv (+ SiLU) on the layer input before the q/k/v projection, the short conv of
    # Zoology's attention baselines; 0: none. Training and evaluation only (decoding refuses it).
    conv: int = 0


@dataclasses.dataclass(frozen=True)
class SALConfig:
    """Taipan's Selective Attention Layer (papers.md 4.2-4.7; unconfirmed choices are marked)."""

    num_heads: int = 12  # query heads
    num_kv_heads: int | None = None  # None: num_heads
    head_dim: int | None = None  # None: d_model // num_heads
    window: int = 2048  # attention window of a selected token
    capacity: float = 0.15  # C: the attention budget (target fraction of tokens selected)
    constraint_weight: float = 1.0  # lambda of the budget loss lambda * sum_SAL (C - rate)^2 (unconfirmed)
    temperature: float = 1.0  # Gumbel-softmax tau (unconfirmed; 1 is the usual default)
    rope: bool = False  # Taipan ships SALs without positional embedding; True for the Fig. 6 ablation
    rope_base: float = 10000.0
    kv_source: str = "selected"  # "selected": A1-a, m_i m_j band mask; "all": A1-b, every token in the window
    # Static capacity of the compacted attention as a multiple of C * t (None: t, i.e. never truncate).
    capacity_factor: float | None = None
    # Gradient of the selection on the key side: "none" (only a query's own gate gets the straight-through gradient)
    # or "bias" (each selected key's score gains m_j - stop_gradient(m_j): same forward, keys get a gradient).
    key_gradient: str = "none"


@dataclasses.dataclass(frozen=True)
class TopKConfig:
    """Top-k block-sparse attention layers (TOPK): each query attends causally to its own key block and to the
    ``top_k`` earlier blocks whose mean key scores highest against it (MoBA-style, arXiv:2502.13189)."""

    num_heads: int = 12  # query heads
    num_kv_heads: int | None = None  # None: num_heads (MHA); the query heads of a kv head share its selection
    head_dim: int | None = None  # None: d_model // num_heads
    rope: bool = True  # rotary position embedding on q and k
    rope_base: float = 10000.0
    block_size: int = 64  # keys per block (the unit of selection)
    top_k: int = 16  # earlier blocks selected per query besides its own (0: block-local attention)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts SwiGLU layers (MOE), token choice with top-k routing (hybrid_jax/model/moe.py)."""

    num_experts: int = 8  # E
    top_k: int = 2  # experts per token
    expert_hidden: int | None = None  # hidden width of each expert; None: the model's mlp_dim
    shared_expert_hidden: int = 0  # a SwiGLU every token goes through besides its experts (Granite); 0: none
    normalize_top_k: bool = True  # renormalise the chosen experts' probabilities to sum to 1 (Mixtral; Jamba: False)
    load_balance_weight: float = 0.01  # weight of the Switch load-balancing loss E * sum_e f_e P_e


@dataclasses.dataclass(frozen=True)
class SharedBlockConfig:
    """Zamba2's shared transformer blocks (SHARED_ATTENTION_MAMBA2 layers, arXiv:2411.15242; transformers' ``Zamba2``).

    The blocks' attention is ``config.attention`` over the concatenation of the residual stream and the embedding
    output (2 * d_model channels in, d_model out); their MLP is gated, ``down(act(gate(x)) * up(x))``, with hidden
    width ``config.mlp_dim``. Each layer that uses a block adds its own low-rank adapters.
    """

    num_blocks: int = 1  # distinct shared blocks; the layers of the kind use them in turn (Zamba2's num_mem_blocks)
    adapter_rank: int = 128  # rank of every per-layer adapter
    attention_adapters: bool = True  # per-layer LoRA on the q, k and v projections (use_shared_attention_adapter)
    mlp_adapters: bool = True  # per-layer LoRA on the MLP's gate and up projections (always on in Zamba2)
    mlp_activation: str = "gelu"  # of the MLP's gate: "gelu" (exact, erf) or "silu"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """``implementation=`` for every pallas_kernels op (``auto | reference | xla | pallas_gpu | pallas_tpu``)."""

    selective_scan: str = "auto"  # Mamba-1 recurrence
    ssd: str = "auto"  # Mamba-2 chunked SSD
    causal_conv1d: str = "auto"  # depthwise causal conv of both Mamba mixers (and attention's short conv)
    sliding_window_attention: str = "auto"  # ATTENTION / SWA layers (and SAL with kv_source="all")
    selective_attention: str = "auto"  # SAL attention over selected tokens
    selective_state_update: str = "auto"  # decode step of both Mamba mixers
    decode_attention: str = "auto"  # decode step of attention / SWA / SAL / TOPK layers, chunked-prefill attention
    topk_attention: str = "auto"  # TOPK layers (training, evaluation and the first prefill chunk)


_SECTIONS = {
    "mamba": MambaConfig,
    "mamba2": Mamba2Config,
    "attention": AttentionConfig,
    "sal": SALConfig,
    "topk": TopKConfig,
    "moe": MoEConfig,
    "shared_block": SharedBlockConfig,
    "kernels": KernelConfig,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A language model: embeddings, ``n_periods`` x ``period`` residual layers, final norm, LM head."""

    # The layer pattern: one period of residual layers (mamba, mamba2, attention, swa, sal, topk, mlp), repeated.
    period: tuple[BlockType, ...]
    n_periods: int  # repetitions of the period (nn.scan over them when scan_layers)
    d_model: int  # width of the residual stream
    vocab_size: int = 256  # in a run config: None means the data's vocabulary, padded to data.vocab_multiple
    mlp_hidden: int | None = None  # SwiGLU hidden width; None: 8/3 d_model rounded up to mlp_multiple_of
    mlp_multiple_of: int = 128  # rounding of the default SwiGLU width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # LM head = embedding matrix (mamba_ssm default)
    dtype: str = "float32"  # compute dtype of activations and matmuls ("bfloat16" for training)
    param_dtype: str = "float32"  # master parameters (and optimizer state) stay float32
    scan_layers: bool = True  # nn.scan over periods; False unrolls (debugging)
    remat_policy: str = "none"  # per period: "none" | "full" | "dots" (save matmul outputs) | "dots_no_batch"
    # muP-style multipliers (Granite-4.0-H): embeddings x embedding_multiplier, each residual update x
    # residual_multiplier, logits x logits_multiplier (Granite's 1 / logits_scaling).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_multiplier: float = 1.0
    mamba: MambaConfig = MambaConfig()
    mamba2: Mamba2Config = Mamba2Config()
    attention: AttentionConfig = AttentionConfig()
    sal: SALConfig = SALConfig()
    topk: TopKConfig = TopKConfig()
    moe: MoEConfig = MoEConfig()
    shared_block: SharedBlockConfig = SharedBlockConfig()
    kernels: KernelConfig = KernelConfig()  # its own section of a run config
    name: str = "custom"  # label recorded with the run

    def __post_init__(self):
        period = tuple(_block(b) for b in self.period)
        object.__setattr__(self, "period", period)
        _check(len(period) > 0, "ModelConfig: period=() must hold at least one BlockType")
        _check(_pos_int(self.n_periods), f"ModelConfig: n_periods={self.n_periods!r} must be an integer >= 1")
        _check(_pos_int(self.d_model), f"ModelConfig: d_model={self.d_model!r} must be an integer >= 1")
        _check(_pos_int(self.vocab_size), f"ModelConfig: vocab_size={self.vocab_size!r} must be an integer >= 1")
        _check(
            self.dtype in ("float32", "bfloat16", "float16"), f"ModelConfig: dtype={self.dtype!r} is not a float dtype"
        )
        _check(
            self.remat_policy in ("none", "full", "dots", "dots_no_batch"),
            f"ModelConfig: remat_policy={self.remat_policy!r} must be one of none, full, dots, dots_no_batch",
        )
        kinds = self.kinds
        if BlockType.MAMBA2 in kinds:
            m = self.mamba2
            _check(
                m.d_inner is None or _pos_int(m.d_inner),
                f"ModelConfig: mamba2.d_inner={m.d_inner!r} must be None or an integer >= 1",
            )
            _check(
                self.d_inner2 % m.headdim == 0,
                f"ModelConfig: mamba2.headdim={m.headdim} must divide d_inner={self.d_inner2} (mamba2.d_inner, else "
                "expand * d_model)",
            )
            _check(
                self.mamba2_heads % m.ngroups == 0,
                f"ModelConfig: mamba2.ngroups={m.ngroups} must divide the {self.mamba2_heads} SSM heads",
            )
            _check(_pos_int(m.chunk_size), f"ModelConfig: mamba2.chunk_size={m.chunk_size!r} must be >= 1")
        if kinds & {BlockType.ATTENTION, BlockType.SWA}:
            self._check_heads(
                "attention", self.attention.num_heads, self.attention.num_kv_heads, self.attention.head_dim
            )
            _check(
                isinstance(self.attention.conv, int)
                and not isinstance(self.attention.conv, bool)
                and self.attention.conv >= 0,
                f"ModelConfig: attention.conv={self.attention.conv!r} must be an integer >= 0",
            )
            a = self.attention
            rotary = (a.head_dim or self.d_model // a.num_heads) * a.rope_fraction
            _check(
                0.0 < a.rope_fraction <= 1.0 and rotary == int(rotary) and int(rotary) % 2 == 0,
                f"ModelConfig: attention.rope_fraction={a.rope_fraction!r} must be in (0, 1] and rotate an even "
                "number of channels of a head",
            )
            if BlockType.SWA in kinds:
                _check(
                    _pos_int(self.attention.window),
                    f"ModelConfig: attention.window={self.attention.window!r} must be >= 1",
                )
        if BlockType.SAL in kinds:
            s = self.sal
            self._check_heads("sal", s.num_heads, s.num_kv_heads, s.head_dim)
            _check(_pos_int(s.window), f"ModelConfig: sal.window={s.window!r} must be an integer >= 1")
            _check(0.0 < s.capacity <= 1.0, f"ModelConfig: sal.capacity={s.capacity!r} must be in (0, 1]")
            _check(s.temperature > 0, f"ModelConfig: sal.temperature={s.temperature!r} must be > 0")
            _check(
                s.kv_source in ("selected", "all"),
                f"ModelConfig: sal.kv_source={s.kv_source!r} must be 'selected' or 'all'",
            )
            _check(
                s.capacity_factor is None or s.capacity_factor > 0,
                f"ModelConfig: sal.capacity_factor={s.capacity_factor!r} must be None or > 0",
            )
            _check(
                s.key_gradient in ("none", "bias"),
                f"ModelConfig: sal.key_gradient={s.key_gradient!r} must be 'none' or 'bias'",
            )
            _check(
                s.key_gradient == "none" or s.kv_source == "selected",
                f"ModelConfig: sal.key_gradient={s.key_gradient!r} needs sal.kv_source='selected' (keys are selected)",
            )

        if BlockType.MOE in kinds:
            self._check_moe()
        if BlockType.MAMBA in kinds:
            _check(
                not (self.mamba.lti and self.mamba.inner_norms),
                "ModelConfig: mamba.inner_norms=True needs mamba.lti=False (the LTI ablation has no dt, B, C to norm)",
            )

        if BlockType.SHARED_ATTENTION_MAMBA2 in kinds:
            self._check_shared_block()

        if BlockType.TOPK in kinds:
            tk = self.topk
            self._check_heads("topk", tk.num_heads, tk.num_kv_heads, tk.head_dim)
            _check(_pos_int(tk.block_size), f"ModelConfig: topk.block_size={tk.block_size!r} must be an integer >= 1")
            _check(
                isinstance(tk.top_k, int) and not isinstance(tk.top_k, bool) and tk.top_k >= 0,
                f"ModelConfig: topk.top_k={tk.top_k!r} must be an integer >= 0",
            )

    def _check_moe(self) -> None:
        m = self.moe
        _check(_pos_int(m.num_experts), f"ModelConfig: moe.num_experts={m.num_experts!r} must be an integer >= 1")
        _check(
            _pos_int(m.top_k) and m.top_k <= m.num_experts,
            f"ModelConfig: moe.top_k={m.top_k!r} must be an integer in [1, num_experts={m.num_experts}]",
        )
        _check(
            m.expert_hidden is None or _pos_int(m.expert_hidden),
            f"ModelConfig: moe.expert_hidden={m.expert_hidden!r} must be None or an integer >= 1",
        )
        _check(m.load_balance_weight >= 0, f"ModelConfig: moe.load_balance_weight={m.load_balance_weight!r} < 0")
        _check(
            isinstance(m.shared_expert_hidden, int) and m.shared_expert_hidden >= 0,
            f"ModelConfig: moe.shared_expert_hidden={m.shared_expert_hidden!r} must be an integer >= 0",
        )

    def _check_shared_block(self) -> None:
        s, kind = self.shared_block, BlockType.SHARED_ATTENTION_MAMBA2
        uses = self.period.count(kind)
        _check(
            _pos_int(s.num_blocks) and s.num_blocks <= uses * self.n_periods,
            f"ModelConfig: shared_block.num_blocks={s.num_blocks!r} must be an integer in [1, the "
            f"{uses * self.n_periods} {kind.value} layers]",
        )
        # Layer j uses block j % num_blocks; that is the same block in every period only if a period's uses are a
        # multiple of num_blocks (the scan over periods needs a block fixed per position).
        _check(
            self.n_periods == 1 or uses % s.num_blocks == 0,
            f"ModelConfig: shared_block.num_blocks={s.num_blocks} must divide the {uses} {kind.value} layers of a "
            "period (or n_periods == 1)",
        )
        _check(_pos_int(s.adapter_rank), f"ModelConfig: shared_block.adapter_rank={s.adapter_rank!r} must be >= 1")
        _check(
            self.attention.conv == 0,
            f"ModelConfig: attention.conv={self.attention.conv} must be 0 with {kind.value} layers (the shared "
            "blocks' attention has no short conv)",
        )
        _check(
            s.mlp_activation in ("gelu", "silu"),
            f"ModelConfig: shared_block.mlp_activation={s.mlp_activation!r} must be 'gelu' or 'silu'",
        )

    def _check_heads(self, section: str, heads: int, kv_heads: int | None, head_dim: int | None) -> None:
        _check(_pos_int(heads), f"ModelConfig: {section}.num_heads={heads!r} must be an integer >= 1")
        kv = heads if kv_heads is None else kv_heads
        _check(
            _pos_int(kv) and heads % kv == 0,
            f"ModelConfig: {section}.num_kv_heads={kv_heads!r} must divide num_heads={heads}",
        )
        if head_dim is None:
            _check(
                self.d_model % heads == 0,
                f"ModelConfig: {section}.num_heads={heads} must divide d_model={self.d_model} (or set head_dim)",
            )

    # ----- derived sizes -------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Residual layers in the whole stack (mixers and MLPs)."""
        return len(self.period) * self.n_periods

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return self.mamba.dt_rank or math.ceil(self.d_model / 16)

    @property
    def d_inner2(self) -> int:
        return self.mamba2.d_inner or self.mamba2.expand * self.d_model

    @property
    def mamba2_heads(self) -> int:
        return self.d_inner2 // self.mamba2.headdim

    @property
    def mlp_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        m = self.mlp_multiple_of
        return m * math.ceil(8 * self.d_model / 3 / m)

    @property
    def kinds(self) -> frozenset[BlockType]:
        """Every kind of layer the stack runs, a composite kind (:data:`PARTS`) with its parts."""
        return frozenset(self.period).union(*(PARTS.get(k, ()) for k in self.period))

    def count(self, kind: BlockType) -> int:
        """How many layers of ``kind`` the stack has."""
        return self.period.count(kind) * self.n_periods

    # ----- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from plain (nested) dicts, e.g. ``config.model.to_dict()``; unknown keys raise."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        _check(not unknown, f"ModelConfig: unknown field(s) {unknown}")
        for key, section in _SECTIONS.items():
            if key in d and isinstance(d[key], Mapping):
                sub = dict(d[key])
                sub_fields = {f.name for f in dataclasses.fields(section)}
                bad = sorted(set(sub) - sub_fields)
                _check(not bad, f"ModelConfig: unknown field(s) model.{key}.{bad}")
                for key2 in ("A_init_range", "dt_limit"):
                    if key2 in sub:
                        sub[key2] = tuple(float(v) for v in sub[key2])
                d[key] = section(**sub)
        if "period" in d:
            d["period"] = tuple(_block(b) for b in d["period"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (JSON-ready); inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["period"] = [b.value for b in self.period]
        out["mamba2"]["A_init_range"] = list(self.mamba2.A_init_range)
        out["mamba2"]["dt_limit"] = list(self.mamba2.dt_limit)
        return out

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _block(b) -> BlockType:
    if isinstance(b, BlockType):
        return b
    try:
        return BlockType(str(b).lower())
    except ValueError:
        raise ValueError(f"ModelConfig: period entry {b!r} is not one of {[t.value for t in BlockType]}") from None


# ----- presets ------------------------------------------------------------------------------------------------

M, M2, ATT, SWA, SAL, MLP = (
    BlockType.MAMBA,
    BlockType.MAMBA2,
    BlockType.ATTENTION,
    BlockType.SWA,
    BlockType.SAL,
    BlockType.MLP,
)
TOPK = BlockType.TOPK

PERIODS: dict[str, tuple[BlockType, ...]] = {
    "transformer": (ATT, MLP),  # Llama-style Transformer++
    "transformer_swa": (SWA, MLP),  # Llama-2-SWA / Mistral-style
    "mamba": (M,),  # Mamba-1 LM, no MLP
    "mamba2": (M2,),  # Mamba-2 LM, no MLP
    "samba": (M, MLP, SWA, MLP),  # Samba, papers.md 3.1
    "taipan": (M2,) * 6 + (SAL, MLP),  # Taipan: SAL after every 6 Mamba-2 layers, SwiGLU after the SAL
    "jamba": (M2,) * 6 + (ATT, MLP),  # Jamba-style baseline of the Taipan paper: full attention every 7th mixer
    "mamba2_topk": (M2,) * 6 + (TOPK, MLP),  # issue 22: Taipan's layout with top-k attention in the SAL's place
    "samba_topk": (M, MLP, TOPK, MLP),  # issue 22: Samba's period with top-k attention in place of SWA
}

# Per size: d_model, heads, and periods per preset family. "tiny" runs on a laptop CPU in seconds.
# 130m..1.3b follow the papers: Mamba/Mamba-2 130m = 24 x 768, 370m = 48 x 1024, 790m = 48 x 1536, 1.3b/1.4b =
# 48 x 2048; Transformer++ uses half the layers (GPT-3 sizes); Samba 421m = 12 code blocks x 1536, 1.3b = 18 x 2304;
# Taipan sizes are not given in the paper: we reuse Mamba-2 widths with one SAL per 6 Mamba-2 layers (our choice).
_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, heads=4, mixers=4, window=16, vocab=256),
    "small": dict(d_model=256, heads=4, mixers=8, window=128, vocab=256),
    "130m": dict(d_model=768, heads=12, mixers=24, window=2048, vocab=50280),
    "370m": dict(d_model=1024, heads=16, mixers=48, window=2048, vocab=50280),
    "790m": dict(d_model=1536, heads=12, mixers=48, window=2048, vocab=50280),
    "1.3b": dict(d_model=2048, heads=16, mixers=48, window=2048, vocab=50280),
}

# Top-k attention per size, (block_size, top_k) (our choice): 64 x (16 + 1) = 1,088 keys per query from 130m on (the
# issue's benchmark point, about half of the 2,048-token SWA window); "small" sees 16 x 9 = 144 keys (its window is
# 128); "tiny" uses blocks of 4 and 2 winners so that a few dozen tokens already exercise the selection.
_TOPK_BLOCKS: dict[str, tuple[int, int]] = {"tiny": (4, 2), "small": (16, 8)}

PRESETS = tuple(PERIODS)
SIZES = tuple(_SIZES)


def preset(name: str, size: str = "tiny", **overrides) -> ModelConfig:
    """A paper configuration at a given size; ``overrides`` replace top-level ModelConfig fields.

    ``mixers`` is the Mamba-layer count of the size in the Mamba papers; an attention layer with its MLP counts as
    two Mamba layers (same parameters), so Transformer++ gets ``mixers / 2`` attention+MLP periods.
    """
    if name not in PERIODS:
        raise ValueError(f"preset: name={name!r} is not one of {PRESETS}")
    if size not in _SIZES:
        raise ValueError(f"preset: size={size!r} is not one of {SIZES}")
    s = _SIZES[size]
    d, heads, mixers = s["d_model"], s["heads"], s["mixers"]
    tiny = size == "tiny"
    period = PERIODS[name]
    n_periods = {
        "transformer": mixers // 2,
        "transformer_swa": mixers // 2,
        "mamba": mixers,
        "mamba2": mixers,
        "samba": mixers // 4,  # each period = 2 mixers + 2 MLPs, i.e. the parameters of ~4 Mamba layers
        "taipan": max(1, mixers // 6),
        "jamba": max(1, mixers // 6),
        "mamba2_topk": max(1, mixers // 6),
        "samba_topk": mixers // 4,
    }[name]
    if tiny and name in ("taipan", "jamba", "mamba2_topk"):
        # Two Mamba-2 layers before the attention layer instead of six, and one period: the same kinds of layers in
        # the same order at half the depth (tests compile every layer of the unrolled decode loop).
        period, n_periods = period[4:], 1
    block_size, top_k = _TOPK_BLOCKS.get(size, (64, 16))
    kw: dict[str, Any] = dict(
        name=f"{name}-{size}",
        period=period,
        n_periods=n_periods,
        d_model=d,
        vocab_size=s["vocab"],
        mlp_multiple_of=16 if tiny else 128,
        tie_embeddings=True,  # mamba_ssm ties by default (HF Mamba-2 checkpoints untie: the importer sets it)
        mamba=MambaConfig(),
        mamba2=Mamba2Config(d_state=16, headdim=16, chunk_size=32) if tiny else Mamba2Config(),
        attention=AttentionConfig(num_heads=heads, window=s["window"], rope=True),
        sal=SALConfig(num_heads=heads, window=s["window"]),
        topk=TopKConfig(num_heads=heads, rope=True, block_size=block_size, top_k=top_k),
    )
    kw.update(overrides)
    return ModelConfig(**kw)
