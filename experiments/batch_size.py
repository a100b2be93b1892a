"""The optimal batch size grows as the loss falls: the paper's §3.2, Figures 1-2 (bs = 1.21e9 / L^6.24).

For each model size, runs with 5+ batch sizes train on the same token budget at lr 0.01 under a
cosine schedule over that budget (as §3.2), so the lr as a function of tokens is the same for every
batch size and only the batch size differs. For each loss level L we read off how many tokens each
run needed to reach it; the batch size that needs the fewest tokens is the optimum at that level
(a parabola in log batch size through the best batch size and its neighbours, as the paper fits
parabolas), and the optima of all levels and sizes are fitted with bs = a / L^b (least squares in
log-log space).

The loss is each step's training loss (every window is unseen data, so it estimates the loss on the
training distribution without bias), smoothed by a centred moving average over a fixed number of
tokens, the same for every batch size. Our tokens are bytes, so the loss is also bits per byte.
With several seeds (--seeds), each batch size's smoothed curve is the mean of its seeds' curves.

    python experiments/batch_size.py              # 2 sizes x 5 batch sizes, 2.4M tokens each, ~8 min on 2 cores
    python experiments/batch_size.py --quick      # tiny sizes and budget: under a minute (the smoke test)
    python experiments/batch_size.py --scale gpu  # widths 256 and 512, 4 and 8 layers, 40M tokens per run (one GPU)

Writes to --out (default experiments/out): batch_size.png (smoothed loss against tokens per batch
size with the optima connected, and the optimal batch size against the loss with the fitted law
and the paper's), batch_size.csv (size, batch, level, tokens to reach it), batch_size_optimum.csv
(size, level, optimal batch, edge) and batch_size_runs/<run>/; prints the fit and the comparison.
"""
import csv
import math
import shutil
import sys
import time

import numpy as np

import common
from common import eval_flags, pyplot, read_metrics, run_parallel

LR = 0.01                          # §3.2: every batch-size run at lr 0.01 (the wind tunnel's best)
PAPER_A, PAPER_B = 1.21e9, 6.24    # §3.2, Figure 2: bs (tokens) = 1.21e9 / L^6.24, L = C4 loss in nats/token
# Our comparison needs the paper's loss in bits per byte and its batch in bytes: C4 is English web
# text and MiniCPM's tokenizer has 122,753 tokens, so we assume 4 bytes per token (a GPT-2-like
# tokenizer on web text gives ~4.2-4.5). The exponent b does not depend on this; only a does.
PAPER_BYTES_PER_TOKEN = 4.0
# CPU default: two sizes (2 layers at d 64; 3 layers at d 128; head dim 16), batches of 8-256
# windows of 64 tokens (512-16384 tokens), 2.4M tokens per run (~22 and ~4 tokens per parameter).
# A first run with batches of 256-4096 tokens found 1K-4K equally good at every level (the optimum
# at or past the grid's top) and 256-512 clearly worse, so the grid was moved up by a factor 2-4.
FULL = dict(sizes=dict(S=(2, 64), M=(3, 128)), head_dim=16, seq_len=64, batches=(8, 16, 32, 64, 128, 256),
            tokens=2_400_000, warmup_frac=0.02, smooth_frac=0.04, levels=14, eval_tokens=65536)
QUICK = dict(FULL, sizes=dict(S=(1, 32), M=(1, 64)), head_dim=16, seq_len=32, batches=(2, 4, 8, 16, 32),
             tokens=40_000, levels=6, eval_tokens=2048)
GPU = dict(FULL, sizes=dict(S=(4, 256), M=(8, 512)), head_dim=64, seq_len=256, batches=(8, 16, 32, 64, 128, 256),
           tokens=40_000_000, eval_tokens=1_048_576)
# smooth_frac: the moving average spans 4% of the budget, wide enough to average out the per-step
# noise of the small batches, narrow enough to keep the curves' shape; levels: loss levels per size
SCALES = dict(cpu=FULL, gpu=GPU)


def parse_args(argv):
    p = common.parser(__doc__)
    # one seed by default: every batch size starts from the same init, so only the batch size differs
    common.add_common_flags(p, seeds=1, seeds_help="; every batch size once per seed, the seeds' curves averaged")
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    p.add_argument("--reanalyse", action="store_true", help="no training: analyse the runs already in --out")
    return common.parse(p, argv)


def run_name(args, size, batch_tokens, seed):
    # one seed: the names of the published runs; several: the seed too
    return f"{size}_bs{batch_tokens}" + (f"_s{seed}" if args.seeds > 1 else "")


def run_argv(args, setup, n_layer, width, batch, seed):
    """train.py's flags for one run: this model and batch, the budget's steps at lr 0.01, cosine."""
    bt = batch * setup["seq_len"]        # tokens per step
    steps = setup["tokens"] // bt        # the same budget in tokens for every batch size
    warmup = max(1, round(setup["warmup_frac"] * steps))   # 2% of each run: the same share of tokens
    heads = width // setup["head_dim"]
    return ["--source", args.source, "--tokenizer", args.tokenizer, "--data_dir", args.data_dir,
            "--n_layer", n_layer, "--n_embd", width, "--n_head", heads, "--n_kv_head", heads,
            "--ffn_dim", width * 5 // 2, "--block_size", setup["seq_len"], "--seq_len", setup["seq_len"],
            "--batch_size", batch, "--lr", LR, "--schedule", "cosine", "--max_steps", steps,
            # every step's training loss is logged: the levels are read from it, not from evals; the one
            # evaluation at the end is a final validation loss for the table
            "--warmup_steps", warmup, "--log_interval", 1, "--eval_interval", steps,
            "--ckpt_interval", 10**9, "--seed", seed, *eval_flags(setup["eval_tokens"])]


def run_all(args, setup, runs_dir, train=True):
    """Train every (size, batch, seed) (unless not train) -> {(size, batch tokens): [metrics rows per seed]}."""
    # one job per run: independent runs, so both cores are busy until the last one
    jobs, keys = [], []
    for name, (n_layer, width) in setup["sizes"].items():
        for batch in setup["batches"]:
            for seed in common.seed_list(args):
                run_dir = runs_dir / run_name(args, name, batch * setup["seq_len"], seed)
                jobs.append([([*run_argv(args, setup, n_layer, width, batch, seed), "--out_dir", run_dir], run_dir)])
                keys.append((name, batch * setup["seq_len"], run_dir))
    # slowest first (the bigger model, then the small batches with the most steps)
    order = sorted(range(len(jobs)), key=lambda i: (-setup["sizes"][keys[i][0]][1], keys[i][1]))
    if train:
        run_parallel([jobs[i] for i in order], workers=common.workers(args))
    missing = [str(d) for _, _, d in keys if not (d / "metrics.jsonl").exists()]
    if missing:   # --reanalyse of runs that are not there (another --scale or --seeds, or never trained)
        raise common.UsageError(f"--reanalyse: no run in {missing[0]}: train it first (the same --scale, "
                                "--quick and --seeds, without --reanalyse)")
    runs = {}
    for name, bt, run_dir in keys:
        (run_dir / "ckpt.pt").unlink(missing_ok=True)   # keep the output small
        runs.setdefault((name, bt), []).append(read_metrics(run_dir))
    return runs


def smoothed_curve(rows, batch_tokens, window, grid):
    """The training loss on `grid` (tokens), averaged over a centred window of `window` tokens."""
    # each step's loss sits at the middle of the tokens it saw; the window is in tokens, not steps, so a
    # small batch averages more steps than a large one and every curve has the same resolution in tokens
    pts = np.array([(r["tokens"] - batch_tokens / 2, r["train_loss"]) for r in rows if "train_loss" in r])
    # pts: (steps, 2) of (token position, loss); a cumulative sum gives each window's mean in O(1)
    csum = np.concatenate([[0.0], np.cumsum(pts[:, 1])])
    lo = np.searchsorted(pts[:, 0], grid - window / 2)
    hi = np.searchsorted(pts[:, 0], grid + window / 2, side="right")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > lo,  # nan where a window holds no step
                         (csum[hi] - csum[np.minimum(lo, hi)]) / (hi - lo), np.nan)


def tokens_to_reach(grid, curve, level):
    """The first token count at which the smoothed curve is at or below level; inf when it never is."""
    # linear between grid points: the token count varies smoothly with the level, not in grid steps
    below = np.nonzero(curve <= level)[0]
    if not len(below):
        return math.inf
    i = below[0]
    if i == 0 or not math.isfinite(curve[i - 1]):
        return float(grid[i])
    t0, t1, l0, l1 = grid[i - 1], grid[i], curve[i - 1], curve[i]
    return float(t0 + (t1 - t0) * (l0 - level) / (l0 - l1))


def optimum(batches, tokens, half_width=2):
    """The batch needing the fewest tokens -> (batch, on_edge)."""
    # a least-squares parabola in (log2 batch, log tokens) over the best batch and up to half_width
    # neighbours each side, as the paper fits parabolas (§3.2); more points than 3 average out some of
    # the noise of the smoothed curves. on_edge when the best batch is the smallest or largest reached,
    # or the vertex falls outside the fitted points: the optimum is then only bounded, not located
    tokens = [t if math.isfinite(t) else math.inf for t in tokens]
    i = int(np.argmin(tokens))
    if i in (0, len(batches) - 1) or not math.isfinite(tokens[i - 1] + tokens[i + 1]):
        return float(batches[i]), True
    window = [j for j in range(i - half_width, i + half_width + 1) if 0 <= j < len(batches) and math.isfinite(tokens[j])]
    x = np.log2(np.array([batches[j] for j in window], dtype=float))
    c2, c1, _ = np.polyfit(x, np.log([tokens[j] for j in window]), 2)
    vertex = -c1 / (2 * c2) if c2 > 0 else math.nan   # c2 <= 0: no minimum, the vertex test below fails
    if not x[0] <= vertex <= x[-1]:
        return float(batches[i]), True
    return float(2.0 ** vertex), False


def fit_law(points):
    """bs = a / L^b by least squares on log bs = log a - b log L. points: [(L, bs)] -> (a, b)."""
    # a straight line in log-log space weights every optimum equally in relative terms (Figure 2's axes)
    L, bs = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(np.log(L), np.log(bs), 1)
    return float(math.exp(intercept)), float(-slope)


def paper_law_bytes(bpb):
    """The paper's bs = 1.21e9 / L^6.24 with L and bs converted to bits per byte and bytes per batch."""
    # bits/byte -> nats/token at PAPER_BYTES_PER_TOKEN; the batch in tokens -> bytes at the same ratio
    nats_per_token = bpb * math.log(2) * PAPER_BYTES_PER_TOKEN
    return PAPER_A / nats_per_token**PAPER_B * PAPER_BYTES_PER_TOKEN


def analyse(runs, setup):
    """Smoothed curves, tokens to reach each level, the optimum per level. -> (curves, table, optima)."""
    # the window holds at least two steps of the largest batch, so every curve is defined everywhere
    window = max(setup["smooth_frac"] * setup["tokens"], 2 * max(bt for _, bt in runs))
    grid = np.linspace(window, setup["tokens"] - window / 2, 600)   # 600 token positions, shared by all runs
    curves, table, optima = {}, [], []
    for name in setup["sizes"]:
        batches = sorted(bt for n, bt in runs if n == name)
        for bt in batches:   # the mean over seeds (one seed: its own curve, unchanged)
            curves[name, bt] = np.mean([smoothed_curve(rows, bt, window, grid) for rows in runs[name, bt]], axis=0)
        # levels: from where the best run stands at a tenth of the budget down to the lowest loss
        # some run reaches (the best run's end); equal steps in log loss
        best_at = lambda frac: np.nanmin([c[int(frac * (len(grid) - 1))] for (n, _), c in curves.items() if n == name])
        levels = np.geomspace(best_at(0.1), best_at(1.0) + 1e-3, setup["levels"])
        for level in levels:
            # Figure 1: at each loss level, the tokens each batch size needed; the optimum needs the fewest
            tokens = [tokens_to_reach(grid, curves[name, bt], level) for bt in batches]
            table += [(name, bt, float(level), t) for bt, t in zip(batches, tokens)]
            bs, edge = optimum(batches, tokens)
            optima.append((name, float(level), bs, min(tokens), edge))
    return grid, curves, table, optima


def final_optima(curves, setup):
    """Per size, the batch whose run ends lowest -> [(size, best final loss in bpb, batch, on_edge)]."""
    # the smoothed training loss over the last window (in bits per byte), a 3-point parabola in log2
    # batch: the optimum for the whole budget, where each cosine run has finished its decay. The training
    # loss, smoothed, as for the levels: one evaluation at the end would be a single noisy point per run
    out = []
    for name in setup["sizes"]:
        batches = sorted(bt for n, bt in curves if n == name)
        final = [curves[name, bt][-1] / math.log(2) for bt in batches]
        bs, edge = optimum(batches, final, half_width=1)
        out.append((name, min(final), bs, edge))
    return out


def plot(grid, curves, optima, law, finals, setup, path):
    plt = pyplot()
    names = list(setup["sizes"])
    # one panel per size (Figure 1: loss against tokens per batch), then the optima against loss (Figure 2)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(6 * (len(names) + 1), 5))
    for ax, name in zip(axes, names):
        batches = sorted(bt for n, bt in curves if n == name)
        for i, bt in enumerate(batches):
            ax.plot(grid, curves[name, bt], color=f"C{i}", label=f"batch {bt} tokens")
        opt = [(t, L) for n, L, bs, t, edge in optima if n == name]
        ax.plot(*zip(*opt), "k.--", label="fewest tokens to each level")
        n_layer, width = setup["sizes"][name]
        ax.set(xscale="log", xlabel="tokens", ylabel="training loss (nats/byte, smoothed)",
               title=f"{name}: {n_layer} layers, d={width}, lr {LR}, cosine (cf. Figure 1)")
        ax.set_ylim(min(L for _, L in opt) - 0.1, max(L for _, L in opt) + 0.3)   # zoom on the levels
        ax.legend(fontsize=7)
    ax = axes[-1]
    bpb = lambda nats: nats / math.log(2)   # byte tokens: one token is one byte
    for i, name in enumerate(names):
        pts = [(bpb(L), bs, edge) for n, L, bs, _, edge in optima if n == name]
        ax.plot([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], "o", color=f"C{i}", label=f"{name} optimum")
        ax.plot([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], "x", color=f"C{i}", label=f"{name} at the grid's edge")
    for i, (name, L, bs, edge) in enumerate(finals):
        ax.plot([L], [bs], "*", ms=14, color=f"C{i}", mec="k", label=f"{name}: best batch for the whole run (final training loss)")
    xs = np.geomspace(min(bpb(o[1]) for o in optima), max(bpb(o[1]) for o in optima), 50)
    if law:
        ax.plot(xs, law[0] / xs**law[1], "k-", label=f"fit: bs = {law[0]:.3g} / L^{law[1]:.2f}")
    ax.plot(xs, [paper_law_bytes(x) for x in xs], "k--",
            label=f"paper: 1.21e9 / L^6.24 (in bytes, {PAPER_BYTES_PER_TOKEN:g} bytes/token)")
    ax.set(xscale="log", yscale="log", xlabel="loss L (bits per byte)", ylabel="optimal batch size (bytes = tokens)",
           title="optimal batch size against loss (cf. Figure 2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csvs(table, optima, out):
    with open(out / "batch_size.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "batch_tokens", "level_nats", "level_bpb", "tokens_to_reach"])
        w.writerows([n, bt, repr(L), repr(L / math.log(2)), repr(t)] for n, bt, L, t in table)
    with open(out / "batch_size_optimum.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "level_nats", "level_bpb", "optimal_batch_tokens", "tokens", "on_edge"])
        w.writerows([n, repr(L), repr(L / math.log(2)), repr(bs), repr(t), edge] for n, L, bs, t, edge in optima)


def summary(runs, optima, law, finals, setup):
    lines = ["| size | " + " | ".join(f"batch {bt}" for bt in sorted({bt for _, bt in runs})) + " |",
             "|---|" + "---|" * len({bt for _, bt in runs})]
    for name in setup["sizes"]:   # the final validation loss of every run, seeds apart: "a / b"
        cells = [" / ".join(f"{[r['val_bpb'] for r in rows if 'val_bpb' in r][-1]:.4f}" for rows in runs[name, bt])
                 for bt in sorted(bt for n, bt in runs if n == name)]
        lines.append(f"| {name} final val bpb | " + " | ".join(cells) + " |")
    lines += ["", "| size | level (bpb) | optimal batch (tokens) | edge |", "|---|---|---|---|"]
    lines += [f"| {n} | {L / math.log(2):.3f} | {bs:.0f} | {'yes' if edge else ''} |" for n, L, bs, _, edge in optima]
    lines.append("")
    for name, L, bs, edge in finals:
        lines.append(f"{name}: the whole run's best batch {bs:.0f} tokens{' (edge)' if edge else ''}, "
                     f"final training loss {L:.4f} bpb")
    if len(finals) >= 2 and not any(f[3] for f in finals):   # across sizes, as the paper's law is
        a, b = fit_law([(L, bs) for _, L, bs, _ in finals])
        lines.append(f"across sizes, from the whole runs' optima: bs = {a:.4g} / L^{b:.3f}")
    for name in setup["sizes"]:   # each size alone, to see whether the sizes agree
        pts = [(L / math.log(2), bs) for n, L, bs, _, edge in optima if n == name and not edge]
        if len(pts) >= 2:
            a, b = fit_law(pts)
            lines.append(f"{name} alone ({len(pts)} interior optima): bs = {a:.4g} / L^{b:.3f}")
    if law:
        lines += ["", f"fit over interior optima: bs = {law[0]:.4g} / L^{law[1]:.3f}  (L in bits per byte, bs in bytes)",
                  f"paper (§3.2): bs = 1.21e9 / L^6.24 (nats/token, tokens) = {paper_law_bytes(1.0):.4g} / L^6.24 "
                  f"in bits per byte and bytes at {PAPER_BYTES_PER_TOKEN:g} bytes/token"]
    return "\n".join(lines)


def run(argv):
    args = parse_args(argv)
    setup = QUICK if args.quick else SCALES[args.scale]
    out = common.check_out(args.out)   # bad flags stop here, before the old runs are deleted
    runs_dir = out / "batch_size_runs"
    if not args.reanalyse:
        common.check_data(args)
        shutil.rmtree(runs_dir, ignore_errors=True)   # every run gets a fresh folder
        # prepare the data here: workers of a pool are daemons and cannot start data.py's own pool
        import data
        data.prepare(args.source, args.tokenizer, args.data_dir, quiet=True)
    t0 = time.time()
    runs = run_all(args, setup, runs_dir, train=not args.reanalyse)
    grid, curves, table, optima = analyse(runs, setup)
    interior = [(L / math.log(2), bs) for _, L, bs, _, edge in optima if not edge]
    # the law is fitted to interior optima only: an edge optimum is only a bound, and would bias the slope b;
    # it needs 2+ distinct levels to have a slope at all
    law = fit_law(interior) if len({round(L, 6) for L, _ in interior}) >= 2 else None
    finals = final_optima(curves, setup)
    write_csvs(table, optima, out)
    plot(grid, curves, optima, law, finals, setup, out / "batch_size.png")
    n_runs = sum(map(len, runs.values()))
    print(f"\n{n_runs} runs, {time.time() - t0:.0f} s in all.\n{summary(runs, optima, law, finals, setup)}")
    print(f"\nwrote {out / 'batch_size.png'}, {out / 'batch_size.csv'}, {out / 'batch_size_optimum.csv'}, runs in {runs_dir}")
    return 0


def main(argv=None):
    return common.main("batch_size.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
