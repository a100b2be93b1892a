"""Direct Preference Optimization (DPO, Rafailov et al. 2023, arXiv 2305.18290) of a MiniCPM model, as
MiniCPM's chat models were aligned (Hu et al. 2024, §7.1): preference pairs, a cosine schedule, and the
starting model, frozen, as the reference.

    python dpo.py                                      # the embedded default task on out/tiny, CPU, ~minutes
    python dpo.py --data pairs.jsonl --init_from out/tiny --out_dir out/tiny-dpo
    python dpo.py --hf path/to/hf_folder --tokenizer cl100k_base --data pairs.jsonl
    python dpo.py --resume out/tiny-dpo                # continue a stopped run exactly
    python dpo.py --help                               # every flag, with its default

Data: JSONL, one {"prompt", "chosen", "rejected"} object of strings per line (the UltraFeedback pair
format); a pair is held out when the hash of its line falls below --val_frac. Without --data, the
default task is built from the held-out documents of the checkpoint's own training data (data.py's
validation split, never trained on): prompt = a real window of a document, chosen = its real
continuation, rejected = a continuation taken from another document.

Writes to --out_dir: ckpt.pt (checkpoint.py's format, kind "dpo": sample.py reads it, and --init_from
of train.py or dpo.py starts from its weights), the tokenizer file, metrics.jsonl (loss, implicit
rewards, margin, preference accuracy) and dpo.png. Exit codes: 0 done, 1 failed (NaN loss, disk),
2 bad input (nothing written), 130/143 stopped by Ctrl-C/SIGTERM after saving a checkpoint.
"""
import copy, dataclasses, hashlib, json, math, os, random, sys, time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import cli
import data
import hf
import metrics
import preference
import tokenizer
import wsd
from cli import UsageError, flag


@dataclass
class DPOConfig:
    # starting point: any ckpt.pt of this project (pretrain or dpo), or the released Hugging Face layout
    init_from: str = flag("out/tiny", "checkpoint to fine-tune (file or folder, any kind); also the frozen reference")
    hf: str = flag("", "instead: a Hugging Face-layout folder (config.json + weights)")
    tokenizer: str = flag("", "with --hf: NAME[@RANK_FILE], e.g. byte, gpt2, bpe:4096@dir/tokenizer.tiktoken "
                              "('': DIR/tokenizer_record.json)")
    resume: str = flag("", "continue the dpo.py run saved in this folder exactly (optimizer, step, batch order)")
    # data
    data: str = flag("", "JSONL of {prompt, chosen, rejected} pairs ('': the embedded default task)")
    dataset: str = flag("", "default task: a data.py dataset folder ('': the checkpoint's own training data)")
    val_frac: float = flag(0.2, "share of pairs held out (by a hash of the pair) to measure accuracy")
    max_len: int = flag(256, "tokens per sequence; longer prompts lose their left part")
    out_dir: str = flag("out/tiny-dpo", "where the checkpoint, metrics.jsonl and dpo.png go")
    overwrite: bool = flag(False, "start a new run in an --out_dir that already holds one, replacing it")
    # §7.1 does not state beta; 0.1 is the usual choice (Rafailov et al. use 0.1 to 0.5)
    beta: float = flag(0.1, "DPO beta: strength of the pull towards the reference")
    label_smoothing: float = flag(0.0, "conservative DPO: assumed probability that a label is flipped")
    # AdamW with the model's muP groups and a cosine, as the paper fine-tunes (§7.1)
    lr: float = flag(1e-3, "peak lr (muP: matrices get lr / m). The paper's 1e-5 is for the 2.4B "
                           "(m = 9); the tiny default task needs more to move in ~100 steps")
    schedule: str = flag("cosine", "learning-rate schedule from wsd.py: " + ", ".join(wsd.SCHEDULES))
    warmup_steps: int = flag(-1, f"linear warmup steps (-1: wsd.py's default, {wsd.WARMUP_STEPS})")
    epochs: int = flag(1, "passes over the training pairs (the paper: 1)")
    max_steps: int = flag(-1, "steps in the run (-1: the whole of --epochs)")
    batch_size: int = flag(8, "preference pairs per step")
    weight_decay: float = flag(0.0, "AdamW weight decay (not in the paper)")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    eval_interval: int = flag(20, "evaluate on the held-out pairs every this many steps (and at 0 and the end)")
    eval_pairs: int = flag(256, "held-out pairs per evaluation (the first ones: a fixed set)")
    ckpt_interval: int = flag(100, "save a checkpoint every this many steps (and at the end)")
    stop_at: int = flag(-1, "stop (with a checkpoint) after this step, keeping the schedule of the whole run")
    seed: int = flag(1337, "seed of the default task and of the batch order")
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "autocast dtype: bfloat16, float16, float32, or auto (fp32 on CPU)")


# What a resume may change: where things go, how the run is watched, the machine, and its length.
RESUME_MAY_CHANGE = {"resume", "out_dir", "overwrite", "stop_at", "max_steps", "eval_interval", "ckpt_interval",
                     "device", "dtype"}


# ----------------------------------------------------------------------------- the DPO loss

def sequence_logps(model, input_ids, labels):
    """log pi(response | prompt) of each sequence: input_ids, labels [B, T] -> [B]."""
    # Eq. 7 scores a whole response y given its prompt x: token log-probs are summed (a mean would be
    # another objective), over response tokens only: labels are -100 on the prompt, given rather than
    # chosen, and on the padding. labels[:, t] is the token after input_ids[:, t], as model(idx, targets).
    logits, _ = model(input_ids)   # [B, T, vocab]
    mask = labels != -100          # [B, T]
    # fp32: a log-ratio is a small difference of two large sums, which bf16 would round away; clamp: -100 is no index
    logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (logps * mask).sum(dim=1)


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """Summed log-probs [B] of each side -> (mean loss, chosen rewards [B], rejected rewards [B])."""
    # Rafailov et al. Eq. 7, as MiniCPM's chat models were aligned (§7.1): loss = -log sigmoid(beta d), d the margin
    # of log-ratios log(pi / pi_ref), chosen minus rejected. The reference terms are the KL anchor of the RLHF
    # objective (Eq. 3): the policy gains only by preferring chosen over rejected *more than the reference did*.
    margin = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)   # [B]
    # conservative DPO: a label is flipped with probability eps, so the flipped label's loss is mixed in; then
    # the optimum is a finite margin (sigmoid(beta d) = 1 - eps) instead of d -> infinity. eps = 0 is Eq. 7.
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    # the implicit rewards beta * log(pi / pi_ref) (Rafailov et al. §4, from Eq. 5): logged, never trained on
    return losses.mean(), beta * (pol_chosen - ref_chosen).detach(), beta * (pol_rejected - ref_rejected).detach()


def pair_metrics(loss, chosen_r, rejected_r):
    # a tie (policy == reference at step 0) counts as half right: accuracy starts at chance, 0.5
    acc = (chosen_r > rejected_r).float() + 0.5 * (chosen_r == rejected_r).float()   # [B]
    return dict(loss=loss.item(), reward_chosen=chosen_r.mean().item(), reward_rejected=rejected_r.mean().item(),
                margin=(chosen_r - rejected_r).mean().item(), accuracy=acc.mean().item())


# ----------------------------------------------------------------------------- configuration

def check_flags(cfg, explicit):
    """Every flag's range, before anything is read or written."""
    # checked together: one line on stderr names every bad flag (exit 2), and no folder is half-written
    cli.check([(min(cfg.batch_size, cfg.eval_interval, cfg.eval_pairs, cfg.ckpt_interval, cfg.epochs, cfg.max_len) < 1,
                "--batch_size, --eval_interval, --eval_pairs, --ckpt_interval, --epochs and --max_len must be >= 1"),
               (cfg.max_steps == 0 or cfg.max_steps < -1, f"--max_steps must be >= 1, or -1 for all of --epochs (got {cfg.max_steps})"),
               (cfg.stop_at == 0 or cfg.stop_at < -1, f"--stop_at must be >= 1, or -1 for no stop (got {cfg.stop_at})"),
               (not cfg.beta > 0, f"--beta must be > 0 (got {cfg.beta}): it scales the log-ratios (Rafailov et al. Eq. 7)"),
               # eps = 0.5 makes both labels equally likely: the loss would no longer prefer either side
               (not 0 <= cfg.label_smoothing < 0.5, f"--label_smoothing must be in [0, 0.5) (got {cfg.label_smoothing})"),
               (not 0 < cfg.val_frac < 1, f"--val_frac must be in (0, 1) (got {cfg.val_frac})"),
               (not cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
               (min(cfg.weight_decay, cfg.grad_clip) < 0, "--weight_decay and --grad_clip must be >= 0"),
               (cfg.warmup_steps < -1, "--warmup_steps must be >= 0, or -1 for the default"),
               (cfg.schedule not in wsd.SCHEDULES, f"--schedule must be one of {', '.join(wsd.SCHEDULES)}"),
               ({"init_from", "hf"} <= explicit.keys(), "give --init_from or --hf, not both")])   # both: which one is the reference?


def resolve(argv):
    """argv -> (the run's config, the resumed checkpoint or None, the starting checkpoint or None)."""
    # defaults are left out of the parse, so that a resume, which takes the saved flags, can tell a flag
    # the user changed from one left alone: it may change only RESUME_MAY_CHANGE
    p = cli.parser(__doc__)
    cli.add_flags(p, DPOConfig, suppress=True)
    explicit = cli.parse(p, argv)
    cfg = DPOConfig(**explicit)
    check_flags(cfg, explicit)
    if not cfg.resume:   # any kind of checkpoint can start a run: DPO on top of DPO is fine-tuning further
        return cfg, None, None if cfg.hf else checkpoint.load(cfg.init_from)
    resumed = checkpoint.load(cfg.resume, kind="dpo")   # only a dpo.py run has the state to continue
    saved = DPOConfig(**{k: v for k, v in resumed["config"].items() if k in {f.name for f in fields(DPOConfig)}})
    # a changed beta, lr or data would silently make a different run out of the saved one: refused
    differ = [f"--{k}: checkpoint has {getattr(saved, k)!r}, given {v!r}" for k, v in explicit.items()
              if k not in RESUME_MAY_CHANGE and getattr(saved, k) != v]
    cli.check([(bool(differ), "cannot resume with a different configuration: " + "; ".join(differ))])
    # a stop or an overwrite was a one-off request of the saved run, not part of its configuration
    changes = {"stop_at": -1, "overwrite": False, "out_dir": os.path.dirname(resumed["path"]),
               **{k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE}}
    return dataclasses.replace(saved, **changes), resumed, None


def check_out_dir(cfg, resumed, source):
    """A new run never replaces an existing one by accident (checkpoint.py's rule, as in train.py)."""
    # nor writes over its own starting model: a resume rebuilds the frozen reference from that file
    same = source and os.path.abspath(cfg.out_dir) == os.path.dirname(os.path.abspath(source["path"]))
    cli.check([(same, f"--init_from and --out_dir are the same folder ({cfg.out_dir}): the run would "
                "overwrite its own reference model; choose another --out_dir")])
    checkpoint.check_run_folder(cfg.out_dir, resumed and resumed["path"], cfg.overwrite)


# ----------------------------------------------------------------------------- models, pairs and the run

def fingerprint(model):
    """sha256 of the weights: a resume checks that the reference it rebuilds is the one it began with."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):   # raw bytes, on the CPU: the same hash on any device
        h.update(name.encode() + t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_models(cfg, resumed, source, device):
    """-> (policy, frozen reference, where the reference comes from)."""
    # pi_ref is the model DPO starts from (Rafailov et al. §4), frozen: it anchors the KL term; a reference
    # that trained along would keep every log-ratio near 0, and nothing would hold the policy near what it
    # knew. Checkpoints store its source and fingerprint, not a second copy of the weights. Attention is sdpa
    # whatever a checkpoint trained with (checkpoint.load drops a saved attn_impl): a runtime choice.
    if resumed:
        policy, where = checkpoint.build_model(resumed, device, attn_impl="sdpa"), resumed["reference"]
        reference = (hf.load_hf(where["hf"], device, attn_impl="sdpa") if where["hf"] else
                     checkpoint.build_model(checkpoint.load(where["ckpt"]), device, attn_impl="sdpa"))
        # another reference would change every log-ratio: the run would not continue, it would restart
        cli.check([(fingerprint(reference) != where["fingerprint"], f"the reference model {where['hf'] or where['ckpt']} "
                    "has changed since this run started: restore it to resume this run exactly")])
    else:
        policy = hf.load_hf(cfg.hf, device, attn_impl="sdpa") if cfg.hf else checkpoint.build_model(source, device, attn_impl="sdpa")
        reference = copy.deepcopy(policy)   # at step 0 policy == reference: loss ln 2 exactly
        where = dict(hf=cfg.hf and os.path.abspath(cfg.hf), ckpt=source and os.path.abspath(source["path"]), fingerprint=fingerprint(reference))
    return policy, reference.eval().requires_grad_(False), where   # no gradients, no optimizer state


def load_tokenizer(cfg, ckpt, model):
    """-> (tiktoken Encoding, the tokenizer record for our checkpoint, the rank file's path or None)."""
    # from a checkpoint its own record; from --hf the flags, else the folder's tokenizer_record.json
    if ckpt:
        spec, rank_file = ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt)
    else:
        path = os.path.join(cfg.hf, "tokenizer_record.json")
        spec, _, rank_file = cfg.tokenizer.partition("@")
        if not spec and os.path.isfile(path):   # hf.save_hf writes it beside the weights
            record = json.load(open(path))
            spec, rank_file = record["spec"], record["rank_file"] and os.path.join(cfg.hf, record["rank_file"])
        elif not spec and os.path.isfile(os.path.join(cfg.hf, "tokenizer.json")):   # a released folder's
            spec, rank_file = tokenizer.RELEASED_TOKENIZER, os.path.join(cfg.hf, "tokenizer.json")
        cli.check([(not spec, f"{cfg.hf} has no tokenizer_record.json or tokenizer.json: pass --tokenizer NAME[@RANK_FILE]")])
    enc = data.load_tokenizer(spec, rank_file or None)
    cli.check([(enc.n_vocab > model.config.vocab_size, f"tokenizer {spec} has {enc.n_vocab} tokens, more than "
                f"the model's {model.config.vocab_size}")])
    return enc, checkpoint.tokenizer_record(dict(tokenizer=spec, rank_file=rank_file, eot_id=enc.eot_token,
                                                 vocab_size=model.config.vocab_size)), rank_file or None


def default_dataset(cfg, source):
    """The data.py folder of the default task: --dataset, a dpo.py checkpoint's, or the start's own."""
    # its validation split was never trained on: the policy cannot know the chosen continuations by heart
    run_cfg = (source or {}).get("config", {})
    if cfg.dataset or run_cfg.get("dataset"):
        return cfg.dataset or run_cfg["dataset"]
    if "source" not in run_cfg:   # e.g. --hf: no record of its corpus
        raise UsageError("the starting model does not say what it was trained on: pass --dataset or --data")
    return str(data.prepare(run_cfg["source"], run_cfg["tokenizer"], run_cfg["data_dir"], quiet=True))


def load_pairs(cfg, source, enc):
    """-> (training pairs, held-out pairs, the default task's dataset folder or "")."""
    folder = "" if cfg.data else default_dataset(cfg, source)
    if cfg.data:
        pairs = preference.read_pairs(cfg.data, enc, cfg.val_frac)
    else:
        meta = data.load_meta(folder)
        # ids of another tokenizer would be valid numbers meaning other text: the task would be noise
        cli.check([(meta["eot_id"] != enc.eot_token or meta["vocab_size"] != enc.n_vocab,
                    f"{folder} was tokenized with {meta['tokenizer']}, not the model's tokenizer: pass --dataset or --data")])
        tokens = np.asarray(data.open_tokens(os.path.join(folder, "val.bin")))
        pairs = preference.build_default_pairs(tokens, enc.eot_token, cfg.val_frac, seed=cfg.seed)
    train_pairs = [p for p in pairs if not p["held_out"]]
    val_pairs = [p for p in pairs if p["held_out"]][:cfg.eval_pairs]   # the first ones: the same set at every eval
    cli.check([(not train_pairs or not val_pairs, f"{len(pairs)} pairs give {len(train_pairs)} to train on and "
                f"{len(val_pairs)} held out: need some of each (change --val_frac or add pairs)")])
    return train_pairs, val_pairs, folder


def build_run(cfg, resumed, source, device, dtype):
    """Everything the loop needs, in one namespace; nothing is written yet."""
    torch.manual_seed(cfg.seed)
    policy, reference, where = load_models(cfg, resumed, source, device)
    enc, record, rank_file = load_tokenizer(cfg, resumed or source, policy)
    cli.check([(cfg.max_len + 1 > policy.config.block_size, f"--max_len {cfg.max_len} does not fit the model's "
                f"block_size {policy.config.block_size}: use at most {policy.config.block_size - 1}")])
    train_pairs, val_pairs, folder = load_pairs(cfg, source, enc)
    cfg = dataclasses.replace(cfg, dataset=folder or cfg.dataset)   # saved, so a resume reads the same pairs
    digest = hashlib.sha256(json.dumps([[p[k] for k in ("prompt", "chosen", "rejected")] for p in train_pairs + val_pairs]).encode())
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(len(train_pairs) / cfg.batch_size)
    # AdamW over the muP groups (§3.1): each group's lr is lr(step) * lr_scale
    optimizer = torch.optim.AdamW(policy.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  eps=1e-8, fused=device.startswith("cuda"))
    device_type = device.split(":")[0]
    run = SimpleNamespace(
        cfg=cfg, device=device, policy=policy, reference=reference, reference_source=where, optimizer=optimizer,
        scaler=torch.amp.GradScaler(device_type, enabled=dtype == torch.float16),   # fp16 only: bf16 needs none
        autocast=torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext(),
        lr_at=wsd.resolve(cfg.schedule, lr=cfg.lr, max_steps=total, warmup=cfg.warmup_steps), total=total,
        train_pairs=train_pairs, val_pairs=val_pairs, pairs_digest=digest.hexdigest(),
        eot_id=enc.eot_token, record=record, rank_file=rank_file, step=0, tokens=0,   # eot: padding, and bos for ours
        bos_id=enc.eot_token if getattr(enc, "bos_token", None) is None else enc.bos_token,   # a release's own BOS
        rng=random.Random(cfg.seed), order=[], log=metrics.MetricsLog(cfg.out_dir), last_ckpt=None)
    if resumed:
        restore(run, resumed)
    return run


def restore(run, resumed):
    """Exactly where the saved run stopped: optimizer, scaler, RNG states, batch order, step."""
    # bitwise the weights of an unstopped run need all of it: fresh Adam moments would jolt the policy, and a
    # new batch order would show some pairs twice and others never; the same pairs too (their digest)
    last = min(run.total, run.cfg.stop_at) if run.cfg.stop_at > 0 else run.total
    cli.check([(resumed["pairs_digest"] != run.pairs_digest, "the preference pairs differ from the ones this run "
                f"started with ({run.cfg.data or run.cfg.dataset} changed?): a resume needs the same data"),
               (resumed["step"] >= last, f"{resumed['path']} is at step {resumed['step']}, the end of its "
                f"{run.total} steps (or --stop_at): give a larger --max_steps to train on")])
    run.optimizer.load_state_dict(resumed["optimizer"])
    if resumed["scaler"]: run.scaler.load_state_dict(resumed["scaler"])   # {} when the saved run was not fp16
    torch.set_rng_state(resumed["rng"])
    run.rng.setstate(resumed["order_rng"])
    run.order, run.step, run.tokens, run.last_ckpt = list(resumed["order"]), resumed["step"], resumed["tokens"], resumed["path"]


def prepare_out_dir(run, resumed):
    """Only now, with configuration, models and pairs known good, is the output folder written."""
    cfg = run.cfg
    os.makedirs(cfg.out_dir, exist_ok=True)
    checkpoint.remove_stale_temps(cfg.out_dir)   # leftovers of a writer killed mid-save
    dest = os.path.join(cfg.out_dir, run.record["rank_file"] or "")
    if run.rank_file and os.path.abspath(run.rank_file) != os.path.abspath(dest):   # the folder is self-contained
        checkpoint.atomic_write(dest, lambda f: f.write(open(run.rank_file, "rb").read()))
        tk_config = os.path.join(os.path.dirname(run.rank_file), "tokenizer_config.json")   # a release's BOS rule
        if run.record["spec"] == tokenizer.RELEASED_TOKENIZER and os.path.isfile(tk_config):
            checkpoint.atomic_write(os.path.join(cfg.out_dir, "tokenizer_config.json"), lambda f: f.write(open(tk_config, "rb").read()))
    # a resume into another folder starts its metrics from the old folder's, up to the resumed step
    run.log.start(resumed["step"] if resumed else None, resumed and os.path.join(os.path.dirname(resumed["path"]), "metrics.jsonl"))


def save(run):
    """ckpt.pt of kind "dpo": the policy, and everything a resume needs to continue bitwise."""
    run.last_ckpt = checkpoint.save(
        run.cfg.out_dir, "dpo", run.policy, optimizer=run.optimizer.state_dict(), step=run.step, tokens=run.tokens,
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else {}, config=dataclasses.asdict(run.cfg),
        tokenizer=run.record, rng=torch.get_rng_state(), order_rng=run.rng.getstate(), order=run.order,
        reference=run.reference_source, pairs_digest=run.pairs_digest)


# ----------------------------------------------------------------------------- training

def forward(run, batch, with_grad):
    """-> ((loss, chosen rewards, rejected rewards), response tokens scored) for a list of pairs."""
    # padding is never scored nor attended to (causal, on the right), so any id will do
    ids, labels = (t.to(run.device) for t in preference.collate(batch, run.cfg.max_len, run.eot_id, run.bos_id))   # [2B, T]
    with run.autocast:
        with torch.no_grad():   # the frozen reference: no graph kept, no gradient
            ref = sequence_logps(run.reference, ids, labels)   # [2B]
        with nullcontext() if with_grad else torch.no_grad():
            pol = sequence_logps(run.policy, ids, labels)      # [2B]
    B = len(batch)   # chosen first, then rejected (collate): one forward pass per model scores both sides
    return dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], run.cfg.beta, run.cfg.label_smoothing), int((labels != -100).sum())


@torch.no_grad()
def evaluate(run):
    """Loss, rewards and accuracy over the fixed held-out pairs, as eval_* metrics."""
    run.policy.eval()
    B, pairs = run.cfg.batch_size, run.val_pairs
    results = [forward(run, pairs[i:i + B], False)[0] for i in range(0, len(pairs), B)]
    run.policy.train()
    # each batch's mean loss weighted by its size: the last batch may be short
    loss = torch.stack([r[0] * len(r[1]) for r in results]).sum() / len(pairs)
    m = pair_metrics(loss, torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results]))
    return {"eval_" + k: v for k, v in m.items()}


def next_batch(run):
    """The next batch_size training pairs: a fresh shuffle at each epoch."""
    # run.rng and the rest of the epoch's order are in the checkpoint, so a resume draws the same batches
    if not run.order:
        run.order = list(range(len(run.train_pairs)))
        run.rng.shuffle(run.order)
    batch, run.order = run.order[:run.cfg.batch_size], run.order[run.cfg.batch_size:]
    return [run.train_pairs[i] for i in batch]


def train_step(run, lr):
    """One optimizer step -> (row of metrics, response tokens); (row, None) for a non-finite loss."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]              # muP: matrices lr / m
    (loss, chosen_r, rejected_r), n_tokens = forward(run, next_batch(run), True)
    if not torch.isfinite(loss):   # returned before the update: the weights and the last checkpoint stay good
        return dict(loss=loss.item()), None
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)   # the clip must see the true gradient norm, not the fp16-scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), run.cfg.grad_clip or math.inf)   # inf: measure only
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return dict(lr=lr, grad_norm=grad_norm.item(), **pair_metrics(loss, chosen_r, rejected_r)), n_tokens


def train(run):
    """The loop: step, log, evaluate, checkpoint, until the end (or --stop_at, or a signal). -> exit code."""
    from tqdm import tqdm
    cfg, t0 = run.cfg, time.time()
    # --stop_at ends this process early, but the schedule stays that of the whole run (run.total)
    last = min(run.total, cfg.stop_at) if cfg.stop_at > 0 else run.total
    if run.step == 0:   # policy = reference: loss ln 2, accuracy 0.5, the baseline of the plot
        run.log(dict(step=0, tokens=0, **evaluate(run)))
    bar = tqdm(total=last, initial=run.step, desc="dpo", unit="step", dynamic_ncols=True)
    with cli.StopSignals() as stop:   # Ctrl-C / SIGTERM finish the step and save, never leave half a state
        while run.step < last:
            row, n_tokens = train_step(run, run.lr_at(run.step))
            if n_tokens is None:   # NaN/inf: stop with exit 1 rather than train on garbage
                bar.close()
                print(f"dpo.py: the DPO loss is {row['loss']} at step {run.step}; stopping. Last good checkpoint: "
                      f"{run.last_ckpt or 'none saved yet'}. Try a lower --lr, then --resume from it.", file=sys.stderr)
                return 1
            run.step, run.tokens = run.step + 1, run.tokens + n_tokens
            row = dict(step=run.step, tokens=run.tokens, **row)
            if run.step % cfg.eval_interval == 0 or run.step == run.total:
                row.update(evaluate(run))
                bar.write(f"step {run.step}: held-out loss {row['eval_loss']:.4f}, accuracy {row['eval_accuracy']:.3f}, "
                          f"margin {row['eval_margin']:.3f}")
            run.log(row)
            if "eval_loss" in row:   # the plot is redrawn at every evaluation, so a stopped run still has one
                plot(run)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.2f}")
            bar.update(1)
            if run.step % cfg.ckpt_interval == 0 or run.step == last or stop.signal:
                save(run)
            if stop.signal:   # exit 130/143 after the checkpoint: --resume continues exactly from here
                bar.close()
                print(f"\nstopped by signal at step {run.step}; checkpoint saved: {run.last_ckpt}. "
                      f"Continue with --resume {cfg.out_dir}")
                return stop.exit_code
    bar.close()
    plot(run)
    evals = [r for r in run.log.rows() if "eval_accuracy" in r]   # from step 0: a resume keeps the old history
    print(f"done in {time.time() - t0:.0f} s, step {run.step} of {run.total}: held-out accuracy "
          f"{evals[0]['eval_accuracy']:.3f} -> {evals[-1]['eval_accuracy']:.3f}, margin {evals[0]['eval_margin']:.3f} -> "
          f"{evals[-1]['eval_margin']:.3f}; {run.last_ckpt}, metrics.jsonl and dpo.png in {cfg.out_dir}")
    return 0


def plot(run):
    """dpo.png: loss, preference accuracy and reward margin, per training batch and on the held-out pairs."""
    metrics.plot(run.log.rows(), os.path.join(run.cfg.out_dir, "dpo.png"),
                 title=f"DPO, beta {run.cfg.beta} ({run.lr_at.describe}); policy = reference: loss ln 2, accuracy 0.5",
                 panels=[(name, [(key, "train (per batch)"), ("eval_" + key, "held-out pairs")])
                         for name, key in (("DPO loss", "loss"), ("preference accuracy", "accuracy"),
                                           ("reward margin", "margin"))])


# ----------------------------------------------------------------------------- command line

def run(argv):
    # every check (flags, folders, models, pairs) comes before the first write: bad input leaves nothing behind
    cfg, resumed, source = resolve(argv)
    device = cli.pick_device(cfg.device)
    dtype = cli.pick_dtype(cfg.dtype, device)
    check_out_dir(cfg, resumed, source)
    state = build_run(cfg, resumed, source, device, dtype)
    print(f"{len(state.train_pairs)} training pairs, {len(state.val_pairs)} held out; {state.total} steps of "
          f"{cfg.batch_size} pairs from step {state.step}; {state.lr_at.describe}; beta {cfg.beta}, "
          f"label smoothing {cfg.label_smoothing}")
    prepare_out_dir(state, resumed)
    return train(state)


def main(argv=None):
    return cli.main("dpo.py", run, argv)   # UsageError -> one line on stderr, exit 2


if __name__ == "__main__":
    sys.exit(main())
