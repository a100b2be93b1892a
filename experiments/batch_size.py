"""The optimal batch size grows as the loss falls: the paper's §3.2, Figures 1-2 (bs = 1.21e9 / L^6.24),
measured with two instruments.

Direct (Figure 1): for each of the small sizes, runs with 5 batch sizes train on the same token budget
under a cosine schedule over that budget (as §3.2). Each batch size gets its own lr: a grid of 3 around
the square-root rule (lr ~ sqrt(batch), the usual scaling for Adam below the critical batch) at the
first seed, the lowest final loss wins, and the other seeds rerun that lr. For each loss level we read
off how many tokens each batch needed (the seeds' curves averaged); the batch needing the fewest is the
optimum (a parabola in log batch, as the paper fits parabolas); each seed's own optimum gives the spread.

Gradient noise scale (McCandlish et al. 2018): every run logs B_simple = tr(Σ)/|G|² in tokens
(train.py --noise_scale, noise.py, from --grad_accum's micro-batches), the batch past which a bigger
batch stops paying. Read against the training loss (smoothed with the estimator's own EMA) for 3 model
sizes, binned at the same loss levels, and fitted with B = a / L^b (L in bits/byte). McCandlish's
critical batch is also read off the direct runs: tokens(B) = E_min + S_min B (their (S/S_min - 1)(E/E_min - 1) = 1), so
B_crit = E_min / S_min, from the batches at and above the optimum. Tokens are bytes (byte tokenizer).

    python experiments/batch_size.py              # 3 sizes, 52 runs of 1.2M tokens: ~13 min on 2 cores (estimated)
    python experiments/batch_size.py --quick      # tiny sizes and budget: under a minute (the smoke test)
    python experiments/batch_size.py --scale gpu  # widths 256-768, 40M tokens per run (one GPU; not run)
Writes to --out (default experiments/out): batch_size.png, batch_size.csv (size, batch, lr, level,
tokens to reach it: the seeds' mean curve and the seeds' range), batch_size_optimum.csv (size, level,
direct optimum and its seed range, B_crit, B_simple), batch_size_noise.csv (every logged B_simple with
its smoothed loss), batch_size_lr.csv (the lr sweep) and batch_size_runs/<run>/; prints a verdict per claim.
"""
import csv
import math
import shutil
import sys
import time

import numpy as np

import common
from common import pyplot, read_metrics, run_parallel
import noise  # noqa: E402  (after common, which puts the repo root on the path)

PAPER_A, PAPER_B = 1.21e9, 6.24    # §3.2, Figure 2: bs (tokens) = 1.21e9 / L^6.24, L = C4 loss in nats/token
# Our comparison needs the paper's loss in bits per byte and its batch in bytes: C4 is English web
# text and MiniCPM's tokenizer has 122,753 tokens, so we assume 4 bytes per token (a GPT-2-like
# tokenizer on web text gives ~4.2-4.5). The exponent b does not depend on this; only a does.
PAPER_BYTES_PER_TOKEN = 4.0
# CPU default: three sizes (2 layers at d 32 and d 64; 3 layers at d 128; head dim 16), 1.2M tokens a
# run. XS and S carry the direct measurement (5 batches of 8-128 windows of 64 tokens: 512-8,192 tokens,
# the range where an earlier single-seed grid of 512-16K found its optima; 16K was clearly worse);
# M, ~4x slower per token, only logs B_simple at two batches. grad_accum 4 (2 for the smallest batch):
# micro-batch 0 is the estimator's small batch (noise.py). lr_ref: lr 0.005 at 2,048 tokens, the grid
# 0.5x-2x of it; a first run centred on §3.2's 0.01 found its lowest lr (0.5x) best at every batch and
# size, on the grid's edge, so the centre moved down one grid step.
FULL = dict(sizes=dict(XS=(2, 32), S=(2, 64), M=(3, 128)), direct=("XS", "S"), head_dim=16, seq_len=64,
            batches=(8, 16, 32, 64, 128), noise_batches=(16, 64), tokens=1_200_000, grad_accum=4,
            lr_ref=(0.005, 2048), lr_mults=(0.5, 1.0, 2.0), warmup_frac=0.02, smooth_frac=0.04, levels=10)
QUICK = dict(FULL, sizes=dict(XS=(1, 16), S=(1, 32), M=(1, 48)), seq_len=32, batches=(2, 4, 8), noise_batches=(4,),
             tokens=4_800, grad_accum=2, lr_ref=(0.01, 128), lr_mults=(0.5, 2.0), levels=5)
# GPU (not run): batches of 2K-64K tokens, the lr grid centred on 0.01 at 16K tokens
GPU = dict(FULL, sizes=dict(XS=(4, 256), S=(8, 512), M=(12, 768)), head_dim=64, seq_len=256, lr_ref=(0.01, 16384),
           batches=(8, 16, 32, 64, 128, 256), noise_batches=(32, 128), tokens=40_000_000)
# smooth_frac: the moving average spans 4% of the budget, wide enough to average out the per-step
# noise of the small batches, narrow enough to keep the curves' shape; levels: loss levels per size
SCALES = dict(cpu=FULL, gpu=GPU)
MIN_POINTS = 5   # a level's B_simple is a median over at least this many logged steps, else not given


def parse_args(argv):
    p = common.parser(__doc__)
    # three seeds: the first sweeps the lr per batch size, the others rerun each batch's best lr
    common.add_common_flags(p, seeds=3, seeds_help="; the first sweeps the lr per batch, the others rerun its best lr")
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    p.add_argument("--reanalyse", action="store_true", help="no training: analyse the runs already in --out")
    return common.parse(p, argv)


# ----------------------------------------------------------------------------- the runs

def lr_for(setup, batch, mult):
    """The peak lr of a batch of `batch` windows at multiple `mult` of the square-root rule's centre."""
    lr0, ref = setup["lr_ref"]
    return float(f"{lr0 * math.sqrt(batch * setup['seq_len'] / ref) * mult:.3g}")   # 3 digits: readable names


def run_argv(setup, args, size, batch, lr, seed):
    """train.py's flags for one run: this model, batch and lr, the budget's steps, cosine, --noise_scale."""
    n_layer, width = setup["sizes"][size]
    steps = setup["tokens"] // (batch * setup["seq_len"])   # the same budget in tokens for every batch size
    warmup = max(1, round(setup["warmup_frac"] * steps))     # 2% of each run: the same share of tokens
    # micro-batches of at least 4 windows (2 if the batch is smaller): a tiny model's step costs about
    # the same per micro-batch whatever its size, so 4 micro-batches of 2 windows ran ~3x slower per token
    heads, G = width // setup["head_dim"], max(2, min(setup["grad_accum"], batch // 4))
    return ["--source", args.source, "--tokenizer", args.tokenizer, "--data_dir", args.data_dir,
            "--n_layer", n_layer, "--n_embd", width, "--n_head", heads, "--n_kv_head", heads,
            "--ffn_dim", width * 5 // 2, "--block_size", setup["seq_len"], "--seq_len", setup["seq_len"],
            "--batch_size", batch // G, "--grad_accum", G, "--noise_scale", "--lr", lr, "--schedule", "cosine",
            # every step's training loss and B_simple are logged: everything is read from them (every window
            # is unseen data), so no evaluation (each one also redraws loss.png: ~1 s, most of a --quick run)
            "--max_steps", steps, "--warmup_steps", warmup, "--log_interval", 1, "--eval_interval", 0,
            "--ckpt_interval", 10**9, "--seed", seed]


def train_and_load(args, setup, runs_dir, keys, train):
    """keys [(size, batch, lr, seed)] -> {key: metrics rows, or None for a run that failed or diverged}."""
    dirs = {k: runs_dir / f"{k[0]}_bs{k[1] * setup['seq_len']}_lr{k[2]:g}_s{k[3]}" for k in keys}
    # slowest first (the widest model, then the small batches with the most steps): no core idles at the end
    order = sorted(keys, key=lambda k: (-setup["sizes"][k[0]][1], k[1]))
    if train:   # a diverged lr is an answer of the sweep, not an error (allow_failures)
        jobs = [[([*run_argv(setup, args, *k), "--out_dir", dirs[k]], dirs[k])] for k in order]
        run_parallel(jobs, workers=common.workers(args), allow_failures=True)
    missing = [str(d) for d in dirs.values() if not (d / "metrics.jsonl").exists()]
    if missing and not train:   # --reanalyse of runs that are not there (another --scale or --seeds)
        raise common.UsageError(f"--reanalyse: no run in {missing[0]}: train it first (the same --scale, "
                                "--quick and --seeds, without --reanalyse)")
    out = {}
    for k, d in dirs.items():
        (d / "ckpt.pt").unlink(missing_ok=True)   # keep the output small
        rows = read_metrics(d) if (d / "metrics.jsonl").exists() else []
        # a run counts when it reached its last step (a non-finite loss stops it early: train.py exits 1)
        out[k] = rows if any(r.get("step") == setup["tokens"] // (k[1] * setup["seq_len"]) for r in rows) else None
    return out


def run_all(args, setup, runs_dir, train=True):
    """-> (runs {(size, batch, lr, seed): rows}, best {(size, batch): lr}) after both phases."""
    seeds = common.seed_list(args)
    # phase 1: the lr grid of every direct batch at the first seed, and the noise-only sizes' runs
    keys = [(n, b, lr_for(setup, b, m), seeds[0]) for n in setup["direct"] for b in setup["batches"]
            for m in setup["lr_mults"]]
    keys += [(n, b, lr_for(setup, b, 1.0), s) for n in setup["sizes"] if n not in setup["direct"]
             for b in setup["noise_batches"] for s in seeds[:1]]
    runs = train_and_load(args, setup, runs_dir, keys, train)
    # each batch's best lr: the lowest loss at the end of the budget, the point the cosine is tuned for
    # (the earlier levels might prefer another lr; one lr per batch keeps one curve per batch and seed)
    final = lambda n, b, lr: final_loss(runs[n, b, lr, seeds[0]], setup["smooth_frac"] * setup["tokens"])
    best = {(n, b): min((lr_for(setup, b, m) for m in setup["lr_mults"]), key=lambda lr: final(n, b, lr))
            for n in setup["direct"] for b in setup["batches"]}
    # phase 2: the further seeds, each batch at its own best lr
    keys = [(n, b, best[n, b], s) for (n, b) in best for s in seeds[1:]]
    runs.update(train_and_load(args, setup, runs_dir, keys, train))
    return runs, best


# ----------------------------------------------------------------------------- reading the curves

def final_loss(rows, window):
    """Mean training loss over the run's last `window` tokens; inf for a failed run (never the best lr)."""
    # smoothed over a window, as the levels are: one step's loss, or one evaluation, is a noisy point
    end = max((r["tokens"] for r in rows or []), default=0)
    tail = [r["train_loss"] for r in rows or [] if "train_loss" in r and r["tokens"] > end - window]
    return float(np.mean(tail)) if tail and math.isfinite(np.mean(tail)) else math.inf


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



def critical_batch(batches, tokens):
    """McCandlish's B_crit = E_min / S_min from tokens(B) = E_min + S_min B; nan if none."""
    # steps S = tokens / B, so (S/S_min - 1)(E/E_min - 1) = 1 is a straight line in (B, tokens). Only the
    # batches at and above the fewest-tokens one: below it the model (which assumes a tuned lr) fails
    i = int(np.argmin(tokens))
    pts = [(b, t) for b, t in zip(batches[i:], tokens[i:]) if math.isfinite(t)]
    if len(pts) < 2:   # a line needs two batches
        return math.nan
    s_min, e_min = np.polyfit(*np.array(pts, dtype=float).T, 1)   # slope: steps S_min; intercept: tokens E_min
    return float(e_min / s_min) if e_min > 0 and s_min > 0 else math.nan


def noise_points(rows, decay=noise.EMA_DECAY):
    """[(training loss, B_simple)] at every step that logged one, the loss under the estimator's own EMA."""
    # B_simple is a ratio of two EMAs over ~20 steps (noise.py): the loss gets the same average, bias
    # corrected the same way, so each pair describes the same stretch of training
    e, w, pts = 0.0, 0.0, []
    for r in rows or []:
        if "train_loss" not in r:
            continue
        e, w = decay * e + (1 - decay) * r["train_loss"], decay * w + (1 - decay)
        if r.get("noise_scale_tokens"):   # None while |G|^2 <= 0: no estimate yet
            pts.append((e / w, r["noise_scale_tokens"]))
    return pts


def per_level(points, levels):
    """The median B_simple of the points whose loss falls in each level's bin -> [B or nan] per level."""
    # bins meet half-way (geometric mean) between neighbouring levels; the outer ones are as wide
    lv = np.sort(np.asarray(levels, dtype=float))
    mids = np.sqrt(lv[1:] * lv[:-1])
    ratio = mids[0] / lv[0] if len(lv) > 1 else 1.01
    edges = np.concatenate([[lv[0] / ratio], mids, [lv[-1] * ratio]])
    pts = np.array(points, dtype=float).reshape(-1, 2)
    inside = [pts[(pts[:, 0] >= edges[k]) & (pts[:, 0] < edges[k + 1]), 1] for k in range(len(lv))]
    out = {L: float(np.median(x)) if len(x) >= MIN_POINTS else math.nan for L, x in zip(lv, inside)}
    return [out[float(L)] for L in levels]   # in the caller's order


def direct(runs, best, setup, seeds):
    """The direct measurement -> (grid, mean curves, table rows, optimum rows) for the direct sizes."""
    seq, nan = setup["seq_len"], np.full((1, 600), np.nan)   # nan: the curve of a batch whose every seed failed
    window = max(setup["smooth_frac"] * setup["tokens"], 2 * max(setup["batches"]) * seq)
    grid = np.linspace(window, setup["tokens"] - window / 2, 600)   # 600 token positions, shared by all runs
    curves, table, optima = {}, [], []
    for n in setup["direct"]:
        bts = [b * seq for b in setup["batches"]]
        # per batch: (seeds, 600) smoothed curves at its best lr, seeds that failed left out
        per_seed = {b * seq: np.array([smoothed_curve(runs[n, b, best[n, b], s], b * seq, window, grid)
                                       for s in seeds if runs[n, b, best[n, b], s]] or nan) for b in setup["batches"]}
        curves.update({(n, bt): per_seed[bt].mean(axis=0) for bt in bts})   # the mean: less noisy than any seed
        # levels: from where the best curve stands at a tenth of the budget down to the best end
        best_at = lambda frac: np.nanmin([curves[n, bt][int(frac * (len(grid) - 1))] for bt in bts])
        for level in np.geomspace(best_at(0.1), best_at(1.0) + 1e-3, setup["levels"]):
            tokens = [tokens_to_reach(grid, curves[n, bt], level) for bt in bts]
            # each seed alone (the seeds every batch has): its own tokens, its own optimum
            k = min(len(c) for c in per_seed.values())
            seed_tokens = [[tokens_to_reach(grid, per_seed[bt][i], level) for bt in bts] for i in range(k)]
            for j, (bt, t) in enumerate(zip(bts, tokens)):   # one row per batch: the mean's, the seeds' range
                st = [s[j] for s in seed_tokens] or [math.nan]
                table.append((n, bt, best[n, bt // seq], float(level), t, min(st), max(st)))
            bs, edge = optimum(bts, tokens)
            seed_opt = [optimum(bts, st)[0] for st in seed_tokens if math.isfinite(min(st))]
            optima.append(dict(size=n, level=float(level), bs=bs, tokens=min(tokens), edge=edge,
                               seed_lo=min(seed_opt, default=math.nan), seed_hi=max(seed_opt, default=math.nan),
                               b_crit=critical_batch(bts, tokens)))
    return grid, curves, table, optima


def noise_analysis(runs, best, setup, optima):
    """B_simple per size: its points, the median per loss level, the fit -> (points, levels, fits)."""
    points, levels, fits = {}, {}, {}
    for n in setup["sizes"]:
        # the runs the direct measurement reads (each batch's best lr, every seed); M: all of its runs
        keys = [k for k in runs if k[0] == n and runs[k] and (n not in setup["direct"] or best[n, k[1]] == k[2])]
        points[n] = [p for k in keys for p in noise_points(runs[k])]
        if n in setup["direct"]:   # the direct levels: the two instruments compared at the same losses
            lv = [o["level"] for o in optima if o["size"] == n]
        else:   # the same rule as the direct levels: the best run at a tenth of the budget to its end
            ends = [noise_points(runs[k]) for k in keys]
            hi = min(e[len(e) // 10][0] for e in ends if e)
            lv = list(np.geomspace(hi, min(e[-1][0] for e in ends if e), setup["levels"]))
        levels[n] = list(zip(lv, per_level(points[n], lv)))
        # a median <= 0 (tr(Σ)'s estimate swamped by its noise: noise.py) has no logarithm: not fitted
        ok = [(L / math.log(2), B) for L, B in levels[n] if B > 0]
        fits[n] = fit_law(ok) if len(ok) >= 2 else None
        for o in (o for o in optima if o["size"] == n):   # B_simple at each direct level, beside its optimum
            o["b_simple"] = dict(levels[n])[o["level"]]
    return points, levels, fits


# ----------------------------------------------------------------------------- outputs

def plot(grid, curves, optima, points, levels, fits, setup, path):
    plt = pyplot()
    names, bpb = list(setup["direct"]), lambda nats: nats / math.log(2)   # byte tokens: nats/byte / ln 2
    # a panel per direct size (Figure 1), the optima against loss (Figure 2), B_simple along training
    # every axis in tokens = bytes, so the paper's law (converted at 4 bytes/token) sits on the same scale
    fig, axes = plt.subplots(1, len(names) + 2, figsize=(6 * (len(names) + 2), 5))
    for ax, n in zip(axes, names):
        for i, bt in enumerate(b * setup["seq_len"] for b in setup["batches"]):
            ax.plot(grid, curves[n, bt], color=f"C{i}", label=f"batch {bt} tokens")
        opt = [(o["tokens"], o["level"]) for o in optima if o["size"] == n]
        ax.plot(*zip(*opt), "k.--", label="fewest tokens to each level")
        ax.set(xscale="log", xlabel="tokens", ylabel="training loss (nats/byte, smoothed, mean of seeds)",
               title=f"{n}: {setup['sizes'][n][0]} layers, d={setup['sizes'][n][1]}, lr tuned per batch (cf. Figure 1)")
        ax.set_ylim(min(L for _, L in opt) - 0.1, max(L for _, L in opt) + 0.3)   # zoom on the levels
        ax.legend(fontsize=7)
    ax, raw = axes[-2], axes[-1]
    for c, n in zip(("C0", "C1", "C2", "C3", "C4"), setup["sizes"]):   # a colour per size in both panels
        for o in (o for o in optima if o["size"] == n):   # direct: the seeds' range as an error bar
            ax.errorbar([bpb(o["level"])], [o["bs"]], yerr=[[o["bs"] - min(o["seed_lo"], o["bs"])], [max(o["seed_hi"], o["bs"]) - o["bs"]]],
                        fmt="x" if o["edge"] else "o", color=c, ms=5, alpha=0.8)
        ax.plot([bpb(o["level"]) for o in optima if o["size"] == n], [o["b_crit"] for o in optima if o["size"] == n], "^", color=c, mfc="none")
        for a in (ax, raw):
            a.plot([bpb(L) for L, B in levels[n]], [B for _, B in levels[n]], "s-", color=c, mfc="none", label=f"{n}: B_simple (median per level)")
            if fits[n]:
                xs = np.array([bpb(L) for L, _ in levels[n]])
                a.plot(xs, fits[n][0] / xs ** fits[n][1], ":", color=c, label=f"{n}: B_simple = {fits[n][0]:.3g} / L^{fits[n][1]:.2f}")
        pts = np.array(points[n]).reshape(-1, 2)
        raw.plot(bpb(pts[:, 0]), pts[:, 1], ",", color=c, alpha=0.3)
    # the paper's law over the losses this run covers: its b is the number to compare, a rests on bytes/token
    xs = np.geomspace(*[f(bpb(L) for n in levels for L, _ in levels[n]) for f in (min, max)], 50)
    ax.plot(xs, [paper_law_bytes(x) for x in xs], "k--", label=f"paper: 1.21e9 / L^6.24 ({PAPER_BYTES_PER_TOKEN:g} bytes/token)")
    ax.plot([], [], "ko", label="direct optimum (x: grid edge), bar: seeds' range")
    ax.plot([], [], "k^", mfc="none", label="B_crit = E_min / S_min from the direct runs")
    for a, title in ((ax, "optimal batch against loss (cf. Figure 2)"), (raw, "B_simple along training, every step")):
        a.set(xscale="log", yscale="log", xlabel="loss L (bits per byte)", ylabel="batch size (tokens = bytes)", title=title)
        a.legend(fontsize=6)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def write_csvs(table, optima, runs, best, setup, out):
    bpb = lambda L: repr(L / math.log(2))
    with open(out / "batch_size.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "batch_tokens", "lr", "level_nats", "level_bpb", "tokens_to_reach", "tokens_seed_min", "tokens_seed_max"])
        w.writerows([n, bt, lr, repr(L), bpb(L), repr(t), repr(lo), repr(hi)] for n, bt, lr, L, t, lo, hi in table)
    # seed_optimum_*: the optimum of each seed's own curves; b_crit, b_simple: McCandlish's two readings
    cols = ["size", "level_nats", "level_bpb", "optimal_batch_tokens", "tokens", "on_edge", "seed_optimum_min",
            "seed_optimum_max", "b_crit_tokens", "b_simple_tokens"]
    with open(out / "batch_size_optimum.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([o["size"], repr(o["level"]), bpb(o["level"]), *(repr(o[k]) for k in ("bs", "tokens")), o["edge"],
                     *(repr(o[k]) for k in ("seed_lo", "seed_hi", "b_crit", "b_simple"))] for o in optima)
    with open(out / "batch_size_noise.csv", "w", newline="") as f:   # every step's pair, every run
        w = csv.writer(f)
        w.writerow(["size", "batch_tokens", "lr", "seed", "best_lr", "loss_ema_nats", "loss_ema_bpb", "noise_scale_tokens"])
        for (n, b, lr, s), rows in sorted(runs.items()):
            is_best = n not in setup["direct"] or best[n, b] == lr
            w.writerows([n, b * setup["seq_len"], lr, s, is_best, repr(L), bpb(L), repr(B)] for L, B in noise_points(rows))
    window = setup["smooth_frac"] * setup["tokens"]
    with open(out / "batch_size_lr.csv", "w", newline="") as f:   # the sweep: final smoothed training loss
        w = csv.writer(f)
        w.writerow(["size", "batch_tokens", "lr", "seed", "final_train_loss_nats", "final_train_bpb", "best_lr"])
        for (n, b, lr, s), rows in sorted(runs.items()):
            end = final_loss(rows, window)   # inf: the run failed (diverged)
            w.writerow([n, b * setup["seq_len"], lr, s, repr(end), bpb(end), n not in setup["direct"] or best[n, b] == lr])


def verdicts(optima, levels, fits, setup):
    """One line per claim: the paper's (or McCandlish's) claim, this run's numbers, reproduced or not."""
    fmt = lambda f: f"B = {f[0]:.3g} / L^{f[1]:.2f}" if f else "too few levels to fit"
    bs = [f[1] for f in fits.values() if f]
    yes = bool(bs) and len(bs) == len(fits) and min(bs) > 0   # every size's exponent positive
    lines = ["B_simple per size: " + "; ".join(f"{n} {fmt(f)}" for n, f in fits.items()),
             f"VERDICT B_simple grows as the loss falls (McCandlish et al.; the paper: b = 6.24): {'yes' if yes else 'no'}, "
             f"b = {', '.join(f'{b:.2f}' for b in bs)} ({'near' if yes and all(3 < b < 12 for b in bs) else 'not near'} 6.24)"]
    # an edge optimum is only a bound: fitted, it would bias b; the seeds' spread says how far to trust the rest
    inner = [(o["level"] / math.log(2), o["bs"]) for o in optima if not o["edge"]]
    law = fit_law(inner) if len({round(L, 6) for L, _ in inner}) >= 2 else None
    lines.append(f"VERDICT the direct optimum grows as the loss falls: {'yes' if law and law[1] > 0 else 'no'}, fit over "
                 f"{len(inner)} interior optima: {fmt(law)}; seed spread per level: " + ", ".join(
                     f"{o['seed_hi'] / o['seed_lo']:.1f}x" for o in optima if o["seed_lo"] > 0))
    # McCandlish: B_simple ~ B_crit, the batch past which tokens to a loss grow; the fewest-tokens batch
    # sits at or below it (with the lr tuned, tokens only grow with the batch), so a ratio >= 1 is expected
    ratios = [o["b_simple"] / o["bs"] for o in optima if not o["edge"] and o["b_simple"] > 0]
    crit = [o["b_simple"] / o["b_crit"] for o in optima if o["b_simple"] > 0 and o["b_crit"] > 0]
    med = lambda r: f"median {np.median(r):.2f} (range {min(r):.2f}-{max(r):.2f}, {len(r)} levels)" if r else "none"
    agree = bool(ratios) and 0.5 <= np.median(ratios) <= 2
    lines.append(f"VERDICT the two instruments agree on the optimum (within 2x): {'yes' if agree else 'no'}: B_simple / "
                 f"direct optimum {med(ratios)}; B_simple / B_crit {med(crit)}")
    # the law has L alone: at a loss every size reaches, the sizes' fits should give the same batch
    lo = max(min(L for L, _ in lv) for lv in levels.values())
    hi = min(max(L for L, _ in lv) for lv in levels.values())
    if lo <= hi and all(fits.values()):
        L = math.sqrt(lo * hi) / math.log(2)
        at = {n: f[0] / L ** f[1] for n, f in fits.items()}
        lines.append(f"VERDICT at equal loss the sizes want the same batch (the law has no N): at {L:.3f} bpb B_simple "
                     + ", ".join(f"{n} {B:.0f}" for n, B in at.items()) + f": spread {max(at.values()) / min(at.values()):.1f}x, "
                     f"{'yes' if max(at.values()) < 2 * min(at.values()) else 'no'} (paper's law there: {paper_law_bytes(L):.3g})")
    else:
        lines.append("VERDICT at equal loss the sizes want the same batch: the sizes' loss ranges do not overlap, not tested")
    return lines


def summary(runs, best, optima, setup, seeds):
    # the lr each batch took and its seeds' final loss (the training loss over the last 4% of tokens, in
    # bits/byte: unseen data, as good as a validation loss on 48k tokens), then the optimum per level by both instruments
    seq, lines, window = setup["seq_len"], [], setup["smooth_frac"] * setup["tokens"]
    for n in setup["direct"]:
        lines.append(f"{n} final bpb: " + "; ".join(f"batch {b * seq} lr {best[n, b]:g}: " + " / ".join(
            f"{final_loss(runs[n, b, best[n, b], s], window) / math.log(2):.3f}" for s in seeds) for b in setup["batches"]))
    lines += ["", "| size | level (bpb) | direct optimum (seeds' range) | B_crit | B_simple |", "|---|---|---|---|---|"]
    lines += [f"| {o['size']} | {o['level'] / math.log(2):.3f} | {o['bs']:.0f}{' (edge)' if o['edge'] else ''} "
              f"({o['seed_lo']:.0f}-{o['seed_hi']:.0f}) | {o['b_crit']:.0f} | {o['b_simple']:.0f} |" for o in optima]
    return lines


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
    runs, best = run_all(args, setup, runs_dir, train=not args.reanalyse)
    seeds = common.seed_list(args)
    grid, curves, table, optima = direct(runs, best, setup, seeds)
    points, levels, fits = noise_analysis(runs, best, setup, optima)
    write_csvs(table, optima, runs, best, setup, out)
    plot(grid, curves, optima, points, levels, fits, setup, out / "batch_size.png")
    print(f"\n{len(runs)} runs ({sum(r is None for r in runs.values())} failed or diverged), {time.time() - t0:.0f} s in all.")
    print("\n".join(summary(runs, best, optima, setup, seeds) + [""] + verdicts(optima, levels, fits, setup)))
    print(f"\nwrote {out / 'batch_size.png'} and batch_size*.csv there, runs in {runs_dir}")
    return 0


def main(argv=None):
    return common.main("batch_size.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
