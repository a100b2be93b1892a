"""Timing kernels.py's fused attention against PyTorch's SDPA (flash backend) and eager attention.

Needs a CUDA GPU. Run:  python tools/kernel_bench.py [--out DIR]   (or as part of python tools/gpu_report.py);
writes DIR/attention.csv and attention.png.
"""
import math
import os
import pathlib
import sys

import torch

# the repo's flat scripts are not a package: the repo root on the path, so this runs from any folder
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import cli  # noqa: E402  (importable once the root is on the path)
from atomic import atomic_write  # noqa: E402
from kernels import HAVE_TRITON, INTERPRET, flash_attention  # noqa: E402

# ----------------------------------------------------------------------------------------- benchmark
# FLOP convention (causal): the forward is two matmuls, Q K^T and P V, of 2*T*T*D flops per head each,
# of which causality keeps half: 4*B*H*T*T*D / 2. The backward is five such matmuls, 2.5x the forward,
# so forward+backward counts 3.5x. Every implementation is credited the same count, whatever it computes.
BENCH_SHAPES = {"36 heads": (36, 36), "24q/8kv heads": (24, 8)}   # MiniCPM-2B and MiniCPM-1B, head dim 64
BENCH_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
BENCH_TOKENS = 16384                                             # batch = tokens / T, so work grows with T


def _eager(q, k, v):
    """The textbook computation, as minicpm.py's 'eager': repeated K/V, fp32 softmax."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])   # [B, H, T, T]: what flash avoids
    mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v


def _sdpa_flash(q, k, v):
    # The bar to meet: PyTorch's own FlashAttention-2 kernel, forced, so SDPA cannot quietly fall
    # back to its math or memory-efficient backends and flatter the comparison.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if k.shape[1] != q.shape[1]:
            try:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:  # a flash backend without GQA: give it repeated K/V
                g = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _time_ms(fn, grads):
    from triton.testing import do_bench
    try:
        return do_bench(fn, grad_to_none=grads)  # grads reset each call, so .grad is not accumulated
    except torch.cuda.OutOfMemoryError:          # eager's T x T scores at long T: a gap in the plot
        torch.cuda.empty_cache()
        return float("nan")


def bench(out_dir):
    if not torch.cuda.is_available() or not HAVE_TRITON or INTERPRET:
        raise cli.UsageError("needs a CUDA GPU and triton, without TRITON_INTERPRET; run it on a machine with a GPU")
    import csv
    impls = {"triton": flash_attention, "sdpa-flash": _sdpa_flash, "eager": _eager}
    rows = []   # one dict per (shape, length, implementation, mode): the CSV's rows
    for shape, (hq, hkv) in BENCH_SHAPES.items():
        for T in BENCH_LENGTHS:
            B = max(1, BENCH_TOKENS // T)
            q, k, v = (torch.randn(B, h, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for h in (hq, hkv, hkv))
            do = torch.randn_like(q)   # one upstream gradient for every implementation
            fwd_flops = 4 * B * hq * T * T * 64 / 2
            ref = _sdpa_flash(q, k, v).float()   # a speed table is worthless if the kernel is wrong
            err = ((flash_attention(q, k, v).float() - ref).norm() / ref.norm()).item()
            for name, fn in impls.items():
                for mode, flops, call in (("fwd", fwd_flops, lambda: fn(q, k, v)),
                                          ("fwd+bwd", 3.5 * fwd_flops, lambda: fn(q, k, v).backward(do))):
                    ms = _time_ms(call, [q, k, v])
                    rows.append(dict(shape=shape, heads=hq, kv_heads=hkv, head_dim=64, batch=B, seq_len=T,
                                     impl=name, mode=mode, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2),
                                     triton_rel_err=f"{err:.1e}"))
                    print(*(f"{rows[-1][c]}" for c in ("shape", "seq_len", "impl", "mode", "ms", "tflops")), sep="\t")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, os.path.join(out_dir, "attention.png"))
    print(f"wrote {out_dir}/attention.csv and attention.png ({torch.cuda.get_device_name()})")
    return rows


def _plot(rows, path):
    # TFLOP/s (not ms) on the y axis: the work grows with T, so equal heights mean equal efficiency.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for shape in BENCH_SHAPES:
            for impl, style in (("triton", "o-"), ("sdpa-flash", "s--"), ("eager", "x:")):
                pts = [(r["seq_len"], r["tflops"]) for r in rows
                       if r["mode"] == mode and r["shape"] == shape and r["impl"] == impl]
                ax.plot(*zip(*pts), style, label=f"{impl}, {shape}")
        ax.set(xscale="log", xlabel="sequence length", title=f"causal attention {mode}, bf16, head dim 64")
        ax.set_xticks(BENCH_LENGTHS, [str(t) for t in BENCH_LENGTHS])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))   # never half a PNG


def from_flags(argv):
    """--out DIR -> bench(DIR); exit code 0. No GPU: UsageError, which cli.main prints as one line (exit 2)."""
    parser = cli.Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="bench", help="folder for attention.csv and attention.png")
    bench(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main("kernel_bench.py", from_flags, None))
