"""Train MiniCPM: from the tiny CPU demo to the real 2.4B under torchrun, on the WSD schedule.

    python train.py                                   # tiny preset, default corpus, CPU, ~minutes
    python train.py --preset wt-9m --max_steps 2000   # any preset; model flags override it
    torchrun --nproc_per_node=8 train.py --preset minicpm-2.4b ...   # DDP (NCCL on CUDA, gloo on CPU)
    python train.py --resume out/tiny                 # continue a run exactly where it stopped
    python train.py --help                            # every flag, with its default

Writes to --out_dir (default out/<preset>): ckpt.pt (model, optimizer, step, configs, tokenizer
reference), the tokenizer files, metrics.jsonl and loss.png.
"""
import argparse
import dataclasses
import difflib
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import wsd
from minicpm import MUP_BASE_LR, PRESETS, MiniCPM, MiniCPMConfig, atomic_save, atomic_write_text, get_config


def flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = flag("tiny", "model size: " + ", ".join(PRESETS))
    # data
    source: str = flag("stdlib", "corpus for data.py: stdlib, shakespeare, or a local file/folder/glob")
    tokenizer: str = flag("bpe:4096", "tokenizer for data.py: bpe:N, byte, gpt2, cl100k_base, o200k_base")
    data_dir: str = flag("data", "where prepared datasets live (prepared on first use)")
    out_dir: str = flag("", "where checkpoints, metrics and plots go (default out/<preset>)")
    # batch: tokens per optimizer step = batch_size * seq_len * grad_accum * number of processes
    batch_size: int = flag(16, "sequences per micro-batch per process")
    seq_len: int = flag(256, "tokens per sequence (at most the model's block_size)")
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step")
    # optimizer: AdamW with the model's muP lr groups; betas, eps, decay, clip are not in the paper
    lr: float = flag(MUP_BASE_LR, "peak learning rate (muP: matrices get lr / m), §3.3")
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices and the embedding")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    # schedule (wsd.py)
    schedule: str = flag("wsd", "learning-rate schedule: " + ", ".join(wsd.SCHEDULES))
    max_steps: int = flag(250, "optimizer steps in the run")
    warmup_steps: int = flag(-1, "linear warmup steps (-1: 5%% of max_steps)")
    decay_steps: int = flag(-1, "WSD decay length in steps (-1: 10%% of max_steps, as in the paper, §4)")
    decay_start: int = flag(-1, "step where the WSD decay starts (-1: max_steps - decay_steps)")
    decay_shape: str = flag("exp", "WSD decay shape: " + ", ".join(wsd.DECAY_SHAPES))
    final_lr_frac: float = flag(wsd.FINAL_LR_FRAC, "lr at the end of the decay, as a fraction of --lr")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(50, "evaluate (and refresh loss.png) every this many steps")
    eval_batches: int = flag(8, "validation micro-batches per evaluation (a fixed set)")
    log_interval: int = flag(10, "write a metrics.jsonl line every this many steps")
    ckpt_interval: int = flag(100, "save a checkpoint every this many steps (and at the end)")
    # starting points
    resume: str = flag("", "continue the run saved in this folder exactly (optimizer, step, data position)")
    init_from: str = flag("", "start a new run from the weights of this checkpoint (file or folder)")
    decay_only: bool = flag(False, "with --init_from: run only the WSD decay, decay_steps long (§4.3)")
    upcycle_from: str = flag("", "start from a dense checkpoint upcycled to MoE (moe.py; set --n_experts)")
    stop_at: int = flag(-1, "stop (with a checkpoint) after this step, keeping the schedule of max_steps")
    # system
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "autocast dtype: bfloat16, float16 (with a grad scaler), float32, or auto")
    compile: bool = flag(False, "torch.compile the model")
    attn: str = flag("sdpa", "attention implementation: sdpa, eager, triton (CUDA only)")
    grad_ckpt: bool = flag(False, "activation checkpointing per layer (less memory, ~30%% more compute)")
    seed: int = flag(1337, "seed of the initialisation and of the data windows")
    dry_run: bool = flag(False, "print the plan (parameters, tokens, FLOPs, memory) and exit; allocates nothing")
    dry_run_gpus: int = flag(1, "with --dry_run: plan for this many processes")
    bench: bool = flag(False, "measure tokens/s and the fraction of measured matmul throughput, then exit")
    inject_nan_at: int = flag(-1, "testing aid: make the loss NaN at this step to exercise the guard")


# Fields that may change when resuming: where things go, how the run is observed, the machine, and
# the length of the schedule (a WSD decay branched from a stable checkpoint changes exactly that).
RESUME_MAY_CHANGE = {"out_dir", "resume", "stop_at", "device", "compile", "attn", "grad_ckpt", "dry_run",
                     "dry_run_gpus", "bench", "eval_interval", "eval_batches", "log_interval", "ckpt_interval",
                     "max_steps", "decay_steps", "decay_start", "inject_nan_at",
                     "decay_shape", "final_lr_frac"}   # issue 13: a branch may pick its decay's shape and end
MODEL_FLAGS = [f for f in fields(MiniCPMConfig) if f.name not in ("vocab_size", "attn_impl")]
MODEL_HELP = dict(n_layer="decoder layers", n_embd="model width d", n_head="query heads",
                  n_kv_head="key/value heads (< n_head: grouped-query attention)", ffn_dim="SwiGLU inner width",
                  block_size="longest sequence the model accepts", rope_theta="RoPE base",
                  norm_eps="RMSNorm epsilon", mup="muP scalings, init and lr groups (false: standard parameterisation)",
                  scale_emb="muP embedding multiplier (§3.1: 12)", scale_depth="muP residual multiplier (§3.1: 1.4)",
                  dim_model_base="muP base width: m = n_embd / dim_model_base (256)",
                  init_std="init std (matrices: init_std / sqrt(m) under muP)",
                  tie_word_embeddings="share the input embedding and the output head",
                  n_experts="MoE experts per layer (0: dense)", top_k="MoE experts per token",
                  aux_loss_coef="MoE load-balancing loss weight (§7.3: 0.01)")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU on CUDA


class TrainError(Exception):
    """A problem with the user's request: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- flags

def str2bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_parser(doc):
    """A parser whose --help is the script's docstring: first paragraph above the flags, the rest below."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False, epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_flag(group, f, help, default):
    """--name for the dataclass field f; a bool flag takes true/false, or nothing for true."""
    kw = dict(type=str2bool, nargs="?", const=True) if f.type in (bool, "bool") else dict(type=type(f.default))
    group.add_argument(f"--{f.name}", default=default, help=help, **kw)


def parse_known_flags(parser, argv, error=TrainError):
    """The parsed flags as a dict; an unknown flag is one line naming the closest valid one."""
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=")[0]
        names = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(bad, names, n=1, cutoff=0.5)
        raise error(f"unknown flag {bad}" + (f"; did you mean {close[0]}?" if close else "; see --help"))
    return vars(given)


def dataclass_flags(config_cls, doc, argv, error=TrainError):
    """config_cls(**flags), one --flag per field of a dataclass made with flag() (sample.py, dpo.py)."""
    parser = flag_parser(doc)
    for f in fields(config_cls):
        add_flag(parser, f, f"{f.metadata['help']} (default: {f.default!r})", f.default)
    return config_cls(**parse_known_flags(parser, argv, error))


def build_parser():
    p = flag_parser(__doc__)
    # defaults are SUPPRESSed so that we know which flags were given (resume compares only those)
    for f in fields(TrainConfig):
        add_flag(p, f, f"{f.metadata['help']} (default: {f.default!r})", argparse.SUPPRESS)
    group = p.add_argument_group("model overrides (default: the preset's value; see minicpm.py)")
    for f in MODEL_FLAGS:
        add_flag(group, f, MODEL_HELP[f.name], argparse.SUPPRESS)
    return p


def parse_flags(argv):
    """-> (TrainConfig, model overrides, the TrainConfig fields given explicitly)."""
    given = parse_known_flags(build_parser(), argv)
    model_names = {f.name for f in MODEL_FLAGS}
    overrides = {k: v for k, v in given.items() if k in model_names}
    explicit = {k: v for k, v in given.items() if k not in model_names}
    return TrainConfig(**explicit), overrides, explicit


# ----------------------------------------------------------------------------- checkpoints

def load_checkpoint(path, device="cpu"):
    """A training checkpoint (ckpt.pt, or the folder holding it), loaded with weights_only=True."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise TrainError(f"no checkpoint at {path}: train one with python train.py, or pass --ckpt/--resume PATH")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        ckpt["model"], ckpt["model_config"], ckpt["step"]
    except Exception as e:
        raise TrainError(f"cannot read checkpoint {path} ({type(e).__name__}): corrupt or not from train.py") from None
    ckpt["path"] = path
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    model = MiniCPM(MiniCPMConfig(**{**ckpt["model_config"], **overrides}))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def make_optimizer(model, lr, weight_decay, betas, eps, device):
    """AdamW over the model's muP groups (SPEC §2); each group's lr is lr(step) * group["lr_scale"]."""
    return torch.optim.AdamW(model.param_groups(lr, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=str(device).startswith("cuda"))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def save_checkpoint(cfg, model, optimizer, scaler, step, tokens, tokenizer, out_dir, data_offset=0):
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, tokens=tokens,
                 data_offset=data_offset,
                 scaler=scaler.state_dict() if scaler.is_enabled() else {}, train_config=asdict(cfg),
                 model_config=asdict(model.config), tokenizer=tokenizer, rng=torch.get_rng_state())
    path = os.path.join(out_dir, "ckpt.pt")
    atomic_save(state, path)
    return path


# ----------------------------------------------------------------------------- metrics and plot

def plot_metrics(metrics_path, png_path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["tokens"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title=title)
    lr_ax = ax.twinx()
    lr_ax.plot([r["tokens"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], "k:", label="lr")
    lr_ax.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------- setup

def setup_distributed(cfg):
    """-> (rank, world_size, local_rank, device). DDP when started by torchrun (RANK is set)."""
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:
            device = "cpu" if cfg.device == "auto" else cfg.device
            dist.init_process_group("gloo")
        return rank, world, local, device
    if cfg.device != "auto":
        return 0, 1, 0, cfg.device
    if torch.cuda.is_available():
        return 0, 1, 0, "cuda"
    return 0, 1, 0, "mps" if torch.backends.mps.is_available() else "cpu"


def autocast_dtype(cfg, device_type):
    if cfg.dtype == "auto":   # bf16 on GPUs; fp32 on CPU, where bf16 matmuls without native
        if device_type == "cuda":   # support ran 8x slower than fp32 on our 2-core test machine
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if cfg.dtype not in ("bfloat16", "float16", "float32"):
        raise TrainError(f"--dtype {cfg.dtype} is not one of bfloat16, float16, float32, auto")
    return getattr(torch, cfg.dtype)


def resolve_schedule(cfg):
    """The lr(step) function, from wsd.py (the only place schedules live)."""
    if cfg.schedule not in wsd.SCHEDULES:
        raise TrainError(f"--schedule {cfg.schedule} is not one of {', '.join(wsd.SCHEDULES)}")
    warmup = cfg.warmup_steps
    common = dict(lr_max=cfg.lr, warmup=warmup)
    if cfg.schedule == "wsd":
        decay = cfg.decay_steps if cfg.decay_steps >= 0 else max(1, round(0.1 * cfg.max_steps))
        start = cfg.decay_start if cfg.decay_start >= 0 else cfg.max_steps - decay
        lr_at = wsd.schedule("wsd", **common, decay_start=start, decay_steps=decay, shape=cfg.decay_shape,
                             final_frac=cfg.final_lr_frac)
    elif cfg.schedule in ("cosine", "cosine_loop"):
        lr_at = wsd.schedule(cfg.schedule, **common, T=cfg.max_steps)
    else:
        lr_at = wsd.schedule(cfg.schedule, **common)
    lr_at(cfg.max_steps)   # a bad combination of schedule flags fails now, not at the end of the run
    lr_at.describe = f"{cfg.schedule}, peak lr {cfg.lr}, warmup {warmup}" + (
        f", {cfg.decay_shape} decay over steps {start}-{start + decay}" if cfg.schedule == "wsd" else "")
    return lr_at


def plan(cfg, model, world, tokens_per_step, dtype, lr_at):
    mem = model.train_memory(seq_len=cfg.seq_len, micro_batch=cfg.batch_size, grad_ckpt=cfg.grad_ckpt)
    fpt = model.flops_per_token(cfg.seq_len)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    return "\n".join([
        f"model      {cfg.preset}: {model.num_params(non_embedding=False):,} parameters, "
        f"{model.num_params():,} non-embedding, vocab {model.config.vocab_size}",
        f"batch      {cfg.batch_size} x {cfg.seq_len} tokens x {cfg.grad_accum} accumulation x {world} processes "
        f"= {tokens_per_step:,} tokens per step; {cfg.max_steps} steps = {tokens_per_step * cfg.max_steps:,} tokens",
        f"compute    {fpt / 1e9:.3f} GFLOP per token, {fpt * tokens_per_step / 1e12:.2f} TFLOP per step",
        f"memory     per process: weights {gib(mem['weights'])}, grads {gib(mem['grads'])}, Adam {gib(mem['adam'])}, "
        f"bf16 copies {gib(mem['bf16_copies'])}, activations {gib(mem['activations'])} = {gib(mem['total'])}",
        f"schedule   {lr_at.describe}; autocast {str(dtype).split('.')[-1]}",
    ])


# ----------------------------------------------------------------------------- training

def train(cfg, overrides, explicit):
    rank, world, local_rank, device = setup_distributed(cfg)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = load_checkpoint(cfg.resume)
        saved = TrainConfig(**resume_ckpt["train_config"])
        differ = [f"{k}: checkpoint has {getattr(saved, k)!r}, given {v!r}" for k, v in explicit.items()
                  if k not in RESUME_MAY_CHANGE and getattr(saved, k) != v]
        differ += [f"{k}: checkpoint has {resume_ckpt['model_config'].get(k)!r}, given {v!r}"
                   for k, v in overrides.items() if resume_ckpt["model_config"].get(k) != v]
        if differ:
            raise TrainError("cannot resume with a different configuration: " + "; ".join(differ))
        one_off = {k: getattr(TrainConfig, k) for k in ("stop_at", "inject_nan_at", "bench", "dry_run")}
        cfg = dataclasses.replace(saved, **{**one_off, **{k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE}})
        cfg.out_dir = explicit.get("out_dir", os.path.dirname(resume_ckpt["path"]))
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.preset)
    if cfg.warmup_steps < 0:   # fixed when the run starts, so a branch that changes max_steps keeps it
        cfg.warmup_steps = round(0.05 * cfg.max_steps)
    if cfg.init_from and cfg.decay_only:   # §4.3: a decay branched from a stable checkpoint
        decay = cfg.decay_steps if cfg.decay_steps > 0 else cfg.max_steps
        cfg = dataclasses.replace(cfg, warmup_steps=0, decay_start=0, decay_steps=decay, max_steps=decay)
    lr_at = resolve_schedule(cfg)
    dtype = autocast_dtype(cfg, device.split(":")[0])
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world

    # ---- data (prepared on first use, by rank 0 only) and model config
    dataset = None
    if not (cfg.dry_run and not os.path.exists(os.path.join(cfg.data_dir, data.default_name(cfg.source, cfg.tokenizer)))):
        if master:
            dataset = data.prepare(cfg.source, cfg.tokenizer, cfg.data_dir)
        if world > 1:
            dist.barrier()
        dataset = data.prepare(cfg.source, cfg.tokenizer, cfg.data_dir, quiet=True)
    meta = data.load_meta(dataset) if dataset else None
    # the architecture: the resumed run's, else the source checkpoint's (--init_from, --upcycle_from, with
    # the model flags on top), else the preset's with the model flags
    source = None
    if (cfg.init_from or cfg.upcycle_from) and not resume_ckpt:
        source = load_checkpoint(cfg.init_from or cfg.upcycle_from)
    if resume_ckpt or source:
        model_kw = {**(resume_ckpt or source)["model_config"], **({} if resume_ckpt else overrides)}
    else:
        get_config(cfg.preset)   # an unknown preset: the error lists the valid ones
        model_kw = {**PRESETS[cfg.preset], **overrides}
    if source and cfg.upcycle_from:
        model_kw.update(n_experts=0)   # the dense model; upcycle() makes the experts below
    if meta and meta["vocab_size"] != model_kw.get("vocab_size", meta["vocab_size"]) and (resume_ckpt or source):
        raise TrainError(f"the checkpoint's vocabulary ({model_kw['vocab_size']}) is not the data's "
                         f"({meta['vocab_size']}): pass the --source/--tokenizer it was trained with")
    model_kw.update(attn_impl=cfg.attn, **({"vocab_size": meta["vocab_size"]} if meta else {}))
    model_cfg = MiniCPMConfig(**model_kw)
    if cfg.seq_len > model_cfg.block_size:
        raise TrainError(f"--seq_len {cfg.seq_len} is longer than the model's block_size {model_cfg.block_size}")

    if cfg.dry_run:
        with torch.device("meta"):
            model = MiniCPM(model_cfg)
        world = max(world, cfg.dry_run_gpus)
        say(plan(cfg, model, world, cfg.batch_size * cfg.seq_len * cfg.grad_accum * world, dtype, lr_at))
        return 0

    # ---- model, optimizer
    torch.manual_seed(cfg.seed)
    model = MiniCPM(model_cfg)
    data_offset = 0   # a run started from another's weights reads on from where that run stopped
    if source:
        try:
            model.load_state_dict(source["model"])
        except RuntimeError:
            raise TrainError(f"the weights in {source['path']} do not fit a model with these flags: "
                             "drop the model flags that change its shape") from None
        data_offset = source["step"] + source.get("data_offset", 0)
    if source and cfg.upcycle_from:
        import moe
        model = moe.upcycle(model, n_experts=overrides.get("n_experts") or 8, top_k=overrides.get("top_k", 2))
        model_cfg = model.config
    model.to(device)
    model.grad_ckpt = cfg.grad_ckpt
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    step, tokens = 0, 0
    if resume_ckpt:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if resume_ckpt["scaler"]:
            scaler.load_state_dict(resume_ckpt["scaler"])
        torch.set_rng_state(resume_ckpt["rng"])
        step, tokens, data_offset = resume_ckpt["step"], resume_ckpt["tokens"], resume_ckpt.get("data_offset", 0)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        # an MoE expert that no token of a micro-batch chose gets no gradient: let DDP allow for it
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None,
                    find_unused_parameters=bool(model_cfg.n_experts))
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()

    # ---- output folder: tokenizer files next to the checkpoint, so it is self-contained
    tokenizer = dict(spec=meta["tokenizer"], rank_file="tokenizer.tiktoken" if meta["rank_file"] else None,
                     eot_id=meta["eot_id"], vocab_size=meta["vocab_size"])
    metrics_path, png_path = os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "loss.png")
    say(plan(cfg, raw_model, world, tokens_per_step, dtype, lr_at))
    if master and not cfg.bench:   # (a benchmark leaves the output folder alone)
        os.makedirs(cfg.out_dir, exist_ok=True)
        if meta["rank_file"]:
            shutil.copyfile(os.path.join(dataset, meta["rank_file"]), os.path.join(cfg.out_dir, tokenizer["rank_file"]))
        atomic_write_text(json.dumps(meta, indent=2), os.path.join(cfg.out_dir, "data_meta.json"))
        # keep the metrics up to the step we start from (a resumed run rewrites what came after)
        kept = []
        if resume_ckpt and os.path.exists(metrics_path):
            kept = [line for line in open(metrics_path) if json.loads(line)["step"] <= step]
        atomic_write_text("".join(kept), metrics_path)
    train_bin, val_bin = os.path.join(dataset, "train.bin"), os.path.join(dataset, "val.bin")
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]

    def batch(bin_path, seed, index, micro):
        # windows are keyed by the global micro-batch index, so any split of the global batch over
        # processes and accumulation steps reads the same data (and DDP ranks read different windows)
        x, y = data.get_batch(bin_path, cfg.batch_size, cfg.seq_len, seed=seed, step=index, micro_step=micro)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = torch.zeros(2, device=device)
        for i in range(rank, cfg.eval_batches, world):
            x, y = batch(val_bin, cfg.seed + 1, i, 0)     # the same fixed set at every evaluation
            with autocast:
                loss = raw_model(x, y)[1]
            if raw_model.config.n_experts:   # the validation loss is the LM loss: drop the balancing term
                loss = loss - raw_model.config.aux_loss_coef * raw_model.aux_loss
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if world > 1:
            dist.all_reduce(total)
        model.train()
        val_loss = (total[0] / total[1]).item()
        return val_loss, val_loss / math.log(2) / bytes_per_token    # nats/token, bits/byte

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    stop_signal = []   # SIGINT / SIGTERM: finish the step, save a checkpoint, exit
    old_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}

    # ---- the loop
    last_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at >= 0 else cfg.max_steps
    if cfg.bench:
        last_step = min(last_step, step + 30)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.startswith("cuda") and k in torch.cuda.get_device_name()), None)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    last_ckpt, exit_code = resume_ckpt["path"] if resume_ckpt else None, 0
    bar = None
    if master and not cfg.bench:
        from tqdm import tqdm
        bar = tqdm(total=last_step, initial=step, desc="training", unit="step", dynamic_ncols=True)
    bench_times = []
    if not resume_ckpt and not cfg.bench and cfg.eval_interval > 0:   # the loss at initialisation
        val_loss, val_bpb = evaluate()
        log(dict(step=0, tokens=0, val_loss=val_loss, val_bpb=val_bpb))
    t0 = time.time()
    while step < last_step:
        lr = lr_at(step)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)    # MoE load balancing (train_loss includes coef x it)
        for micro in range(cfg.grad_accum):
            x, y = batch(train_bin, cfg.seed, data_offset + step, rank * cfg.grad_accum + micro)
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(x, y)
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float() / cfg.grad_accum
            if raw_model.config.n_experts:
                aux_sum += raw_model.aux_loss.detach().float() / cfg.grad_accum
        if step == cfg.inject_nan_at:
            loss_sum = loss_sum * float("nan")
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if not torch.isfinite(loss_sum):
            say(f"train.py: loss is {loss_sum.item()} at step {step}; stopping. Last good checkpoint: "
                f"{last_ckpt or 'none saved yet'}. Try a lower --lr or --grad_clip, then --resume from it.",
                file=sys.stderr)
            exit_code = 1
            break
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        if device.startswith("cuda") and (step % cfg.log_interval == 0 or cfg.bench):
            torch.cuda.synchronize()
        dt, t0 = time.time() - t0, time.time()
        bench_times.append(dt)
        if cfg.bench:
            continue
        tok_s = tokens_per_step / dt
        if bar:
            bar.set_postfix(loss=f"{loss_sum.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
        record = dict(step=step, tokens=tokens, lr=lr)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            record.update(train_loss=loss_sum.item(), grad_norm=grad_norm.item(), tokens_per_s=tok_s)
            if raw_model.config.n_experts:   # logged apart, with each expert's share of the routed tokens
                record["aux_loss"] = aux_sum.item()
                record["expert_load"] = torch.stack([l.mlp.expert_load for l in raw_model.model.layers]).mean(0).tolist()
            if peak:
                record["mfu"] = tok_s * flops_per_token / world / peak
        if cfg.eval_interval > 0 and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            record["val_loss"], record["val_bpb"] = evaluate()
            if bar:
                bar.write(f"step {step}: val loss {record['val_loss']:.4f} nats/token, {record['val_bpb']:.4f} bits/byte")
        if len(record) > 3:
            log(record)
            if master and "val_loss" in record:
                plot_metrics(metrics_path, png_path, title=f"{cfg.preset}: {cfg.schedule}")
        stopping = torch.tensor(float(bool(stop_signal)), device=device)
        if world > 1:
            dist.all_reduce(stopping)
        if step % cfg.ckpt_interval == 0 or step == last_step or stopping.item():
            if master:
                last_ckpt = save_checkpoint(cfg, raw_model, optimizer, scaler, step, tokens, tokenizer, cfg.out_dir,
                                            data_offset)
        if stopping.item():
            say(f"\nstopped by signal at step {step}; checkpoint saved: {last_ckpt}. Continue with --resume {cfg.out_dir}")
            exit_code = 128 + stop_signal[0]
            break
        t0 = time.time()
    if bar:
        bar.close()
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    if cfg.bench:
        report_bench(cfg, raw_model, bench_times, tokens_per_step, world, dtype, device, peak)
    elif master and exit_code == 0:
        plot_metrics(metrics_path, png_path, title=f"{cfg.preset}: {cfg.schedule}")
        say(f"done: {step} steps, {tokens:,} tokens; checkpoint, metrics.jsonl and loss.png in {cfg.out_dir}")
    # Tear down DDP cleanly: drop the wrapped model and collect it before destroying the process
    # group; without this about 1 gloo run in 10 aborted at exit on our CPU machine.
    del model
    gc.collect()
    return exit_code


def report_bench(cfg, model, times, tokens_per_step, world, dtype, device, peak):
    """tokens/s after warm-up, and model FLOP/s against the peak (GPU) or a measured matmul (CPU)."""
    steady = sorted(times[len(times) // 3:])[: max(1, 2 * len(times) // 3)]
    tok_s = tokens_per_step / (sum(steady) / len(steady))
    flops = tok_s * model.flops_per_token(cfg.seq_len) / world
    if peak is None:   # measure this machine's matmul throughput in the training dtype, for ~1 s
        n, reps = 1024, 0
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        t = time.time()
        while time.time() - t < 1.0:
            a @ b
            reps += 1
        peak = 2 * n**3 * reps / (time.time() - t)
    print(f"bench {cfg.preset}: {tok_s:,.0f} tokens/s, {flops / 1e12:.3f} TFLOP/s per process = "
          f"{100 * flops / peak:.1f}% of {peak / 1e12:.3f} TFLOP/s ({'peak' if device.startswith('cuda') else 'measured matmul'}), "
          f"dtype {str(dtype).split('.')[-1]}")


def main(argv=None):
    try:
        cfg, overrides, explicit = parse_flags(argv if argv is not None else sys.argv[1:])
        code = train(cfg, overrides, explicit)
    except (TrainError, data.DataError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
