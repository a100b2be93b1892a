"""Direct Preference Optimization (Rafailov et al. 2023) of a MiniCPM checkpoint, as for MiniCPM-DPO
(Hu et al. 2024, §7.1; SPEC §6): 1 epoch on preference pairs, cosine schedule, a frozen reference model.

    python dpo.py                                      # the embedded default task on out/tiny, CPU, ~minutes
    python dpo.py --data pairs.jsonl --init_from out/tiny --out_dir out/tiny-dpo
    python dpo.py --hf path/to/hf_folder --tokenizer cl100k_base --data pairs.jsonl
    python dpo.py --help                               # every flag, with its default

Data: JSONL, one {"prompt", "chosen", "rejected"} object of strings per line (the UltraFeedback pair
format); a pair goes to the held-out split when the hash of its text falls below --val_frac. Without
--data, the default task is built from the held-out documents of the checkpoint's own training data
(data.py's validation split, never trained on): prompt = a real window of a document, chosen = its
real continuation, rejected = a continuation taken from another document.

Writes to --out_dir: ckpt.pt (train.py's format, so sample.py --ckpt works on it), the tokenizer
file, metrics.jsonl (loss, rewards, margin, preference accuracy) and dpo.png.
"""
import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

import data
import train
import wsd
from minicpm import MiniCPM, atomic_write_text
from train import TrainError, flag


@dataclass
class DPOConfig:
    # starting point: ours (train.py's ckpt.pt, or its folder), or the released Hugging Face layout
    init_from: str = flag("out/tiny", "checkpoint to fine-tune (file or folder); also the frozen reference")
    hf: str = flag("", "instead: a Hugging Face-layout folder (config.json + weights)")
    tokenizer: str = flag("", "with --hf: tokenizer spec (bpe:N, byte, gpt2, ...; default: DIR/tokenizer_record.json)")
    rank_file: str = flag("", "with --hf and a bpe:N --tokenizer: its tokenizer.tiktoken")
    # data
    data: str = flag("", "JSONL of {prompt, chosen, rejected} pairs ('': the embedded default task)")
    dataset: str = flag("", "default task: a data.py dataset folder ('': the checkpoint's own training data)")
    val_frac: float = flag(0.2, "share of pairs held out (by a hash of the pair) to measure accuracy")
    max_len: int = flag(256, "tokens per sequence; longer prompts lose their left part")
    out_dir: str = flag("out/tiny-dpo", "where the checkpoint, metrics.jsonl and dpo.png go")
    # DPO (SPEC §6): the paper does not state beta; 0.1 is the usual default
    beta: float = flag(0.1, "DPO beta: strength of the pull towards the reference")
    label_smoothing: float = flag(0.0, "conservative DPO: assumed probability that a label is flipped")
    # optimization: AdamW with the model's muP groups, from train.py; cosine as in the paper (§7.1)
    lr: float = flag(1e-3, "peak lr (muP: matrices get lr / m). The paper's 1e-5 is for the 2.4B "
                           "(m = 9); the tiny default task needs more to move in ~100 steps")
    schedule: str = flag("cosine", "learning-rate schedule from wsd.py: " + ", ".join(wsd.SCHEDULES))
    warmup_steps: int = flag(-1, "linear warmup steps (-1: 10%% of the run)")
    epochs: int = flag(1, "passes over the training pairs (the paper: 1)")
    max_steps: int = flag(-1, "stop after this many steps (-1: the whole of --epochs)")
    batch_size: int = flag(8, "preference pairs per step")
    weight_decay: float = flag(0.0, "AdamW weight decay (not in the paper)")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    eval_interval: int = flag(20, "evaluate on the held-out pairs every this many steps (and at 0 and the end)")
    eval_pairs: int = flag(256, "held-out pairs per evaluation (the first ones: a fixed set)")
    seed: int = flag(1337, "seed of the default task and of the batch order")
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "autocast dtype: bfloat16, float16, float32, or auto (fp32 on CPU)")


# The embedded default task: 48 tokens of real context, then 16 tokens of continuation.
TASK_PROMPT_LEN, TASK_RESPONSE_LEN = 48, 16


# ----------------------------------------------------------------------------- the DPO loss

def sequence_logps(model, input_ids, labels):
    """Sum of log p(labels[t] | input_ids[:t+1]) over positions where labels != -100 -> [B].
    labels are aligned with input_ids the way model(idx, targets) takes them (shifted by one)."""
    logits, _ = model(input_ids)
    mask = labels != -100
    logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (logps * mask).sum(dim=1)


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """-> (mean loss, chosen rewards [B], rejected rewards [B]); SPEC §6 with conservative smoothing:
    loss = (1-eps) * -log sigmoid(beta * d) + eps * -log sigmoid(-beta * d), d the log-ratio margin.
    The rewards are the implicit ones, beta * (log pi - log ref), detached (for logging)."""
    margin = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    return losses.mean(), beta * (pol_chosen - ref_chosen).detach(), beta * (pol_rejected - ref_rejected).detach()


def pair_metrics(loss, chosen_r, rejected_r):
    # a tie (policy == reference at step 0) counts as half right: accuracy starts at chance, 0.5
    acc = (chosen_r > rejected_r).float() + 0.5 * (chosen_r == rejected_r).float()
    return dict(loss=loss.item(), reward_chosen=chosen_r.mean().item(), reward_rejected=rejected_r.mean().item(),
                margin=(chosen_r - rejected_r).mean().item(), accuracy=acc.mean().item())


# ----------------------------------------------------------------------------- data

def collate(pairs, max_len, pad_id, bos_id):
    """Pairs of token-id lists {prompt, chosen, rejected} -> input_ids, labels [2B, T]: the B chosen
    sequences, then the B rejected ones. Each sequence is bos_id + prompt + response: a leading
    separator (our corpora's <|endoftext|>: a document starts after one) gives the first response
    token something to follow, even with an empty prompt.
    Labels are -100 on the prompt and the padding, so only response tokens are scored; a sequence
    longer than max_len + 1 loses the left of its prompt (then the right of its response)."""
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            response = p[side][:max_len]
            prompt = ([bos_id] + p["prompt"])[-(max_len + 1 - len(response)):]
            seqs.append(prompt + response)
            starts.append(len(prompt))
    T = max(len(s) for s in seqs) - 1
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s) - 1] = torch.tensor(s[:-1])
        labels[i, start - 1:len(s) - 1] = torch.tensor(s[start:])   # position t predicts s[t + 1]
    return input_ids, labels


def pair_hash(key):
    """A pair's place in [0, 1), the same on every machine and run (the held-out split)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def build_default_pairs(tokens, eot_id, val_frac=0.2, prompt_len=TASK_PROMPT_LEN, response_len=TASK_RESPONSE_LEN, seed=0):
    """The default task from a token stream of documents separated by eot_id (a val.bin): every
    non-overlapping window of a document gives prompt = its first prompt_len tokens, chosen = the
    next response_len, rejected = the continuation of a random window of another document.
    A window is held out (its pair measures accuracy) when its hash falls below val_frac."""
    docs, start = [], 0
    for end in np.flatnonzero(tokens == eot_id).tolist() + [len(tokens)]:
        docs.append(tokens[start:end].tolist())
        start = end + 1
    n = prompt_len + response_len
    windows = [(d, i) for d, doc in enumerate(docs) for i in range(0, len(doc) - n + 1, n)]
    if len({d for d, _ in windows}) < 2:
        raise TrainError(f"the default task needs at least 2 validation documents of {n}+ tokens; "
                         f"found {len({d for d, _ in windows})}: use a bigger corpus or --data")
    # held-out windows are split off first, and rejected continuations come from the same split:
    # otherwise training would push down the very text that held-out pairs prefer
    rng, pairs = random.Random(seed), []
    for held in (False, True):
        pool = [(d, i) for d, i in windows if (pair_hash(f"{d}:{i}") < val_frac) == held]
        for d, i in pool:
            others = [w for w in pool if w[0] != d]
            if not others:
                continue
            od, oi = rng.choice(others)
            pairs.append(dict(prompt=docs[d][i:i + prompt_len], chosen=docs[d][i + prompt_len:i + n],
                              rejected=docs[od][oi + prompt_len:oi + n], held_out=held))
    return pairs


def read_pairs(path, tokenizer, val_frac):
    """A JSONL file of {prompt, chosen, rejected} strings -> pairs of token-id lists; a pair is held
    out when the hash of its line falls below val_frac."""
    if not os.path.isfile(path):
        raise TrainError(f"--data {path} is not a file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
                raise TrainError(f"{path}:{lineno} needs string fields prompt, chosen and rejected")
            # encode_ordinary: the text's own "<|endoftext|>" is text, not our separator
            pairs.append(dict(held_out=pair_hash(line) < val_frac, **{k: tokenizer.encode_ordinary(rec[k]) for k in ("prompt", "chosen", "rejected")}))
    if not pairs:
        raise TrainError(f"--data {path} holds no pairs")
    return pairs


# ----------------------------------------------------------------------------- setup

def load_policy(cfg, device):
    """-> (model, tokenizer record {spec, rank_file, eot_id, vocab_size}, rank file path, train_config)."""
    if cfg.hf:
        model = MiniCPM.from_hf(cfg.hf)
        record_path = os.path.join(cfg.hf, "tokenizer_record.json")
        record = json.load(open(record_path)) if os.path.isfile(record_path) else {}
        spec = cfg.tokenizer or record.get("spec")
        rank_file = cfg.rank_file or (record.get("rank_file") and os.path.join(cfg.hf, record["rank_file"]))
        if not spec:
            raise TrainError(f"{cfg.hf} has no tokenizer_record.json: pass --tokenizer (and --rank_file for bpe:N)")
        train_config = {}
    else:
        ckpt = train.load_checkpoint(cfg.init_from)
        model = train.model_from_checkpoint(ckpt)
        spec, rel = ckpt["tokenizer"]["spec"], ckpt["tokenizer"]["rank_file"]
        rank_file = rel and os.path.join(os.path.dirname(ckpt["path"]), rel)
        train_config = ckpt.get("train_config") or {}
    enc = data.load_tokenizer(spec, rank_file or None)
    if enc.n_vocab > model.config.vocab_size:
        raise TrainError(f"tokenizer {spec} has {enc.n_vocab} tokens, more than the model's {model.config.vocab_size}")
    record = dict(spec=spec, rank_file="tokenizer.tiktoken" if rank_file else None, eot_id=enc.eot_token,
                  vocab_size=model.config.vocab_size)
    return model.to(device), enc, record, rank_file, train_config


def default_task_tokens(cfg, train_config, enc):
    """The validation tokens (val.bin) of the checkpoint's training data, or of --dataset."""
    folder = cfg.dataset
    if not folder:
        if "source" not in train_config:
            raise TrainError("this checkpoint does not say what it was trained on: pass --dataset or --data")
        folder = data.prepare(train_config["source"], train_config["tokenizer"], train_config["data_dir"], quiet=True)
    meta = data.load_meta(folder)
    if meta["eot_id"] != enc.eot_token or meta["vocab_size"] != enc.n_vocab:
        raise TrainError(f"{folder} was tokenized with {meta['tokenizer']}, not the checkpoint's tokenizer")
    return np.asarray(data.open_tokens(os.path.join(folder, "val.bin")))


def make_schedule(cfg, total, warmup):
    """lr(step) from wsd.py over the whole run; the paper fine-tunes with a cosine (§7.1)."""
    if cfg.schedule not in wsd.SCHEDULES:
        raise TrainError(f"--schedule {cfg.schedule} is not one of {', '.join(wsd.SCHEDULES)}")
    extra = {}
    if cfg.schedule in ("cosine", "cosine_loop"):
        extra = dict(T=total)
    elif cfg.schedule == "wsd":   # decay over the last 10%, as in pre-training (§4)
        start = max(warmup, round(0.9 * total))
        extra = dict(decay_start=start, decay_steps=max(1, total - start))
    return wsd.schedule(cfg.schedule, lr_max=cfg.lr, warmup=warmup, **extra)


def resolve_device(name):
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def plot(metrics_path, png_path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        train_rows = [(r["step"], r[key]) for r in rows if key in r]
        val_rows = [(r["step"], r["eval_" + key]) for r in rows if "eval_" + key in r]
        if train_rows:
            ax.plot(*zip(*train_rows), alpha=0.5, label=f"train {key} (per batch)")
        ax.plot(*zip(*val_rows), "o-", label=f"held-out {key}")
        ax.axhline(math.log(2) if key == "loss" else 0.5, color="k", ls=":", lw=1, label="policy = reference")
        ax.set(xlabel="step", ylabel=key, title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


# ----------------------------------------------------------------------------- training

def run(cfg):
    device = resolve_device(cfg.device)
    dtype = train.autocast_dtype(cfg, device.split(":")[0])
    if not 0 <= cfg.label_smoothing < 0.5:
        raise TrainError(f"--label_smoothing {cfg.label_smoothing} must be in [0, 0.5)")
    torch.manual_seed(cfg.seed)
    policy, enc, record, rank_file, train_config = load_policy(cfg, device)
    if cfg.max_len + 1 > policy.config.block_size:
        raise TrainError(f"--max_len {cfg.max_len} does not fit the model's block_size {policy.config.block_size}")
    # the reference is the starting checkpoint, frozen (SPEC §6); eval mode, no gradients
    reference = copy.deepcopy(policy).eval().requires_grad_(False)

    if cfg.data:
        pairs = read_pairs(cfg.data, enc, cfg.val_frac)
    else:
        pairs = build_default_pairs(default_task_tokens(cfg, train_config, enc), enc.eot_token, cfg.val_frac, seed=cfg.seed)
    train_pairs = [p for p in pairs if not p["held_out"]]
    val_pairs = [p for p in pairs if p["held_out"]][:cfg.eval_pairs]
    if not train_pairs or not val_pairs:
        raise TrainError(f"{len(pairs)} pairs give {len(train_pairs)} to train on and {len(val_pairs)} held out: "
                         f"need some of each (change --val_frac or add pairs)")
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps < 0 else cfg.max_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else round(0.1 * total)
    lr_at = make_schedule(cfg, total, warmup)
    optimizer = train.make_optimizer(policy, cfg.lr, cfg.weight_decay, (0.9, 0.95), 1e-8, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    pad_id = bos_id = enc.eot_token   # padding is never scored nor attended to (causal, on the right)

    def forward(pairs_batch, with_grad):
        ids, labels = (t.to(device) for t in collate(pairs_batch, cfg.max_len, pad_id, bos_id))
        with autocast:
            with torch.no_grad():
                ref = sequence_logps(reference, ids, labels)
            with nullcontext() if with_grad else torch.no_grad():
                pol = sequence_logps(policy, ids, labels)
        B = len(pairs_batch)    # chosen first, then rejected (collate)
        return dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], cfg.beta, cfg.label_smoothing), int((labels != -100).sum())

    @torch.no_grad()
    def evaluate():
        policy.eval()
        results = [forward(val_pairs[i:i + cfg.batch_size], False)[0] for i in range(0, len(val_pairs), cfg.batch_size)]
        policy.train()
        losses = torch.stack([r[0] * len(r[1]) for r in results]).sum() / len(val_pairs)
        m = pair_metrics(losses, torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results]))
        return {"eval_" + k: v for k, v in m.items()}

    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank_file:   # the tokenizer beside the checkpoint: the output folder is self-contained
        shutil.copyfile(rank_file, os.path.join(cfg.out_dir, record["rank_file"]))
    metrics_path, png_path = os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "dpo.png")
    atomic_write_text("", metrics_path)

    def log(row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    print(f"{len(train_pairs)} training pairs, {len(val_pairs)} held out; {total} steps of {cfg.batch_size} pairs, "
          f"{cfg.schedule} lr {cfg.lr} (warmup {warmup}), beta {cfg.beta}, label smoothing {cfg.label_smoothing}")
    first = evaluate()
    log(dict(step=0, **first))
    print(f"step 0: held-out accuracy {first['eval_accuracy']:.3f}, margin {first['eval_margin']:.3f}")
    from tqdm import tqdm
    bar = tqdm(total=total, desc="dpo", unit="step", dynamic_ncols=True)
    rng, order, step, tokens, t0 = random.Random(cfg.seed), [], 0, 0, time.time()
    while step < total:
        if not order:   # a new epoch: a fresh shuffle of the training pairs
            order = list(range(len(train_pairs)))
            rng.shuffle(order)
        batch, order = [train_pairs[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        lr = lr_at(step)
        train.set_lr(optimizer, lr)
        (loss, chosen_r, rejected_r), n_tokens = forward(batch, True)
        if not torch.isfinite(loss):
            raise TrainError(f"the DPO loss is {loss.item()} at step {step}: try a lower --lr")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + n_tokens
        row = dict(step=step, lr=lr, grad_norm=grad_norm.item(), **pair_metrics(loss, chosen_r, rejected_r))
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.2f}")
        bar.update(1)
        if step % cfg.eval_interval == 0 or step == total:
            row.update(evaluate())
            bar.write(f"step {step}: held-out loss {row['eval_loss']:.4f}, accuracy {row['eval_accuracy']:.3f}, "
                      f"margin {row['eval_margin']:.3f}")
            plot(metrics_path, png_path, f"DPO, beta {cfg.beta}")
        log(row)
    bar.close()
    path = train.save_checkpoint(cfg, policy, optimizer, scaler, step, tokens, record, cfg.out_dir)
    last = row if "eval_accuracy" in row else first
    print(f"done in {time.time() - t0:.0f} s: held-out accuracy {first['eval_accuracy']:.3f} -> "
          f"{last['eval_accuracy']:.3f}, margin {first['eval_margin']:.3f} -> {last['eval_margin']:.3f}; "
          f"{path}, metrics.jsonl and dpo.png in {cfg.out_dir}")
    return first, last


# ----------------------------------------------------------------------------- command line

def parse_flags(argv):
    return train.dataclass_flags(DPOConfig, __doc__, argv)


def main(argv=None):
    try:
        run(parse_flags(sys.argv[1:] if argv is None else argv))
    except (TrainError, data.DataError, ValueError, FileNotFoundError) as e:
        print(f"dpo.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
