"""The tables and quoted numbers of the write-ups, computed from the CSVs in docs/ (for tools/writeup.py).

One function per generated table (TABLES) and per number quoted in a sentence (VALUES). Numbers are
computed from the full-precision CSV values and rounded once, at the end: a difference of two rounded
losses can be off by one in its last digit. The fits are the experiments' own code (curve_fit with
their bounds and starts), so a write-up reports what its script would print.
"""
import csv
import functools
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the experiments' fits are imported from experiments/ (which imports the repo's flat scripts)
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]


class WriteupError(Exception):
    """A missing CSV or an unknown marker name: one line on stderr, exit 2, nothing written."""


def read_csv(name):
    """docs/NAME.csv as a list of dicts (strings); a missing file is a one-line error."""
    path = DOCS / f"{name}.csv"
    if not path.exists():
        raise WriteupError(f"{path} is missing: run the experiment that writes it, or restore it")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def span(values, fmt="{:.2f}", sep="-"):
    """'lo-hi' of the formatted values ('0.11-0.23'), or one value when they agree once rounded."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}{sep}{hi}"


def g(text):
    """'7.2e+04' -> '7.2e4': exponents as the prose writes them."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)


def both(values, fmt="{:+.3f}", sep=" / "):
    """Per-seed values in seed order: 'seed 1 / seed 2' in tables, '-0.044 and -0.056' in sentences."""
    return sep.join(fmt.format(v) for v in values)


def markdown(header, rows):
    """A pipe table: header cells, then rows of cells (already strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


# ----------------------------------------------------------------------------- WSD vs cosine (§4.3)

SEEDS = (1337, 1338)   # every two-seed write-up here ran these (each experiment's --seed default and the next)
# short names for the markers -> the arm names in the CSV
ARM = {"stable": "stable (no decay)", "exp2.5": "WSD exp 2.5%", "exp10": "WSD exp 10%", "exp20": "WSD exp 20%",
       "sqrt2.5": "WSD 1-sqrt 2.5%", "sqrt10": "WSD 1-sqrt 10%", "sqrt20": "WSD 1-sqrt 20%",
       "cos10": "Cosine(T) to 10%", "cos0": "Cosine(T) to 0"}
FAMILY = {"stable (no decay)": "wsd", "Cosine(T) to 10%": "cos10", "Cosine(T) to 0": "cos0"}


@functools.lru_cache(None)
def wsd():
    """{(arm, T, lr, seed): final val loss} from the grid, plus the stable trunk's (a separate CSV)."""
    # the grid CSV holds every decayed / cosine run; the trunk's evaluation at T is in no run's final
    # row, so it lives in wsd_vs_cosine_stable.csv (transcribed from the experiment's printed table)
    pts = {}
    for name in ("wsd_vs_cosine_grid", "wsd_vs_cosine_stable"):
        for r in read_csv(name):
            pts[r["variant"], int(r["T"]), float(r["lr_peak"]), int(r["seed"])] = float(r["val_loss"])
    return pts


@functools.lru_cache(None)
def best_lr(family):
    """A family's best lr: the lowest mean final loss over T = 440 and 880, seed 1337 (as the script)."""
    # WSD's lr is chosen over all six decays at once: they share one trunk, so they share its lr
    prefix = {"wsd": "WSD", "cos10": "Cosine(T) to 10%", "cos0": "Cosine(T) to 0"}[family]
    losses = {}
    for (arm, T, lr, seed), v in wsd().items():
        if arm.startswith(prefix) and seed == SEEDS[0] and T in (440, 880):
            losses.setdefault(lr, []).append(v)
    return min(losses, key=lambda lr: sum(losses[lr]) / len(losses[lr]))


def wsd_loss(arm, T, seed, lr=None):
    # by default at the arm's family's best lr: the comparison the finding is about
    lr = best_lr(FAMILY.get(arm, "wsd")) if lr is None else lr
    return wsd()[arm, T, lr, seed]


def wsd_gap(arm, T, seed, lr=None):
    """Loss minus Cosine(T) to 10% at the same T and seed (each at its best lr unless lr is given)."""
    return wsd_loss(arm, T, seed, lr) - wsd_loss("Cosine(T) to 10%", T, seed, lr)


def table_wsd_decay():
    rows = []
    for key in ("stable", "exp2.5", "exp10", "exp20", "sqrt2.5", "sqrt10", "sqrt20", "cos10", "cos0"):
        arm = ARM[key]
        # the two claims of the finding row are in bold: 10% exp (the paper's) and 20% 1-sqrt (the best)
        bold = (lambda s: f"**{s}**") if key in ("exp10", "sqrt20") else (lambda s: s)
        losses = [both((wsd_loss(arm, T, s) for s in SEEDS), "{:.4f}") for T in (440, 880)]
        gaps = ["0" if key == "cos10" else bold(both(wsd_gap(arm, T, s) for s in SEEDS))
                for T in (440, 880)]
        label = arm.replace("stable (no decay)", "stable, no decay")
        rows.append([f"{bold(label)} ({best_lr(FAMILY.get(arm, 'wsd')):g})", *losses, *gaps])
    return markdown(["arm (its best lr)", "T = 440 (10.4 N)", "T = 880 (20.9 N)", "minus cosine, T = 440",
                     "minus cosine, T = 880"], rows)


def table_wsd_sweep():
    # the whole lr grid ran with the first seed only, at both horizons; the longer one is shown
    lrs = sorted({lr for (_, T, lr, s) in wsd() if T == 880 and s == SEEDS[0]})
    rows = []
    for key in ("stable", "exp10", "sqrt20", "exp2.5", "cos10", "cos0"):
        arm = ARM[key]
        best = best_lr(FAMILY.get(arm, "wsd"))
        cells = [f"{wsd_loss(arm, 880, SEEDS[0], lr):.4f}" for lr in lrs]
        rows.append([arm.replace("stable (no decay)", "stable, no decay")]
                    + [f"**{c}**" if lr == best else c for c, lr in zip(cells, lrs)])
    return markdown(["arm", *(f"lr {lr:g}" for lr in lrs)], rows)


@functools.lru_cache(None)
def anytime_fits():
    """Appendix B.2's L(C) fitted per seed to the ends of the best trunk's 10% exp decays."""
    import wsd_vs_cosine   # the experiment's own fit (curve_fit, its bounds and start): what it printed
    # N, for C = 6 N D: from the model shape (the CSV's tokens_per_param is rounded)
    import common
    n_params = common.non_embedding_params(wsd_vs_cosine.SCALES["cpu"]["model"])
    fits = {}
    for seed in SEEDS:
        env = [(6 * n_params * float(r["tokens"]), float(r["val_loss"])) for r in read_csv("wsd_vs_cosine_grid")
               if r["variant"] == "WSD exp 10%" and float(r["lr_peak"]) == best_lr("wsd") and int(r["seed"]) == seed]
        fits[seed] = wsd_vs_cosine.fit_envelope(env)
    return fits


def table_wsd_anytime():
    fits = anytime_fits()
    C0 = min(f["C0"] for f in fits.values())
    rows = []
    for seed, f in fits.items():
        e = f["err"]
        # an L0 at the fit's lower bound (0) is not a measurement: said so rather than given an error
        L0 = "0.00 (at its bound)" if f["L0"] < 1e-6 else f"{f['L0']:.2f} ± {e['L0']:.2f}"
        rows.append([str(seed), f"{f['alpha']:.3f} ± {e['alpha']:.3f}", f"{f['beta']:.2f} ± {e['beta']:.2f}", L0])
    return markdown(["seed", "alpha", f"beta (C in units of {sci(C0, 2)} FLOPs)", "L0"], rows)


# ----------------------------------------------------------------------------- scaling law (§4.5)

@functools.lru_cache(None)
def scaling():
    """The 16 points, Eq. 2 fitted by the experiment's own code, Eq. 3 at the largest run, the bootstrap."""
    import numpy as np
    import scaling_law
    rows = read_csv("scaling_law")
    N, D, L = (np.array([float(r[k]) for r in rows]) for k in ("N", "D", "bpb"))
    fit = scaling_law.fit_scaling_law(N, D, L)
    C = float((6 * N * D).max())    # the largest run's compute, where D/N is quoted
    band, _ = scaling_law.bootstrap(N, D, L, fit, C)   # seeded: the same band on every run
    return dict(rows=rows, fit=fit, C=C, opt=scaling_law.compute_optimal(fit, C), band=band,
                rms=float(np.sqrt(fit["sse"] / len(L))))


def table_scaling_grid():
    # D_over_N is written with 2 decimals (9.96 for the 10N point of the smallest model): rounded
    rows = read_csv("scaling_law")
    Ns = sorted({int(r["N"]) for r in rows})
    ratios = sorted({round(float(r["D_over_N"])) for r in rows})
    bpb = {(int(r["N"]), round(float(r["D_over_N"]))): float(r["bpb"]) for r in rows}
    return markdown(["N \\ D", *(f"{k} N" for k in ratios)],
                    [[f"{n:,}", *(f"{bpb[n, k]:.4f}" for k in ratios)] for n in Ns])


def table_scaling_fit():
    s = scaling()
    f, o, b = s["fit"], s["opt"], s["band"]
    rng = lambda k, fmt="{:.2f}": f"[{g(fmt.format(b[k][0]))}, {g(fmt.format(b[k][1]))}]"
    # an indented block (monospace), as the script prints it
    return "\n".join([
        f"    L(N, D) = {g(format(f['C_N'], '.4g'))} N^-{f['alpha']:.2f} + {f['C_D']:.4g} D^-{f['beta']:.3f} + {f['L0']:.3f}",
        f"    alpha = {f['alpha']:.2f} {rng('alpha')}   beta = {f['beta']:.2f} {rng('beta')}   "
        f"L0 = {f['L0']:.2f} {rng('L0')}",
        f"    K^2 = {g(format(o['K2'], '.2g'))} {rng('K2', '{:.2g}')}                "
        f"eta = {o['eta']:.2f} {rng('eta', '{:.2f}')}",
        f"    compute-optimal D/N at C = {sci(s['C'])} FLOPs (our largest run): {o['D_over_N']:.0f} "
        f"{rng('D_over_N', '{:.0f}')} tokens per parameter", ""])


# ----------------------------------------------------------------------------- sparse upcycling (§7.3)

@functools.lru_cache(None)
def moe():
    """{(run, seed): [rows sorted by step]}, numbers as floats."""
    out = {}
    for r in read_csv("moe_upcycling"):
        out.setdefault((r["run"], int(r["seed"])), []).append(
            {k: float(v) if v else None for k, v in r.items() if k != "run"})
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


ARMS_MOE = ("upcycled", "upcycled_eqflops", "upcycled_fresh_adam")   # (b), (c), (d); (a) is "dense"


def moe_final(run, seed):
    # the highest step: after the decay for every continuation, the branch point for the trunk
    return moe()[run, seed][-1]["val_loss"]


def moe_before_decay(run, seed):
    """The last evaluation before the run's decay starts (the first step whose lr is below the peak)."""
    rows = moe()[run, seed]
    peak = max(r["lr"] for r in rows if r["lr"] is not None)
    return [r for r in rows if r["lr"] is None or r["lr"] >= peak][-1]


def table_moe():
    # (b) and (c) in bold: the two claims (equal tokens, equal FLOPs); every gap is to (a), same seed
    rows = []
    for seed in SEEDS:
        v, dense = {run: moe_final(run, seed) for run in ARMS_MOE}, moe_final("dense", seed)
        cells = [(f"**{v[run]:.3f}**" if run != "upcycled_fresh_adam" else f"{v[run]:.3f}") + f" ({v[run] - dense:+.3f})"
                 for run in ARMS_MOE]
        rows.append([str(seed), f"{moe_final('trunk', seed):.3f}", f"{dense:.3f}", *cells])
    return markdown(["seed", "trunk (branch)", "(a) dense", "(b) upcycled, equal tokens",
                     "(c) upcycled, equal FLOPs", "(d) fresh Adam, equal tokens"], rows)


def moe_flops_per_token(run, seed=1337):
    """Training FLOPs per token over the continuation (after the branch), in MFLOP."""
    first, last = moe()["trunk", seed][-1], moe()[run, seed][-1]
    return (last["flops"] - first["flops"]) / (last["tokens"] - first["tokens"]) / 1e6


# ----------------------------------------------------------------------------- long context (§7.2)

LC_ARMS = {"a": "(a) base", "b": "(b) base + NTK x4", "c": "(c) ABF + CT", "d": "(d) NTK base + CT",
           "e": "(e) ABF + CT + NTK x4"}


@functools.lru_cache(None)
def long_context():
    """passkey {(arm, seed, length): mean over depths}, cells {(arm, seed, length, depth)}, loss {(arm, seed, pos_lo)}."""
    cells, loss = {}, {}
    for r in read_csv("long_context"):
        if r["kind"] == "passkey":
            cells[r["arm"], int(r["seed"]), int(r["length"]), float(r["depth"])] = float(r["value"])
        else:
            loss[r["arm"], int(r["seed"]), int(r["pos_lo"])] = (int(r["pos_hi"]), float(r["value"]))
    passkey = {}
    for (arm, seed, n, _), v in cells.items():
        passkey.setdefault((arm, seed, n), []).append(v)
    return {k: sum(v) / len(v) for k, v in passkey.items()}, cells, loss


def table_lc_passkey():
    # the mean over the 5 depths: one number per arm, length and seed (the CSV keeps every cell)
    passkey = long_context()[0]
    lengths = sorted({n for (_, _, n) in passkey})
    return markdown(["arm", *map(str, lengths)],
                    [[name, *(both((passkey[a, s, n] for s in SEEDS), "{:.2f}") for n in lengths)]
                     for a, name in LC_ARMS.items()])


def table_lc_loss():
    # octaves of position: the bins the experiment averaged over, read back from the CSV
    loss = long_context()[2]
    bins = sorted({(lo, hi) for (_, _, lo), (hi, _) in loss.items()})
    return markdown(["arm", *(f"{lo}-{hi - 1}" for lo, hi in bins)],
                    [[name, *(both((loss[a, s, lo][1] for s in SEEDS), "{:.3f}") for lo, _ in bins)]
                     for a, name in LC_ARMS.items()])


def lc_loss(arm, pos):
    # per seed, the bin that starts at pos
    return [long_context()[2][arm, s, pos][1] for s in SEEDS]


def lc_passkey(arm, length):
    return [long_context()[0][arm, s, length] for s in SEEDS]


# ----------------------------------------------------------------------------- kernels (aot.csv)

KERNEL = {"fwd": "forward", "bwd_dkdv": "dK/dV", "bwd_dq": "dQ", "bwd_delta": "delta"}


def table_aot():
    """Head dim 64 (MiniCPM's), bf16: one row per tile, sm_80 and sm_90 side by side."""
    rows = [r for r in read_csv("aot") if r["head_dim"] == "64" and r["dtype"] == "bf16"]
    by = {(r["kernel"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"], r["target"]): r for r in rows}
    kb = lambda r: f"{int(r['smem_bytes']) / 1024:g}"   # KiB, exact (48.5, not a rounded 48)
    out = []
    for k in KERNEL:
        tiles = sorted({key[1:5] for key in by if key[0] == k},
                       key=lambda t: (-int(t[0]) * (int(t[1]) if t[1] != "-" else 1), -int(t[0]), t[2], -int(t[3])))
        for m, n, w, st in tiles:
            a, h = by[k, m, n, w, st, "sm_80"], by[k, m, n, w, st, "sm_90"]
            tile = f"{m} rows, {w}" if n == "-" else f"{m} x {n}, {w}, {st}"
            mma = "(no matmul)" if h["mma"] == "-" else h["mma"]
            out.append([KERNEL[k], tile, f"{a['regs']} / {kb(a)}", f"{h['regs']} / {kb(h)} / {mma}"])
    return markdown(["kernel", "tile (rows x cols, warps, stages)", "sm_80 registers / shared KB",
                     "sm_90 registers / shared KB / instruction"], out)


def aot_fp16_differs():
    """Where fp16 compiles differently from bf16 (registers or shared memory), in words."""
    key = lambda r: (r["kernel"], r["target"], r["head_dim"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"])
    rows = read_csv("aot")
    bf16 = {key(r): r for r in rows if r["dtype"] == "bf16"}
    out = [f"{KERNEL[r['kernel']]} on {r['target']} at head dim {r['head_dim']}: {bf16[key(r)]['regs']} registers "
           f"in bf16, {r['regs']} in fp16" for r in rows if r["dtype"] == "fp16"
           and (r["regs"], r["smem_bytes"]) != (bf16[key(r)]["regs"], bf16[key(r)]["smem_bytes"])]
    return "; ".join(out) or "none"


def aot_max_kb(target):
    # every head dim and dtype: the claim it backs is about every tile
    return max(int(r["smem_bytes"]) for r in read_csv("aot") if r["target"] == target) / 1024


# ----------------------------------------------------------------------------- the markers

def wsd_gaps(arm):
    return [wsd_gap(ARM[arm], T, s) for T in (440, 880) for s in SEEDS]


def wsd_seed_spread(arm):
    # half the difference between the seeds, the larger of the two horizons: the "±" of a tie
    return max(abs(wsd_gap(ARM[arm], T, SEEDS[0]) - wsd_gap(ARM[arm], T, SEEDS[1])) / 2 for T in (440, 880))


def wsd_short_costs():
    """The 2.5% decay minus the 10% one, same shape, horizon and seed: what a too-short decay costs."""
    return [wsd_loss(ARM[f"{shape}2.5"], T, s) - wsd_loss(ARM[f"{shape}10"], T, s)
            for shape in ("exp", "sqrt") for T in (440, 880) for s in SEEDS]


def moe_decay_worth():
    """How much the decay takes off, (a) and (b): the last evaluation before it minus the final one."""
    return [moe_before_decay(run, s)["val_loss"] - moe_final(run, s) for run in ("dense", "upcycled") for s in SEEDS]


def sci(x, digits=1):
    return g(f"{x:.{digits}e}")   # 1.5e13, as the write-up prints compute


# NAME -> function of the marker's arguments (strings) -> the text between the markers
VALUES = {
    # WSD vs cosine
    "wsd_gap": lambda arm, T: both(wsd_gap(ARM[arm], int(T), s) for s in SEEDS),
    "wsd_gap_mean": lambda arm: f"{sum(wsd_gaps(arm)) / 4:.3f}",
    "wsd_gap_range": lambda arm: span(wsd_gaps(arm), "{:+.3f}", ".."),
    "wsd_gap_span": lambda arm: span(wsd_gaps(arm), "{:.3f}"),
    "wsd_gain_range": lambda arm: span([-x for x in wsd_gaps(arm)], "{:.3f}"),
    "wsd_seed_spread": lambda arm: f"{wsd_seed_spread(arm):.2f}",
    "wsd_below_stable": lambda arm, T: both((wsd_loss(ARM["stable"], int(T), s) - wsd_loss(ARM[arm], int(T), s)
                                             for s in SEEDS), "{:.2f}"),
    "wsd_short_cost": lambda: span(wsd_short_costs()),
    "wsd_short_worse": lambda: f"{sum(c > 0 for c in wsd_short_costs())} of {len(wsd_short_costs())}",
    "wsd_best_lr": lambda family: f"{best_lr(family):g}",
    "wsd_gap_at_lr": lambda arm, T, lr: f"{wsd_gap(ARM[arm], int(T), SEEDS[0], float(lr)):.3f}",
    "wsd_anytime_alpha": lambda: span([f["alpha"] for f in anytime_fits().values()]),
    # scaling law
    "sl_rms": lambda: f"{scaling()['rms']:.3f}",
    "sl_alpha": lambda: f"{scaling()['fit']['alpha']:.1f}",
    "sl_dn": lambda: f"{scaling()['opt']['D_over_N']:.0f} [{scaling()['band']['D_over_N'][0]:.0f}, "
                     f"{scaling()['band']['D_over_N'][1]:.0f}]",
    "sl_dn_point": lambda: f"{scaling()['opt']['D_over_N']:.0f}", "sl_C": lambda: sci(scaling()["C"]),
    "sl_points": lambda: str(len(scaling()["rows"])),
    "sl_decay_gain": lambda: span([float(r["stable_bpb"]) - float(r["bpb"]) for r in scaling()["rows"]]),
    # sparse upcycling
    "moe_gap": lambda run: both((moe_final(run, s) - moe_final("dense", s) for s in SEEDS), sep=" and "),
    "moe_fresh_cost": lambda: both((moe_final("upcycled_fresh_adam", s) - moe_final("upcycled", s)
                                    for s in SEEDS), sep=" and "),
    "moe_decay_worth": lambda: span(moe_decay_worth()),
    "moe_dense_stable_drop": lambda: span([moe_final("trunk", s) - moe_before_decay("dense", s)["val_loss"]
                                           for s in SEEDS], "{:.3f}"),
    # the upcycled model's first evaluation (at the branch) against the trunk's last: equal by construction
    "moe_start": lambda: span([moe()["upcycled", 1337][0]["val_loss"], moe_final("trunk", 1337)], "{:.4f}"),
    "moe_mflop": lambda run: f"{moe_flops_per_token(run):.2f}",
    "moe_flops_ratio": lambda: f"{moe_flops_per_token('upcycled') / moe_flops_per_token('dense'):.2f}",
    # long context
    "lc_pk": lambda arm, n: span(lc_passkey(arm, int(n))),
    "lc_pk_cell": lambda arm, n, depth: both((long_context()[1][arm, s, int(n), float(depth)] for s in SEEDS),
                                             "{:.2f}"),
    "lc_loss": lambda arm, pos: span(lc_loss(arm, int(pos))),
    "lc_loss_span": lambda arm, lo, hi: span([v for p in (int(lo), int(hi)) for v in lc_loss(arm, p)]),
    "lc_loss_diff": lambda a, b, pos: span([x - y for x, y in zip(lc_loss(a, int(pos)), lc_loss(b, int(pos)))]),
    # the continued-training arms' cost at short positions (0-127), against the base model
    "lc_ct_cost": lambda: span([x - y for arm in "cde" for p in (0, 16, 32, 64)
                                for x, y in zip(lc_loss(arm, p), lc_loss("a", p))]),
    # kernels
    "aot_fp16_differs": aot_fp16_differs,
    "aot_max_kb": lambda target: f"{aot_max_kb(target):g}",
}

TABLES = {
    "wsd_vs_cosine_decay": table_wsd_decay, "wsd_vs_cosine_lr_sweep": table_wsd_sweep,
    "wsd_anytime_fit": table_wsd_anytime, "scaling_law_grid": table_scaling_grid,
    "scaling_law_fit": table_scaling_fit, "moe_upcycling": table_moe,
    "long_context_passkey": table_lc_passkey, "long_context_loss": table_lc_loss, "aot_head_dim_64": table_aot,
}

