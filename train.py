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
import dataclasses, json, math, os, sys, time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
from tqdm import tqdm

import checkpoint
import cli
import data
import metrics
import moe
import parallel
import plan
import wsd
from cli import UsageError, flag
from minicpm import ATTN_IMPLS, CONFIG_HELP, MUP_BASE_LR, PRESETS, MiniCPM, MiniCPMConfig, get_config


@dataclass
class TrainConfig:
    preset: str = flag("tiny", "model size: " + ", ".join(PRESETS))
    # data (data.py prepares it on first use)
    source: str = flag("stdlib", "corpus: stdlib, shakespeare, or a local file/folder/glob")
    tokenizer: str = flag("bpe:4096", "tokenizer: bpe:N, byte, gpt2, cl100k_base, o200k_base")
    data_dir: str = flag("data", "where prepared datasets live")
    out_dir: str = flag("", "where checkpoints, metrics and plots go (default out/<preset>)")
    overwrite: bool = flag(False, "start a new run in an --out_dir that already holds one, replacing it")
    # tokens per optimizer step = batch_size * seq_len * grad_accum * number of processes
    batch_size: int = flag(16, "sequences per micro-batch per process")
    seq_len: int = flag(256, "tokens per sequence (at most the model's block_size)")
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step")
    # AdamW with the model's muP lr groups; the paper gives none of these but the lr (§3.3)
    lr: float = flag(MUP_BASE_LR, "peak learning rate (muP: matrices get lr / m), §3.3")
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices and the embedding")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    # the schedule: wsd.py resolves every -1 to its default
    schedule: str = flag("wsd", "learning-rate schedule: " + ", ".join(wsd.SCHEDULES))
    max_steps: int = flag(250, "optimizer steps in the run")
    warmup_steps: int = flag(-1, f"linear warmup steps (-1: {wsd.WARMUP_STEPS})")
    decay_steps: int = flag(-1, "WSD decay length in steps (-1: 10%% of max_steps, §4)")
    decay_start: int = flag(-1, "step where the WSD decay starts (-1: max_steps - decay_steps)")
    decay_shape: str = flag("exp", "WSD decay shape: " + ", ".join(wsd.DECAY_SHAPES))
    final_lr_frac: float = flag(-1.0, f"lr at the end of the decay / --lr (-1: wsd {wsd.FINAL_LR_FRAC}, cosine {wsd.COSINE_FLOOR})")
    decay_half_life: float = flag(-1.0, "exp decay given by its half-life in steps instead (§6.2: 5000)")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(50, "evaluate (and redraw loss.png) every this many steps (0: never)")
    eval_tokens: int = flag(65536, "validation tokens: seq_len windows spread evenly over the split (0: all of it)")
    log_interval: int = flag(5, "write the train loss to metrics.jsonl every this many steps")
    ckpt_interval: int = flag(100, "save a checkpoint every this many steps (and at the end)")
    # starting points
    resume: str = flag("", "continue the run saved in this folder exactly (optimizer, step, data position)")
    init_from: str = flag("", "start a new run from the weights of this checkpoint (file or folder)")
    decay_only: bool = flag(False, "with --init_from: run only the WSD decay, decay_steps long (§4.3)")
    untie_head: bool = flag(False, "with --init_from: a head of its own, starting as a copy of the embedding (§7.2)")
    upcycle_from: str = flag("", "start from a dense checkpoint upcycled to MoE (moe.py; set --n_experts)")
    upcycle_fresh_adam: bool = flag(False, "with --upcycle_from: restart Adam (default: experts get the dense MLP's moments)")
    stop_at: int = flag(-1, "stop (with a checkpoint) after this step, keeping the schedule of max_steps")
    # the machine: runtime choices, never part of a checkpoint's architecture
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "compute dtype: bfloat16, float16 (with a grad scaler), float32, or auto")
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "shard weights, grads and Adam state over the processes (FSDP2); sharded checkpoints")
    attn: str = flag("sdpa", "attention implementation: " + ", ".join(ATTN_IMPLS) + " (triton: CUDA only)")
    grad_ckpt: bool = flag(False, "activation checkpointing per layer (less memory, ~30%% more compute)")
    seed: int = flag(1337, "seed of the initialisation and of the data windows")
    dry_run: bool = flag(False, "print the plan (parameters, tokens, FLOPs, memory) and exit; allocates nothing")
    dry_run_gpus: int = flag(1, "with --dry_run: plan for this many processes")
    bench: bool = flag(False, "measure tokens/s and the fraction of peak (GPU) or matmul (CPU) throughput, then exit")
    peak_tflops: float = flag(0.0, "the hardware's peak TFLOP/s for MFU, for a GPU not in plan.py's table (0: the table)")


# What a resume may change: where things go, how the run is watched, the machine, and the schedule
# after the current step (§4.3: a decay branched from a stable checkpoint changes exactly that).
# The number of processes may change too (--fsdp or not), with grad_accum keeping the global batch.
RESUME_MAY_CHANGE = {"out_dir", "overwrite", "resume", "stop_at", "device", "dtype", "compile", "attn", "grad_ckpt",
                     "fsdp", "peak_tflops", "grad_accum",
                     "dry_run", "dry_run_gpus", "bench", "eval_interval", "eval_tokens", "log_interval", "ckpt_interval",
                     "schedule", "max_steps", "decay_steps", "decay_start", "decay_shape", "final_lr_frac", "decay_half_life"}
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
    cli.check([(min(cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.max_steps) < 1,
                "--batch_size, --seq_len, --grad_accum and --max_steps must be >= 1"),
               (min(cfg.log_interval, cfg.ckpt_interval, cfg.dry_run_gpus) < 1,
                "--log_interval, --ckpt_interval and --dry_run_gpus must be >= 1"),
               (min(cfg.eval_interval, cfg.eval_tokens, cfg.grad_clip, cfg.weight_decay) < 0,
                "--eval_interval, --eval_tokens, --grad_clip and --weight_decay must be >= 0"),
               (not cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
               (not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1), "--beta1 and --beta2 must be in [0, 1)"),
               (cfg.schedule not in wsd.SCHEDULES, f"--schedule must be one of {', '.join(wsd.SCHEDULES)}"),
               (cfg.decay_shape not in wsd.DECAY_SHAPES, f"--decay_shape must be one of {', '.join(wsd.DECAY_SHAPES)}"),
               (cfg.attn not in ATTN_IMPLS, f"--attn must be one of {', '.join(ATTN_IMPLS)}"),
               (sum(map(bool, (cfg.resume, cfg.init_from, cfg.upcycle_from))) > 1,
                "give at most one of --resume, --init_from, --upcycle_from"),
               (min(cfg.warmup_steps, cfg.decay_steps, cfg.decay_start) < -1,
                "--warmup_steps, --decay_steps and --decay_start must be >= 0 (or -1: the default)"),
               ((cfg.decay_only or cfg.untie_head) and not cfg.init_from, "--decay_only and --untie_head go with --init_from"),
               (cfg.fsdp and (cfg.dtype == "float16" or cfg.upcycle_from), "--fsdp takes --dtype bfloat16 or float32, "
                "and no --upcycle_from (upcycle without it, then --resume with --fsdp)")])


def resolve(cfg, overrides, explicit):
    """-> (the run's config, the resumed checkpoint or None, the source checkpoint or None)."""
    check_flags(cfg)   # a new config is returned, the given one untouched
    resumed = source = None
    if cfg.resume:   # the saved flags, changing only RESUME_MAY_CHANGE: a resume must continue the same run
        resumed = checkpoint.load(cfg.resume, kind="pretrain", weights=False)   # weights: checkpoint.restore
        saved = TrainConfig(**{k: v for k, v in resumed["config"].items() if k in {f.name for f in fields(TrainConfig)}})
        differ = [f"--{k}: checkpoint has {getattr(saved, k)!r}, given {v!r}" for k, v in explicit.items()
                  if k not in RESUME_MAY_CHANGE and getattr(saved, k) != v]
        differ += [f"--{k}: checkpoint has {resumed['model_config'].get(k)!r}, given {v!r}"
                   for k, v in overrides.items() if resumed["model_config"].get(k) != v]
        cli.check([(bool(differ), "cannot resume with a different configuration: " + "; ".join(differ))])
        # one-off requests (a stop, a dry run, a benchmark) are not inherited from the saved run
        one_off = {k: getattr(TrainConfig, k) for k in ("stop_at", "bench", "dry_run", "overwrite")}
        changes = {k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE}
        cfg = dataclasses.replace(saved, **{**one_off, **changes, "resume": cfg.resume})
        # the resumed folder itself unless --out_dir names another (a decay branched into a copy, §4.3)
        cfg = dataclasses.replace(cfg, out_dir=explicit.get("out_dir", os.path.dirname(resumed["path"])))
        if resumed["step"] >= min(cfg.max_steps, cfg.stop_at if cfg.stop_at >= 0 else cfg.max_steps) and not cfg.dry_run:
            raise UsageError(f"{resumed['path']} is at step {resumed['step']}, already past --max_steps {cfg.max_steps} "
                             f"(or --stop_at): give a larger --max_steps to train on")
    elif cfg.init_from or cfg.upcycle_from:
        source = checkpoint.load(cfg.init_from or cfg.upcycle_from)
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or os.path.join("out", cfg.preset))
    if cfg.decay_only:   # §4.3: a decay branched from a stable checkpoint, as a run of its own
        D = cfg.decay_steps if cfg.decay_steps > 0 else cfg.max_steps   # no warmup: the weights are already trained
        cfg = dataclasses.replace(cfg, warmup_steps=0, decay_start=0, decay_steps=D, max_steps=D)
    return cfg, resumed, source


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
    mcfg = MiniCPMConfig(**{**kw, **({"vocab_size": meta["vocab_size"]} if meta else {})})   # no meta: a dry run without data
    cli.check([(cfg.seq_len > mcfg.block_size, f"--seq_len {cfg.seq_len} is longer than the model's block_size {mcfg.block_size}")])
    return mcfg


# ----------------------------------------------------------------------------- building the run

def build_data(cfg, ddp):
    """The dataset folder and its meta.json, prepared on first use by rank 0 only."""
    if cfg.dry_run and not os.path.exists(os.path.join(cfg.data_dir, data.default_name(cfg.source, cfg.tokenizer), "meta.json")):
        return None, None   # a plan needs no data: the preset's vocabulary stands in
    if ddp.rank == 0: data.prepare(cfg.source, cfg.tokenizer, cfg.data_dir)   # one writer: 8 would race
    parallel.barrier(ddp)   # the other ranks wait, then only read what rank 0 wrote
    folder = data.prepare(cfg.source, cfg.tokenizer, cfg.data_dir, quiet=True)
    return folder, data.load_meta(folder)


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
    if resumed:   # its weights come in build_run, once the model is sharded or not
        offset = resumed.get("data_offset", 0)
    return model.to(device), offset, dense


def build_run(cfg, overrides, resumed, source, ddp, lr_at, dtype, folder, meta, mcfg):
    """Everything the loop needs, in one namespace."""
    # model (DDP-wrapped when distributed) and raw model, optimizer, grad scaler, data, position and the log
    model, offset, dense = build_model(cfg, mcfg, overrides, resumed, source, ddp.device)
    if cfg.fsdp and ddp.world > 1:   # before the optimizer, which must hold the sharded parameters
        parallel.shard(model, ddp, dtype, compile=cfg.compile)
    # AdamW over the model's muP groups (§3.1, Table 7): each group's lr is lr(step) * lr_scale. Fused
    # on CUDA: one kernel updates every parameter instead of several launches per tensor.
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps, fused=ddp.device.startswith("cuda"))
    if dense is not None and not cfg.upcycle_fresh_adam:   # §7.3: the optimizer carries on with the weights
        moe.upcycle_optimizer_state(dense, source.get("optimizer"), model, optimizer)
    device_type = ddp.device.split(":")[0]
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)   # fp16 only: bf16 needs none
    step, tokens, tokens_per_step = 0, 0, cfg.batch_size * cfg.seq_len * cfg.grad_accum * ddp.world
    if resumed:   # exactly where the saved run stopped: weights, optimizer moments, scaler, RNG, step, data position
        step, tokens = resumed["step"], resumed["tokens"]
        # other processes are fine (DCP reshards), another global batch is another run: grad_accum makes it up
        cli.check([(tokens != step * tokens_per_step, f"--grad_accum: the resumed run took {tokens // max(step, 1):,} "
                    f"tokens per step, this one would take {tokens_per_step:,}: keep batch_size x seq_len x grad_accum x processes")])
        checkpoint.restore(resumed, model, optimizer)   # ckpt.pt or sharded, into a sharded model or not
        if resumed.get("scaler"): scaler.load_state_dict(resumed["scaler"])   # {} when the saved run was not fp16
        torch.set_rng_state(resumed["rng"])
    # the raw model stays at hand: checkpoints, evaluation and moe_stats bypass compile and DDP (FSDP is in place)
    wrapped = model if parallel.is_sharded(model) else parallel.wrap(torch.compile(model) if cfg.compile else model, ddp,
                                                                     allow_unused=bool(mcfg.n_experts))
    # The fixed validation set: eval_tokens worth of seq_len windows spread evenly over val.bin (all
    # of it when 0), the same at every evaluation and for every run on the same data.
    val_windows = data.eval_windows(os.path.join(folder, "val.bin"), cfg.seq_len, cfg.eval_tokens)
    return SimpleNamespace(
        cfg=cfg, ddp=ddp, model=wrapped, raw=model, optimizer=optimizer, scaler=scaler, lr_at=lr_at, dtype=dtype,
        autocast=torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext(),
        step=step, tokens=tokens, data_offset=offset, folder=folder, meta=meta,
        train_bin=os.path.join(folder, "train.bin"), val_windows=val_windows,
        tokens_per_step=tokens_per_step,
        bytes_per_token=meta["val"]["bytes"] / meta["val"]["tokens"],
        log=metrics.MetricsLog(cfg.out_dir, enabled=ddp.rank == 0 and not cfg.bench),
        last_ckpt=resumed["path"] if resumed else None, tokenizer=checkpoint.tokenizer_record(meta))


def prepare_out_dir(run, resumed):
    """Only now, with configuration, checkpoint and data known good, is the output folder written."""
    # leftovers of a crashed writer removed, the tokenizer beside the checkpoint, the metrics begun
    cfg = run.cfg
    if run.ddp.rank != 0 or cfg.bench: return   # (a benchmark leaves the output folder alone)
    if resumed and os.path.dirname(os.path.abspath(resumed["path"])) != os.path.abspath(cfg.out_dir):   # said, not silent
        print(f"continuing {resumed['path']} (step {resumed['step']}) in {cfg.out_dir}: its metrics.jsonl starts with that run's history")
    checkpoint.start_run_folder(cfg.out_dir, run.meta["rank_file"] and os.path.join(run.folder, run.meta["rank_file"]), run.tokenizer)
    checkpoint.atomic_write_text(json.dumps(run.meta, indent=2), os.path.join(cfg.out_dir, "data_meta.json"))
    # a resume into another folder keeps the old folder's history up to the resumed step
    source = resumed and os.path.join(os.path.dirname(resumed["path"]), "metrics.jsonl")
    run.log.start(resumed["step"] if resumed else None, source)


def save(run):
    """The checkpoint: everything a resume needs to continue bitwise."""
    state = dict(step=run.step, tokens=run.tokens, data_offset=run.data_offset, config=dataclasses.asdict(run.cfg),
                 scaler=run.scaler.state_dict() if run.scaler.is_enabled() else {}, tokenizer=run.tokenizer, rng=torch.get_rng_state())
    if run.cfg.fsdp:   # sharded: every rank writes its slices
        run.last_ckpt = checkpoint.save_sharded(run.cfg.out_dir, "pretrain", run.raw, run.optimizer, run.ddp.rank, **state)
    elif run.ddp.rank == 0:   # the weights are identical on every rank after DDP's all-reduce
        run.last_ckpt = checkpoint.save(run.cfg.out_dir, "pretrain", run.raw, optimizer=run.optimizer.state_dict(), **state)


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate(run):
    """-> (val loss in nats/token, bits/byte) over the fixed validation windows, split across ranks."""
    model, windows, device = run.raw, run.val_windows, run.ddp.device
    # windows per forward: on a CPU at least 16K tokens (small forwards cost per call: 64 windows of 256
    # ran 2.4x faster than 4 x 16); on a GPU the training micro-batch, whose logits are known to fit
    B = run.cfg.batch_size if device.startswith("cuda") else max(run.cfg.batch_size, 16384 // run.cfg.seq_len)
    model.eval()
    total = torch.zeros(2, device=device)     # sum of token losses, number of tokens
    # every rank runs as many forwards (each all-gathers under FSDP): a rank past the end reruns a window, weight 0
    end = -(-len(windows) // (run.ddp.world * B)) * run.ddp.world * B
    for i in range(run.ddp.rank * B, end, run.ddp.world * B):
        chunk, weight = (windows[i:i + B], 1.0) if i < len(windows) else (windows[:1], 0.0)
        chunk = chunk.to(device)               # [b, seq_len + 1]: inputs and targets shifted by one
        with run.autocast:
            loss = model(chunk[:, :-1], chunk[:, 1:])[1].float()
        if model.moe_stats:   # an MoE's balancing term is left out: validation is the language-model loss
            loss = loss - model.config.aux_loss_coef * model.moe_stats["aux_loss"].float()
        total += weight * torch.stack([loss * chunk[:, 1:].numel(), torch.tensor(float(chunk[:, 1:].numel()), device=device)])
    parallel.total(total, run.ddp)   # summed, then divided: ranks may hold different numbers of windows
    model.train()
    val = (total[0] / total[1]).item()   # bits/byte = nats/token / ln 2 / bytes per token: any tokenizer (§4.5)
    return dict(val_loss=val, val_bpb=val / math.log(2) / run.bytes_per_token)


def train_step(run, lr):
    """One optimizer step over grad_accum micro-batches -> (loss, grad norm, MoE aux loss), averaged over ranks."""
    cfg, ddp = run.cfg, run.ddp
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]              # muP: matrices get lr / m (Table 7)
    loss_sum, aux_sum = torch.zeros((), device=ddp.device), torch.zeros((), device=ddp.device)
    for micro in range(cfg.grad_accum):
        # Windows are keyed by the global micro-batch index: any split of the global batch over
        # processes and accumulation steps reads the same data, and each rank reads its own part.
        x, y = data.get_batch(run.train_bin, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                              step=run.data_offset + run.step, micro_step=ddp.rank * cfg.grad_accum + micro)
        with parallel.accumulate(run.model, sync=micro == cfg.grad_accum - 1), run.autocast:
            _, loss = run.model(x.to(ddp.device), y.to(ddp.device))    # [B, T] -> mean loss (+ MoE aux)
        run.scaler.scale(loss / cfg.grad_accum).backward()              # the mean over micro-batches
        loss_sum += loss.detach().float() / cfg.grad_accum
        if run.raw.moe_stats:
            aux_sum += run.raw.moe_stats["aux_loss"].detach().float() / cfg.grad_accum
    parallel.average(loss_sum, ddp)   # every rank sees the same loss, so all stop together on a NaN
    if not torch.isfinite(loss_sum):   # return before the update (grad norm None): the weights stay good
        run.optimizer.zero_grad(set_to_none=True)
        return loss_sum, None, aux_sum
    run.scaler.unscale_(run.optimizer)   # clip the true gradient, not the fp16-scaled one
    # the norm is returned (and logged) even with clipping off: its spikes foretell a diverging run
    grad_norm = parallel.clip_grad_norm(run.raw, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    run.scaler.step(run.optimizer)   # a plain optimizer.step() unless fp16, where inf/NaN steps are skipped
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, aux_sum


def train(run):
    """The loop: step, log, evaluate, checkpoint, until max_steps (or --stop_at, or a signal). -> exit code."""
    cfg, master = run.cfg, run.ddp.rank == 0
    say = print if master else (lambda *a, **k: None)   # one copy of each message, not one per rank
    # --stop_at ends early but the lr keeps following max_steps' schedule, so a later resume continues it
    last = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at >= 0 else cfg.max_steps
    peak = plan.known_peak(run.ddp.device, cfg.peak_tflops)   # MFU is logged when the peak is known
    flops_per_token = run.raw.flops_per_token(cfg.seq_len)
    if run.step == 0 and cfg.eval_interval: run.log(dict(step=0, tokens=0, **evaluate(run)))   # the loss at initialisation
    with cli.StopSignals() as stop, tqdm(total=last, initial=run.step, desc="training", unit="step",
                                         dynamic_ncols=True, disable=not master) as bar:
        t0 = time.time()
        while run.step < last:
            lr = run.lr_at(run.step)                   # the schedule is a pure function of the step
            loss, grad_norm, aux = train_step(run, lr)
            if grad_norm is None:
                ckpt = run.last_ckpt or 'none saved yet'
                say(f"train.py: loss is {loss.item()} at step {run.step}; stopping. Last good checkpoint: {ckpt}. "
                    "Try a lower --lr or --grad_clip, then --resume from it.", file=sys.stderr)
                return 1
            run.step, run.tokens = run.step + 1, run.tokens + run.tokens_per_step
            if run.ddp.device.startswith("cuda") and run.step % cfg.log_interval == 0: torch.cuda.synchronize()   # GPU time
            dt, t0 = time.time() - t0, time.time()
            # a row per step that measured something; lr is the one the step used
            row = dict(step=run.step, tokens=run.tokens, lr=lr)
            if run.step % cfg.log_interval == 0 or run.step == cfg.max_steps:   # .item() syncs, so not every step
                row.update(train_loss=loss.item(), grad_norm=grad_norm.item(), tokens_per_s=run.tokens_per_step / dt)
                if run.raw.moe_stats:                  # each expert's share of the routed tokens
                    row.update(aux_loss=aux.item(), expert_load=run.raw.moe_stats["expert_load"].tolist())
                if peak:   # model FLOPs utilisation: minicpm's flops_per_token / the GPU's peak
                    row["mfu"] = row["tokens_per_s"] * flops_per_token / run.ddp.world / peak
            if cfg.eval_interval and (run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps):
                row.update(evaluate(run))
                if master:
                    bar.write(f"step {run.step}: val loss {row['val_loss']:.4f} nats/token, {row['val_bpb']:.4f} bits/byte")
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if len(row) > 3:   # more than step, tokens, lr: something was measured
                run.log(row)
                if master and "val_loss" in row:
                    plot(run)
            # a signal to any rank stops every rank at this same step, with a checkpoint
            stopping = parallel.total(torch.tensor(float(stop.signal is not None), device=run.ddp.device), run.ddp)
            if run.step % cfg.ckpt_interval == 0 or run.step == last or stopping.item():
                save(run)
            if stopping.item():
                bar.close()
                say(f"stopped by signal at step {run.step}; checkpoint saved: {run.last_ckpt}. "
                    f"Continue with --resume {cfg.out_dir}")
                return stop.exit_code or 130
            t0 = time.time()   # the checkpoint and the plot are not part of the next step's time
    if master:
        plot(run)
        say(f"done: {run.step} steps, {run.tokens:,} tokens; checkpoint, metrics.jsonl and loss.png in {cfg.out_dir}")
    return 0


def plot(run):
    """loss.png: train and validation loss against tokens, and the lr, side by side."""
    metrics.plot(run.log.rows(), os.path.join(run.cfg.out_dir, "loss.png"), x="tokens",
                 title=f"{run.cfg.preset}: {run.lr_at.describe}",
                 panels=[("loss (nats/token)", [("train_loss", "train loss"), ("val_loss", "validation loss")]),
                         ("learning rate", [("lr", "lr (peak; matrices get lr / m)")])])


# ----------------------------------------------------------------------------- beside the loop

def run(argv):
    """Flags -> config -> (checks) -> data -> model -> the loop, or --dry_run / --bench beside it."""
    cfg, overrides, explicit = parse_flags(argv)
    cfg, resumed, source = resolve(cfg, overrides, explicit)
    ddp = parallel.setup(cfg.device)
    try:
        if cfg.attn == "triton" and not ddp.device.startswith("cuda"):   # the kernel compiles for CUDA only
            raise UsageError(f"--attn triton needs a CUDA GPU and this run is on {ddp.device}: use --attn sdpa")
        dtype = cli.pick_dtype(cfg.dtype, ddp.device)
        # the schedule resolved now, so a bad combination of schedule flags is refused before any file is written
        lr_at = wsd.resolve(cfg.schedule, lr=cfg.lr, max_steps=cfg.max_steps, warmup=cfg.warmup_steps,
                            decay_steps=cfg.decay_steps, decay_start=cfg.decay_start, shape=cfg.decay_shape,
                            final_frac=cfg.final_lr_frac, half_life=cfg.decay_half_life)
        if not (cfg.dry_run or cfg.bench):   # refused before any file is touched, data preparation included
            checkpoint.check_run_folder(cfg.out_dir, resumed and resumed["path"], cfg.overwrite)
        folder, meta = build_data(cfg, ddp)
        mcfg = model_config(cfg, overrides, resumed, source, meta)
        if cfg.dry_run:   # the plan for --dry_run_gpus processes, nothing allocated (meta device)
            with torch.device("meta"): model = MiniCPM(mcfg)
            return print(plan.describe(model, cfg, max(ddp.world, cfg.dry_run_gpus), dtype, lr_at.describe)) or 0
        # the run exists from here on: config, checkpoint and data were all accepted
        state = build_run(cfg, overrides, resumed, source, ddp, lr_at, dtype, folder, meta, mcfg)
        if ddp.rank == 0: print(plan.describe(state.raw, cfg, ddp.world, dtype, lr_at.describe))
        if cfg.bench:
            BENCH_RESULTS.append(plan.bench(state, train_step))
            return 0
        prepare_out_dir(state, resumed)
        return train(state)
    finally:
        state = None   # drop the DDP-wrapped model before the process group goes (parallel.teardown)
        parallel.teardown()


BENCH_RESULTS = []   # what --bench measured, for bench() below


def bench(argv):
    """train.py --bench as a function -> plan.bench's dict (tokens_per_s, tflops_per_process, mfu, peak_memory_gib ...).
    Bad input raises UsageError; nothing is written (tools/gpu_report.py calls it)."""
    BENCH_RESULTS.clear()
    run([*argv, "--bench"])
    return BENCH_RESULTS.pop()


def main(argv=None):   # -> exit code (0, 1, 2, 130, 143): see cli.py
    return cli.main("train.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
