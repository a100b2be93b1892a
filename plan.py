"""What a training run costs: before it runs (memory per process under DDP or FSDP, FLOPs per token)
and measured (train.py --bench: tokens/s against the hardware peak, model FLOP utilisation, MFU).

    python plan.py      # every preset: parameters, GFLOP per token, GPU memory, 80 GB GPUs it needs
"""
import sys
import time

import torch

import cli
from minicpm import PRESETS, MiniCPM, get_config

# Dense bf16 tensor-core peaks with fp32 accumulation, without 2:4 sparsity (datasheets print the
# sparse figure, twice these, first), for MFU on CUDA. The first name contained in the device name
# wins, so the variants come before their family ("H100 PCIe" before "H100", "A100" before "A10").
# Sources: NVIDIA's datasheets for H100/H200 (SXM; PCIe and NVL variants listed apart), A100, A10,
# L40S, L40, L4, RTX 6000 Ada, RTX A6000; the Ada whitepaper (RTX 4090) and the Ampere GA102
# whitepaper (RTX 3090); NVIDIA's B200 (HGX) figures; AMD's MI300X datasheet. A GPU not listed:
# --peak_tflops.
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
    "H200 NVL": 835e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,   # AWS's A10 variant: no datasheet of its own, the A10's figure (--peak_tflops if you know better)
    "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 6000 Ada": 364e12, "RTX A6000": 155e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "MI300X": 1307e12,
}
# An 80 GB GPU's usable share: CUDA's context, NCCL's buffers and the allocator's fragmentation take
# a few GiB (the same margin keeps the plan honest for other sizes)
GPU_USABLE = 0.9


def train_memory(model, seq_len=4096, micro_batch=1, grad_ckpt=False, fsdp_world=0):
    """Bytes one GPU needs to train with AdamW and bf16, by part: under DDP, or FSDP over fsdp_world GPUs."""
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
    if fsdp_world:   # FSDP: 1/N of the fp32 state; in full only the layers being gathered (parallel.shard)
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        root = n - cfg.n_layer * layer   # the root unit: embedding (+ untied head), final norm
        parts.update({k: parts[k] / fsdp_world for k in ("weights", "grads", "adam")})
        # bf16 gathers of the root and of two layers (the one running, the next prefetched), and one
        # layer's unsharded fp32 gradient before its reduce-scatter
        parts["bf16_copies"] = 2 * (root + 2 * layer) + 4 * (root + layer)
    parts["total"] = sum(parts.values())
    return parts


def check_fits(cfg, batch_size, seq_len, device, shards=1):
    """UsageError when a model and micro-batch cannot fit the device at all: said before a run folder is written."""
    # a lower bound: 16 bytes a parameter (fp32 weight, grad, Adam's m and v; 1/shards of them under
    # FSDP), three fp32 [B, T, V] tensors at once in the backward (the loss's log-softmax, its gradient,
    # the logits' gradient) and the int64 windows of the batch (data.get_batch: the index and the ids)
    B, T, V, d, kv = batch_size, seq_len, cfg.vocab_size, cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    per_layer = d * (2 * d + 2 * kv) + 3 * d * cfg.ffn_dim * max(1, cfg.n_experts)   # q, o, k, v; gate, up, down
    params = cfg.n_layer * per_layer + V * d * (1 if cfg.tie_word_embeddings else 2)   # counted, not built: 10^7 layers
    sharded = f", over {shards} FSDP shards" if shards > 1 else ""
    cli.check_memory(16 * params // shards + 3 * B * T * V * 4 + 2 * B * (T + 1) * 8, device,
                     f"{params:,} parameters with AdamW (16 bytes each{sharded}) and, for --batch_size {B} x --seq_len "
                     f"{T}, the logits (3 x {B} x {T} x vocab {V} x 4 bytes)",
                     "lower --batch_size (raise --grad_accum to keep the tokens per step) or the model's size")


def describe(model, *, name, batch_size, seq_len, grad_accum, max_steps, world, dtype, schedule, grad_ckpt=False,
             fsdp=False):
    """The plan train.py prints before it trains (and --dry_run prints instead of training)."""
    mem = train_memory(model, seq_len=seq_len, micro_batch=batch_size, grad_ckpt=grad_ckpt, fsdp_world=fsdp and world)
    fpt = model.flops_per_token(seq_len)   # training FLOPs (forward + backward), see minicpm.py
    tokens_per_step = batch_size * seq_len * grad_accum * world   # the global batch the schedule sees
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    return "\n".join([
        f"model      {name}: {model.num_params(non_embedding=False):,} parameters, "
        f"{model.num_params():,} non-embedding, vocab {model.config.vocab_size}",
        f"batch      {batch_size} x {seq_len} tokens x {grad_accum} accumulation x {world} processes "
        f"= {tokens_per_step:,} tokens per step; {max_steps} steps = {tokens_per_step * max_steps:,} tokens",
        f"compute    {fpt / 1e9:.3f} GFLOP per token, {fpt * tokens_per_step / 1e12:.2f} TFLOP per step",
        f"memory     per process ({f'FSDP over {world}' if fsdp else 'DDP'}): weights {gib(mem['weights'])}, "
        f"grads {gib(mem['grads'])}, Adam {gib(mem['adam'])}, {'gathered layers' if fsdp else 'bf16 copies'} "
        f"{gib(mem['bf16_copies'])}, activations {gib(mem['activations'])} = {gib(mem['total'])}",
        f"schedule   {schedule}; compute dtype {str(dtype).split('.')[-1]}",
    ])


def known_peak(device, peak_tflops=0.0):
    """The peak FLOP/s: --peak_tflops when given, else this CUDA GPU's from PEAK_FLOPS, else None."""
    if peak_tflops > 0:   # the user's figure wins, on any device
        return peak_tflops * 1e12
    if not device.startswith("cuda"):   # a CPU's peak depends on its cores and clock: measured instead
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)   # "NVIDIA H100 80GB HBM3" contains "H100"


def peak_flops(device, dtype, peak_tflops=0.0):
    """-> (FLOP/s, what it is): --peak_tflops, the datasheet peak of a known GPU, else a measured matmul rate."""
    # measured: 1024 x 1024 matmuls in the training dtype for about one second, the practical ceiling
    # of a CPU run (a CPU's datasheet peak is seldom known to torch, and seldom reachable)
    if peak_tflops > 0:
        return peak_tflops * 1e12, "--peak_tflops"
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


def gpus_needed(model, seq_len, fsdp, gpu_gib=80):
    """The fewest gpu_gib GPUs (1, 2, 4, ... 64) that train the model (one sequence each), or None."""
    # DDP cannot spread a model: one GPU that fits, or none; FSDP divides the fp32 state by the count
    for world in [1] if not fsdp else [1, 2, 4, 8, 16, 32, 64]:
        if train_memory(model, seq_len=seq_len, fsdp_world=world if fsdp else 0)["total"] <= GPU_USABLE * gpu_gib * 2**30:
            return world
    return None


def throughput(*, name, seconds_per_step, tokens_per_step, flops_per_token, device, dtype, world, peak_tflops=0.0,
               verbose=True):
    """train.py --bench's figures from the measured seconds per step: tokens/s, model FLOP/s against the
    peak (MFU), peak memory on CUDA; printed as one line and returned as a dict."""
    # the peak is the GPU's datasheet value or, on a CPU, this machine's measured matmul throughput
    tok_s = tokens_per_step / seconds_per_step
    flops = tok_s * flops_per_token / world   # per process: each GPU's share of the work
    peak, what = peak_flops(device, dtype, peak_tflops)
    cuda = device.startswith("cuda")
    result = dict(preset=name, tokens_per_s=tok_s, tflops_per_process=flops / 1e12, peak_tflops=peak / 1e12,
                  peak_what=what, mfu=flops / peak, dtype=str(dtype).split(".")[-1],
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    if verbose:
        print(f"bench {name}: {tok_s:,.0f} tokens/s, {flops / 1e12:.3f} TFLOP/s per process = "
              f"{100 * flops / peak:.1f}% of {peak / 1e12:.3f} TFLOP/s ({what}), dtype {result['dtype']}"
              + (f", peak memory {result['peak_memory_gib']:.1f} GiB" if cuda else ""))
    return result


def preset_table(seq_len=4096):
    """Every preset's size, compute and memory as an aligned text table (4096: the paper's context)."""
    rows = [("preset", "layers", "d", "heads/kv", "ffn", "vocab", "total", "non-emb", "GFLOP/token", "DDP GiB",
             "FSDP/8 GiB", "80GB GPUs DDP", "FSDP")]
    for name in PRESETS:
        cfg = get_config(name)
        with torch.device("meta"):       # no memory is allocated, so the 13.6B MoE builds in seconds
            model = MiniCPM(cfg)
        mem = train_memory(model, seq_len=seq_len)["total"] / 2**30
        mem8 = train_memory(model, seq_len=seq_len, fsdp_world=8)["total"] / 2**30
        need = [gpus_needed(model, seq_len, fsdp) or "-" for fsdp in (False, True)]
        rows.append((name, cfg.n_layer, cfg.n_embd, f"{cfg.n_head}/{cfg.n_kv_head}", cfg.ffn_dim, cfg.vocab_size,
                     f"{model.num_params(non_embedding=False):,}", f"{model.num_params():,}",
                     f"{model.flops_per_token(seq_len) / 1e9:.3f}", f"{mem:.1f}", f"{mem8:.1f}", *need))
    # right-aligned columns as wide as their widest cell, so the numbers line up by digit
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows)


if __name__ == "__main__":
    if len(sys.argv) > 1:   # no flags: a run's own plan comes from train.py, with all of its flags
        sys.exit("usage: python plan.py   (prints the preset table; a run's own plan: python train.py --dry_run)")
    print(preset_table())
    print("\nGFLOP/token: training (6 per active matrix parameter + attention at 4096 tokens).\n"
          "DDP GiB: one GPU under DDP, AdamW, bf16 autocast: fp32 weights, grads, Adam moments, bf16 weight "
          "copies and the activations of one 4096-token sequence.\nFSDP/8 GiB: one of 8 GPUs under --fsdp: "
          "1/8 of the fp32 state, the gathered bf16 layers, the same activations.\n80GB GPUs: the fewest that "
          f"train the preset (one sequence each, {GPU_USABLE:.0%} of 80 GiB usable); -: none under DDP.")
