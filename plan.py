"""What a training run costs before it runs: memory per process, FLOPs per token, and the hardware
peak that model FLOP utilisation (MFU) is measured against. train.py --dry_run and --bench use it.

    python plan.py      # every preset: parameters, training GFLOP per token, GPU memory under DDP
"""
import sys
import time

import torch

from minicpm import PRESETS, MiniCPM, get_config

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), for MFU on CUDA.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def train_memory(model, seq_len=4096, micro_batch=1, grad_ckpt=False):
    """Bytes one GPU needs to train under DDP with AdamW and bf16 autocast, by part."""
    # DDP: every rank holds a full replica. Parts: fp32 weights, grads and two Adam moments, autocast's
    # bf16 weight copies, and the activations autograd keeps (flash attention: nothing T x T)
    cfg = model.config
    n = model.num_params(non_embedding=False)   # all parameters: the embedding is trained too
    d, kv, f, V = cfg.n_embd, cfg.n_kv_head * cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    f_active = f * (cfg.top_k if cfg.n_experts else 1)   # an MoE token goes through top_k experts' MLPs
    # per token per layer: fp32 residual inputs of both norms (2 x 4d), bf16 norm outputs (2 x 2d),
    # q, k, v (2(d + 2kv)), attention output (2d), gate, up, silu(gate), product (4 x 2f)
    per_layer = 8 * d + 4 * d + 2 * (d + 2 * kv) + 2 * d + 8 * f_active
    # with checkpointing only each layer's input (fp32) stays, plus one layer's worth being recomputed
    layers = cfg.n_layer * (4 * d) + per_layer if grad_ckpt else cfg.n_layer * per_layer
    head = 6 * d + 6 * V          # final norm; bf16 logits + their fp32 copy for the loss
    activations = micro_batch * seq_len * (layers + head)
    # bytes per parameter: fp32 weight 4, fp32 grad 4, Adam's m and v 4 + 4, autocast's bf16 copy 2
    parts = dict(weights=4 * n, grads=4 * n, adam=8 * n, bf16_copies=2 * n, activations=activations)
    parts["total"] = sum(parts.values())
    return parts


def describe(model, cfg, world, dtype, schedule):
    """The plan train.py prints before it trains (and --dry_run prints instead of training)."""
    # cfg is train.py's config: only preset, batch_size, seq_len, grad_accum, max_steps, grad_ckpt are read
    name, batch_size, seq_len, grad_accum, max_steps = cfg.preset, cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.max_steps
    mem = train_memory(model, seq_len=seq_len, micro_batch=batch_size, grad_ckpt=cfg.grad_ckpt)
    fpt = model.flops_per_token(seq_len)   # training FLOPs (forward + backward), see minicpm.py
    tokens_per_step = batch_size * seq_len * grad_accum * world   # the global batch the schedule sees
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    return "\n".join([
        f"model      {name}: {model.num_params(non_embedding=False):,} parameters, "
        f"{model.num_params():,} non-embedding, vocab {model.config.vocab_size}",
        f"batch      {batch_size} x {seq_len} tokens x {grad_accum} accumulation x {world} processes "
        f"= {tokens_per_step:,} tokens per step; {max_steps} steps = {tokens_per_step * max_steps:,} tokens",
        f"compute    {fpt / 1e9:.3f} GFLOP per token, {fpt * tokens_per_step / 1e12:.2f} TFLOP per step",
        f"memory     per process: weights {gib(mem['weights'])}, grads {gib(mem['grads'])}, Adam {gib(mem['adam'])}, "
        f"bf16 copies {gib(mem['bf16_copies'])}, activations {gib(mem['activations'])} = {gib(mem['total'])}",
        f"schedule   {schedule}; compute dtype {str(dtype).split('.')[-1]}",
    ])


def known_peak(device):
    """The datasheet peak FLOP/s of this CUDA GPU when it is in PEAK_FLOPS, else None."""
    if not device.startswith("cuda"):   # a CPU's peak depends on its cores and clock: measured instead
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)   # "NVIDIA H100 80GB HBM3" contains "H100"


def peak_flops(device, dtype):
    """-> (FLOP/s, what it is): the datasheet peak of a known GPU, else a measured matmul rate."""
    # measured: 1024 x 1024 matmuls in the training dtype for about one second, the practical ceiling
    # of a CPU run (a CPU's datasheet peak is seldom known to torch, and seldom reachable)
    if known_peak(device):
        return known_peak(device), f"{torch.cuda.get_device_name(device)} bf16 peak"
    n, reps = 1024, 0
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b   # warm-up: the first call pays for thread pools and kernel selection
    t = time.time()
    while time.time() - t < 1.0:
        a @ b
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()   # CUDA matmuls are queued: wait for them before reading the clock
    return 2 * n**3 * reps / (time.time() - t), "measured matmul"


def preset_table(seq_len=4096):
    """Every preset's size, compute and memory as an aligned text table (4096: the paper's context)."""
    rows = [("preset", "layers", "d", "heads/kv", "ffn", "vocab", "total", "non-emb", "GFLOP/token", "GPU GiB")]
    for name in PRESETS:
        cfg = get_config(name)
        with torch.device("meta"):       # no memory is allocated, so the 13.6B MoE builds in seconds
            model = MiniCPM(cfg)
        mem = train_memory(model, seq_len=seq_len)["total"] / 2**30
        rows.append((name, cfg.n_layer, cfg.n_embd, f"{cfg.n_head}/{cfg.n_kv_head}", cfg.ffn_dim, cfg.vocab_size,
                     f"{model.num_params(non_embedding=False):,}", f"{model.num_params():,}",
                     f"{model.flops_per_token(seq_len) / 1e9:.3f}", f"{mem:.1f}"))
    # right-aligned columns as wide as their widest cell, so the numbers line up by digit
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows)


if __name__ == "__main__":
    if len(sys.argv) > 1:   # no flags: a run's own plan comes from train.py, with all of its flags
        sys.exit("usage: python plan.py   (prints the preset table; a run's own plan: python train.py --dry_run)")
    print(preset_table())
    print("\nGFLOP/token: training (6 per active matrix parameter + attention at 4096 tokens).\n"
          "GPU GiB: one GPU under DDP, AdamW, bf16 autocast: fp32 weights, grads, Adam moments, bf16 weight "
          "copies and the activations of one 4096-token sequence.")
