"""Long context at small scale: does a RoPE model trained at a short context extend to 4x and 8x
its length by NTK scaling, by ABF + a short continued training, or both? (MiniCPM, Hu et al. 2024,
§7.2: MiniCPM-2.4B-128K, extended by Adjusted Base Frequency and NTK-aware RoPE scaling.)

Per seed (the seed fixes the base model's init and batches):
  corpus  real text (stdlib .py files) + passkey documents (50% of the bytes): filler, the needle
          "The pass key is K. Remember it. K is the pass key." at a random depth, at the end "What is
          the pass key? The pass key is K" (K: a marker + 1 of 24 symbols, KEY_SYMBOLS). Documents fit
          the training length; for continued training 56% short : 44% up to 4x long (§7.2's mix).
  trunk   a byte-level model trained at seq_len 256 by WSD, stopped at the end of its stable phase;
  (a) base        the trunk decayed, as is: past 256 RoPE extrapolates;
  (b) NTK         (a) with the released dynamic NTK scaling at inference (factor 4), no training;
  (c) ABF + CT    from the trunk's stable checkpoint (§7.2), RoPE base 1e4 -> 5e5, seq_len 1024 on the
                  long corpus, fresh Adam, a short WSD;
  (d) NTK + CT    the same continued training with the NTK-aware base for 4x, 1e4 * 4 ** (hd/(hd-2));
  (e) (c) + NTK   (c) with dynamic NTK past 1024 at inference: the release's recipe.
Evaluation on held-out files: the passkey test (lengths 128..2048 x depths 0..100%, 20 keys a cell,
the whole key right by greedy argmax: one teacher-forced forward) and the loss by position on 48
fixed windows of 2048 tokens (file starts), by octave of position.

    python experiments/long_context.py               # d 128, 4 layers, 2 seeds: ~12 min on 2 idle cores
    python experiments/long_context.py --quick       # a 2-layer d-32 model: the smoke test, ~10 s
    python experiments/long_context.py --scale gpu   # d 512, 8 layers, trained at 512, to 4096 (untested)

Writes to --out (default experiments/out): long_context_passkey.png (a heatmap per arm, mean over
seeds), long_context_loss.png, long_context.csv (kind: passkey or loss; arm, seed,
length, depth, pos_lo, pos_hi, value) and runs/long_context/ (corpus, data, runs).
"""
import csv
import json
import multiprocessing
import pathlib
import random
import shutil
import sys
import sysconfig
import time
from statistics import fmean as mean

import common
from common import RunFailed, eval_flags, fail, pyplot, run_parallel, scale_setup

# Sizes, measured on our 2-core machine with one thread per process: the d-128 model trains at
# ~12K tokens/s at seq_len 256 and ~8K at 1024, and reads ~18K tokens/s at 2048 (forward only).
# trunk = stable steps of the base, decay = its decay; ct = continued-training steps (both CT arms).
SCALES = {
    "cpu": dict(model=dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, ffn_dim=320),
                train_len=256, ct_len=1024, batch_tokens=4096, trunk=1000, decay=150, warmup=50,
                ct=150, ct_warmup=10, ct_decay=30, lengths=[128, 256, 512, 1024, 2048], keys=20,
                loss_windows=48, corpus_mb=6.0, eval_tokens=65536),
    "quick": dict(model=dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=2, ffn_dim=64),
                  train_len=128, ct_len=256, batch_tokens=512, trunk=12, decay=4, warmup=2,
                  ct=6, ct_warmup=1, ct_decay=2, lengths=[128, 256, 512], keys=2,
                  loss_windows=4, corpus_mb=0.3, eval_tokens=1024),
    # one GPU (an estimate, not run): a 25M-parameter model trained at 512, extended to 2048, tested to 4096
    "gpu": dict(model=dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=8, ffn_dim=1280),
                train_len=512, ct_len=2048, batch_tokens=65536, trunk=4000, decay=500, warmup=200,
                ct=600, ct_warmup=30, ct_decay=100, lengths=[256, 512, 1024, 2048, 4096], keys=50,
                loss_windows=32, corpus_mb=30.0, eval_tokens=65536),
}
LR = 0.002              # the peak lr of every run: below muP's ~0.01 (§3.3), where the retrieval
                        # lookups did not form in 600 steps (probes: they did at 0.002-0.003)
BASE_THETA = 10000.0    # the RoPE base of the trunk (MiniCPM's)
ABF_THETA = 5e5         # ABF's base (Xiong et al. 2023), the (c) arm
NTK_FACTOR = 4          # the released 128K model's dynamic NTK factor; also the CT arms' 4x extension
# The key: KEY_LEN symbols, the j-th drawn from its own set of KEY_SET control characters that occur
# nowhere in the corpus, after a marker: retrieving it is one attention hop, from the marker to the
# needle's symbol (why not digits: the README's probes; copying digits needs induction heads, which
# no model here formed). One symbol of 24 (chance 1/24): with two, each lookup is its own circuit and
# one seed in two learned only one of them in the run's budget (README).
KEY_SYMBOLS = [chr(c) for c in range(1, 32) if c not in (9, 10, 13, 27)] + [chr(127)]   # 28, never in the stdlib
KEY_LEN, KEY_SET = 1, 24
KEY_CLASSES = [KEY_SYMBOLS[KEY_SET * j:KEY_SET * (j + 1)] for j in range(KEY_LEN)]
KEY_MARK = chr(30)   # the record separator: in KEY_SYMBOLS, in no key set
PASSKEY_FRAC = 0.5     # the passkey documents' share of the training bytes
LONG_FRAC = 0.44        # of the long corpus's passkey bytes, the share in documents longer than train_len
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
EOT = 256               # the byte tokenizer's end-of-text token (256 bytes, then EOT)
NEEDLE = "\nThe pass key is " + KEY_MARK + "{}. Remember it. " + KEY_MARK + "{} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is " + KEY_MARK + "{}"
ARMS = {"a": "(a) base", "b": f"(b) base + NTK x{NTK_FACTOR} (inference)", "c": "(c) ABF 5e5 + CT",
        "d": "(d) NTK base + CT", "e": f"(e) ABF + CT + NTK x{NTK_FACTOR} past CT length"}


def parse_args(argv):
    p = common.parser(__doc__)
    common.add_common_flags(p)   # no data flags: the corpus is made here (stdlib text + passkey documents)
    p.add_argument("--trunk_steps", type=int, help="stable steps of the base model (default: the scale's)")
    p.add_argument("--ct_steps", type=int, help="continued-training steps of (c) and (d) (default: the scale's)")
    args = common.parse(p, argv)
    for name in ("trunk_steps", "ct_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UsageError(f"--{name} must be at least 1")
    return args


# ----------------------------------------------------------------------------- the corpus

def stdlib_texts(corpus_mb):
    """(train texts, held-out texts): standard-library .py files split by a hash of their path."""
    # held out by name, not at random: the same files on every run; no run trains on them, so the
    # evaluation haystacks and loss windows are text the models have never seen
    import data
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages", "test", "tests"}
                   & set(p.relative_to(root).parts))
    train, held, size = [], [], 0
    for p in files:
        try:   # ASCII only: a byte is then a character, so lengths in bytes are lengths in tokens
            text = p.read_text(encoding="ascii")
        except (UnicodeDecodeError, OSError):
            continue
        if not set(KEY_SYMBOLS).isdisjoint(text):   # a key symbol in the text would be a false needle
            continue
        if data.key_hash(p.relative_to(root).as_posix()) < 0.12:
            held.append(text)
        elif size < corpus_mb * 1e6:
            train.append(text)
            size += len(text)
    return train, held


def random_key(rng):
    return "".join(rng.choice(symbols) for symbols in KEY_CLASSES)


def passkey_doc(rng, filler_texts, n, key, depth=None):
    """A passkey document: n bytes of filler cut from a random text, the needle at `depth` of it,
    the question at the end (its last len(key) bytes are the answer)."""
    needle, question = NEEDLE.format(key, key), QUESTION.format(key)
    text = rng.choice([t for t in filler_texts if len(t) > n] or [max(filler_texts, key=len)])
    start = rng.randrange(0, max(1, len(text) - n))
    filler = (text[start:start + n] * (n // max(1, len(text)) + 1))[:n]   # a short text repeats (never in practice)
    cut = round((rng.random() if depth is None else depth) * n)
    return filler[:cut] + needle + filler[cut:] + question


def fixed_part():
    """Bytes of a passkey document that are not filler: the needle and the question."""
    return len(NEEDLE.format("k" * KEY_LEN, "k" * KEY_LEN)) + len(QUESTION.format("k" * KEY_LEN))


def write_corpus(path, train, rng, short_len, long_len=None):
    """One .jsonl of documents (each line one, data.py's format): the real text and passkey documents."""
    # Short documents: filler from none to what fits in short_len (the training length less a margin,
    # so that a random window can hold a whole one), skewed short (u ** 2 of the range: in a short
    # haystack the lookup's gradient is less diluted; probes did not separate it from uniform); with
    # long_len, LONG_FRAC of the passkey bytes go to documents from short_len to long_len. Documents
    # are shuffled into the text, so a training window holds a mixture, as in a pretraining mix.
    real = sum(map(len, train))
    budget = PASSKEY_FRAC / (1 - PASSKEY_FRAC) * real
    docs, used = [], {"short": 0.0, "long": 0.0}
    shares = {"short": 1 - LONG_FRAC, "long": LONG_FRAC} if long_len else {"short": 1.0}
    for kind, share in shares.items():
        while used[kind] < share * budget:
            lo, hi = (0, short_len) if kind == "short" else (short_len, long_len)
            lo, hi = max(0, lo - fixed_part()), hi - fixed_part()
            u = rng.random() ** 2 if kind == "short" else rng.random()
            doc = passkey_doc(rng, train, lo + round(u * (hi - lo)), random_key(rng))
            docs.append(doc)
            used[kind] += len(doc)
    docs += train
    rng.shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return len(docs), real, sum(used.values())


def haystacks(held, setup, seed=0):
    """The passkey test set: {length: (token ids [n, length], keys, depths)}, the same for every arm."""
    # each a byte sequence of exactly `length` tokens: EOT (a document starts), filler from held-out
    # files, the needle at the depth, the question ending in the KEY_LEN symbols that are scored
    rng = random.Random(seed)
    sets = {}
    for L in setup["lengths"]:
        rows, keys, depths = [], [], []
        for depth in DEPTHS:
            for _ in range(setup["keys"]):
                key = random_key(rng)
                doc = passkey_doc(rng, held, L - 1 - fixed_part(), key, depth)
                rows.append([EOT] + list(doc.encode()))
                keys.append(key)
                depths.append(depth)
        sets[L] = (rows, keys, depths)
    return sets


def loss_windows(held, setup):
    """Fixed windows for the loss by position: EOT + the first max-length bytes of held-out files."""
    T = max(setup["lengths"])
    longest = sorted((t for t in held if len(t) >= T), key=len, reverse=True)[:setup["loss_windows"]]
    if len(longest) < setup["loss_windows"]:
        fail(f"only {len(longest)} held-out files of {T}+ bytes, need {setup['loss_windows']}")
    return [[EOT] + list(t[:T].encode()) for t in longest]


# ----------------------------------------------------------------------------- training

def plan(args, setup, runs, data_short, data_long):
    """-> (trunk jobs, continued-training jobs, {(arm, seed): (run folder, RoPE changes at inference)})."""
    S, D, W = setup["trunk"], setup["decay"], setup["warmup"]
    T, TL = setup["train_len"], setup["ct_len"]
    model = [x for key, v in setup["model"].items() for x in (f"--{key}", v)]
    shared = [*model, "--tokenizer", "byte", "--lr", LR, "--log_interval", 10, "--ckpt_interval", 10**9,
              *eval_flags(setup["eval_tokens"])]
    hd = setup["model"]["n_embd"] // setup["model"]["n_head"]
    ntk_theta = BASE_THETA * NTK_FACTOR ** (hd / (hd - 2))   # NTK-aware base for a 4x longer context
    C, CW, CD = setup["ct"], setup["ct_warmup"], setup["ct_decay"]
    trunks, cts, arms = [], [], {}
    for seed in common.seed_list(args):
        d = {name: runs / f"{name}_s{seed}" for name in ("trunk", "base", "abf", "ntk")}
        base = [*shared, "--source", data_short, "--seed", seed, "--rope_theta", BASE_THETA,
                "--block_size", T, "--seq_len", T, "--batch_size", setup["batch_tokens"] // T]
        # the trunk stops at the end of its stable phase (a checkpoint there), then (a) resumes into
        # its own folder for the decay, so that the trunk's folder keeps the stable checkpoint
        trunks.append([([*base, "--schedule", "wsd", "--max_steps", S + D, "--warmup_steps", W,
                         "--decay_steps", D, "--stop_at", S, "--eval_interval", S, "--out_dir", d["trunk"]], d["trunk"]),
                       (["--resume", d["trunk"], "--out_dir", d["base"], "--eval_interval", D], d["base"])])
        # (c) and (d): new runs from the stable weights (fresh Adam: a short warmup), 4x the length,
        # the same steps and tokens per step; only the RoPE base differs
        for name, theta in (("abf", ABF_THETA), ("ntk", ntk_theta)):
            cts.append([([*shared, "--source", data_long, "--seed", seed, "--init_from", d["trunk"],
                          "--rope_theta", theta, "--block_size", TL, "--seq_len", TL,
                          "--batch_size", setup["batch_tokens"] // TL, "--schedule", "wsd", "--max_steps", C,
                          "--warmup_steps", CW, "--decay_steps", CD, "--eval_interval", C, "--out_dir", d[name]],
                         d[name])])
        dyn = dict(rope_scaling="dynamic", rope_factor=NTK_FACTOR)
        arms.update({("a", seed): (d["base"], {}), ("b", seed): (d["base"], dyn), ("c", seed): (d["abf"], {}),
                     ("d", seed): (d["ntk"], {}), ("e", seed): (d["abf"], dyn)})
    return trunks, cts, arms


# ----------------------------------------------------------------------------- evaluation

def evaluate(job):
    """One arm of one seed: passkey accuracy per (length, depth) and the loss per position octave."""
    # runs in a worker process (one torch thread); the model is the run's weights with its RoPE
    # settings changed: "none" needs block_size raised to the longest test (RoPE extrapolates),
    # "dynamic" keeps block_size at the training length, where NTK scaling starts
    import torch
    import torch.nn.functional as F
    import checkpoint
    from minicpm import MiniCPM, MiniCPMConfig
    torch.set_num_threads(1)
    run_dir, rope, tests, windows, max_len = job
    ckpt = checkpoint.load(str(run_dir))
    cfg = {**ckpt["model_config"], **rope, **({} if rope else {"block_size": max_len})}
    model = MiniCPM(MiniCPMConfig(**cfg))
    model.load_state_dict(ckpt["model"])
    model.eval()
    acc, K = {}, KEY_LEN
    with torch.no_grad():
        for L, (rows, keys, depths) in tests.items():
            # ~16K tokens a forward: the 2048-token haystacks 8 at a time, the short ones in bigger batches
            x, hits, n = torch.tensor(rows), [], max(1, 16384 // L)
            for b in range(0, len(x), n):
                # the key is the last K tokens: predicted from the K positions before each; greedy
                # argmax of one teacher-forced forward is what greedy decoding would write
                pred = model(x[b:b + n])[0][:, -K - 1:-1].argmax(-1)
                hits += (pred == x[b:b + n, -K:]).tolist()
            for depth in DEPTHS:
                cell = [h for h, dp in zip(hits, depths) if dp == depth]
                acc[L, depth] = mean(all(h) for h in cell)   # the whole key right (chance: KEY_SET ** -K)
        w, losses = torch.tensor(windows), []
        for b in range(0, len(w), 8):
            logits, _ = model(w[b:b + 8, :-1])
            losses.append(F.cross_entropy(logits.transpose(1, 2), w[b:b + 8, 1:], reduction="none"))
        per_pos = torch.cat(losses).mean(0)   # [T]: the mean loss at each position over the windows
    # octaves of position: [1, 16), [16, 32), ..., [T/2, T) (position p predicts token p + 1)
    edges = [0, 16] + [2 ** k for k in range(5, 20) if 2 ** k < len(per_pos)] + [len(per_pos)]
    loss = {(lo, hi): per_pos[lo:hi].mean().item() for lo, hi in zip(edges, edges[1:])}
    return acc, loss


def evaluate_all(arms, tests, windows, max_len, workers):
    jobs = [(str(run_dir), rope, tests, windows, max_len) for run_dir, rope in arms.values()]
    if workers == 1:
        return dict(zip(arms, map(evaluate, jobs)))
    # spawn, not fork, as common.run_parallel: a forked child of a process that ran torch can deadlock
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return dict(zip(arms, pool.map(evaluate, jobs, chunksize=1)))


# ----------------------------------------------------------------------------- results

def table(results):
    """The CSV rows: passkey accuracy per (arm, seed, length, depth), loss per (arm, seed, octave)."""
    rows = []
    for (arm, seed), (acc, loss) in sorted(results.items()):
        rows += [dict(kind="passkey", arm=arm, seed=seed, length=L, depth=dp, pos_lo="", pos_hi="", value=v)
                 for (L, dp), v in sorted(acc.items())]
        rows += [dict(kind="loss", arm=arm, seed=seed, length="", depth="", pos_lo=lo, pos_hi=hi, value=v)
                 for (lo, hi), v in sorted(loss.items())]
    return rows


def by_length(results, arm):
    """{length: [accuracy averaged over depths, one per seed]}."""
    seeds = sorted(s for a, s in results if a == arm)
    lengths = sorted({L for L, _ in results[arm, seeds[0]][0]})
    return {L: [mean(v for (l, _), v in results[arm, s][0].items() if l == L) for s in seeds] for L in lengths}


def verdict(results, setup):
    """Per arm: the longest length whose passkey accuracy (mean over depths) is >= 0.9 in every seed,
    and the loss of the last position octave against the last one inside the training length."""
    # 0.9 in every seed, not on average: an arm that extends in one seed and not the other has not
    # extended (the README reports both); the loss columns show where a failure sets in
    T = setup["train_len"]
    out = {}
    for arm in ARMS:
        acc = by_length(results, arm)
        # the longest length solved with every shorter one solved too (0: not even the shortest)
        solved = [min(acc[L]) >= 0.9 for L in sorted(acc)] + [False]
        reach = ([0] + sorted(acc))[solved.index(False)]
        seeds = sorted(s for a, s in results if a == arm)
        octaves = sorted(results[arm, seeds[0]][1])
        inside = max(o for o in octaves if o[1] <= T)   # the last octave inside the training length
        last = octaves[-1]
        out[arm] = dict(reach=reach, acc=acc, inside=inside, last=last,
                        loss_inside=[results[arm, s][1][inside] for s in seeds],
                        loss_last=[results[arm, s][1][last] for s in seeds])
    return out


def plot_passkey(results, setup, path, title):
    """One heatmap per arm: passkey accuracy, length x depth, the mean over seeds."""
    plt = pyplot()
    lengths = setup["lengths"]
    fig, axes = plt.subplots(1, len(ARMS), figsize=(4 * len(ARMS), 3.8), sharey=True)
    for ax, (arm, label) in zip(axes, ARMS.items()):
        seeds = sorted(s for a, s in results if a == arm)
        # the mean over seeds: a cell at 0.5 can be one seed solving it and one not (the CSV has each)
        grid = [[mean(results[arm, s][0][L, dp] for s in seeds) for L in lengths] for dp in DEPTHS]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        # the lengths it was trained at: the base's, and the continued training's for (c)-(e)
        for t in [setup["train_len"]] + ([setup["ct_len"]] if arm in "cde" else []):
            if t in lengths:
                ax.axvline(lengths.index(t) + 0.5, color="k", lw=1.5)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(DEPTHS)), [f"{int(100 * d)}%" for d in DEPTHS])
        ax.set(title=label, xlabel="context length (tokens)")
    axes[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"passkey accuracy (chance {KEY_SET ** -KEY_LEN:.2f})")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss(results, setup, path, title):
    """Loss against position (octave means, log axis), every seed drawn, training lengths marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    # each seed its own line, not a mean: past the trained lengths the seeds part, and that is a result
    dashes = ["-", "--", ":", "-."]
    for k, (arm, label) in enumerate(ARMS.items()):
        seeds = sorted(s for a, s in results if a == arm)
        for i, s in enumerate(seeds):
            octaves = sorted(results[arm, s][1].items())
            x = [(lo + hi) / 2 for (lo, hi), _ in octaves]   # the octave's middle position
            ax.plot(x, [v for _, v in octaves], dashes[i % 4], color=f"C{k}", marker="o", ms=3,
                    label=f"{label}, seed {s}")
    for t, name in ((setup["train_len"], "base training length"), (setup["ct_len"], "continued training length")):
        ax.axvline(t, color="gray", ls=":", lw=1)
        ax.text(t, ax.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=7, color="gray")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position in the window (octave middles)", ylabel="held-out loss (nats/byte)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv):
    args = parse_args(argv)
    setup = scale_setup(SCALES, args, trunk=args.trunk_steps, ct=args.ct_steps, seeds=args.seeds)
    # steps given on the command line: decay, warmup in the default's proportions (1000 + 150)
    if args.trunk_steps:
        setup["decay"] = max(1, round(0.15 * setup["trunk"]))
    if args.ct_steps:
        setup["ct_warmup"], setup["ct_decay"] = max(1, round(0.07 * setup["ct"])), max(1, round(0.2 * setup["ct"]))
    out = common.check_out(args.out)   # a bad --out stops here, before the old runs are deleted
    work = out / "runs" / "long_context"
    shutil.rmtree(work, ignore_errors=True)   # fresh folders: a new run never lands on an old one
    t0 = time.time()
    # the corpora: the same real text; the passkey documents fit the base length, or reach 4x it
    import data
    train, held = stdlib_texts(setup["corpus_mb"])
    rng = random.Random(args.seed)
    # 16 bytes of margin: a passkey document a little shorter than a window, so whole ones fit in some
    short, long = setup["train_len"] - 16, setup["ct_len"] - 16
    corpora = {"short": write_corpus(work / "corpus" / "short.jsonl", train, rng, short),
               "long": write_corpus(work / "corpus" / "long.jsonl", train, rng, short, long)}
    # the test set first: a corpus too small for it fails here, not after the training
    tests, windows = haystacks(held, setup), loss_windows(held, setup)
    sources = {name: str(work / "corpus" / f"{name}.jsonl") for name in corpora}
    for src in sources.values():   # prepared here, once: two runs preparing one folder at once would race
        data.prepare(src, "byte", str(work / "data"), quiet=True, force=True)
    trunks, cts, arms = plan(args, setup, work, sources["short"], sources["long"])
    workers = common.workers(args)
    try:
        run_parallel([[(a + ["--data_dir", work / "data"], d) if "--resume" not in a else (a, d) for a, d in job]
                      for job in trunks], workers)
        run_parallel([[(a + ["--data_dir", work / "data"], d) for a, d in job] for job in cts], workers)
    except RunFailed as e:
        fail(str(e))
    t_train = time.time() - t0
    results = evaluate_all(arms, tests, windows, max(setup["lengths"]), min(workers, len(arms)))
    rows = table(results)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "long_context.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(), w.writerows(rows)
    v = verdict(results, setup)
    T, TL = setup["train_len"], setup["ct_len"]
    print(f"corpora: {corpora['short'][1] / 1e6:.1f} MB real text + {corpora['short'][2] / 1e6:.1f} MB passkey "
          f"(base), + {corpora['long'][2] / 1e6:.1f} MB (long); trained at {T}, continued at {TL}; "
          f"{len(windows)} loss windows of {max(setup['lengths'])}")
    print("passkey accuracy (mean over depths, per seed) by length:")
    for arm, label in ARMS.items():
        cells = "  ".join(f"{L}: {'/'.join(f'{a:.2f}' for a in accs)}" for L, accs in v[arm]["acc"].items())
        lo, hi = v[arm]["last"]
        print(f"  {label:38s} {cells}  | solved to {v[arm]['reach']}; loss {v[arm]['inside']} "
              f"{'/'.join(f'{x:.3f}' for x in v[arm]['loss_inside'])} -> [{lo}, {hi}) "
              f"{'/'.join(f'{x:.3f}' for x in v[arm]['loss_last'])}")
    summary = ", ".join(f"{arm} to {v[arm]['reach']}" for arm in ARMS)
    title = f"Long context (MiniCPM §7.2), trained at {T}, CT at {TL}, {setup['seeds']} seeds: passkey solved (>= 0.9) {summary}"
    plot_passkey(results, setup, out / "long_context_passkey.png", title)
    plot_loss(results, setup, out / "long_context_loss.png", f"Held-out loss by position (MiniCPM §7.2): trained at "
              f"{T}, continued at {TL}, {setup['seeds']} seeds")
    print(f"{summary}; training {t_train:.0f} s, in all {time.time() - t0:.0f} s; wrote "
          f"{out / 'long_context_passkey.png'}, {out / 'long_context_loss.png'} and {out / 'long_context.csv'}")
    return 0


def main(argv=None):
    return common.main("long_context.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
