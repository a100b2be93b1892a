"""The data-model scaling law of MiniCPM (Hu et al. 2024, §4.5), measured the paper's way: with WSD.

For each model size, one WSD stable run (constant lr after warmup) is trained once; at each data size
D it is branched into a 10% exponential decay (§4.3) whose final loss is the point L(N, D). The cost
is linear in the number of models and nearly free along D: that is the point of §4.5. The losses (in
bits per byte, §4.5) are fitted with Eq. 2,

    L(N, D) = C_N N^-alpha + C_D D^-beta + L0          N: non-embedding parameters, D: tokens,

and minimising L at fixed compute C = 6 N D gives Eq. 3,

    N_opt / D_opt = K^2 (C / 6)^eta,   K^2 = (alpha C_N / (beta C_D))^(2 / (alpha + beta)),
                                        eta = (beta - alpha) / (alpha + beta),

so the compute-optimal tokens per parameter D/N = 1 / (K^2 (C/6)^eta). Uncertainties: a bootstrap
over the points (refit on resampled points, the 16th-84th percentiles).

    python experiments/scaling_law.py                     # 4 sizes, 25K-203K params, 10N-60N: ~8 min on 2 cores
    python experiments/scaling_law.py --quick             # 3 tiny sizes, under a minute (the smoke test)
    python experiments/scaling_law.py --scale gpu --device cuda --workers 4
    python experiments/scaling_law.py --seeds 2           # every point measured with 2 seeds, fitted together
    python experiments/scaling_law.py --from out/run1 out/run2 ...   # fit your own finished runs

Writes to --out (default experiments/out): scaling_law.png (loss against D per model with the fitted
curves, cf. Figure 17; equal-loss contours over N and D, cf. Figure 10), scaling_law.csv (the points)
and scaling_law_runs/<run>/.
"""
import csv
import math
import pathlib
import shutil
import sys
import time

import numpy as np

import common
from common import RunFailed, UsageError, eval_flags, fail, non_embedding_params, pyplot, read_metrics, run_parallel
import checkpoint  # noqa: E402  (after common, which puts the repo root on the path)
import data  # noqa: E402

# cpu: widths 48-96 on bytes (vocabulary 257, so the embedding stays small), 2,048 tokens a step.
# Non-embedding sizes 25K, 86K, 139K, 203K (8x). Throughput on one core: 125K, 63K, ~48K, 38K tokens/s,
# so the largest model's 60N (12M tokens) plus its decays is ~6.5 minutes on one core, while the other
# core runs the three smaller ones. The lr is wsd_vs_cosine.py's best WSD lr at this width (muP lets
# it carry over widths, §3.1).
SCALES = {
    "cpu": dict(sizes=[dict(n_layer=1, n_embd=48, n_head=4, n_kv_head=2, ffn_dim=128),
                       dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160),
                       dict(n_layer=2, n_embd=80, n_head=4, n_kv_head=2, ffn_dim=208),
                       dict(n_layer=2, n_embd=96, n_head=4, n_kv_head=2, ffn_dim=256)],
                batch=16, seq=128, multiples=(10, 20, 40, 60), lr=0.005, warmup=20, eval_tokens=65536),
    "quick": dict(sizes=[dict(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, ffn_dim=48),
                         dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn_dim=64),
                         dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, ffn_dim=64)],
                  batch=8, seq=32, multiples=(2, 4, 6, 8), lr=0.01, warmup=4, eval_tokens=1024),
    # one GPU (not measured here): 0.4M-6.3M non-embedding parameters (16x), 16K tokens a step
    "gpu": dict(sizes=[dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, ffn_dim=320),
                       dict(n_layer=4, n_embd=192, n_head=4, n_kv_head=2, ffn_dim=480),
                       dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, ffn_dim=640),
                       dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=3, ffn_dim=960)],
                batch=64, seq=256, multiples=(10, 20, 40, 60), lr=0.005, warmup=100, eval_tokens=131072),
}
DECAY_FRAC, FINAL_FRAC = 0.1, 0.02     # §4: decays of ~10% of the run, exponential to 2% of the peak
BOOTSTRAP = 200                        # refits: enough for stable 16th/84th percentiles, each a few ms


# ----------------------------------------------------------------------------- Eq. 2 and Eq. 3

def loss_model(N, D, C_N, alpha, C_D, beta, L0):
    """Eq. 2."""
    # N, D: scalars or arrays of one shape (a meshgrid for Figure 10's contours); L is in bits/byte
    return C_N * N ** -alpha + C_D * D ** -beta + L0


def fit_scaling_law(N, D, L, starts=None):
    """Least-squares fit of Eq. 2 -> dict(C_N, alpha, C_D, beta, L0, sse, scaled), or None."""
    # scipy's curve_fit, as the paper. It assumes every point has the same noise and that the law holds
    # over the whole range: if the smallest D (10N) is still in an early, steeper regime, beta absorbs it.
    # N and D are scaled by their geometric means so every parameter is O(1)
    from scipy.optimize import curve_fit
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    N0, D0 = math.exp(np.log(N).mean()), math.exp(np.log(D).mean())
    f = lambda X, cn, a, cd, b, l0: cn * X[0] ** -a + cd * X[1] ** -b + l0
    spread = L.max() - L.min() + 1e-3
    # four starts (alpha, beta in {0.3, 0.7}): the sum of two power laws has local minima where one term
    # takes over the other's role; the best of the four by residual is kept
    starts = starts or [(spread, a, spread, b, max(0.0, L.min() - spread)) for a in (0.3, 0.7) for b in (0.3, 0.7)]
    best = None
    for p0 in starts:
        try:
            # exponents bounded to [0, 4] and every coefficient >= 0: the loss must fall with N and D
            p, _ = curve_fit(f, (N / N0, D / D0), L, p0=p0, bounds=([0, 0, 0, 0, 0], [np.inf, 4, np.inf, 4, np.inf]),
                             maxfev=5000)
        except (RuntimeError, ValueError):   # no convergence from this start
            continue
        sse = float(((f((N / N0, D / D0), *p) - L) ** 2).sum())
        if best is None or sse < best[1]:
            best = (p, sse)
    if best is None:
        return None
    (cn, a, cd, b, l0), sse = best
    # C_N (N/N0)^-a = (C_N N0^a) N^-a: back to unscaled N and D
    return dict(C_N=cn * N0 ** a, alpha=a, C_D=cd * D0 ** b, beta=b, L0=l0, sse=sse, scaled=tuple(best[0]))


def compute_optimal(fit, C):
    """Eq. 3 at compute C (FLOPs): K^2, eta, the optimal N and D, and D/N."""
    # minimising Eq. 2 under C = 6 N D: C a scalar or an array (then every result has C's shape)
    a, b = fit["alpha"], fit["beta"]
    with np.errstate(divide="ignore", over="ignore"):   # a degenerate fit (alpha ~ 0) gives inf, not a warning
        K = np.float64(a * fit["C_N"] / (b * fit["C_D"])) ** (1 / (a + b))
        eta = (b - a) / (a + b)   # eta < 0: D_opt/N_opt grows with compute (more tokens per parameter)
        N_opt = K * (C / 6) ** (b / (a + b))
        return dict(K2=K * K, eta=eta, N_opt=N_opt, D_opt=C / 6 / N_opt, D_over_N=1 / (K * K * (C / 6) ** eta))


def bootstrap(N, D, L, fit, C, n=BOOTSTRAP, seed=0):
    """Refit on points resampled with replacement. -> {name: (16th, 84th percentile)}, refits."""
    # the points are few (16 at cpu scale) and not independent (one trunk per model), so the band is a
    # rough guide; a fixed seed makes the printed band the same on every run
    rng = np.random.default_rng(seed)
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    draws = []
    for _ in range(n):
        i = rng.integers(0, len(L), len(L))
        if len(set(N[i])) < 2 or len(set(D[i])) < 3:   # Eq. 2 needs spread along both axes
            continue
        f = fit_scaling_law(N[i], D[i], L[i], starts=[fit["scaled"]])   # start at the full fit: one start suffices
        if f:
            draws.append({**f, **compute_optimal(f, C)})
    keys = ("alpha", "beta", "L0", "K2", "eta", "D_over_N")
    return {k: tuple(np.percentile([d[k] for d in draws], [16, 84])) for k in keys} if draws else {}, len(draws)


# ----------------------------------------------------------------------------- the runs

def size_job(args, setup, runs_dir, size, seed):
    """A worker's job: one model's stable trunk in segments and a 10% decay branched at each data size."""
    # §4.5 measured the WSD way: the trunk is trained once to the longest D and each D only costs its decay,
    # so a model's 4 data sizes cost ~1.1 runs instead of the ~2.2 runs of separate Cosine(T) runs per D
    N = non_embedding_params(size)
    tps = setup["batch"] * setup["seq"]
    name = f"N{N}" if args.seeds == 1 else f"N{N}_s{seed}"   # one seed: the names of the published runs
    trunk = runs_dir / name
    totals = sorted({max(2, round(m * N / tps)) for m in setup["multiples"]})   # steps of each data size
    flags = ["--n_layer", size["n_layer"], "--n_embd", size["n_embd"], "--n_head", size["n_head"],
             "--n_kv_head", size["n_kv_head"], "--ffn_dim", size["ffn_dim"], "--block_size", setup["seq"],
             "--batch_size", setup["batch"], "--seq_len", setup["seq"], "--source", args.source,
             "--tokenizer", args.tokenizer, "--data_dir", args.data_dir, "--device", args.device,
             "--lr", args.lr or setup["lr"], "--seed", seed, "--warmup_steps", setup["warmup"],
             # the bits/byte of this fixed validation set are the L of Eq. 2
             *eval_flags(setup["eval_tokens"]),
             # eval, logs and checkpoints only at segment ends (max_steps): a point needs only the final loss
             "--eval_interval", 10**9, "--log_interval", 10**9, "--ckpt_interval", 10**9,
             # a WSD run whose decay starts at the last total, never reached: the stable trunk
             "--schedule", "wsd", "--decay_start", totals[-1], "--decay_steps", 1, "--out_dir", trunk]
    job, points = [], []
    for i, T in enumerate(totals):
        D = max(1, round(DECAY_FRAC * T))   # decay steps (here D is steps; the points' D is tokens)
        job.append(((flags if i == 0 else ["--resume", trunk]) + ["--max_steps", T - D], trunk))
        branch = runs_dir / f"{name}_D{T * tps}"
        job.append((["--resume", trunk, "--out_dir", branch, "--max_steps", T, "--decay_start", T - D,
                     "--decay_steps", D, "--decay_shape", "exp", "--final_lr_frac", FINAL_FRAC], branch))
        points.append(dict(run=branch.name, trunk=name, N=N, k=T - D, **size))   # k: the branch point in the trunk
    return job, points


def train_points(args, setup, runs_dir):
    jobs, points = [], []
    # several seeds: every (N, D) point measured once per seed, all fitted together (repeats weigh the
    # noise of one run down; the bootstrap's band then covers the seed-to-seed spread too)
    for size in sorted(setup["sizes"], key=lambda s: -non_embedding_params(s)):
        for seed in common.seed_list(args):
            job, pts = size_job(args, setup, runs_dir, size, seed)
            jobs.append(job)   # largest first: the pool then fills the other worker with the smaller models
            points += pts
    run_parallel(jobs, workers=common.workers(args))
    for p in points:
        rows = read_metrics(runs_dir / p["run"])
        last = [r for r in rows if "val_bpb" in r][-1]
        # the trunk's loss at the branch point: the plot's x, to show what the decay itself gained (§4.3)
        trunk = [r for r in read_metrics(runs_dir / p["trunk"]) if r["step"] == p["k"] and "val_bpb" in r]
        p.update(D=last["tokens"], val_loss=last["val_loss"], bpb=last["val_bpb"],
                 stable_bpb=trunk[-1]["val_bpb"] if trunk else float("nan"))
    for ckpt in runs_dir.glob("*/ckpt.pt"):
        ckpt.unlink()   # keep the output small
    return points


def points_from(folders):
    """One point per finished run folder of train.py: its last evaluation, N from its checkpoint."""
    # a WSD run's last evaluation comes after its decay; a run stopped mid-stable would bias its point up.
    # The checkpoint is read by checkpoint.load (torch.load with weights_only=True): a folder from
    # elsewhere may hold a pickle that runs code when loaded in full; this one only reads tensors and data
    points = []
    for folder in map(pathlib.Path, folders):
        if not (folder / "metrics.jsonl").exists():
            raise UsageError(f"--from {folder}: needs a train.py run folder with metrics.jsonl and a checkpoint")
        try:
            cfg = checkpoint.load(str(folder))["model_config"]
        except UsageError as e:   # no checkpoint, or one that is not ours: one line naming the flag
            raise UsageError(f"--from {folder}: {e}") from None
        rows = [r for r in read_metrics(folder) if "val_bpb" in r]
        if not rows:
            raise UsageError(f"--from {folder}: its metrics.jsonl has no evaluation; train with --eval_interval > 0")
        points.append(dict(run=folder.name, N=non_embedding_params(cfg), D=rows[-1]["tokens"],
                           val_loss=rows[-1]["val_loss"], bpb=rows[-1]["val_bpb"], stable_bpb=float("nan")))
    return points


# ----------------------------------------------------------------------------- outputs

def write_csv(points, path):
    keys = ["run", "N", "D", "D_over_N", "val_loss", "bpb", "stable_bpb"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for p in points:
            w.writerow([p["run"], p["N"], p["D"], f"{p['D'] / p['N']:.2f}", repr(p["val_loss"]), repr(p["bpb"]),
                        repr(p["stable_bpb"])])


def plot(points, fit, path):
    plt = pyplot()
    fig, (ax, cx) = plt.subplots(1, 2, figsize=(14, 5.5))
    Ns = sorted({p["N"] for p in points})
    for i, N in enumerate(Ns):   # Figure 17: loss against data, one model per colour, Eq. 2's curve
        pts = sorted((p["D"], p["bpb"], p["stable_bpb"]) for p in points if p["N"] == N)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=f"C{i}", label=f"N = {N:,} (decayed)")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "x", color=f"C{i}", alpha=0.5)
        D = np.geomspace(pts[0][0] / 1.5, pts[-1][0] * 3, 100)
        ax.plot(D, loss_model(N, D, *(fit[k] for k in ("C_N", "alpha", "C_D", "beta", "L0"))), "-", color=f"C{i}", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="training tokens D", ylabel="validation loss (bits/byte)",
           title="loss against data (cf. Figure 17); lines: Eq. 2 fit; x: stable run before its decay")
    ax.legend(fontsize=8)
    # Figure 10: equal-loss contours over (N, D), constant-compute lines and the compute-optimal path
    n = np.geomspace(min(Ns) / 4, max(Ns) * 8, 200)
    d = np.geomspace(min(p["D"] for p in points) / 4, max(p["D"] for p in points) * 8, 200)
    NN, DD = np.meshgrid(n, d)   # (200, 200) grids: rows over D, columns over N
    LL = loss_model(NN, DD, *(fit[k] for k in ("C_N", "alpha", "C_D", "beta", "L0")))
    cs = cx.contour(NN, DD, LL, levels=12, cmap="viridis")
    cx.clabel(cs, fontsize=7, fmt="%.2f")
    C = 6 * NN * DD
    cx.contour(NN, DD, C, levels=np.geomspace(C.min(), C.max(), 8), colors="gray", linestyles=":", linewidths=0.7)
    Cs = np.geomspace(6 * n[0] * d[0], 6 * n[-1] * d[-1], 100)
    opt = compute_optimal(fit, Cs)
    # draw the optimal path only inside the plotted box: outside it the fit is an extrapolation anyway
    ok = (opt["N_opt"] >= n[0]) & (opt["N_opt"] <= n[-1]) & (opt["D_opt"] >= d[0]) & (opt["D_opt"] <= d[-1])
    cx.plot(opt["N_opt"][ok], opt["D_opt"][ok], "r-", lw=2, label="compute-optimal (Eq. 3)")
    cx.plot([p["N"] for p in points], [p["D"] for p in points], "k.", label="measured points")
    cx.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="tokens D",
           title="equal-loss contours of the fit (cf. Figure 10); dotted: equal compute 6ND")
    cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(points, fit, C_ref):
    N, D, L = ([p[k] for p in points] for k in ("N", "D", "bpb"))
    opt = compute_optimal(fit, C_ref)
    ci, n_ok = bootstrap(N, D, L, fit, C_ref)   # resamples with too little spread in N or D are skipped
    band = lambda k: f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""
    rms = math.sqrt(fit["sse"] / len(L))
    return "\n".join([
        f"Eq. 2 fit to {len(L)} points (rms residual {rms:.4f} bits/byte), bootstrap 16-84% over {n_ok} refits in []:",
        f"  L(N, D) = {fit['C_N']:.4g} N^-{fit['alpha']:.4f} + {fit['C_D']:.4g} D^-{fit['beta']:.4f} + {fit['L0']:.4f}",
        f"  alpha = {fit['alpha']:.3f}{band('alpha')}, beta = {fit['beta']:.3f}{band('beta')}, L0 = {fit['L0']:.3f}{band('L0')}",
        f"Eq. 3: N_opt/D_opt = K^2 (C/6)^eta with K^2 = {opt['K2']:.4g}{band('K2')}, eta = {opt['eta']:.3f}{band('eta')}",
        f"  at C = {C_ref:.3g} FLOPs (the largest run here): N_opt = {opt['N_opt']:,.0f}, D_opt = {opt['D_opt']:,.0f},"
        f" compute-optimal D/N = {opt['D_over_N']:.1f}{band('D_over_N')} tokens per parameter",
    ])


def parse_args(argv):
    p = common.parser(__doc__)
    # one seed by default (the published runs); more seeds measure every point once per seed
    common.add_common_flags(p, seeds=1, seeds_help="; every point is measured once per seed, all fitted together")
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    p.add_argument("--from", dest="from_runs", nargs="+", metavar="RUN_DIR",
                   help="fit the last evaluation of these finished train.py run folders instead of training")
    p.add_argument("--lr", type=float, help="peak lr (default: the scale's)")
    p.add_argument("--device", default="cpu", help="passed to train.py")
    return common.parse(p, argv)


def measure(args, setup, out):
    """The points: trained here (a fresh scaling_law_runs/), or read from --from's run folders."""
    if args.from_runs:
        return points_from(args.from_runs)
    common.check_data(args)   # before the old runs are deleted
    runs_dir = out / "scaling_law_runs"
    shutil.rmtree(runs_dir, ignore_errors=True)   # every run gets a fresh folder
    sizes = ", ".join(f"{non_embedding_params(s):,}" for s in setup["sizes"])
    print(f"models (non-embedding parameters): {sizes}; data sizes {setup['multiples']} x N; "
          f"{setup['batch'] * setup['seq']:,} tokens/step", flush=True)
    # prepare the data here, once: in the pool's workers data.py could not start its own pool,
    # and two workers would prepare the same folder at once
    data.prepare(args.source, args.tokenizer, args.data_dir, quiet=True)
    try:
        return train_points(args, setup, runs_dir)
    except RunFailed as e:
        fail(str(e))


def run(argv):
    args = parse_args(argv)
    setup = SCALES["quick" if args.quick else args.scale]
    out = common.check_out(args.out)   # a bad --out stops here, before anything is deleted
    t0 = time.time()
    points = measure(args, setup, out)
    wall = time.time() - t0
    # Eq. 2 separates N and D only with 2+ sizes and 3+ data sizes, and needs more points than its 5 parameters
    if len({p["N"] for p in points}) < 2 or len({p["D"] for p in points}) < 3 or len(points) < 6:
        raise UsageError("Eq. 2 has 5 parameters: give at least 6 points over 2+ model sizes and 3+ data sizes")
    fit = fit_scaling_law(*([p[k] for p in points] for k in ("N", "D", "bpb")))
    if fit is None:
        fail("the Eq. 2 fit did not converge from any starting point; add points or check the losses")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(points, out / "scaling_law.csv")
    plot(points, fit, out / "scaling_law.png")
    print("\n| N | D | D/N | bits/byte (decayed) | bits/byte (stable, before the decay) |\n|---|---|---|---|---|")
    for p in points:
        print(f"| {p['N']:,} | {p['D']:,} | {p['D'] / p['N']:.1f} | {p['bpb']:.4f} | {p['stable_bpb']:.4f} |")
    # Eq. 3 is read at the largest compute measured here, not extrapolated to the paper's scale
    print(f"\n{report(points, fit, max(6 * p['N'] * p['D'] for p in points))}")
    print(f"\n{len(points)} points, {wall:.0f} s; wrote {out / 'scaling_law.png'}, {out / 'scaling_law.csv'}")
    return 0


def main(argv=None):
    return common.main("scaling_law.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
