"""MiniCPM, the model (Hu et al. 2024, "MiniCPM: Unveiling the Potential of Small Language Models
with Scalable Training Strategies", arXiv 2404.06395), in one readable file.

A Llama-style pre-norm decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings)
with MiniCPM's muP ("Tensor Program") scalings: embedding output x scale_emb, each residual branch
x scale_depth / sqrt(L), logits from h / m with width multiplier m = d / d_base, matrix init std
and Adam lr divided by sqrt(m) and m. Parameter names are those of the released Hugging Face
checkpoints, so hf.save_hf / load_hf are a plain state-dict copy. The preset table
(parameters, FLOPs per token, GPU memory) is `python plan.py`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import MoE

# Constants from the paper, written once (§3.1, Appendix A.1 Table 7: the values found in the
# 0.009B wind tunnel and used for every MiniCPM model).
SCALE_EMB = 12.0          # h0 = embed(ids) * scale_emb
SCALE_DEPTH = 1.4         # residual: h + branch * scale_depth / sqrt(n_layer)
DIM_MODEL_BASE = 256      # width multiplier m = d / dim_model_base
INIT_STD = 0.1            # matrices: init_std / sqrt(m); embedding: init_std
MUP_BASE_LR = 0.01        # matrices: lr / m; everything else: lr  (§3.3: best lr ~0.01 at all sizes)
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
ROPE_SCALINGS = ("none", "linear", "dynamic")
ATTN_IMPLS = ("sdpa", "eager", "triton")   # a runtime choice of the script, not part of the config


@dataclass
class MiniCPMConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256             # model width d
    n_head: int = 4               # query heads; head_dim = n_embd // n_head
    n_kv_head: int = 4            # key/value heads (grouped-query attention when < n_head)
    ffn_dim: int = 640            # SwiGLU inner width (2.5 d in every MiniCPM)
    block_size: int = 256         # longest sequence (max_position_embeddings)
    rope_theta: float = ROPE_THETA
    rope_scaling: str = "none"    # "linear" or "dynamic" (NTK) position scaling, as the released code computes it
    rope_factor: float = 1.0      # the scaling factor of rope_scaling
    norm_eps: float = RMS_NORM_EPS
    mup: bool = True              # False: standard parameterisation (no scalings, plain init, one lr)
    scale_emb: float = SCALE_EMB
    scale_depth: float = SCALE_DEPTH
    dim_model_base: int = DIM_MODEL_BASE
    init_std: float = INIT_STD
    tie_word_embeddings: bool = True
    n_experts: int = 0            # > 0: MiniCPM-MoE feed-forward (moe.py), §7.3
    top_k: int = 2                # experts per token
    aux_loss_coef: float = 0.01   # load-balancing loss weight

    def __post_init__(self):   # every field checked at once: one error lists every problem
        sizes = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_dim", "block_size", "dim_model_base")
        problems = [f"{name} must be positive (got {getattr(self, name)})" for name in sizes if getattr(self, name) <= 0]
        # scales and epsilons: a negative or non-finite one trains (or divides) into NaN far from its cause
        floats = ("rope_factor", "norm_eps", "scale_emb", "scale_depth", "init_std")
        problems += [f"{name} must be a finite number > 0 (got {getattr(self, name)})" for name in floats
                     if not 0 < getattr(self, name) < math.inf]
        if not 0 <= self.aux_loss_coef < math.inf:
            problems.append(f"aux_loss_coef must be a finite number >= 0 (got {self.aux_loss_coef})")
        if not problems:
            if self.n_embd % self.n_head:
                problems.append(f"n_head={self.n_head} does not divide n_embd={self.n_embd}")
            elif (self.n_embd // self.n_head) % 2:
                problems.append(f"head_dim={self.n_embd // self.n_head} must be even for RoPE")
            if self.n_head % self.n_kv_head:
                problems.append(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"rope_scaling={self.rope_scaling!r} must be one of {', '.join(ROPE_SCALINGS)}")
        elif self.rope_scaling != "none" and self.rope_factor < 1:   # < 1 would shrink the context
            problems.append(f"rope_factor={self.rope_factor} must be >= 1 with rope_scaling={self.rope_scaling}")
        elif self.rope_scaling == "dynamic" and self.n_embd // self.n_head <= 2:   # the NTK exponent hd/(hd-2)
            problems.append("rope_scaling=dynamic needs head_dim > 2")
        if not 1 < self.rope_theta < math.inf:
            problems.append(f"rope_theta={self.rope_theta} must be a finite number > 1")
        if self.n_experts and not 0 < self.top_k <= self.n_experts:
            problems.append(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if problems:
            raise ValueError("invalid MiniCPMConfig: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    # The three muP multipliers (§3.1, Table 7); all 1 under the standard parameterisation.
    @property
    def width_mult(self):      # m
        return self.n_embd / self.dim_model_base if self.mup else 1.0

    @property
    def emb_mult(self):
        return self.scale_emb if self.mup else 1.0

    @property
    def residual_mult(self):
        return self.scale_depth / math.sqrt(self.n_layer) if self.mup else 1.0


# One line of help per field, for the scripts that expose the config as flags (train.py).
CONFIG_HELP = dict(
    vocab_size="vocabulary size (train.py: the dataset's)", n_layer="decoder layers", n_embd="model width d",
    n_head="query heads", n_kv_head="key/value heads (< n_head: grouped-query attention)", ffn_dim="SwiGLU inner width",
    block_size="longest sequence the model accepts (dynamic rope_scaling: where NTK scaling starts)",
    rope_theta="RoPE base (§7.2 ABF: raise it to extend the context)",
    rope_scaling="none, linear (positions / rope_factor) or dynamic (NTK: the base grows past block_size)",
    rope_factor="the factor of --rope_scaling", norm_eps="RMSNorm epsilon",
    mup="muP scalings, init and lr groups (false: standard parameterisation)",
    scale_emb="muP embedding multiplier (§3.1: 12)", scale_depth="muP residual multiplier (§3.1: 1.4)",
    dim_model_base="muP base width: m = n_embd / dim_model_base (256)",
    init_std="init std (matrices: init_std / sqrt(m) under muP)", tie_word_embeddings="share the input embedding and the output head",
    n_experts="MoE experts per layer (0: dense)", top_k="MoE experts per token", aux_loss_coef="MoE load-balancing loss weight (§7.3: 0.01)")


def _preset(n_layer, d, n_head, n_kv_head, vocab, block_size=4096, **kw):
    return dict(n_layer=n_layer, n_embd=d, n_head=n_head, n_kv_head=n_kv_head, ffn_dim=d * 5 // 2,
                vocab_size=vocab, block_size=block_size, **kw)


MINICPM_VOCAB_2B, MINICPM_VOCAB_1B = 122_753, 73_440     # paper Table 2
PRESETS = {
    # CPU demo: learns visibly in a few minutes on 2 cores (GQA, so every code path is exercised).
    "tiny": _preset(4, 128, 4, 2, 4096, block_size=1024),
    # Wind-tunnel shapes, Appendix A.3 Table 8 (head dim 64, ffn 2.5 d). The paper does not give
    # their vocabulary; we use MiniCPM-2.4B's (train.py replaces it with the dataset's).
    "wt-9m": _preset(8, 320, 5, 5, MINICPM_VOCAB_2B),
    "wt-30m": _preset(12, 512, 8, 8, MINICPM_VOCAB_2B),
    "wt-70m": _preset(14, 640, 10, 10, MINICPM_VOCAB_2B),
    "wt-0.1b": _preset(16, 768, 12, 12, MINICPM_VOCAB_2B),
    "wt-0.17b": _preset(18, 896, 14, 14, MINICPM_VOCAB_2B),
    "wt-0.2b": _preset(20, 1024, 16, 16, MINICPM_VOCAB_2B),
    "wt-0.5b": _preset(24, 1344, 21, 21, MINICPM_VOCAB_2B),
    # Table 2.
    "minicpm-1.2b": _preset(52, 1536, 24, 8, MINICPM_VOCAB_1B),
    "minicpm-2.4b": _preset(40, 2304, 36, 36, MINICPM_VOCAB_2B),
    # §7.3: the 2.4B with 8 experts per layer, top-2 (13.6B non-embedding, ~4B active per token).
    "minicpm-moe-8x2b": _preset(40, 2304, 36, 36, MINICPM_VOCAB_2B, n_experts=8, top_k=2),
}


def get_config(preset: str, **overrides) -> MiniCPMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return MiniCPMConfig(**{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in (at least) fp32 whatever the input dtype, as the released code does
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_tables(head_dim, positions, theta, dtype=torch.float32, position_scale=1.0):
    """cos, sin [T, head_dim] in fp32 (fp64 for a float64 model) for the "rotate half" layout."""
    # frequency i is used by dimensions i and i + head_dim/2, as in the released checkpoints (the
    # interleaved layout would need q_proj/k_proj's rows permuted to load them)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = torch.outer(positions.to(dtype) / position_scale, inv_freq)   # [T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)               # [T, head_dim]
    return angles.cos(), angles.sin()


def rope_base(cfg, seq_len):
    """(RoPE base, position divisor) for a sequence of seq_len tokens, as the released code computes them."""
    # linear: positions / factor, the context stretched evenly (Position Interpolation). dynamic (NTK-
    # aware): past max_position_embeddings (our block_size) the base grows with the current length,
    # base * (factor * len / max_pos - (factor - 1)) ** (hd / (hd - 2)), so the lowest frequency
    # stretches over the longer sequence while the highest barely moves (§7.2 uses NTK scaling for 128K)
    if cfg.rope_scaling == "linear":
        return cfg.rope_theta, cfg.rope_factor
    if cfg.rope_scaling == "dynamic" and seq_len > cfg.block_size:
        hd, f = cfg.head_dim, cfg.rope_factor
        return cfg.rope_theta * (f * seq_len / cfg.block_size - (f - 1)) ** (hd / (hd - 2)), 1.0
    return cfg.rope_theta, 1.0


def apply_rope(x, cos, sin):  # x [B, H, T, hd]; rotation done in the tables' precision
    x32 = x.to(cos.dtype)
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding: prefill once, then one token at a time."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        # preallocated once: no torch.cat per token; n_kv_head, not n_head, is what GQA saves in memory
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0   # positions already stored: the RoPE position of the next token

    def update(self, layer, k, v):  # k, v [B, n_kv, T, hd] -> all keys/values so far
        end = self.pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions; decoding past it needs a bigger cache")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention(q, k, v, impl):
    """Causal attention, q [B, Hq, Tq, hd], k/v [B, Hkv, Tk, hd] with Tq <= Tk, scale 1/sqrt(hd)."""
    # the queries are the last Tq positions (bottom-right aligned mask, as when decoding with a cache)
    Tq, Tk = q.shape[2], k.shape[2]
    if impl == "triton":
        import kernels
        kernels.check_supported(q)
        return kernels.flash_attention(q, k, v, causal=True)
    if impl == "sdpa":
        if Tq == Tk:  # SDPA's is_causal aligns top-left, which is right only for Tq == Tk
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if Tq == 1:   # one new token (decoding): it sees every cached key, no mask needed
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # eager: the textbook computation, softmax in fp32
    groups = q.shape[1] // k.shape[1]   # GQA: each key/value head serves `groups` query heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32))  # [B, Hq, Tq, Tk]
    scores = scores / math.sqrt(q.shape[-1])
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, impl="sdpa"):  # x [B, T, d]
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)   # [B, Hq, T, hd]
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)   # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attention(q, k, v, impl)                             # [B, Hq, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # SwiGLU: down(silu(gate(x)) * up(x))
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.residual_mult = cfg.residual_mult
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MoE(cfg.n_embd, cfg.ffn_dim, cfg.n_experts, cfg.top_k) if cfg.n_experts else MLP(cfg)

    def forward(self, h, cos, sin, cache=None, layer=0, impl="sdpa"):
        # §3.1 muP: each residual branch scaled by scale_depth / sqrt(L)
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, layer, impl) * self.residual_mult
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_mult


class Decoder(nn.Module):  # the released checkpoints' "model." prefix
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


# ----------------------------------------------------------------------------- the model

class MiniCPM(nn.Module):
    """The model. `config` is the architecture (what a checkpoint saves); the rest is runtime."""
    # attn_impl and grad_ckpt are the running script's choices (plain attributes it may change):
    #   attn_impl  "sdpa" (F.scaled_dot_product_attention), "eager" (the textbook softmax), or
    #              "triton" (kernels.py, CUDA only)
    #   grad_ckpt  activation checkpointing per layer: recompute each layer in the backward
    # After a forward of an MoE model, `moe_stats` holds {"aux_loss": the unweighted load-balancing
    # loss (a tensor with its graph), "expert_load": each expert's share of the routed tokens, averaged
    # over layers}. forward's loss is the language-model loss alone: a trainer adds
    # aux_loss_coef * aux_loss to what it backpropagates (train.py), evaluation never sees it.

    def __init__(self, config: MiniCPMConfig, attn_impl="sdpa", grad_ckpt=False):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attention implementation {attn_impl!r} is not one of {', '.join(ATTN_IMPLS)}")
        self.config, self.attn_impl, self.grad_ckpt = config, attn_impl, grad_ckpt
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:   # one [V, d] matrix, as in every released MiniCPM
            self.lm_head.weight = self.model.embed_tokens.weight
        self.moe_stats = None
        # on the meta device (plans, loading a released checkpoint) there is nothing to initialise
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- muP initialisation and learning-rate groups (§3.1, Table 7) --

    def _is_embedding(self, name):
        # the head too: tied, it is the embedding; untied, muP treats it like the embedding (init and lr)
        return name in ("model.embed_tokens.weight", "lm_head.weight")

    @torch.no_grad()
    def init_weights(self):
        """muP init: matrices N(0, init_std / sqrt(m)), the embedding N(0, init_std), norm gains 1."""
        # the embedding is input-like: the paper leaves its class open, standard muP treats it as a vector.
        # Standard parameterisation (mup=False): every weight N(0, init_std), gains 1.
        cfg = self.config
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)                                   # RMSNorm gains
            elif self._is_embedding(name) or not cfg.mup:
                p.normal_(0.0, cfg.init_std)
            else:
                p.normal_(0.0, cfg.init_std / math.sqrt(cfg.width_mult))

    def param_groups(self, lr, weight_decay):
        """AdamW groups with the muP lr rule: 2-D matrices lr / m, the embedding and the norm gains lr."""
        # weight decay on matrices and the embedding, none on gains (the paper is silent; a common choice).
        # Each group carries `lr_scale`, so a schedule sets group["lr"] = lr(step) * lr_scale.
        m = self.config.width_mult   # 1 under the standard parameterisation: one lr for all
        matrices, embedding, vectors = [], [], []
        for name, p in self.named_parameters():   # a tied head is listed once, with the embedding
            (vectors if p.dim() < 2 else embedding if self._is_embedding(name) else matrices).append(p)
        groups = [("matrices", matrices, 1.0 / m, weight_decay),
                  ("embedding", embedding, 1.0, weight_decay),
                  ("vectors", vectors, 1.0, 0.0)]
        return [dict(name=n, params=ps, lr=lr * s, lr_scale=s, weight_decay=wd)
                for n, ps, s, wd in groups if ps]

    # -- forward --

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        # on the weights' device and in their dtype unless told otherwise: cached k, v come from them
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size,
                       device or w.device, dtype or w.dtype)

    def rope(self, device, start, T):
        """cos, sin of positions start .. start+T-1 for a sequence now start+T tokens long."""
        # fp32 (fp64 for a float64 model) even under bf16: bf16 angles lose whole radians at position 4000.
        # Up to block_size the tables are made once per device and dtype, so decoding a token costs no
        # trigonometry; past it (dynamic NTK) the base depends on the length, so they are made per call.
        # With a KV cache that means what the released code does: the new token is rotated with the
        # base of the current length, the cached keys keep the rotation they were stored with.
        cfg, dtype = self.config, torch.promote_types(self.lm_head.weight.dtype, torch.float32)
        if start + T > cfg.block_size:
            theta, scale = rope_base(cfg, start + T)
            return rope_tables(cfg.head_dim, torch.arange(start, start + T, device=device), theta, dtype, scale)
        key = (device, dtype, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.block_size)
        if getattr(self, "_rope", (None,))[0] != key:   # first call, or the RoPE settings were changed
            theta, scale = rope_base(cfg, cfg.block_size)
            self._rope = (key, rope_tables(cfg.head_dim, torch.arange(cfg.block_size, device=device), theta, dtype, scale))
        cos, sin = self._rope[1]
        return cos[start:start + T], sin[start:start + T]

    def forward(self, idx, targets=None, cache=None):
        """idx [B, T] token ids -> logits [B, T, V] and the mean cross-entropy against targets, or None."""
        # targets of -100 are ignored (F.cross_entropy's convention for padding); with a cache, idx continues the cached text
        cfg = self.config
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        # an out-of-range id would otherwise be a CUDA device-side assert far from its cause; skipped
        # under torch.compile, where the data-dependent check would break the graph
        if not torch.compiler.is_compiling() and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); got min {int(idx.min())}, "
                             f"max {int(idx.max())}: was the data tokenized for another vocabulary?")
        if start + T > cfg.block_size and cfg.rope_scaling != "dynamic":   # dynamic NTK: any length
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={cfg.block_size}")
        cos, sin = self.rope(idx.device, start, T)
        h = self.model.embed_tokens(idx) * cfg.emb_mult                     # [B, T, d]  §3.1
        for i, layer in enumerate(self.model.layers):
            if self.grad_ckpt and self.training:   # keep only h; recompute the layer in the backward
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, None, i, self.attn_impl, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, i, self.attn_impl)
        h = self.model.norm(h)
        logits = self.lm_head(h / cfg.width_mult)                           # [B, T, V]  §3.1
        if cache is not None:
            cache.pos += T
        if cfg.n_experts:   # §7.3: the balancing loss averaged over layers, for the trainer to add (train.py)
            mlps = [layer.mlp for layer in self.model.layers]
            self.moe_stats = dict(aux_loss=torch.stack([m.aux_loss for m in mlps]).mean(),
                                  expert_load=torch.stack([m.expert_load for m in mlps]).mean(0))
        loss = None
        if targets is not None:
            # in (at least) fp32: a bf16 log-softmax over 100K+ tokens loses the small probabilities the
            # loss is about; a float64 model keeps float64 (the reference tests compare at 1e-12)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    # -- accounting --

    def num_params(self, non_embedding=True, active=False):
        """Parameters, tied weights once; non_embedding=True gives the N of the scaling-law fits."""
        # non_embedding drops the embedding (and an untied head); active counts top_k of the n_experts
        # experts, the parameters one token uses (the MoE's "active" size, §7.3)
        cfg = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel() * (1 if cfg.tie_word_embeddings else 2)
        if active and cfg.n_experts:
            n -= cfg.n_layer * (cfg.n_experts - cfg.top_k) * 3 * cfg.n_embd * cfg.ffn_dim   # 3 matrices per expert
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per active matrix parameter plus attention."""
        # 6 = forward 2 + backward 4, per multiply-add of each matrix; attention scores and weighted sum
        # add 12 * L * d_attn * T (the PaLM convention: the causal half is not subtracted)
        cfg = self.config
        matrix_params = self.num_params(non_embedding=True, active=True) - (2 * cfg.n_layer + 1) * cfg.n_embd  # minus norm gains
        matrix_params += cfg.vocab_size * cfg.n_embd   # the head's V x d matmul (the embedding lookup is free)
        return 6 * matrix_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
