"""WSD against Cosine(T), each at its own best learning rate: the paper's Figure 5 and §4.3 (MiniCPM,
Hu et al. 2024, arXiv 2404.06395), on a model small enough to see enough tokens on 2 CPU cores.

For every peak lr of a grid (seed 1):
  - one WSD stable trunk (warmup, then constant lr) trained in segments; at each branch point k its
    checkpoint is resumed into a new folder with a decay of D steps (--decay_start k), so every decay
    continues the one trunk exactly (§4.3). Decays end at each horizon T: 2.5%, 10% and 20% of T
    long, exponential (§4, the paper's) and 1-sqrt (Hägele et al. 2024);
  - more 10% exponential decays from other points of the same trunk: the any-time figure (§4.3), whose
    lower envelope is fitted with L(C) = beta C^-alpha + L0 (Appendix B.2);
  - Cosine(T) to 10% of the peak (Appendix B.1) and Cosine(T) to 0, each its own run.
Then the best lr of each family (WSD, Cosine to 10%, Cosine to 0) is trained again with seed 2
(and with each further seed of --seeds).

    python experiments/wsd_vs_cosine.py                  # cpu scale, ~10 min on 2 cores
    python experiments/wsd_vs_cosine.py --quick          # a 1-layer model, under a minute (the smoke test)
    python experiments/wsd_vs_cosine.py --scale gpu --device cuda --workers 4   # 2.8M non-embedding, 1 GPU

Writes to --out (default experiments/out): wsd_vs_cosine.png (schedules, Figure-5 curves, lr sweep),
wsd_anytime.png (the envelope and its fit), wsd_vs_cosine.csv (every logged row of every run),
wsd_vs_cosine_grid.csv (each run's final loss: the full grid) and wsd_vs_cosine_runs/<run>/.
"""
import csv
import pathlib
import shutil
import sys
import time

import common
from common import RunFailed, eval_flags, fail, pyplot, read_metrics, run_parallel
import data  # noqa: E402  (after common, which puts the repo root on the path)

# cpu: 2 layers of width 64 on bytes: 86,336 non-embedding parameters (the 257 x 64 embedding is 16K
# more), 2,048 tokens a step, ~63K tokens/s on one core. Horizons 440 and 880 steps are 10.4 and 20.9
# tokens per non-embedding parameter (§4.3's runs see 20N-80N; the issue asks >= 10N and >= 20N).
# The lr grid reaches below 0.005, the best of a first probe at this size.
SCALES = {
    "cpu": dict(model=dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160), batch=16, seq=128,
                totals=(440, 880), lrs=(0.00125, 0.0025, 0.005, 0.01), warmup=22, eval_interval=88,
                eval_tokens=65536, log_interval=4),
    "quick": dict(model=dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn_dim=64), batch=4, seq=32,
                  totals=(40, 80), lrs=(0.005, 0.01), warmup=4, eval_interval=20, eval_tokens=1024,
                  log_interval=1),
    # one GPU (not measured here): 4 layers of width 256, 2.75M non-embedding parameters, 16K tokens a
    # step; 10N and 20N are 1,680 and 3,360 steps. Run 4 workers on the one GPU.
    "gpu": dict(model=dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, ffn_dim=640), batch=64, seq=256,
                totals=(1680, 3360), lrs=(0.00125, 0.0025, 0.005, 0.01), warmup=84, eval_interval=336,
                eval_tokens=131072, log_interval=8),
}
DECAY_FRACS = (0.025, 0.1, 0.2)      # §4: 10% matches Cosine(T); Hägele et al.: 20% beats it, 2.5% is short
SHAPES = ("exp", "1-sqrt")            # exp: the paper's decay (§4.3); 1-sqrt: the best shape of Hägele et al.
FINAL_FRAC = 0.02                    # both decay shapes end at 2% of the peak, as the paper's exp decay
ANYTIME = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)   # any-time decays end at these fractions of the longer T


def parse_args(argv):
    p = common.parser(__doc__)
    # 2 seeds by default: the verdict must hold for both, and a third would not fit the 10-minute budget
    common.add_common_flags(p, seeds_help="; the first sweeps the whole lr grid, the others rerun each "
                            "family's best lr")
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    p.add_argument("--lrs", help="comma-separated peak lrs (default: the scale's grid)")
    p.add_argument("--device", default="cpu", help="passed to train.py")
    args = common.parse(p, argv)
    try:
        args.lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else None
    except ValueError:
        raise common.UsageError(f"--lrs {args.lrs}: give comma-separated numbers, e.g. --lrs 0.0025,0.005,0.01") from None
    return args


# ----------------------------------------------------------------------------- the runs

def base_flags(args, setup, lr, seed):
    m = setup["model"]
    # every arm shares model, data, seed, warmup and eval set: a difference in final loss is the schedule's;
    # the same seed also means the same batches in the same order (the loader is a function of seed and step)
    return ["--n_layer", m["n_layer"], "--n_embd", m["n_embd"], "--n_head", m["n_head"], "--n_kv_head",
            m["n_kv_head"], "--ffn_dim", m["ffn_dim"], "--block_size", setup["seq"], "--batch_size", setup["batch"],
            "--seq_len", setup["seq"], "--source", args.source, "--tokenizer", args.tokenizer,
            "--data_dir", args.data_dir, "--device", args.device, "--lr", lr, "--seed", seed,
            "--warmup_steps", setup["warmup"],   # the same warmup for every run: only the decay differs
            "--eval_interval", setup["eval_interval"], *eval_flags(setup["eval_tokens"]),
            "--log_interval", setup["log_interval"], "--ckpt_interval", 10**9]   # checkpoints only at segment ends


def branches_of(setup):
    """(T, D, shape) of every decay branched from a trunk: the Figure-5 grid, then the any-time decays."""
    totals = setup["totals"]
    # T: the horizon in steps; D: decay steps ending at T, so the branch point is k = T - D (at least one
    # step of decay at the quick scale); 3 lengths x 2 shapes x 2 horizons = the Figure-5 grid
    out = [(T, max(1, round(f * T)), s) for T in totals for f in DECAY_FRACS for s in SHAPES]
    # §4.3: a decay from any point of the trunk gives a finished model; their ends trace the envelope
    anytime = [round(f * totals[-1]) for f in ANYTIME]
    out += [(T, max(1, round(0.1 * T)), "exp") for T in anytime if T not in totals]
    return out


def trunk_job(args, setup, runs_dir, lr, seed):
    """One worker's job: the trunk in segments, each decay resumed from the trunk's checkpoint."""
    # train.py --resume keeps the trunk's optimizer, step and data position: a branch continues it exactly
    totals, name = setup["totals"], f"wsd_lr{lr:g}_s{seed}"
    trunk = runs_dir / name
    # The trunk is a WSD run whose decay starts at the longest total, never reached: its lr stays constant.
    # Each segment ends at a branch point k (--max_steps k), where the run evaluates and saves.
    trunk_flags = [*base_flags(args, setup, lr, seed), "--schedule", "wsd", "--decay_start", totals[-1],
                   "--decay_steps", 1, "--out_dir", trunk]
    branches = branches_of(setup)
    stops = sorted({T - D for T, D, _ in branches} | set(totals))   # segment ends: branch points and horizons
    # the trunk itself is an arm too: "no decay", read at each horizon T
    job, runs = [], {name: dict(family="stable", lr=lr, seed=seed, T=None, D=None, shape=None, k=None)}
    for i, stop in enumerate(stops):
        job.append(((trunk_flags if i == 0 else ["--resume", trunk]) + ["--max_steps", stop], trunk))
        for T, D, shape in (b for b in branches if b[0] - b[1] == stop):   # decays that start here
            bname = f"{name}_T{T}_{shape}{D}"
            job.append((["--resume", trunk, "--out_dir", runs_dir / bname, "--max_steps", T, "--decay_start", stop,
                         "--decay_steps", D, "--decay_shape", shape, "--final_lr_frac", FINAL_FRAC], runs_dir / bname))
            runs[bname] = dict(family="wsd", lr=lr, seed=seed, T=T, D=D, shape=shape, k=stop)
    return job, runs


def cosine_job(args, setup, runs_dir, lr, seed, T, family):
    """Cosine(T) to 10% (wsd.cosine, Appendix B.1) or to 0 (--final_lr_frac 0: the cosine's floor)."""
    # one run per horizon T: a cosine must know T in advance, the cost that WSD avoids (§4.3)
    name = f"{family}_lr{lr:g}_s{seed}_T{T}"
    flags = [*base_flags(args, setup, lr, seed), "--max_steps", T, "--out_dir", runs_dir / name]
    flags += ["--schedule", "cosine", "--final_lr_frac", 0.1 if family == "cos10" else 0.0]
    return [(flags, runs_dir / name)], {name: dict(family=family, lr=lr, seed=seed, T=T, D=None, shape=None, k=None)}


def run_phase(args, setup, runs_dir, plan):
    """plan: [(lr, seed, family)] -> {run name: info dict with 'rows'}, after running them all."""
    # a WSD family is one job (the trunk and its branches, in order); a cosine family one job per T
    jobs, runs = [], {}
    for lr, seed, family in plan:
        if family == "wsd":
            parts = [trunk_job(args, setup, runs_dir, lr, seed)]
        else:
            parts = [cosine_job(args, setup, runs_dir, lr, seed, T, family) for T in setup["totals"]]
        for job, info in parts:
            jobs.append(job)
            runs.update(info)
    steps = lambda job: sum(int(a[a.index("--max_steps") + 1]) for a, _ in job)
    # longest first: the pool ends on short jobs instead of one worker idling while the other runs a long one
    run_parallel(sorted(jobs, key=steps, reverse=True), workers=common.workers(args))
    for name, info in runs.items():
        # a branch's folder starts with its trunk's history (train.py --resume into another --out_dir):
        # keep only what the branch itself trained, the steps after its branch point k
        info["rows"] = [r for r in read_metrics(runs_dir / name) if info.get("k") is None or r["step"] > info["k"]]
        (runs_dir / name / "ckpt.pt").unlink(missing_ok=True)   # keep the output small
    return runs


# ----------------------------------------------------------------------------- results

def final(run):
    """The run's last validation loss (nats/token) and bits/byte, and its tokens."""
    r = [r for r in run["rows"] if "val_loss" in r][-1]
    return r["val_loss"], r["val_bpb"], r["tokens"]


def variant(run):
    """The arm a run belongs to, e.g. 'WSD exp 10%', 'Cosine to 10%', 'stable (no decay)'."""
    if run["family"] == "wsd":
        return f"WSD {run['shape']} {100 * run['D'] / run['T']:g}%"
    return {"cos10": "Cosine(T) to 10%", "cos0": "Cosine(T) to 0"}.get(run["family"], "stable (no decay)")


def grid_points(runs, totals):
    """{(variant, T, lr, seed): final val loss} for the Figure-5 arms; the stable trunk at each T."""
    pts = {}
    for name, run in runs.items():
        if run["family"] == "stable":
            for T in totals:
                at = [r["val_loss"] for r in run["rows"] if r["step"] == T and "val_loss" in r]
                pts[("stable (no decay)", T, run["lr"], run["seed"])] = at[-1]   # the trunk's eval at T
        elif run["T"] in totals:   # the any-time decays end elsewhere: they are not arms of Figure 5
            pts[(variant(run), run["T"], run["lr"], run["seed"])] = final(run)[0]
    return pts


def best_lrs(pts, seed, lrs, totals):
    """Each family's best lr: the lowest mean final loss over both horizons (for WSD, over all its decays)."""
    def mean_loss(prefix, lr):
        v = [x for (var, T, l, s), x in pts.items() if var.startswith(prefix) and l == lr and s == seed]
        return sum(v) / len(v)
    # one lr per family, not per decay length: the trunk is shared by all WSD decays, so they share its lr
    best = {fam: min(lrs, key=lambda lr: mean_loss(prefix, lr))
            for fam, prefix in (("wsd", "WSD"), ("cos10", "Cosine(T) to 10%"), ("cos0", "Cosine(T) to 0"))}
    # a best lr on the grid's edge may not be the best lr at all: the comparison would favour one family
    for fam, lr in best.items():
        if len(lrs) >= 3 and lr in (min(lrs), max(lrs)):
            print(f"  warning: the best lr of {fam} ({lr:g}) is on the edge of the grid; widen --lrs", flush=True)
    return best


def fit_envelope(points):
    """Fit L(C) = beta C^-alpha + L0 (Appendix B.2) to (C, L) points. -> dict(alpha, beta, L0, C0, err)."""
    # least squares by scipy's curve_fit, as the paper; C (~1e11 FLOPs) is scaled by its smallest value C0
    # so beta is O(1) rather than ~1e5 and the fit is well conditioned: beta is then per unit of C/C0
    import numpy as np
    from scipy.optimize import curve_fit
    C, L = np.asarray([p[0] for p in points], float), np.asarray([p[1] for p in points], float)
    C0 = C.min()
    f = lambda x, beta, alpha, L0: beta * x ** -alpha + L0
    p0 = (L.max() - L.min() + 1e-3, 0.5, max(0.0, L.min() - 0.1))   # start: the loss range, L0 just below it
    # alpha <= 5: with ~6 points an unbounded fit can trade a huge alpha against L0
    popt, pcov = curve_fit(f, C / C0, L, p0=p0, bounds=([0, 0, 0], [np.inf, 5, np.inf]), maxfev=20000)
    # 1-sigma errors; pcov is inf when the points cannot pin a parameter down
    err = np.sqrt(np.diag(pcov)) if np.all(np.isfinite(pcov)) else [float("nan")] * 3
    return dict(beta=popt[0], alpha=popt[1], L0=popt[2], C0=C0, err=dict(beta=err[0], alpha=err[1], L0=err[2]))


def write_csvs(runs, out, n_params):
    keys = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb"]
    meta = ["family", "shape", "lr_peak", "seed", "T", "D", "k"]
    info = lambda run: [run["family"], run["shape"] or "", run["lr"], run["seed"], run["T"] or "", run["D"] or "",
                        run["k"] if run["k"] is not None else ""]
    with open(out / "wsd_vs_cosine.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *meta, *keys])
        for name, run in runs.items():   # floats written with repr: they read back bitwise
            w.writerows([name, *info(run), *(repr(r[k]) if k in r else "" for k in keys)] for r in run["rows"])
    with open(out / "wsd_vs_cosine_grid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "variant", *meta, "tokens", "tokens_per_param", "val_loss", "val_bpb"])
        for name, run in runs.items():
            if run["family"] != "stable":
                loss, bpb, tokens = final(run)
                w.writerow([name, variant(run), *info(run), tokens, f"{tokens / n_params:.2f}", repr(loss), repr(bpb)])


# the arms of the verdict, in table order: the trunk, 2 shapes x 3 decay lengths, the two cosines
ARMS = ["stable (no decay)", *(f"WSD {s} {100 * f:g}%" for s in SHAPES for f in DECAY_FRACS),
        "Cosine(T) to 10%", "Cosine(T) to 0"]


def family(arm):
    return "cos10" if arm == "Cosine(T) to 10%" else "cos0" if arm.startswith("Cos") else "wsd"


def paired_differences(pts, best, seeds, totals):
    """{arm: {(T, seed): loss - Cosine(T) to 10% loss}}, each at its family's best lr."""
    # same-seed differences pair the runs: the same init and batches (the validation windows are the
    # same for every seed), so the seed's own luck cancels; the seeds' differences give the spread
    ref = lambda T, s: pts.get(("Cosine(T) to 10%", T, best["cos10"], s))
    return {arm: {(T, s): pts[(arm, T, best[family(arm)], s)] - ref(T, s) for T in totals for s in seeds
                  if (arm, T, best[family(arm)], s) in pts and ref(T, s) is not None}
            for arm in ARMS if arm != "Cosine(T) to 10%"}


def verdict_table(pts, best, seeds, totals, tokens_per_step, n_params):
    """Markdown: each arm at its family's best lr: its loss and its difference from Cosine(T) to 10%."""
    # per seed, never averaged: the verdict must hold for each seed (a negative difference: the arm is better)
    diffs = paired_differences(pts, best, seeds, totals)
    head = [f"T = {T} ({T * tokens_per_step / n_params:.1f} N): loss, seeds {' / '.join(map(str, seeds))}"
            for T in totals]
    head += [f"T = {T}: minus Cosine 10%, per seed" for T in totals]
    lines = ["| arm (its best lr) | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for arm in ARMS:
        lr = best[family(arm)]
        cells = [" / ".join(f"{pts[(arm, T, lr, s)]:.4f}" if (arm, T, lr, s) in pts else "n/a" for s in seeds)
                 for T in totals]
        cells += [" / ".join(f"{diffs[arm][(T, s)]:+.4f}" if (T, s) in diffs.get(arm, {}) else "0" for s in seeds)
                  for T in totals]
        lines.append(f"| {arm} (lr {lr:g}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(pts, lrs, seed, totals):
    """Markdown: the final loss of each arm at every lr of the grid (first seed), longer horizon."""
    arms = sorted({k[0] for k in pts})
    lines = [f"| arm, T = {totals[-1]} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{pts[(arm, totals[-1], lr, seed)]:.4f}" for lr in lrs) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

def plot(runs, pts, best, seeds, lrs, totals, path):
    plt = pyplot()
    # four panels: the lr schedules, loss against tokens (Figure 5), the lr sweep, the verdict
    fig, (lr_ax, ax, sw_ax, d_ax) = plt.subplots(1, 4, figsize=(24, 5.5))
    s1 = seeds[0]
    trunk = runs[f"wsd_lr{best['wsd']:g}_s{s1}"]
    # the trunk's (tokens, loss) at branch point k, where a branch's curve starts
    at_k = lambda k: [(r["tokens"], r["val_loss"]) for r in trunk["rows"] if r["step"] == k and "val_loss" in r]
    color = {T: f"C{i}" for i, T in enumerate(totals)}
    show = {("exp", 0.1): "-", ("exp", 0.025): "--", ("1-sqrt", 0.2): "-."}   # the arms drawn as curves
    for name, run in runs.items():
        if run["seed"] != s1:
            continue
        if run["family"] == "stable" and run["lr"] == best["wsd"]:
            style = dict(color="k", lw=2, label=f"WSD stable trunk (lr {run['lr']:g})")
        elif run["family"] == "wsd" and run["lr"] == best["wsd"] and (run["shape"], round(run["D"] / run["T"], 3)) in show \
                and run["T"] in totals:
            style = dict(color=color[run["T"]], ls=show[(run["shape"], round(run["D"] / run["T"], 3))],
                         label=f"{variant(run)}, T={run['T']}")
        elif run["family"] in ("cos10", "cos0") and run["lr"] == best[run["family"]]:
            style = dict(color=color[run["T"]], ls=":" if run["family"] == "cos10" else (0, (1, 4)), lw=2,
                         label=f"{variant(run)}, T={run['T']} (lr {run['lr']:g})")
        else:
            continue
        lr_rows = [r for r in run["rows"] if "lr" in r]
        lr_ax.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], **style)
        val = ([] if run["k"] is None else at_k(run["k"])) + [(r["tokens"], r["val_loss"]) for r in run["rows"]
                                                              if "val_loss" in r]
        ax.plot(*zip(*val), marker="." if run["k"] is not None else None, **style)
    shown = [v for (arm, T, lr, s), v in pts.items() if s == s1 and lr == best[family(arm)]]   # zoom on the ends
    ax.set_ylim(min(shown) - 0.03, max(shown) + 0.12)
    ax.set_xlim(0.3 * totals[0] * trunk["rows"][-1]["tokens"] / trunk["rows"][-1]["step"], None)
    ax.set(xlabel="tokens", ylabel="validation loss (nats/byte)", title=f"decays from one trunk vs Cosine(T) (cf. Figure 5), seed {s1}")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="schedules at each family's best lr")
    lr_ax.legend(fontsize=7)
    # the lr sweep: each arm's final loss at the longer horizon against lr; the second seed as a cross
    for i, arm in enumerate(["WSD exp 10%", "WSD 1-sqrt 20%", "WSD exp 2.5%", "Cosine(T) to 10%", "Cosine(T) to 0"]):
        for T, ls in zip(totals[-2:], ("--", "-")):
            sw_ax.plot(lrs, [pts[(arm, T, lr, s1)] for lr in lrs], ls, marker="o", color=f"C{i}",
                       label=f"{arm}, T={T}" if ls == "-" else None, alpha=1 if ls == "-" else 0.5)
    sw_ax.set_xscale("log")
    sw_ax.set(xlabel="peak lr", ylabel="final validation loss", title=f"lr sweep, seed {s1} (dashed: shorter T)")
    sw_ax.legend(fontsize=7)
    # the verdict: each arm minus Cosine(T) to 10% at the same T and seed (the same init and batches),
    # every arm at its family's best lr; one marker per seed shows the spread
    for arm, d in paired_differences(pts, best, seeds, totals).items():
        for (T, seed), v in d.items():
            d_ax.plot(v, arm, "osD^v"[seeds.index(seed) % 5], color=color[T], ms=6, alpha=0.8,
                      label=f"T={T}, seed {seed}" if arm.startswith("stable") else None)
    d_ax.axvline(0, color="k", lw=0.8)
    d_ax.set(xlabel="loss minus Cosine(T) to 10% (nats/byte; < 0: better)", title="each arm at its best lr, every seed")
    d_ax.legend(fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_anytime(runs, best, seeds, fits, n_params, path):
    plt = pyplot()
    import numpy as np
    fig, ax = plt.subplots(figsize=(8, 5.5))
    flops = lambda tokens: 6 * n_params * tokens   # C = 6 N D, N non-embedding (§4.5)
    # per seed: the trunk (constant lr) and its 10% exp decays; the decays' ends lie below the trunk (§4.3)
    for seed, mk in zip(seeds, "osD^v" * len(seeds)):
        trunk = runs[f"wsd_lr{best['wsd']:g}_s{seed}"]
        tv = [(flops(r["tokens"]), r["val_loss"]) for r in trunk["rows"] if "val_loss" in r and r["step"] > 0]
        ax.plot(*zip(*tv), color="k", lw=1.5 if seed == seeds[0] else 0.7, label=f"stable trunk, seed {seed}")
        for run in runs.values():   # the 10% exp decays of this trunk: the any-time curves
            if run["family"] == "wsd" and run["lr"] == best["wsd"] and run["seed"] == seed and run["shape"] == "exp" \
                    and run["D"] == max(1, round(0.1 * run["T"])):
                pts = [(flops(r["tokens"]), r["val_loss"]) for r in run["rows"] if "val_loss" in r]
                ax.plot(*zip(*pts), color="C0", lw=0.8)
                ax.plot(*pts[-1], mk, color="C0", ms=6)
    for (seed, fit), ls in zip(fits.items(), ["--", ":", "-."] * len(fits)):
        C = np.geomspace(fit["C0"], max(flops(r["tokens"]) for r in trunk["rows"]) * 1.5, 200)
        ax.plot(C, fit["beta"] * (C / fit["C0"]) ** -fit["alpha"] + fit["L0"], "r", ls=ls,
                label=f"seed {seed}: L = {fit['beta']:.3f} (C/C0)^-{fit['alpha']:.3f} + {fit['L0']:.3f}, C0 = {fit['C0']:.2e}")
    ax.set_xscale("log")
    ends = [p[1] for fit in fits.values() for p in fit["points"]]
    ax.set_ylim(min(ends) - 0.05, max(ends) + 0.3)
    ax.set(xlabel="compute C = 6 N D (FLOPs)", ylabel="validation loss (nats/byte)",
           title=f"any-time decays (10% exp) from one trunk, lr {best['wsd']:g} (§4.3, Appendix B.2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_all(args, setup, runs_dir, lrs, seeds):
    """Phase 1: the whole lr grid, first seed; phase 2: each family's best lr, every other seed."""
    # the other seeds rerun only the best lrs: the grid is what costs, and the verdict compares each
    # family at its own best lr, so that is what every seed must confirm
    t0 = time.time()
    try:
        runs = run_phase(args, setup, runs_dir, [(lr, seeds[0], fam) for lr in lrs for fam in ("wsd", "cos10", "cos0")])
        print(f"  lr grid done ({time.time() - t0:.0f} s)", flush=True)
        best = best_lrs(grid_points(runs, setup["totals"]), seeds[0], lrs, setup["totals"])
        if seeds[1:]:
            runs.update(run_phase(args, setup, runs_dir, [(lr, s, fam) for s in seeds[1:] for fam, lr in best.items()]))
    except RunFailed as e:
        fail(str(e))
    return runs, best, time.time() - t0


def run(argv):
    args = parse_args(argv)
    setup = SCALES["quick" if args.quick else args.scale]
    lrs, totals, seeds = sorted(args.lrs or setup["lrs"]), setup["totals"], common.seed_list(args)
    n_params = common.non_embedding_params(setup["model"])   # N: horizons are read as tokens per parameter
    tokens_per_step = setup["batch"] * setup["seq"]
    # bad flags stop here, before the old runs are deleted
    out = common.check_out(args.out)
    common.check_data(args)
    runs_dir = out / "wsd_vs_cosine_runs"
    shutil.rmtree(runs_dir, ignore_errors=True)   # every run gets a fresh folder
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {n_params:,} non-embedding parameters; {tokens_per_step:,} tokens/step; horizons "
          + ", ".join(f"{T} steps = {T * tokens_per_step / n_params:.1f} N" for T in totals), flush=True)
    # prepare the data here, once: in the pool's workers data.py could not start its own pool,
    # and two workers would prepare the same folder at once
    data.prepare(args.source, args.tokenizer, args.data_dir, quiet=True)
    runs, best, wall = train_all(args, setup, runs_dir, lrs, seeds)
    pts = grid_points(runs, totals)
    # any-time: the ends of the 10% exp decays of the best WSD trunk (every seed) are the envelope,
    # fitted per seed: each seed's trunk is a run of its own (its init and batches)
    fits = {}
    for seed in seeds:
        env = [(6 * n_params * final(r)[2], final(r)[0]) for r in runs.values() if r["family"] == "wsd"
               and r["lr"] == best["wsd"] and r["seed"] == seed and r["shape"] == "exp" and r["D"] == max(1, round(0.1 * r["T"]))]
        fits[seed] = {**fit_envelope(env), "points": env}
    write_csvs(runs, out, n_params)
    plot(runs, pts, best, seeds, lrs, totals, out / "wsd_vs_cosine.png")
    plot_anytime(runs, best, seeds, fits, n_params, out / "wsd_anytime.png")
    print(f"\nbest lr: WSD {best['wsd']:g}, Cosine to 10% {best['cos10']:g}, Cosine to 0 {best['cos0']:g}; "
          f"{len(runs)} runs in {wall:.0f} s on {common.workers(args)} workers")
    print(f"\nfinal validation loss (nats/byte) at each family's best lr, seeds {', '.join(map(str, seeds))}:"
          f"\n{verdict_table(pts, best, seeds, totals, tokens_per_step, n_params)}")
    print(f"\nlr sweep, seed {seeds[0]}:\n{sweep_table(pts, lrs, seeds[0], totals)}")
    for seed, fit in fits.items():
        e = fit["err"]
        print(f"any-time envelope, seed {seed} ({len(fit['points'])} decay ends): L(C) = {fit['beta']:.4f}±{e['beta']:.4f}"
              f" (C/{fit['C0']:.3e})^-({fit['alpha']:.4f}±{e['alpha']:.4f}) + {fit['L0']:.4f}±{e['L0']:.4f}")
    print(f"\nwrote {out / 'wsd_vs_cosine.png'}, {out / 'wsd_anytime.png'}, {out / 'wsd_vs_cosine.csv'}, "
          f"{out / 'wsd_vs_cosine_grid.csv'}; runs in {runs_dir}")
    return 0


def main(argv=None):
    return common.main("wsd_vs_cosine.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
