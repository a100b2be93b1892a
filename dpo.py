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
2 bad input (nothing written), 130/143 stopped by Ctrl-C/SIGTERM after saving a checkpoint. The loop,
its flags (optimizer, schedule, --stop_at, --resume) and their meaning are loop.py's, shared with train.py.
"""
import copy, dataclasses, hashlib, json, math, os, random, sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import atomic
import checkpoint
import cli
import data
import hf
import loop
import metrics
import preference
import tokenizer
from cli import UsageError, flag


@dataclass
class DPOConfig(loop.LoopConfig):
    # the shared flags are loop.py's; DPO gives some another default (never another meaning)
    out_dir: str = flag("out/tiny-dpo", "where the checkpoint, metrics.jsonl and dpo.png go")
    # AdamW with the model's muP groups and a cosine, as the paper fine-tunes (§7.1)
    lr: float = flag(1e-3, "peak lr (muP: matrices get lr / m). The paper's 1e-5 is for the 2.4B "
                           "(m = 9); the tiny default task needs more to move in ~100 steps")
    schedule: str = flag("cosine", "learning-rate schedule from wsd.py (§7.1: cosine)")
    max_steps: int = flag(-1, "steps in the run (-1: the whole of --epochs)")
    weight_decay: float = flag(0.0, "AdamW weight decay (not in the paper)")
    eval_interval: int = flag(20, "evaluate on the held-out pairs every this many steps, and at 0 and the end (0: never)")
    log_interval: int = flag(1, "write the training metrics every this many steps (a DPO run is ~100 steps: all of them)")
    # starting point: any ckpt.pt of this project (pretrain or dpo), or the released Hugging Face layout
    init_from: str = flag("out/tiny", "checkpoint to fine-tune (file or folder, any kind); also the frozen reference")
    hf: str = flag("", "instead: a Hugging Face-layout folder (config.json + weights)")
    tokenizer: str = flag("", "with --hf: NAME[@RANK_FILE], e.g. byte, gpt2, bpe:4096@dir/tokenizer.tiktoken "
                              "('': DIR/tokenizer_record.json)")
    # data
    data: str = flag("", "JSONL of {prompt, chosen, rejected} pairs ('': the embedded default task)")
    dataset: str = flag("", "default task: a data.py dataset folder ('': the checkpoint's own training data)")
    val_frac: float = flag(0.2, "share of pairs held out (by a hash of the pair) to measure accuracy")
    max_len: int = flag(256, "tokens per sequence; longer prompts lose their left part")
    epochs: int = flag(1, "passes over the training pairs (the paper: 1)")
    batch_size: int = flag(8, "preference pairs per micro-batch")
    eval_pairs: int = flag(256, "held-out pairs per evaluation (the first ones: a fixed set)")
    # §7.1 does not state beta; 0.1 is the usual choice (Rafailov et al. use 0.1 to 0.5)
    beta: float = flag(0.1, "DPO beta: strength of the pull towards the reference")
    label_smoothing: float = flag(0.0, "conservative DPO: assumed probability that a label is flipped")


# ----------------------------------------------------------------------------- the DPO loss

def sequence_logps(model, input_ids, labels):
    """log pi(response | prompt) of each sequence: input_ids, labels [B, T] -> [B]."""
    # Eq. 7 scores a whole response y given its prompt x: token log-probs are summed (a mean would be
    # another objective), over response tokens only: labels are -100 on the prompt, given rather than
    # chosen, and on the padding. labels[:, t] is the token after input_ids[:, t], as model(idx, targets).
    logits, _ = model(input_ids)   # [B, T, vocab]
    mask = labels != -100          # [B, T]
    # fp32 (float64 stays): a log-ratio is a small difference of two large sums, which bf16 would round
    # away; clamp: -100 is no index
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = torch.gather(F.log_softmax(wide, dim=-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
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
    """The logged measures of a batch of pairs, as detached scalar tensors."""
    # a tie (policy == reference at step 0) counts as half right: accuracy starts at chance, 0.5
    acc = (chosen_r > rejected_r).float() + 0.5 * (chosen_r == rejected_r).float()   # [B]
    return dict(loss=loss.detach(), reward_chosen=chosen_r.mean(), reward_rejected=rejected_r.mean(),
                margin=(chosen_r - rejected_r).mean(), accuracy=acc.mean())


# ----------------------------------------------------------------------------- configuration

def check_flags(cfg, explicit):
    """Every flag's range, before anything is read or written."""
    # checked together: one line on stderr names every bad flag (exit 2), and no folder is half-written
    cli.check(loop.check_loop_flags(cfg) + [
        (min(cfg.batch_size, cfg.eval_pairs, cfg.epochs, cfg.max_len) < 1,
         "--batch_size, --eval_pairs, --epochs and --max_len must be >= 1"),
        (cfg.max_steps == 0 or cfg.max_steps < -1, f"--max_steps must be >= 1, or -1 for all of --epochs (got {cfg.max_steps})"),
        (not cfg.beta > 0, f"--beta must be > 0 (got {cfg.beta}): it scales the log-ratios (Rafailov et al. Eq. 7)"),
        # eps = 0.5 makes both labels equally likely: the loss would no longer prefer either side
        (not 0 <= cfg.label_smoothing < 0.5, f"--label_smoothing must be in [0, 0.5) (got {cfg.label_smoothing})"),
        (not 0 < cfg.val_frac < 1, f"--val_frac must be in (0, 1) (got {cfg.val_frac})"),
        ({"init_from", "hf"} <= explicit.keys(), "give --init_from or --hf, not both")])   # both: which one is the reference?


def resolve(argv):
    """argv -> (the run's config, the resumed checkpoint or None, the starting checkpoint or None)."""
    # defaults are left out of the parse, so that a resume, which takes the saved flags, can tell a flag
    # the user changed from one left alone: it may change only loop.RESUME_MAY_CHANGE
    p = cli.parser(__doc__)
    cli.add_flags(p, DPOConfig, suppress=True)
    explicit = cli.parse(p, argv)
    cfg = DPOConfig(**explicit)
    check_flags(cfg, explicit)
    if not cfg.resume:   # any kind of checkpoint can start a run: DPO on top of DPO is fine-tuning further
        return cfg, None, None if cfg.hf else checkpoint.load(cfg.init_from)
    resumed = checkpoint.load(cfg.resume, kind="dpo")   # only a dpo.py run has the state to continue
    return loop.resume_config(DPOConfig, resumed["config"], explicit, loop.RESUME_MAY_CHANGE, resumed["path"]), resumed, None


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
    # from a checkpoint its own record; from --hf the flags, else the folder's own (tokenizer.py's rule)
    if ckpt:
        spec, rank_file = ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt)
    else:
        spec, _, rank_file = cfg.tokenizer.partition("@")
        if not spec:
            spec, rank_file = tokenizer.folder_tokenizer(cfg.hf)
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



@dataclass(eq=False)
class DPO(loop.Run):
    """A DPO run: the loop's state, plus the frozen reference, the pairs and their order."""
    reference: torch.nn.Module = None   # pi_ref, frozen
    reference_source: dict = None       # where pi_ref comes from, and its fingerprint
    train_pairs: list = None
    val_pairs: list = None
    pairs_digest: str = ""              # a resume needs the same pairs
    eot_id: int = 0                     # padding (never attended to), and BOS for our tokenizers
    bos_id: int = 0
    rank_file: str = None
    order_rng: random.Random = None     # the shuffles; its state and the epoch's rest are checkpointed
    order: list = None

    def forward(self, batch, with_grad):
        """-> ((loss, chosen rewards, rejected rewards), response tokens scored) for a list of pairs."""
        # padding is never scored nor attended to (causal, on the right), so any id will do
        ids, labels = (t.to(self.dist.device) for t in preference.collate(batch, self.cfg.max_len, self.eot_id, self.bos_id))   # [2B, T]
        with self.autocast:
            with torch.no_grad():   # the frozen reference: no graph kept, no gradient
                ref = sequence_logps(self.reference, ids, labels)   # [2B]
            with torch.enable_grad() if with_grad else torch.no_grad():
                pol = sequence_logps(self.model, ids, labels)       # [2B]
        B = len(batch)   # chosen first, then rejected (collate): one forward pass per model scores both sides
        return dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], self.cfg.beta, self.cfg.label_smoothing), int((labels != -100).sum())

    def next_batch(self):
        """The next batch_size training pairs: a fresh shuffle at each epoch."""
        # the rng and the rest of the epoch's order are in the checkpoint, so a resume draws the same batches
        if not self.order:
            self.order = list(range(len(self.train_pairs)))
            self.order_rng.shuffle(self.order)
        batch, self.order = self.order[:self.cfg.batch_size], self.order[self.cfg.batch_size:]
        return [self.train_pairs[i] for i in batch]

    def micro_loss(self, micro):
        (loss, chosen_r, rejected_r), n_tokens = self.forward(self.next_batch(), True)
        return loss, pair_metrics(loss, chosen_r, rejected_r), n_tokens

    @torch.no_grad()
    def evaluate(self):
        """Loss, rewards and accuracy over the fixed held-out pairs, as eval_* metrics."""
        self.model.eval()
        B, pairs = self.cfg.batch_size, self.val_pairs
        results = [self.forward(pairs[i:i + B], False)[0] for i in range(0, len(pairs), B)]
        self.model.train()
        # each batch's mean loss weighted by its size: the last batch may be short
        loss = torch.stack([r[0] * len(r[1]) for r in results]).sum() / len(pairs)
        m = pair_metrics(loss, torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results]))
        return {"eval_" + k: v.item() for k, v in m.items()}

    def eval_line(self, row):
        return (f"step {row['step']}: held-out loss {row['eval_loss']:.4f}, accuracy {row['eval_accuracy']:.3f}, "
                f"margin {row['eval_margin']:.3f}")

    def checkpoint_state(self):
        return dict(order_rng=self.order_rng.getstate(), order=self.order, reference=self.reference_source,
                    pairs_digest=self.pairs_digest)

    def start_folder(self, resumed):
        """Only now, with configuration, models and pairs known good, is the output folder written."""
        cfg = self.cfg
        checkpoint.start_run_folder(cfg.out_dir, self.rank_file, self.tokenizer)   # the folder is self-contained
        tk_config = self.rank_file and os.path.join(os.path.dirname(self.rank_file), "tokenizer_config.json")
        if self.tokenizer["spec"] == tokenizer.RELEASED_TOKENIZER and os.path.isfile(tk_config):   # a release's BOS rule
            dest = os.path.join(cfg.out_dir, "tokenizer_config.json")
            if os.path.abspath(tk_config) != os.path.abspath(dest):
                atomic.atomic_write(dest, lambda f: f.write(open(tk_config, "rb").read()))
        # a resume into another folder starts its metrics from the old folder's, up to the resumed step
        self.log.start(resumed["step"] if resumed else None, resumed and os.path.join(os.path.dirname(resumed["path"]), "metrics.jsonl"))

    def plot(self):
        """dpo.png: loss, preference accuracy and reward margin, per training batch and on the held-out pairs."""
        metrics.plot(self.log.rows(), os.path.join(self.cfg.out_dir, "dpo.png"),
                     title=f"DPO, beta {self.cfg.beta} ({self.lr_at.describe}); policy = reference: loss ln 2, accuracy 0.5",
                     panels=[(name, [(key, "train (per batch)"), ("eval_" + key, "held-out pairs")])
                             for name, key in (("DPO loss", "loss"), ("preference accuracy", "accuracy"),
                                               ("reward margin", "margin"))])

    def done_line(self):
        evals = [r for r in self.log.rows() if "eval_accuracy" in r]   # from step 0: a resume keeps the old history
        change = (f": held-out accuracy {evals[0]['eval_accuracy']:.3f} -> {evals[-1]['eval_accuracy']:.3f}, margin "
                  f"{evals[0]['eval_margin']:.3f} -> {evals[-1]['eval_margin']:.3f}") if evals else ""
        return f"done, step {self.step} of {self.total}{change}; {self.last_ckpt}, metrics.jsonl and dpo.png in {self.cfg.out_dir}"


def build_run(cfg, resumed, source, device, dtype):
    """Everything the loop needs; nothing is written yet."""
    torch.manual_seed(cfg.seed)
    policy, reference, where = load_models(cfg, resumed, source, device)
    enc, record, rank_file = load_tokenizer(cfg, resumed or source, policy)
    cli.check([(cfg.max_len + 1 > policy.config.block_size, f"--max_len {cfg.max_len} does not fit the model's "
                f"block_size {policy.config.block_size}: use at most {policy.config.block_size - 1}")])
    train_pairs, val_pairs, folder = load_pairs(cfg, source, enc)
    # the logits of chosen and rejected, [2B, max_len, V] fp32, three times at once in the backward (as
    # train.py counts them): a batch never holds more pairs than there are, so a huge --batch_size is fine
    B, V = min(cfg.batch_size, max(len(train_pairs), len(val_pairs))), policy.config.vocab_size
    cli.check_memory(3 * 2 * B * cfg.max_len * V * 4, device, f"--batch_size {B} x --max_len {cfg.max_len}: the logits "
                     f"alone (3 x 2 x {B} x {cfg.max_len} x vocab {V} x 4 bytes)", "lower --batch_size or --max_len")
    cfg = dataclasses.replace(cfg, dataset=folder or cfg.dataset)   # saved, so a resume reads the same pairs
    digest = hashlib.sha256(json.dumps([[p[k] for k in ("prompt", "chosen", "rejected")] for p in train_pairs + val_pairs]).encode())
    # an epoch is len(train_pairs) / (batch_size x grad_accum) optimizer steps
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(len(train_pairs) / per_step)
    autocast, scaler = loop.autocast(device, dtype)
    run = DPO(cfg=cfg, kind="dpo", dist=SimpleNamespace(rank=0, world=1, local=0, device=device), model=policy, raw=policy,
              optimizer=loop.optimizer(policy, cfg, device), lr_at=loop.schedule(cfg, total), total=total,
              autocast=autocast, scaler=scaler, tokenizer=record, plot_name="dpo.png", reference=reference,
              reference_source=where, train_pairs=train_pairs, val_pairs=val_pairs, pairs_digest=digest.hexdigest(),
              eot_id=enc.eot_token, bos_id=enc.eot_token if getattr(enc, "bos_token", None) is None else enc.bos_token,
              rank_file=rank_file, order_rng=random.Random(cfg.seed), order=[])
    if resumed:   # bitwise the unstopped run: the same pairs, Adam moments, batch order and RNG states
        cli.check([(resumed["pairs_digest"] != run.pairs_digest, "the preference pairs differ from the ones this run "
                    f"started with ({cfg.data or cfg.dataset} changed?): a resume needs the same data")])
        loop.check_resumable(resumed["step"], total, cfg.stop_at, resumed["path"])
        loop.restore(run, resumed)
        run.order_rng.setstate(resumed["order_rng"])
        run.order = list(resumed["order"])
    return run


# ----------------------------------------------------------------------------- command line

def run(argv):
    # every check (flags, folders, models, pairs) comes before the first write: bad input leaves nothing behind
    cfg, resumed, source = resolve(argv)
    device = cli.pick_device(cfg.device)
    dtype = cli.pick_dtype(cfg.dtype, device)
    check_out_dir(cfg, resumed, source)
    state = build_run(cfg, resumed, source, device, dtype)
    print(f"{len(state.train_pairs)} training pairs, {len(state.val_pairs)} held out; {state.total} steps of "
          f"{cfg.batch_size} x {cfg.grad_accum} pairs from step {state.step}; {state.lr_at.describe}; beta {cfg.beta}, "
          f"label smoothing {cfg.label_smoothing}")
    return loop.train(state, resumed, "dpo.py")


def main(argv=None):
    return cli.main("dpo.py", run, argv)   # UsageError -> one line on stderr, exit 2


if __name__ == "__main__":
    sys.exit(main())
