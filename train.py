"""Train MiniCPM: from the tiny CPU demo to the real 2.4B under torchrun, on the WSD schedule.

    python train.py                                   # tiny preset, default corpus, CPU, ~3 minutes
    python train.py --preset wt-9m --max_steps 2000   # any preset; model flags override it
    torchrun --nproc_per_node=8 train.py --preset minicpm-2.4b ...   # DDP (NCCL on CUDA, gloo on CPU)
    torchrun --nproc_per_node=8 train.py --preset minicpm-moe-8x2b --fsdp ...   # sharded: FSDP2
    python train.py --resume out/tiny                 # continue a run exactly where it stopped
    python train.py --help                            # every flag, with its default

Writes to --out_dir (default out/<preset>): ckpt.pt (checkpoint.py's format, kind "pretrain"; with
--fsdp the sharded/ folder instead), the tokenizer file, data_meta.json, metrics.jsonl and loss.png.
Exit codes: 0 done, 1 failed (NaN loss, disk), 2 bad input (nothing written), 130/143 stopped by
Ctrl-C/SIGTERM after a checkpoint.
"""
import dataclasses, json, math, os, sys
from dataclasses import dataclass, fields

import torch

import atomic
import checkpoint
import cli
import data
import loop
import metrics
import mixture
import moe
import parallel
import plan
from cli import UsageError, flag
from minicpm import ATTN_IMPLS, CONFIG_HELP, MUP_BASE_LR, PRESETS, MiniCPM, MiniCPMConfig, get_config


@dataclass
class TrainConfig(loop.LoopConfig):
    # the shared flags (optimizer, schedule, cadence, --resume, --stop_at, the machine) are loop.py's
    out_dir: str = flag("", "where checkpoints, metrics and plots go (default out/<preset>)")
    lr: float = flag(MUP_BASE_LR, "peak learning rate (muP: matrices get lr / m), §3.3")
    preset: str = flag("tiny", "model size: " + ", ".join(PRESETS))
    # data (data.py prepares it on first use)
    source: str = flag("stdlib", "corpus: stdlib, shakespeare, or a local file/folder/glob")
    tokenizer: str = flag("bpe:4096", "tokenizer: bpe:N, byte, gpt2, cl100k_base, o200k_base")
    data_dir: str = flag("data", "where prepared datasets live")
    data: str = flag("", "a mixture NAME:WEIGHT,... of sources and conversations (instruct, chat .jsonl), each "
                         "sequence drawn by weight (mixture.py; '': --source alone)")
    decay_data: str = flag("", "the mixture from the WSD decay's start on (§5 two-stage pre-training; '': --data)")
    # tokens per optimizer step = batch_size * seq_len * grad_accum * number of processes
    batch_size: int = flag(16, "sequences per micro-batch per process")
    seq_len: int = flag(256, "tokens per sequence (at most the model's block_size)")
    eval_tokens: int = flag(65536, "validation tokens: seq_len windows spread evenly over the split (0: all of it)")
    # starting points
    init_from: str = flag("", "start a new run from the weights of this checkpoint (file or folder)")
    decay_only: bool = flag(False, "with --init_from: run only the WSD decay, decay_steps long (§4.3)")
    untie_head: bool = flag(False, "with --init_from: a head of its own, starting as a copy of the embedding (§7.2)")
    upcycle_from: str = flag("", "start from a dense checkpoint upcycled to MoE (moe.py; set --n_experts)")
    upcycle_fresh_adam: bool = flag(False, "with --upcycle_from: restart Adam (default: experts get the dense MLP's moments)")
    sft: bool = flag(False, "supervised fine-tuning from --init_from on the conversations of --data: loss on the "
                            "replies only, checkpoint kind sft, lr by default the source's at its end (§6.3)")
    # the machine: runtime choices, never part of a checkpoint's architecture
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "shard weights, grads and Adam state over the processes (FSDP2); sharded checkpoints")
    attn: str = flag("sdpa", "attention implementation: " + ", ".join(ATTN_IMPLS) + " (triton: CUDA only)")
    grad_ckpt: bool = flag(False, "activation checkpointing per layer (less memory, ~30%% more compute)")
    dry_run: bool = flag(False, "print the plan (parameters, tokens, FLOPs, memory) and exit; allocates nothing")
    dry_run_gpus: int = flag(1, "with --dry_run: plan for this many processes")
    bench: bool = flag(False, "measure tokens/s and the fraction of peak (GPU) or matmul (CPU) throughput, then exit")
    peak_tflops: float = flag(0.0, "the hardware's peak TFLOP/s for MFU, for a GPU not in plan.py's table (0: the table)")
    noise_scale: bool = flag(False, "log the gradient noise scale (noise.py): the batch size in tokens past which "
                                    "a bigger batch stops paying; needs --grad_accum >= 2 or several processes")


# A resume may also change the number of processes (--fsdp or not; grad_accum keeps the global batch),
# how the step is computed (compile, attention, checkpointing) and what it measures.
RESUME_MAY_CHANGE = loop.RESUME_MAY_CHANGE | {"compile", "attn", "grad_ckpt", "fsdp", "peak_tflops", "grad_accum",
                                              "dry_run", "dry_run_gpus", "bench", "eval_tokens", "noise_scale"}
# Model flags override the preset's fields (--n_layer 8); the vocabulary is always the data's.
MODEL_FLAGS = [f for f in fields(MiniCPMConfig) if f.name != "vocab_size"]


# ----------------------------------------------------------------------------- configuration

def parse_flags(argv):
    """-> (TrainConfig, model overrides, the TrainConfig flags given explicitly)."""
    # defaults are left out of the parse, so a resume can tell what the user asked to change from what they left alone
    p = cli.parser(__doc__)
    cli.add_flags(p, TrainConfig, suppress=True)
    # the model's fields as a second group of flags, with their help from minicpm.py
    model_fields = dataclasses.make_dataclass("ModelFlags", [(f.name, f.type, f) for f in MODEL_FLAGS])
    cli.add_flags(p.add_argument_group("model overrides (default: the preset's value)"), model_fields, CONFIG_HELP, suppress=True)
    given = cli.parse(p, argv)
    overrides = {k: v for k, v in given.items() if k in {f.name for f in MODEL_FLAGS}}
    explicit = {k: v for k, v in given.items() if k not in overrides}
    return TrainConfig(**explicit), overrides, explicit


def check_flags(cfg):
    """Every flag's range, before anything is read or written."""
    # checked together (one line naming every bad flag, exit 2): a typo must not cost a prepared dataset
    cli.check(loop.check_loop_flags(cfg) + [
        (min(cfg.batch_size, cfg.seq_len, cfg.max_steps, cfg.dry_run_gpus) < 1,
         "--batch_size, --seq_len, --max_steps and --dry_run_gpus must be >= 1"),
        (cfg.eval_tokens < 0, "--eval_tokens must be >= 0"),
        (cfg.peak_tflops < 0, f"--peak_tflops must be > 0, or 0 for plan.py's table (got {cfg.peak_tflops})"),
        (cfg.attn not in ATTN_IMPLS, f"--attn must be one of {', '.join(ATTN_IMPLS)}"),
        (sum(map(bool, (cfg.resume, cfg.init_from, cfg.upcycle_from))) > 1,
         "give at most one of --resume, --init_from, --upcycle_from"),
        ((cfg.decay_only or cfg.untie_head or cfg.sft) and not cfg.init_from,
         "--decay_only, --untie_head and --sft go with --init_from"),
        (cfg.sft and not cfg.data, "--sft trains on conversations: give --data (e.g. instruct, or a chat .jsonl)"),
        (bool(cfg.decay_data) and not cfg.data, "--decay_data goes with --data (the stable phase's mixture)"),
        (bool(cfg.decay_data) and cfg.schedule != "wsd", "--decay_data switches at the WSD decay: use --schedule wsd"),
        (cfg.upcycle_fresh_adam and not cfg.upcycle_from, "--upcycle_fresh_adam goes with --upcycle_from"),
        (cfg.dry_run_gpus != 1 and not cfg.dry_run, "--dry_run_gpus goes with --dry_run"),
        (cfg.bench and cfg.dry_run, "give --bench or --dry_run, not both"),
        (cfg.fsdp and (cfg.dtype == "float16" or cfg.upcycle_from), "--fsdp takes --dtype bfloat16 or float32, "
         "and no --upcycle_from (upcycle without it, then --resume with --fsdp)")])
    for flag, spec in (("--data", cfg.data), ("--decay_data", cfg.decay_data)):
        if spec: mixture.parse(spec, flag)   # weights and names, before any dataset is prepared


def resolve(cfg, overrides, explicit):
    """-> (the run's config, the resumed checkpoint or None, the source checkpoint or None)."""
    check_flags(cfg)   # a new config is returned, the given one untouched
    resumed = source = None
    if cfg.resume:   # the saved flags, changing only RESUME_MAY_CHANGE: a resume must continue the same run
        resumed = checkpoint.load(cfg.resume, kind=("pretrain", "sft"), weights=False)   # weights: loop.restore
        differ = [f"--{k}: checkpoint has {resumed['model_config'].get(k)!r}, given {v!r}"
                  for k, v in overrides.items() if resumed["model_config"].get(k) != v]
        cfg = loop.resume_config(TrainConfig, resumed["config"], explicit, RESUME_MAY_CHANGE, resumed["path"], differ)
        if not cfg.dry_run:   # steps left to take, known before the data is read
            loop.check_resumable(resumed["step"], cfg.max_steps, cfg.stop_at, resumed["path"])
    elif cfg.init_from or cfg.upcycle_from:
        source = checkpoint.load(cfg.init_from or cfg.upcycle_from)
        if source["path"].endswith("config.json") and "tokenizer" not in explicit:   # a released folder: its tokenizer
            cfg = dataclasses.replace(cfg, tokenizer=os.path.dirname(source["path"]))
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or os.path.join("out", cfg.preset))
    if cfg.sft and source:   # (a resume keeps its saved lr) §6.3: "learning rate aligned with the one at the end of annealing", then WSD's exp decay again
        cfg = dataclasses.replace(cfg, lr=explicit.get("lr", source_final_lr(source)),
                                  warmup_steps=explicit.get("warmup_steps", 0))   # no warmup: the weights are trained
    if cfg.decay_only:   # §4.3: a decay branched from a stable checkpoint, as a run of its own
        D = cfg.decay_steps if cfg.decay_steps > 0 else cfg.max_steps   # no warmup: the weights are already trained
        cfg = dataclasses.replace(cfg, warmup_steps=0, decay_start=0, decay_steps=D, max_steps=D)
    return cfg, resumed, source


def source_final_lr(source):
    """The lr the source run's schedule gives at its last step: SFT's default peak (§6.3)."""
    # the source's own flags through the same schedule code: its decay's end, e.g. 2% of its peak
    saved = {k: v for k, v in source.get("config", {}).items() if k in {f.name for f in fields(TrainConfig)}}
    if not saved:   # a checkpoint without a run's flags (made by hand, or by another tool): the muP lr
        return MUP_BASE_LR
    src = TrainConfig(**saved)
    return loop.schedule(src, src.max_steps)(source["step"])


def model_config(cfg, overrides, resumed, source, meta):
    """The architecture: the resumed run's, else the source's or the preset's with the model flags on top."""
    # a resume ignores model flags (resolve() refused any that differ); the vocabulary is always the data's
    if resumed or source:
        kw = {**(resumed or source)["model_config"], **({} if resumed else overrides)}
    else:
        get_config(cfg.preset)   # an unknown preset: the error lists the valid ones
        kw = {**PRESETS[cfg.preset], **overrides}
    if source and cfg.upcycle_from:
        kw["n_experts"] = 0   # the dense source model; moe.upcycle makes the experts
    if cfg.untie_head:   # §7.2; loading the tied weights fills lm_head.weight with the embedding
        kw["tie_word_embeddings"] = False
    if meta and (resumed or source) and meta["vocab_size"] != kw["vocab_size"]:
        raise UsageError(f"the checkpoint's vocabulary ({kw['vocab_size']}) is not the data's ({meta['vocab_size']}): "
                         "pass the --source/--tokenizer it was trained with")
    if meta and source:   # the same size is not enough: a released folder's tokenizer.json must be the data's
        data.check_tokenizer(meta, source.get("tokenizer"), os.path.dirname(source["path"]))
    mcfg = MiniCPMConfig(**{**kw, **({"vocab_size": meta["vocab_size"]} if meta else {})})   # no meta: a dry run without data
    cli.check([(cfg.seq_len > mcfg.block_size, f"--seq_len {cfg.seq_len} is longer than the model's block_size {mcfg.block_size}")])
    return mcfg


# ----------------------------------------------------------------------------- building the run

def build_data(cfg, ddp, ckpt):
    """-> (the dataset folder, its meta.json, the mixtures or None), prepared on first use by rank 0 only."""
    if cfg.dry_run and not os.path.exists(os.path.join(cfg.data_dir, data.default_name(cfg.source, cfg.tokenizer), "meta.json")):
        return None, None, None   # a plan needs no data: the preset's vocabulary stands in
    if ddp.rank == 0: prepare_data(cfg, ckpt)   # one writer: 8 would race
    parallel.barrier(ddp)   # the other ranks wait, then only read what rank 0 wrote
    folder, mixtures = prepare_data(cfg, ckpt, quiet=True)
    return folder, data.load_meta(folder), mixtures


def prepare_data(cfg, ckpt, quiet=False):
    """-> (the run's dataset folder: its tokenizer and headline validation, the mixtures or None)."""
    if not cfg.data:
        return data.prepare(cfg.source, cfg.tokenizer, cfg.data_dir, quiet=quiet), None
    # conversations are tokenized as the model's own data was: the checkpoint's tokenizer when there is one
    tok = ckpt and (ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt))
    # §5: the stable phase's mixture, and the decay's (the same one unless --decay_data)
    stable = mixture.prepare(mixture.parse(cfg.data), cfg, tok, quiet=quiet)
    decay = stable if not cfg.decay_data else mixture.prepare(
        mixture.parse(cfg.decay_data, "--decay_data"), cfg, mixture.spec_of(stable[0].folder, stable[0].meta), quiet=quiet)
    mixture.check_tokenizers(stable + decay)
    return stable[0].folder, dict(stable=stable, decay=decay)


def build_model(cfg, mcfg, overrides, resumed, source, device):
    """-> (model, data offset, the dense model when upcycled), the weights initialised, loaded or upcycled."""
    torch.manual_seed(cfg.seed)   # the same seed, the same initial weights: runs differ only by their flags
    model, offset, dense = MiniCPM(mcfg, attn_impl=cfg.attn, grad_ckpt=cfg.grad_ckpt), 0, None
    if source:
        try:
            model.load_state_dict(source["model"])
        except RuntimeError:
            raise UsageError(f"the weights in {source['path']} do not fit a model with these flags: "
                             "drop the model flags that change its shape") from None
        # reads on from where the source run stopped in the data: a decay must not see its batches again
        offset = source["step"] + source.get("data_offset", 0)
    if source and cfg.upcycle_from:   # §7.3: an MoE whose experts start as copies of the dense MLP
        dense, model = model, moe.upcycle(model, n_experts=overrides.get("n_experts") or 8, top_k=overrides.get("top_k", 2))
    if resumed:   # its weights come in loop.restore, once the model is sharded or not
        offset = resumed.get("data_offset", 0)
    return model.to(device), offset, dense


@dataclass(eq=False)
class Pretrain(loop.Run):
    """A pre-training run: the loop's state, plus where it reads (train.bin) and how it evaluates."""
    data_offset: int = 0          # steps of data a source run already read (a branched decay reads on)
    folder: str = ""              # the prepared dataset
    meta: dict = None             # its meta.json: vocabulary, bytes per token, rank file
    mixtures: dict = None         # {"stable": [Component], "decay": [Component]} (mixture.py), or None: --source
    evals: list = None            # per validation set: (name, x [n, T], y [n, T] with -100 unscored, bytes/token)
    peak: float = None            # the hardware's peak FLOP/s when known: MFU is logged

    def batch(self, micro):
        """This micro-batch's inputs and targets [B, T]: from --source, or from the mixture in force."""
        cfg = self.cfg
        # Windows are keyed by the global micro-batch index: any split of the global batch over
        # processes and accumulation steps reads the same data, and each rank reads its own part.
        where = dict(seed=cfg.seed, step=self.data_offset + self.step, micro_step=self.dist.rank * cfg.grad_accum + micro)
        if self.mixtures is None:
            return data.get_batch(os.path.join(self.folder, "train.bin"), cfg.batch_size, cfg.seq_len, **where)
        # §5: the decay's own mixture from its first step on (a branched decay: from step 0)
        start = getattr(self.lr_at, "keywords", {}).get("decay_start")
        phase = "decay" if start is not None and self.step >= start else "stable"
        return mixture.get_batch(self.mixtures[phase], cfg.batch_size, cfg.seq_len, **where)

    def micro_loss(self, micro):
        """Next-token loss on one micro-batch of random windows: [B, T] -> mean over B * T tokens."""
        device = self.dist.device
        x, y = self.batch(micro)
        with self.autocast:
            logits, loss = self.model(x.to(device), y.to(device))
        if self.mixtures and not (y != -100).any():   # conversations whose windows hold no reply: nothing to
            loss = logits.sum() * 0.0                 # score (the mean over 0 tokens would be NaN), no update
        scalars = dict(train_loss=loss)   # the language-model loss: what the paper's curves show
        if self.raw.moe_stats:   # §7.3: the balancing loss joins the objective, weighted aux_loss_coef (0.01)
            scalars["aux_loss"] = self.raw.moe_stats["aux_loss"]
            loss = loss + self.raw.config.aux_loss_coef * scalars["aux_loss"]
        return loss, scalars, x.numel()

    @torch.no_grad()
    def evaluate(self):
        """-> val loss in nats/token and bits/byte of each validation set, split across ranks."""
        # the first set is the headline (val_loss, val_bpb); a mixture's others get their name as suffix
        row = {}
        for (_, suffix), (_, x, y, bytes_per_token) in zip(self.eval_names(), self.evals):
            loss = self.val_loss(x, y)   # bits/byte = nats/token / ln 2 / bytes per token: any tokenizer (§4.5)
            row.update({f"val_loss{suffix}": loss, f"val_bpb{suffix}": loss / math.log(2) / bytes_per_token})
        return row

    def val_loss(self, x, y):
        """Mean loss over the scored targets of the fixed windows x, y [n, T]."""
        model, device, world = self.raw, self.dist.device, self.dist.world
        # windows per forward: on a CPU at least 16K tokens (small forwards cost per call: 64 windows of 256
        # ran 2.4x faster than 4 x 16); on a GPU the training micro-batch, whose logits are known to fit
        B = self.cfg.batch_size if device.startswith("cuda") else max(self.cfg.batch_size, 16384 // self.cfg.seq_len)
        model.eval()
        total = torch.zeros(2, device=device)     # sum of token losses, number of scored tokens
        # every rank runs as many forwards (each all-gathers under FSDP): a rank past the end reruns a window, weight 0
        end = -(-len(x) // (world * B)) * world * B
        for i in range(self.dist.rank * B, end, world * B):
            sl, weight = (slice(i, i + B), 1.0) if i < len(x) else (slice(0, 1), 0.0)
            xs, ys = x[sl].to(device), y[sl].to(device)          # [b, T]
            n = int((ys != -100).sum())   # every rank runs every forward (FSDP gathers in them), scored or not
            with self.autocast:
                loss = model(xs, ys)[1].float() if n else torch.zeros((), device=device)   # the LM loss (MoE aux apart)
            total += weight * torch.stack([loss * n, torch.tensor(float(n), device=device)])
        parallel.total(total, self.dist)   # summed, then divided: ranks may hold different numbers of windows
        model.train()
        return (total[0] / total[1]).item()

    def eval_line(self, row):
        # nats/token to compare with the training loss, bits/byte to compare across tokenizers
        line = f"step {row['step']}: val loss {row['val_loss']:.4f} nats/token, {row['val_bpb']:.4f} bits/byte"
        # a mixture's other components: bits/byte only (their tokens are the same, their texts are not)
        return line + "".join(f", {k[8:]} {v:.4f}" for k, v in row.items() if k.startswith("val_bpb/"))

    def log_extra(self, row):
        extra = {}
        if self.raw.moe_stats:   # each expert's share of the routed tokens
            extra["expert_load"] = self.raw.moe_stats["expert_load"].tolist()
        if self.peak:   # model FLOPs utilisation: minicpm's flops_per_token / the GPU's peak
            extra["mfu"] = row["tokens_per_s"] * self.raw.flops_per_token(self.cfg.seq_len) / self.dist.world / self.peak
        return extra

    def checkpoint_state(self):
        # the data position: a branched decay (--init_from) reads on from here instead of re-reading;
        # the mixtures as resolved (folders and normalised weights), a record of what was trained on
        mixes = {phase: [dict(name=c.name, weight=c.weight, folder=c.folder) for c in comps]
                 for phase, comps in (self.mixtures or {}).items()}
        return dict(data_offset=self.data_offset, mixtures=mixes)

    def start_folder(self, resumed):
        """The output folder, written only now that configuration, checkpoint and data are known good."""
        # leftovers of a crashed writer removed, the tokenizer beside the checkpoint, the metrics begun
        if not self.master: return
        cfg = self.cfg
        if resumed and os.path.dirname(os.path.abspath(resumed["path"])) != os.path.abspath(cfg.out_dir):   # said, not silent
            print(f"continuing {resumed['path']} (step {resumed['step']}) in {cfg.out_dir}: its metrics.jsonl starts with that run's history")
        rank_file = self.meta["rank_file"] and os.path.join(self.folder, self.meta["rank_file"])
        checkpoint.start_run_folder(cfg.out_dir, rank_file, self.tokenizer)
        atomic.atomic_write_text(json.dumps(self.meta, indent=2), os.path.join(cfg.out_dir, "data_meta.json"))
        # a resume into another folder keeps the old folder's history up to the resumed step
        self.log.start(resumed["step"] if resumed else None, resumed and os.path.join(os.path.dirname(resumed["path"]), "metrics.jsonl"))

    def plot(self):
        """loss.png: train and validation loss against tokens, and the lr, side by side."""
        metrics.plot(self.log.rows(), os.path.join(self.cfg.out_dir, "loss.png"), x="tokens",
                     title=f"{self.cfg.preset}: {self.lr_at.describe}",
                     panels=[("loss (nats/token)", [("train_loss", "train loss"), ("val_loss", "validation loss")]),
                             ("validation bits/byte", [(f"val_bpb{s}", name) for name, s in self.eval_names()]),
                             ("learning rate", [("lr", "lr (peak; matrices get lr / m)")])])

    def eval_names(self):
        # (name, metrics suffix) per validation set: the first is the headline, with no suffix
        return [(name, "" if i == 0 else f"/{name}") for i, (name, *_) in enumerate(self.evals)]


def validation_sets(cfg, folder, meta, mixtures):
    """[(name, x, y, bytes/token)]: the fixed validation windows of --source, or of every mixture component."""
    # eval_tokens worth of seq_len windows spread evenly over each val.bin (all of it when 0): the same
    # at every evaluation and for every run on the same data
    if mixtures is None:
        w = data.eval_windows(os.path.join(folder, "val.bin"), cfg.seq_len, cfg.eval_tokens)   # [n, T + 1]
        return [(cfg.source, w[:, :-1], w[:, 1:], meta["val"]["bytes"] / meta["val"]["tokens"])]
    comps = {c.name: c for c in mixtures["stable"] + mixtures["decay"]}   # each once, the stable mixture's first
    return [(name, *mixture.eval_windows(c, cfg.seq_len, cfg.eval_tokens), mixture.bytes_per_token(c))
            for name, c in comps.items()]


def build_run(cfg, mcfg, *, overrides, resumed, source, ddp, lr_at, dtype, folder, meta, mixtures):
    """Everything the loop needs: the model (sharded or DDP-wrapped), optimizer, data, position."""
    model, offset, dense = build_model(cfg, mcfg, overrides, resumed, source, ddp.device)
    if cfg.fsdp and ddp.world > 1:   # before the optimizer, which must hold the sharded parameters
        parallel.shard(model, ddp, dtype, compile=cfg.compile)
    optimizer = loop.optimizer(model, cfg, ddp.device)
    if dense is not None and not cfg.upcycle_fresh_adam:   # §7.3: the optimizer carries on with the weights
        moe.upcycle_optimizer_state(dense, source.get("optimizer"), model, optimizer)
    # the raw model stays at hand: checkpoints, evaluation and moe_stats bypass compile and DDP (FSDP is in place)
    wrapped = model if parallel.is_sharded(model) else parallel.wrap(torch.compile(model) if cfg.compile else model, ddp,
                                                                     allow_unused=bool(mcfg.n_experts))
    autocast, scaler = loop.autocast(ddp.device, dtype)
    # the fixed validation set: eval_tokens worth of seq_len windows spread evenly over val.bin (all
    # of it when 0), the same at every evaluation and for every run on the same data
    run = Pretrain(cfg=cfg, kind="sft" if cfg.sft else "pretrain", dist=ddp, model=wrapped, raw=model, optimizer=optimizer, lr_at=lr_at,
                   total=cfg.max_steps, autocast=autocast, scaler=scaler, tokenizer=checkpoint.tokenizer_record(meta),
                   sharded=cfg.fsdp, data_offset=offset, folder=str(folder), meta=meta,
                   mixtures=mixtures, evals=validation_sets(cfg, folder, meta, mixtures),
                   peak=plan.known_peak(ddp.device, cfg.peak_tflops))
    if resumed:   # exactly where the saved run stopped, at the same global batch
        loop.restore(run, resumed)
        per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ddp.world
        # other processes are fine (DCP reshards), another global batch is another run: grad_accum makes it up
        cli.check([(run.tokens != run.step * per_step, f"--grad_accum: the resumed run took {run.tokens // max(run.step, 1):,} "
                    f"tokens per step, this one would take {per_step:,}: keep batch_size x seq_len x grad_accum x processes")])
    return run


# ----------------------------------------------------------------------------- beside the loop

def describe(model, cfg, world, dtype, schedule):
    """plan.describe with this run's figures: what it costs before it runs."""
    # printed before every run and instead of it with --dry_run: a 2.4B plan on a laptop is the way to
    # learn whether a cluster's GPUs can hold it before asking for them
    return plan.describe(model, name=cfg.preset, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         grad_accum=cfg.grad_accum, max_steps=cfg.max_steps, world=world, dtype=dtype,
                         schedule=schedule, grad_ckpt=cfg.grad_ckpt, fsdp=cfg.fsdp)


def measure(run, dtype):
    """--bench: tokens/s of real training steps and the fraction of peak; nothing is written."""
    # the steps change the weights in memory only: no checkpoint, no metrics, the out_dir untouched
    cfg = run.cfg
    seconds = loop.bench(run)
    return plan.throughput(name=cfg.preset, seconds_per_step=seconds, device=run.dist.device, dtype=dtype,
                           tokens_per_step=cfg.batch_size * cfg.seq_len * cfg.grad_accum * run.dist.world,
                           flops_per_token=run.raw.flops_per_token(cfg.seq_len), world=run.dist.world,
                           peak_tflops=cfg.peak_tflops, verbose=run.master)


def run(argv, results=None):
    """Flags -> config -> (checks) -> data -> model -> the loop, or --dry_run / --bench beside it."""
    cfg, overrides, explicit = parse_flags(argv)
    cfg, resumed, source = resolve(cfg, overrides, explicit)
    ddp = parallel.setup(cfg.device)
    state = None
    try:
        if cfg.attn == "triton" and not ddp.device.startswith("cuda"):   # the kernel compiles for CUDA only
            raise UsageError(f"--attn triton needs a CUDA GPU and this run is on {ddp.device}: use --attn sdpa")
        dtype = cli.pick_dtype(cfg.dtype, ddp.device)
        # the schedule resolved now, so a bad combination of schedule flags is refused before any file is written
        lr_at = loop.schedule(cfg, cfg.max_steps)
        if not (cfg.dry_run or cfg.bench):   # refused before any file is touched, data preparation included
            checkpoint.check_run_folder(cfg.out_dir, resumed and resumed["path"], cfg.overwrite)
        folder, meta, mixtures = build_data(cfg, ddp, resumed or source)
        mcfg = model_config(cfg, overrides, resumed, source, meta)
        if cfg.dry_run:   # the plan for --dry_run_gpus processes, nothing allocated (meta device)
            with torch.device("meta"): model = MiniCPM(mcfg)
            return print(describe(model, cfg, max(ddp.world, cfg.dry_run_gpus), dtype, lr_at.describe)) or 0
        plan.check_fits(mcfg, cfg.batch_size, cfg.seq_len, ddp.device, ddp.world if cfg.fsdp else 1)   # not a dry run's
        # the run exists from here on: config, checkpoint and data were all accepted
        state = build_run(cfg, mcfg, overrides=overrides, resumed=resumed, source=source, ddp=ddp, lr_at=lr_at,
                          dtype=dtype, folder=folder, meta=meta, mixtures=mixtures)
        if ddp.rank == 0: print(describe(state.raw, cfg, ddp.world, dtype, lr_at.describe))
        if cfg.bench:
            figures = measure(state, dtype)
            if results is not None: results.append(figures)
            return 0
        return loop.train(state, resumed, "train.py")
    finally:
        state = None   # drop the DDP-wrapped model before the process group goes (parallel.teardown)
        parallel.teardown()


# tools/gpu_report.py calls this in a child process per configuration, and reads the dict it returns
# (not the printed line): the figures cross a process boundary as data
def bench(argv):
    """train.py --bench as a function -> plan.throughput's dict (tokens_per_s, tflops_per_process, mfu,
    peak_memory_gib ...). Bad input raises UsageError; nothing is written (tools/gpu_report.py calls it)."""
    results = []
    run([*argv, "--bench"], results)
    return results[0]


def main(argv=None):   # -> exit code (0, 1, 2, 130, 143): see cli.py
    return cli.main("train.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
