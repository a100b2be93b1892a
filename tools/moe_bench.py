"""Forward + backward time of moe.py's MoE layer against a dense SwiGLU MLP of equal FLOPs, on the CPU.

MiniCPM-MoE (§7.3) routes each token to top_k of n experts; a dense MLP with ffn_dim = top_k * ffn
does the same matmul work per token, so the ratio of the two times is the price of routing and dispatch.

Run:   python tools/moe_bench.py [--d 512] [--ffn 1280] [--n_experts 8] [--top_k 2] [--tokens 4096]
                                 [--repeats 10] [--threads 1]
Test:  python -m pytest -q tests/test_moe.py -k bench
"""
import pathlib
import statistics
import sys
import time

import torch
import torch.nn as nn

# the repo's flat scripts are not a package: the repo root on the path, so this runs from any folder
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import cli  # noqa: E402  (importable once the root is on the path)
from moe import Expert, MoE  # noqa: E402


def _fwd_bwd_seconds(layer, x):
    """Wall time of one forward + backward (of the sum of the outputs, plus the aux loss if any)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    y = layer(x)
    loss = y.sum() + (layer.aux_loss if isinstance(layer, MoE) else 0)
    loss.backward()
    return time.perf_counter() - t0


def bench(d=512, ffn=1280, n_experts=8, top_k=2, tokens=4096, repeats=10, warmup=3, seed=0):
    """MoE layer against a dense SwiGLU with ffn_dim = top_k * ffn: the same matmul FLOPs per token
    (the router's d x n is extra, and small), so the ratio measures the cost of routing and dispatch."""
    torch.manual_seed(seed)
    moe = MoE(d, ffn, n_experts, top_k)
    dense = Expert(d, top_k * ffn)      # a SwiGLU MLP, the same computation as minicpm.MLP
    for layer in (moe, dense):
        for p in layer.parameters():
            nn.init.normal_(p, std=d ** -0.5)
    x = torch.randn(tokens, 1, d).requires_grad_()     # [B, T, d] with the tokens as the batch
    # The two are timed in alternation, so a change in the machine's load (other processes) hits
    # both alike; the medians ignore the odd slow repeat.
    times = {"dense": [], "moe": []}
    for i in range(warmup + repeats):
        for name, layer in (("dense", dense), ("moe", moe)):
            t = _fwd_bwd_seconds(layer, x)
            if i >= warmup:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    print(f"{tokens} tokens, d {d}, fp32, {torch.get_num_threads()} CPU threads: forward + backward, "
          f"{repeats} repeats after {warmup} warm-up")
    labels = {"dense": f"dense SwiGLU, ffn {top_k * ffn}", "moe": f"MoE {n_experts}x top-{top_k}, ffn {ffn}"}
    for name, label in labels.items():
        print(f"  {label:28s} median {med[name] * 1e3:8.1f} ms   best {best[name] * 1e3:8.1f} ms")
    print(f"  {'ratio MoE / dense':28s} median {med['moe'] / med['dense']:8.2f}      best {best['moe'] / best['dense']:8.2f}")
    # On a shared machine other processes only ever add time: the best run is the steadier figure.
    print(f"  expert load of the last step: {[round(v, 3) for v in moe.expert_load.tolist()]}")
    return med["moe"], med["dense"]


def from_flags(argv):
    """The layer sizes as flags -> bench(); bad sizes raise cli.UsageError before anything runs."""
    ap = cli.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sizes = dict(d=(512, "model width"), ffn=(1280, "each expert's hidden size (the dense MLP gets top_k x ffn)"),
                 n_experts=(8, "experts per layer"), top_k=(2, "experts per token"),
                 tokens=(4096, "tokens per forward"), repeats=(10, "timed repeats, after 3 warm-up ones"))
    for name, (default, text) in sizes.items():
        ap.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default: {default})")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    cli.check([*((getattr(args, n) < 1, f"--{n} must be at least 1") for n in sizes),
               (args.top_k > args.n_experts, f"--top_k {args.top_k} is more than --n_experts {args.n_experts}"),
               (args.threads < 0, "--threads must be 0 (torch's default) or more")])
    if args.threads:
        # On a machine shared with other jobs, one thread per process gives steadier times: with
        # several, each of the MoE's many smaller ops waits for its slowest (descheduled) thread.
        torch.set_num_threads(args.threads)
    bench(args.d, args.ffn, args.n_experts, args.top_k, args.tokens, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main("moe_bench.py", from_flags, None))
