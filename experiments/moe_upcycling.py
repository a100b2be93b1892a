"""Sparse upcycling at small scale: does an MoE upcycled from a trained dense model beat the dense
model trained on? (MiniCPM, Hu et al. 2024, §7.3: MiniCPM-MoE was upcycled from the dense 2.4B.)

The design, per seed:
  1. trunk:     a dense model trained at WSD's constant peak lr for S steps, long enough that its
                loss flattens (tens of tokens per parameter), byte tokenizer so the embedding is small;
  2. branch at S, both continued for C >= S more steps with the same peak lr, the same batches in
     the same order, and the same WSD decay over their last D steps:
     (a) dense:            the trunk resumed (its own Adam state, the schedule extended);
     (b) upcycled:         train.py --upcycle_from trunk --n_experts 4 --top_k 2: every expert a copy
                           of the dense MLP (the function is preserved at the branch), every copy
                           starting with the dense MLP's Adam moments (moe.upcycle_optimizer_state);
     (c) upcycled, equal FLOPs: the same MoE run decayed earlier, so that its training FLOPs equal
                           (a)'s at the end (top-2 of experts as large as the dense MLP doubles the
                           MLP's FLOPs per token: the MoE's active FLOPs per token are higher);
     (d) fresh Adam:       as (b) but --upcycle_fresh_adam, with a 5% re-warmup (a restarted
                           Adam needs one), to show what the carry-over is worth.
Verdict: the loss gaps (b) - (a) at equal tokens and (c) - (a) at equal FLOPs, after the decay,
per seed. Runs are independent processes, one torch thread each, both cores busy (run_parallel).

    python experiments/moe_upcycling.py               # 4 layers x d 64, 2 seeds: ~10 min on 2 idle cores
    python experiments/moe_upcycling.py --quick       # a 2-layer d-32 model: the smoke test, < 1 min
    python experiments/moe_upcycling.py --scale gpu   # d 512, 8 layers, 64K-token batches, one GPU (untested)

Writes to --out (default experiments/out): moe_upcycling.png (validation loss against tokens and
against training FLOPs), moe_upcycling.csv (run, seed, step, tokens, flops, lr, val_loss, val_bpb,
aux_loss; tokens and FLOPs count from the start of the trunk) and runs/moe_upcycling/<run>/.
"""
import csv
import shutil
import sys
import time

import common
from common import RunFailed, eval_flags, fail, pyplot, read_metrics, run_parallel, scale_setup

# Sizes. The default was sized by measurement on our 2-core machine, one thread per run: the dense
# model trains at ~35K tokens/s, the 4-expert MoE at ~23K (routing, and 1.5x the FLOPs per token).
# trunk = S steps, cont = C steps after the branch, decay = D steps (10% of the dense run's S + C).
SCALES = {
    "cpu": dict(model=dict(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160, block_size=128),
                batch_size=16, seq_len=128, trunk=1600, cont=1600, decay=320, warmup=100,
                eval_tokens=65536, eval_interval=100, log_interval=20),
    "quick": dict(model=dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, ffn_dim=80, block_size=32),
                  batch_size=4, seq_len=32, trunk=24, cont=24, decay=6, warmup=2,
                  eval_tokens=256, eval_interval=6, log_interval=2),
    # one GPU: a 22M-parameter dense model, 64K tokens a step, ~0.5B tokens (24 per parameter) to
    # the branch; the runs take the GPU in turn (--workers' default there). By FLOPs ~1-1.5 hours on an H100/H200:
    # an estimate, as no GPU was available to run it.
    "gpu": dict(model=dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=4, ffn_dim=1280, block_size=512),
                batch_size=128, seq_len=512, trunk=8000, cont=8000, decay=1600, warmup=400,
                eval_tokens=262144, eval_interval=500, log_interval=50),
}
LR = 0.01          # the peak lr of every run (§3.3: muP's ~0.01; matrices get lr / m)
# 4 experts, top-2: MiniCPM-MoE has 8 experts, top-2 (§7.3); 4 copies of the MLP keep the MoE's
# parameters and its CPU time within the budget while the router still chooses 2 of 4
N_EXPERTS, TOP_K = 4, 2


def parse_args(argv):
    p = common.parser(__doc__)
    common.add_common_flags(p)   # 2 seeds: every arm of a seed shares its trunk, init and batches
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    p.add_argument("--trunk_steps", type=int, help="dense steps before the branch (default: the scale's)")
    p.add_argument("--cont_steps", type=int, help="steps of each continuation (default: the scale's)")
    p.add_argument("--no_fresh_adam", action="store_true", help="skip the fresh-Adam control run")
    args = common.parse(p, argv)
    for name in ("trunk_steps", "cont_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UsageError(f"--{name} must be at least 1")
    return args


def flops_per_token(setup, vocab_size, n_experts=0):
    """Training FLOPs per token of the model (minicpm's count), on the meta device: nothing is allocated."""
    # 6 per active matrix parameter plus attention: an MoE counts only its top-k experts, not all of them
    model = common.meta_model(**setup["model"], vocab_size=vocab_size, n_experts=n_experts, top_k=TOP_K)
    return model.flops_per_token(setup["seq_len"])


def plan(args, setup, runs_dir, ratio):
    """-> (trunk jobs, continuation jobs, {(run, seed): folder}, k)."""
    # ratio = dense / MoE FLOPs per token fixes where the equal-FLOPs MoE decays: its k + D steps cost
    # what the dense run's C do (both see the same tokens per step, so FLOPs scale with steps)
    S, C, D = setup["trunk"], setup["cont"], setup["decay"]
    k = max(0, round(ratio * C) - D)       # the equal-FLOPs branch leaves the MoE's stable phase at k
    model = [x for key, v in setup["model"].items() for x in (f"--{key}", v)]   # the dense shape, as flags
    shared = [*model, "--batch_size", setup["batch_size"], "--seq_len", setup["seq_len"], "--lr", LR,
              "--source", args.source, "--tokenizer", args.tokenizer, "--data_dir", args.data_dir,
              "--log_interval", setup["log_interval"], "--ckpt_interval", 10**9, *eval_flags(setup["eval_tokens"])]
    # how a continuation is watched, stated explicitly (a resume may change these; else it keeps the trunk's)
    observe = ["--eval_interval", setup["eval_interval"], "--log_interval", setup["log_interval"],
               *eval_flags(setup["eval_tokens"])]
    # The MoE runs are new runs (step 0 at the branch); their decay ends where the dense run's does.
    # No re-warmup: the lr goes on at the trunk's peak (He et al. 2024: resetting to the peak lr beats
    # a low constant one), and with the Adam state carried over there is nothing to warm up.
    moe_schedule = ["--schedule", "wsd", "--max_steps", C, "--decay_start", C - D, "--decay_steps", D]
    trunks, conts, runs = [], [], {}
    for seed in common.seed_list(args):   # the seed fixes init and batches: all arms of a seed share them
        d = {name: runs_dir / f"{name}_s{seed}" for name in ("trunk", "dense", "upcycled", "upcycled_eqflops",
                                                             "upcycled_fresh_adam")}
        # A WSD run whose decay lies beyond its horizon: constant lr after warmup, and resumable
        # into a decay later (the schedule's name must stay "wsd" across a resume).
        trunks.append([([*shared, "--seed", seed, "--schedule", "wsd", "--max_steps", S, "--warmup_steps",
                         setup["warmup"], "--decay_start", 10**9, "--decay_steps", D, "--eval_interval",
                         setup["eval_interval"], "--out_dir", d["trunk"]], d["trunk"])])
        # (a) the dense run goes on exactly (Adam state, data position), into its own folder
        conts.append([(["--resume", d["trunk"], "--out_dir", d["dense"], "--max_steps", S + C,
                        "--decay_start", S + C - D, "--decay_steps", D, *observe], d["dense"])])
        moe = [*shared, "--seed", seed, "--upcycle_from", d["trunk"], "--n_experts", N_EXPERTS, "--top_k", TOP_K,
               "--eval_interval", setup["eval_interval"]]
        # (b) and (c): one MoE run stopped at k, (c) branched off it into the decay, then (b) resumed
        steps = [([*moe, *moe_schedule, "--warmup_steps", 0, "--stop_at", k, "--out_dir", d["upcycled"]], d["upcycled"]),
                 (["--resume", d["upcycled"], "--out_dir", d["upcycled_eqflops"], "--max_steps", k + D,
                   "--decay_start", k, *observe], d["upcycled_eqflops"]),
                 (["--resume", d["upcycled"], *observe], d["upcycled"])]
        if 0 < k < C - D:   # k must fall inside (b)'s stable phase for (c) to branch from it
            conts.append(steps)
        else:   # a continuation too short for an earlier decay: no equal-FLOPs run
            conts.append([([*moe, *moe_schedule, "--warmup_steps", 0, "--out_dir", d["upcycled"]], d["upcycled"])])
        # (d) the control: Adam restarted. Its first updates are sign-like and full size (a one-sample
        # second moment), on weights that are already trained: the usual remedy is a re-warmup.
        if not args.no_fresh_adam:
            conts.append([([*moe, *moe_schedule, "--warmup_steps", max(1, round(0.05 * C)), "--upcycle_fresh_adam",
                            "true", "--out_dir", d["upcycled_fresh_adam"]], d["upcycled_fresh_adam"])])
        runs.update({(name, seed): path for name, path in d.items()})
    # longest jobs first, so that two workers end close together
    # (MoE jobs before dense ones of the same length: an MoE step costs ~1.5x a dense one)
    conts.sort(key=lambda job: -len(job) - ("--upcycle_from" in map(str, job[0][0])))
    return trunks, conts, runs, k


def run_all(args, setup, runs_dir):
    """Train every run; -> (rows for the CSV, k, {"dense", "moe": FLOPs per token})."""
    shutil.rmtree(runs_dir, ignore_errors=True)   # every run a fresh folder
    # prepare the data once, here, before parallel runs would each try to; its vocabulary sets the FLOPs
    import data
    vocab = data.load_meta(data.prepare(args.source, args.tokenizer, args.data_dir, quiet=True))["vocab_size"]
    fpt = {"dense": flops_per_token(setup, vocab), "moe": flops_per_token(setup, vocab, N_EXPERTS)}
    trunks, conts, runs, k = plan(args, setup, runs_dir, fpt["dense"] / fpt["moe"])
    workers = common.workers(args)   # on a GPU one run at a time: parallel runs would only share the device
    # two phases: every continuation branches from its seed's finished trunk checkpoint
    run_parallel(trunks, workers)     # the seeds' trunks side by side
    run_parallel(conts, workers)      # then every continuation
    metrics = {key: read_metrics(path) for key, path in runs.items() if (path / "metrics.jsonl").exists()}
    branch_tokens = setup["trunk"] * setup["batch_size"] * setup["seq_len"]   # the trunk's tokens at the branch
    rows = []
    for (name, seed), ms in metrics.items():
        moe = name.startswith("upcycled")
        for r in ms:
            if "val_loss" not in r:
                continue
            # tokens and FLOPs from the start of the trunk: a new MoE run counts from the branch
            tokens = r["tokens"] + (branch_tokens if moe else 0)
            flops = tokens * fpt["dense"] if not moe else branch_tokens * fpt["dense"] + r["tokens"] * fpt["moe"]
            rows.append(dict(run=name, seed=seed, step=r["step"] + (setup["trunk"] if moe else 0), tokens=tokens,
                             flops=flops, lr=r.get("lr", ""), val_loss=r["val_loss"], val_bpb=r["val_bpb"],
                             aux_loss=r.get("aux_loss", "")))
    return rows, k, fpt


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def finals(rows):
    """{(run, seed): the last validation row}: after the decay for every continuation."""
    # keep each run's row with the highest step: its final evaluation
    out = {}
    for r in rows:
        key = (r["run"], r["seed"])
        if key not in out or r["step"] > out[key]["step"]:
            out[key] = r
    return out


def verdict(rows, setup):
    """Per seed: the gaps (b) - (a), (c) - (a) and (d) - (b) after the decay, and the dense run's flatness."""
    # (b) - (a) at equal tokens, (c) - (a) at equal FLOPs: §7.3's claim holds only if the MoE wins both;
    # (d) - (b) is the control, what carrying the Adam state over is worth
    last = finals(rows)
    seeds = sorted({r["seed"] for r in rows})
    S, C, D = setup["trunk"], setup["cont"], setup["decay"]
    out = []
    # Differences are taken within a seed: the same trunk and batches (the validation windows are the
    # same for every seed), so the gap compares like with like even where the seeds' losses differ.
    for seed in seeds:
        def val(run, step):   # the last evaluation at or before `step`
            return max((r for r in rows if r["run"] == run and r["seed"] == seed and r["step"] <= step),
                       key=lambda r: r["step"])["val_loss"]
        v = dict(seed=seed, trunk=last["trunk", seed]["val_loss"], dense=last["dense", seed]["val_loss"],
                 upcycled=last["upcycled", seed]["val_loss"])
        # the dense run's constant-lr improvement over the continuation, before its decay starts
        v["dense_stable_drop"] = v["trunk"] - val("dense", S + C - D)
        v["gap_tokens"] = v["upcycled"] - v["dense"]
        if ("upcycled_eqflops", seed) in last:
            v["eqflops"] = last["upcycled_eqflops", seed]["val_loss"]
            v["gap_flops"] = v["eqflops"] - v["dense"]
            v["flops_ratio"] = last["upcycled_eqflops", seed]["flops"] / last["dense", seed]["flops"]
        if ("upcycled_fresh_adam", seed) in last:
            v["fresh"] = last["upcycled_fresh_adam", seed]["val_loss"]
            v["fresh_minus_carried"] = v["fresh"] - v["upcycled"]
        out.append(v)
    return out


def curve(rows, name, seed, x):
    """(x, val_loss) points of one run, joined to the point it branched from (trunk or MoE run)."""
    # x: "tokens" or "flops"; the join makes a branch's curve start where its parent's was, not in mid-air
    own = sorted((r["step"], r[x], r["val_loss"]) for r in rows if r["run"] == name and r["seed"] == seed)
    parent = {"dense": "trunk", "upcycled_eqflops": "upcycled"}.get(name)
    if own and parent:
        before = [(r["step"], r[x], r["val_loss"]) for r in rows
                  if r["run"] == parent and r["seed"] == seed and r["step"] < own[0][0]]
        own = [max(before)] + own if before else own
    return [(a, b) for _, a, b in own]


def plot(rows, path, title):
    """Validation loss against tokens and against FLOPs, and the paired gap upcycled - dense."""
    plt = pyplot()
    # three panels: loss against tokens, loss against FLOPs (the MoE's curve shifts right), the paired gap
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    styles = {"trunk": ("k", "dense trunk (constant lr)"), "dense": ("C0", "(a) dense, continued"),
              "upcycled": ("C3", f"(b) upcycled, {N_EXPERTS} experts top-{TOP_K}, Adam carried over"),
              "upcycled_eqflops": ("C1", "(c) = (b) decayed at (a)'s final FLOPs"),
              "upcycled_fresh_adam": ("C2", "(d) = (b) with a fresh Adam + re-warmup")}
    seeds = sorted({r["seed"] for r in rows})
    dashes = ["-", "--", ":", "-."]   # one line style per seed, one colour per arm
    branch = {x: max(r[x] for r in rows if r["run"] == "trunk") for x in ("tokens", "flops")}
    for ax, x in zip(axes, ("tokens", "flops")):
        for name, (color, label) in styles.items():
            for i, seed in enumerate(seeds):
                pts = curve(rows, name, seed, x)
                if pts:
                    ax.plot(*zip(*pts), dashes[i % 4], color=color, marker="o", ms=2, lw=1.2,
                            label=f"{label}, seed {seed}" if x == "tokens" else None)
        ax.axvline(branch[x], color="gray", ls=":", lw=1)
        ax.set(xlabel="training tokens" if x == "tokens" else "training FLOPs (6 x active params + attention)",
               ylabel="validation loss (nats/token)")
        ax.set_xlim(left=0.5 * branch[x])
    tail = [r["val_loss"] for r in rows if r["tokens"] >= 0.5 * branch["tokens"]]
    lo, hi = min(tail), max(tail)
    for ax in axes[:2]:     # zoom on the continuations
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    axes[0].legend(fontsize=7)
    # the paired gap at equal tokens: same seed, so the same trunk and batches
    for i, seed in enumerate(seeds):
        dense = dict(curve(rows, "dense", seed, "tokens"))
        for name in ("upcycled", "upcycled_fresh_adam"):
            pts = [(t, v - dense[t]) for t, v in curve(rows, name, seed, "tokens") if t in dense]
            if pts:
                axes[2].plot(*zip(*pts), dashes[i % 4], color=styles[name][0], marker="o", ms=2,
                             label=f"{name.replace('_', ' ')} - dense, seed {seed}")
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set(xlabel="training tokens", ylabel="loss gap at equal tokens (nats/token; < 0: MoE ahead)")
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv):
    args = parse_args(argv)
    setup = scale_setup(SCALES, args, trunk=args.trunk_steps, cont=args.cont_steps)
    # the decay: 10% of the dense run's S + C steps (§4), at least one step and inside the continuation
    if args.trunk_steps or args.cont_steps:
        setup["decay"] = max(1, min(setup["cont"] - 1, round(0.1 * (setup["trunk"] + setup["cont"]))))
    # bad flags stop here, before the old runs are deleted
    out = common.check_out(args.out)
    common.check_data(args)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        rows, k, fpt = run_all(args, setup, out / "runs" / "moe_upcycling")
    except RunFailed as e:
        fail(str(e))
    write_csv(rows, out / "moe_upcycling.csv")
    results = verdict(rows, setup)
    S, C, D, tpb = setup["trunk"], setup["cont"], setup["decay"], setup["batch_size"] * setup["seq_len"]
    print(f"dense: {fpt['dense'] / 1e6:.3f} MFLOP/token; MoE {N_EXPERTS}x top-{TOP_K}: {fpt['moe'] / 1e6:.3f} "
          f"MFLOP/token ({fpt['moe'] / fpt['dense']:.2f}x). Trunk {S} steps ({S * tpb:,} tokens), "
          f"continuations {C} steps, decay {D}; equal-FLOPs MoE decays from its step {k}")
    for v in results:
        line = (f"seed {v['seed']}: trunk {v['trunk']:.4f}, dense stable drop {v['dense_stable_drop']:.4f}; "
                f"after the decay: dense {v['dense']:.4f}, upcycled {v['upcycled']:.4f} "
                f"(equal tokens: {v['gap_tokens']:+.4f})")
        if "gap_flops" in v:
            line += (f", upcycled at equal FLOPs ({v['flops_ratio']:.3f}x the dense run's) {v['eqflops']:.4f} "
                     f"({v['gap_flops']:+.4f})")
        if "fresh" in v:
            line += f", fresh Adam {v['fresh']:.4f} ({v['fresh_minus_carried']:+.4f} vs carried)"
        print(line)
    gaps = [v["gap_tokens"] for v in results]
    gaps_f = [v["gap_flops"] for v in results if "gap_flops" in v]
    summary = f"upcycled - dense after the decay: equal tokens {' '.join(f'{g:+.3f}' for g in gaps)}"
    if gaps_f:
        summary += f"; equal FLOPs {' '.join(f'{g:+.3f}' for g in gaps_f)} nats (per seed)"
    plot(rows, out / "moe_upcycling.png",
         f"Sparse upcycling (MiniCPM §7.3), {len(results)} seeds: {summary}")
    print(f"{summary}; {time.time() - t0:.0f} s; wrote {out / 'moe_upcycling.png'} and {out / 'moe_upcycling.csv'}")
    return 0


def main(argv=None):
    return common.main("moe_upcycling.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
