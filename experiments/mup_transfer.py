"""muP learning-rate transfer across widths, and the coordinate check: the paper's Figure 3 (§3.1, §3.3).

§3 of MiniCPM is the "model wind tunnel": hyper-parameters tuned on a tiny model are reused on big
ones because of muP (Tensor Programs; §3.1), and the best lr stays near 0.01 over a 10x range of
sizes (Figure 3). This script sweeps the lr (a grid a factor 2 apart, constant after a short
warmup) at 4 widths spanning 8x (fixed depth and head dimension) under muP (`--mup true`) and under
the standard parameterisation (`--mup false`: one lr, init std 0.1 at every width), and reads the
validation loss of each run on one fixed validation set. The verdict is how far the best lr moves
across widths, in grid steps (a parabola through the best grid point and its neighbours, in log2 lr,
gives sub-grid resolution), for each seed.

The coordinate check (Yang et al. 2021, "Tensor Programs V", §D) looks inside: the RMS of the
embedding output, the attention and MLP outputs and the logits after a few Adam steps, against width.
Under muP they stay flat; under SP they grow with width, which is why SP's best lr falls with width.

    python experiments/mup_transfer.py             # widths 32-256, 7 lrs x 2 arms x 2 seeds, ~8 min on 2 cores
    python experiments/mup_transfer.py --quick     # widths 16-128, 3 lrs: under a minute (the smoke test)
    python experiments/mup_transfer.py --scale gpu # widths 256-2048, head dim 64, 8K-token batches (one GPU)

Writes to --out (default experiments/out): mup_transfer.png (loss against lr for muP and SP, and
the coordinate check), mup_transfer.csv (arm, width, seed, lr, val_loss, val_bpb), mup_coord_check.csv
(arm, width, activation, step, rms) and mup_transfer_runs/<run>/ (metrics.jsonl, log); prints the verdict table.
"""
import csv
import math
import os
import shutil
import sys
import time

import common
from common import eval_flags, pyplot, read_metrics, run_parallel

BASE_LR = 0.01   # §3.3: the lr found in the wind tunnel; every grid is BASE_LR * 2^k
# CPU default. Depth 2 and head dim 16 at every width, so only the width changes. EleutherAI's
# nanoGPT-mup transfer runs take ~120 steps of 8K tokens; we take 120 steps of 1.5K tokens (the
# widest run still costs ~30 s on one core). SP's best lr falls with width, so its grid sits one
# step lower. (Measured: muP's best is ~0.0025 at every width, second point of its grid; SP's best
# goes from ~0.008 at d 32 to ~0.0025 at d 256.)
FULL = dict(widths=(32, 64, 128, 256), head_dim=16, n_layer=2, seq_len=64, batch_size=24, steps=120, warmup=12,
            lr_exps=dict(mup=range(-3, 4), sp=range(-4, 3)), seed2_lrs=5, eval_tokens=65536, coord_steps=4)
QUICK = dict(FULL, widths=(16, 32, 64, 128), head_dim=8, n_layer=1, seq_len=32, batch_size=8, steps=24, warmup=4,
             lr_exps=dict(mup=range(-1, 2), sp=range(-1, 2)), seed2_lrs=3, eval_tokens=4096, coord_steps=3)
# One GPU: the EleutherAI nanoGPT-mup shapes (widths 256-2048, head dim 64, 8K-token batches),
# 4 layers; one run at a time (the GPU is the parallelism: --workers' default at --scale gpu).
# seed2_lrs=0: every seed sweeps the whole grid
GPU = dict(FULL, widths=(256, 512, 1024, 2048), head_dim=64, n_layer=4, seq_len=256, batch_size=32, steps=120,
           warmup=12, lr_exps=dict(mup=range(-6, 3), sp=range(-6, 3)), seed2_lrs=0, eval_tokens=262144)
SCALES = dict(cpu=FULL, gpu=GPU)
ARMS = ("mup", "sp")   # the claim (§3.1) is a contrast: the best lr holds across widths under muP, not under SP
ACTIVATIONS = ("embedding", "attention", "mlp", "logits")   # the coordinates muP keeps O(1) in width


def parse_args(argv):
    p = common.parser(__doc__)
    # 2 seeds by default: a best lr that moves by one grid step with the seed alone is not a width effect
    common.add_common_flags(p, seeds_help="; the first sweeps the whole lr grid, the others the lrs around "
                            "its best (the whole grid at --scale gpu)")
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    return common.parse(p, argv)


def model_flags(setup, width, arm):
    """Fixed depth and head dim; SwiGLU 2.5 d as in every MiniCPM (Table 8)."""
    # fixed depth and head dim: width is the only thing muP scales, so it is the only thing that varies
    heads = width // setup["head_dim"]   # full multi-head attention (no grouping), so heads grow with width
    return ["--n_layer", setup["n_layer"], "--n_embd", width, "--n_head", heads, "--n_kv_head", heads,
            "--ffn_dim", width * 5 // 2, "--block_size", setup["seq_len"], "--mup", str(arm == "mup").lower()]


def run_name(arm, width, k, seed):
    return f"{arm}_d{width}_lr{k:+d}_s{seed}"


def sweep(args, setup, runs_dir, points):
    """Train every (arm, width, lr exponent k, seed) in `points` in parallel -> {point: val_loss or inf}."""
    # a run that diverges (train.py stops on a NaN loss) counts as infinitely bad: too high an lr is a
    # result of the sweep (the grid's high end), not a failure of the experiment
    # a constant lr after warmup: the loss then reflects the peak lr alone, not a decay shape (Figure 3)
    steps = setup["steps"]
    shared = ["--source", args.source, "--tokenizer", args.tokenizer, "--data_dir", args.data_dir,
              "--batch_size", setup["batch_size"], "--seq_len", setup["seq_len"], "--schedule", "constant",
              "--warmup_steps", setup["warmup"], "--max_steps", steps, "--eval_interval", steps,
              "--log_interval", max(1, steps // 12), "--ckpt_interval", 10**9, *eval_flags(setup["eval_tokens"])]
    points = sorted(points, key=lambda p: -p[1])     # widest first: the slowest runs do not finish last
    jobs = [[([*shared, *model_flags(setup, w, arm), "--lr", BASE_LR * 2.0**k, "--seed", seed,
               "--out_dir", runs_dir / run_name(arm, w, k, seed)], runs_dir / run_name(arm, w, k, seed))]
            for arm, w, k, seed in points]
    done = run_parallel(jobs, workers=common.workers(args), allow_failures=True)   # None for a diverged run
    results = {}
    for point, ok in zip(points, done):
        run_dir = runs_dir / run_name(*point)
        (run_dir / "ckpt.pt").unlink(missing_ok=True)   # only the metrics are needed
        vals = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r and r["step"] == steps] if ok else []
        results[point] = vals[-1] if vals and math.isfinite(vals[-1]) else math.inf
    return results


def best_exponent(ks, losses):
    """The best lr as a (fractional) grid exponent -> (k*, on_edge)."""
    # the parabola through the lowest point and its two neighbours, in log2 lr: the loss is near-quadratic
    # in log lr around its minimum, so a grid a factor 2 apart still resolves shifts of a fraction of a step.
    # on_edge when the lowest point is the grid's first or last: then the true best lies outside the grid
    i = min(range(len(ks)), key=lambda j: losses[j])
    if i in (0, len(ks) - 1) or not math.isfinite(losses[i - 1] + losses[i + 1]):
        return float(ks[i]), True
    lo, mid, hi = losses[i - 1], losses[i], losses[i + 1]
    return ks[i] + 0.5 * (lo - hi) / (lo - 2 * mid + hi), False   # vertex of the parabola (unit spacing)


def seed2_window(ks, k_best, n):
    """n consecutive grid exponents centred on seed 1's best (shifted to stay inside the grid)."""
    # the second seed only re-measures around the optimum: fewer runs, enough to locate the best lr
    ks = list(ks)
    if n <= 0 or n >= len(ks):
        return ks
    i = min(max(0, ks.index(round(k_best)) - n // 2), len(ks) - n)
    return ks[i:i + n]


# ----------------------------------------------------------------------------- the coordinate check

def activation_rms(model, idx):
    """RMS of each activation class over one forward pass of idx (forward hooks on minicpm.MiniCPM)."""
    # the embedding output as it enters the residual stream (after x scale_emb), every layer's attention
    # and MLP outputs (before the residual multiplier; pooled over layers), and the logits (§3.1's scalings)
    import torch
    sums = {name: [0.0, 0] for name in ACTIVATIONS}   # name -> [sum of squares (float64), element count]

    def record(name, x):
        sums[name][0] += x.detach().double().pow(2).sum().item()
        sums[name][1] += x.numel()
    hooks = [model.model.layers[0].register_forward_pre_hook(lambda m, args: record("embedding", args[0])),
             model.lm_head.register_forward_hook(lambda m, args, out: record("logits", out))]
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda m, args, out: record("attention", out)))
        hooks.append(layer.mlp.register_forward_hook(lambda m, args, out: record("mlp", out)))
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return {name: math.sqrt(s / n) for name, (s, n) in sums.items()}


def coord_check(widths, steps, batches, vocab_size, head_dim=16, n_layer=2, lr=BASE_LR, seed=0):
    """Train each width under muP and SP for `steps` AdamW steps -> rows (arm, width, activation, step, rms)."""
    # the same lr for every width and the model's own lr groups (as train.py builds them): under muP the
    # update's effect on each activation is width-independent, so after a few steps the RMS stays flat.
    # batches(t) -> (x, y) is step t's batch; batches(-1) is the fixed probe batch, (batch, seq) token ids
    import torch
    from minicpm import MiniCPM, MiniCPMConfig
    rows, probe = [], batches(-1)[0]
    for arm in ARMS:
        for width in widths:
            torch.manual_seed(seed)   # every width and arm starts from the same seed: only width and arm differ
            cfg = MiniCPMConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=width, n_head=width // head_dim,
                                n_kv_head=width // head_dim, ffn_dim=width * 5 // 2, block_size=probe.shape[1],
                                mup=arm == "mup")
            model = MiniCPM(cfg)
            opt = torch.optim.AdamW(model.param_groups(lr, 0.0), lr=lr, betas=(0.9, 0.95))
            for t in range(steps + 1):
                if t in (0, steps):
                    rows += [(arm, width, name, t, v) for name, v in activation_rms(model, probe).items()]
                if t < steps:
                    x, y = batches(t)
                    model(x, y)[1].backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
    return rows


def growth_exponents(rows, step):
    """Slope of log RMS against log width at `step`, per (arm, activation): 0 is flat, 1 grows like width."""
    # a power-law fit over the widths (8x): one number per curve for the verdict table
    import numpy as np
    out = {}
    for arm in ARMS:
        for name in ACTIVATIONS:
            pts = [(w, v) for a, w, n, t, v in rows if (a, n, t) == (arm, name, step)]
            out[arm, name] = float(np.polyfit(np.log(np.array(pts)[:, 0]), np.log(np.array(pts)[:, 1]), 1)[0])
    return out


def run_coord_check(args, setup):
    import torch
    import data
    dataset = data.prepare(args.source, args.tokenizer, args.data_dir, quiet=True)
    train_bin = os.path.join(dataset, "train.bin")
    # the probe batch is step 10**6's window (the loader is a function of seed and step): never trained on
    batches = lambda t: data.get_batch(train_bin, setup["batch_size"], setup["seq_len"], seed=args.seed,
                                       step=t if t >= 0 else 10**6)
    torch.set_num_threads(1)   # one thread like the pool's workers (small matmuls gain little from two)
    return coord_check(setup["widths"], setup["coord_steps"], batches, data.load_meta(dataset)["vocab_size"],
                       setup["head_dim"], setup["n_layer"], seed=args.seed)


# ----------------------------------------------------------------------------- outputs

def write_csvs(results, coord_rows, out):
    with open(out / "mup_transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "width", "seed", "lr_exp", "lr", "val_loss"])
        for (arm, width, k, seed), loss in sorted(results.items()):
            w.writerow([arm, width, seed, k, repr(BASE_LR * 2.0**k), repr(loss)])
    with open(out / "mup_coord_check.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "width", "activation", "step", "rms"])
        w.writerows([*r[:4], repr(r[4])] for r in coord_rows)


def plot(results, best, coord_rows, steps, path):
    plt = pyplot()
    # three panels: loss against lr under muP and under SP (Figure 3), then the coordinate check
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    widths = sorted({p[1] for p in results})
    seeds = sorted({p[3] for p in results})
    finite = [v for v in results.values() if math.isfinite(v)]
    for ax, arm in zip(axes, ARMS):
        for ci, w in enumerate(widths):
            for si, seed in enumerate(seeds):
                pts = sorted((k, v) for (a, w_, k, s), v in results.items() if (a, w_, s) == (arm, w, seed))
                ks, vs = zip(*pts)
                # diverged runs (inf) are drawn at 99, off the zoomed axes, so the line still ends there
                ax.plot([BASE_LR * 2.0**k for k in ks], [min(v, 99) for v in vs], marker="o" if si == 0 else "x",
                        ls="-" if si == 0 else "--", color=f"C{ci}", label=f"d={w}" + (f", seed {seed}" if si else ""))
                k_best = best[arm, w, seed][0]
                ax.axvline(BASE_LR * 2.0**k_best, color=f"C{ci}", lw=0.8, ls=":" if si else "-", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_ylim(min(finite) - 0.03, min(finite) + 1.0)   # zoom on the minima, where the best lr is read
        ax.set(xlabel="peak learning rate (muP: matrices get lr / m)", ylabel="validation loss (nats/byte)",
               title=f"{'muP' if arm == 'mup' else 'standard parameterisation'}: loss vs lr (cf. Figure 3)")
        ax.legend(fontsize=7)
    ax = axes[2]
    for ci, name in enumerate(ACTIVATIONS):
        for arm, ls in zip(ARMS, ("-", "--")):
            pts = sorted((w, v) for a, w, n, t, v in coord_rows if (a, n, t) == (arm, name, steps))
            ax.plot(*zip(*pts), ls=ls, marker="o", color=f"C{ci}", label=f"{name} ({'muP' if arm == 'mup' else 'SP'})")
    ax.set(xscale="log", yscale="log", xlabel="width d", ylabel=f"activation RMS after {steps} Adam steps",
           title="coordinate check: flat under muP (solid), growing under SP (dashed)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(results, best, growth):
    """Markdown: best lr per arm and width and seed, the spread across widths, the coordinate-check slopes."""
    widths = sorted({p[1] for p in results})
    seeds = sorted({p[3] for p in results})
    lines = ["| arm | " + " | ".join(f"best lr, d={w}" for w in widths) + " | spread (grid steps) |",
             "|---|" + "---|" * (len(widths) + 1)]
    for arm in ARMS:
        for seed in seeds:
            ks = [best[arm, w, seed] for w in widths]
            cells = [f"{BASE_LR * 2.0**k:.4f}{' (edge)' if edge else ''}" for k, edge in ks]
            # the verdict: how far the best lr moves over the widths (8x), in factors of 2 (< 1: within one grid step)
            spread = max(k for k, _ in ks) - min(k for k, _ in ks)
            lines.append(f"| {arm} seed {seed} | " + " | ".join(cells) + f" | {spread:.2f} |")
    lines += ["", "| coordinate check: log-log slope of RMS vs width | " + " | ".join(ACTIVATIONS) + " |",
              "|---|" + "---|" * len(ACTIVATIONS)]
    lines += [f"| {arm} | " + " | ".join(f"{growth[arm, n]:+.2f}" for n in ACTIVATIONS) + " |" for arm in ARMS]
    return "\n".join(lines)


def run(argv):
    args = parse_args(argv)
    setup = QUICK if args.quick else SCALES[args.scale]
    seeds = common.seed_list(args)   # the first seed sweeps the whole grid
    # bad flags stop here, before the old runs are deleted
    out = common.check_out(args.out)
    common.check_data(args)
    runs_dir = out / "mup_transfer_runs"
    shutil.rmtree(runs_dir, ignore_errors=True)   # every run gets a fresh folder
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    coord_rows = run_coord_check(args, setup)   # (first: it prepares the data in this process, which
    # the pool's workers cannot do: they are daemons, and data.py tokenizes with a pool of its own)
    print(f"coordinate check: {time.time() - t0:.0f} s", flush=True)
    # seed 1: the whole grid; further seeds: a window of the grid around seed 1's best lr
    first = [(arm, w, k, seeds[0]) for arm in ARMS for w in setup["widths"] for k in setup["lr_exps"][arm]]
    results = sweep(args, setup, runs_dir, first)
    print(f"seed {seeds[0]}: {len(first)} runs, {time.time() - t0:.0f} s", flush=True)
    best = {}   # (arm, width, seed) -> (fractional best grid exponent, on_edge)

    def find_best(seed):
        for arm in ARMS:
            for w in setup["widths"]:
                pts = sorted((k, v) for (a, w_, k, s), v in results.items() if (a, w_, s) == (arm, w, seed))
                best[arm, w, seed] = best_exponent(*zip(*pts))
    find_best(seeds[0])
    more = [(arm, w, k, seed) for seed in seeds[1:] for arm in ARMS for w in setup["widths"]
            for k in seed2_window(setup["lr_exps"][arm], best[arm, w, seeds[0]][0], setup["seed2_lrs"])]
    if more:
        results.update(sweep(args, setup, runs_dir, more))
        for seed in seeds[1:]:
            find_best(seed)
    growth = growth_exponents(coord_rows, setup["coord_steps"])   # slopes after training, not at init
    write_csvs(results, coord_rows, out)
    plot(results, best, coord_rows, setup["coord_steps"], out / "mup_transfer.png")
    print(f"\n{len(results)} runs, {time.time() - t0:.0f} s in all. Best lr per width (parabola in log2 lr; "
          f"grid {BASE_LR} x 2^k), spread across widths in grid steps (factors of 2):\n{verdict(results, best, growth)}")
    print(f"\nwrote {out / 'mup_transfer.png'}, {out / 'mup_transfer.csv'}, {out / 'mup_coord_check.csv'}, runs in {runs_dir}")
    return 0


def main(argv=None):
    return common.main("mup_transfer.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
