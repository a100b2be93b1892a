"""What train.py --noise_scale adds to a step, as a fraction of the step, on this machine.

The noise scale (noise.py) adds to each optimizer step one squared-norm pass over the gradients after
micro-batch 0 (noise.squared_norm) and a handful of scalar operations (NoiseScale.update); nothing
else: no forward, no backward, no communication (the big batch's norm is the clipping norm the step
computes anyway). So this times exactly those against the step they join: grad_accum forwards and
backwards of the model plus the AdamW update, in one process, interleaved round by round so that a
neighbour's burst on a shared machine hits both alike. Timing two whole runs instead (train.py
--bench with and without) measured +-15% noise on our shared 2-core machine, far above the figure.

Run:   python tools/noise_cost.py [--preset tiny] [--batch_size 16] [--seq_len 256] [--grad_accum 2] [--device cuda]
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

# the repo's flat scripts are not a package: the repo root on the path, so this runs from any folder
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import noise  # noqa: E402  (importable once the root is on the path)
from minicpm import MiniCPM, get_config  # noqa: E402


def sync(device):
    if device.startswith("cuda"):   # kernels run asynchronously: the clock must wait for them
        torch.cuda.synchronize()


def step_seconds(model, opt, batches):
    """One optimizer step as loop.step takes it: each micro-batch's loss / G backpropagated, AdamW."""
    t0 = time.perf_counter()
    for x in batches:   # x [B, T]: next-token loss on random tokens (the cost does not depend on them)
        (model(x[:, :-1], x[:, 1:])[1] / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sync(str(batches[0].device))
    return time.perf_counter() - t0


def noise_seconds(model, ema, b):
    """--noise_scale's additions to that step: micro-batch 0's squared norm and the EMA update."""
    t0 = time.perf_counter()
    small = noise.squared_norm([p.grad for p in model.parameters() if p.grad is not None])
    big = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) ** 2   # stands in: loop.step has it
    ema.update(small, big, b, 2 * b)
    sync(str(small.device))
    return time.perf_counter() - t0   # the stand-in's norm counted too: an upper bound


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = MiniCPM(get_config(args.preset)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema, steps, extras = noise.NoiseScale(), [], []
    for i in range(args.rounds):
        batches = [torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), device=args.device)
                   for _ in range(args.grad_accum)]
        steps.append(step_seconds(model, opt, batches))
        extras.append(noise_seconds(model, ema, args.batch_size * args.seq_len))   # on the step's gradients
        opt.zero_grad(set_to_none=True)
    # the first rounds warm the caches and the allocator: the median of the rest
    step, extra = statistics.median(steps[2:]), statistics.median(extras[2:])
    params = sum(q.numel() for q in model.parameters())
    print(f"{args.preset} ({params:,} parameters), {args.grad_accum} x {args.batch_size} x {args.seq_len} tokens: "
          f"step {1e3 * step:.1f} ms, --noise_scale adds {1e3 * extra:.2f} ms = {100 * extra / step:.2f}% of a step")


if __name__ == "__main__":
    main()
