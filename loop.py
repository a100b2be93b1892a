"""The training loop every trainer shares: train.py (pre-training, §4) and dpo.py (alignment, §7.1).

A trainer differs from another only in its loss, its data and what it evaluates; everything else is
here, written once, so a flag means the same thing in every script:

    LoopConfig          the flags every trainer has (optimizer, schedule, cadence, stop, machine)
    resume_config       a resumed run's saved flags, with only the changes a resume may make
    Run                 the run's state: model, optimizer, schedule, step, tokens, log
    train               the loop: step, log, evaluate, checkpoint, until max_steps, --stop_at or a signal

A trainer subclasses Run and fills in its hooks (micro_loss, evaluate, ...); train.py's Pretrain and
dpo.py's DPO are the two. Exit codes: 0 done, 1 a non-finite loss (the weights of the last checkpoint
stay good), 130 / 143 stopped by Ctrl-C / SIGTERM after saving a checkpoint (see cli.py).
"""
import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

import checkpoint
import cli
import metrics
import noise
import parallel
import wsd
from cli import UsageError, flag


@dataclass
class LoopConfig:
    """The flags of every trainer. A trainer may give another default (dpo.py's lr), never another meaning."""
    out_dir: str = flag("", "where checkpoints, metrics and plots go")
    overwrite: bool = flag(False, "start a new run in an --out_dir that already holds one, replacing it")
    resume: str = flag("", "continue the run saved in this folder exactly (optimizer, step, data position)")
    max_steps: int = flag(250, "optimizer steps in the run")
    stop_at: int = flag(-1, "stop (with a checkpoint) after this step, keeping the schedule of max_steps (-1: no stop)")
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step")
    # AdamW with the model's muP lr groups: the paper gives none of these but the lr (§3.3)
    lr: float = flag(0.01, "peak learning rate (muP: matrices get lr / m), §3.3")
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices and the embedding")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    # the schedule: wsd.py resolves every -1 to its default
    schedule: str = flag("wsd", "learning-rate schedule: " + ", ".join(wsd.SCHEDULES))
    warmup_steps: int = flag(-1, f"linear warmup steps (-1: {wsd.WARMUP_STEPS})")
    decay_steps: int = flag(-1, "WSD decay length in steps (-1: 10%% of max_steps, §4)")
    decay_start: int = flag(-1, "step where the WSD decay starts (-1: max_steps - decay_steps)")
    decay_shape: str = flag("exp", "WSD decay shape: " + ", ".join(wsd.DECAY_SHAPES))
    final_lr_frac: float = flag(-1.0, f"lr at the end of the decay / --lr (-1: wsd {wsd.FINAL_LR_FRAC}, cosine {wsd.COSINE_FLOOR})")
    decay_half_life: float = flag(-1.0, "exp decay given by its half-life in steps instead (§6.2: 5000)")
    cosine_period: int = flag(-1, "T of cosine / cosine_loop (Appendix B.1): the step where the cosine first "
                                  "reaches its floor (-1: max_steps); cosine_loop rises again after it")
    # watching the run
    eval_interval: int = flag(50, "evaluate (and redraw the plot) every this many steps, and at 0 and the end (0: never)")
    log_interval: int = flag(5, "write the training metrics to metrics.jsonl every this many steps")
    ckpt_interval: int = flag(100, "save a checkpoint every this many steps (and at the end)")
    # the machine: runtime choices, never part of a checkpoint's architecture
    seed: int = flag(1337, "seed of the initialisation and of the data order")
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "compute dtype: bfloat16, float16 (with a grad scaler), float32, or auto (fp32 on CPU)")


# What a resume may change in every trainer: where things go, how the run is watched, the machine,
# and the schedule after the current step (§4.3: a decay branched from a stable checkpoint changes
# exactly that). A trainer adds its own (train.py: the number of processes, compile, ...).
RESUME_MAY_CHANGE = {"out_dir", "overwrite", "resume", "stop_at", "device", "dtype", "eval_interval", "log_interval",
                     "ckpt_interval", "max_steps", "schedule", "decay_steps", "decay_start", "decay_shape",
                     "final_lr_frac", "decay_half_life", "cosine_period"}
# One-off requests of the saved run, not part of its configuration: a resume starts without them.
ONE_OFF = {"stop_at", "overwrite"}


def check_loop_flags(cfg):
    """The shared flags' ranges, as (condition, message) pairs for cli.check."""
    # a trainer adds its own pairs and checks them all at once: one line names every bad flag
    return [(min(cfg.grad_accum, cfg.log_interval, cfg.ckpt_interval) < 1,
             "--grad_accum, --log_interval and --ckpt_interval must be >= 1"),
            (min(cfg.eval_interval, cfg.weight_decay, cfg.grad_clip) < 0,
             "--eval_interval, --weight_decay and --grad_clip must be >= 0"),
            (cfg.stop_at < -1, f"--stop_at must be >= 0, or -1 for no stop (got {cfg.stop_at})"),
            (not cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
            (not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1), "--beta1 and --beta2 must be in [0, 1)"),
            (not cfg.adam_eps > 0, f"--adam_eps must be > 0 (got {cfg.adam_eps})"),
            (cfg.schedule not in wsd.SCHEDULES, f"--schedule must be one of {', '.join(wsd.SCHEDULES)}"),
            (cfg.decay_shape not in wsd.DECAY_SHAPES, f"--decay_shape must be one of {', '.join(wsd.DECAY_SHAPES)}"),
            (min(cfg.warmup_steps, cfg.decay_steps, cfg.decay_start, cfg.cosine_period) < -1 or cfg.cosine_period == 0,
             "--warmup_steps, --decay_steps, --decay_start must be >= 0 and --cosine_period >= 1 (or -1: the default)"),
            (not (cfg.decay_half_life > 0 or cfg.decay_half_life == -1), f"--decay_half_life must be > 0, or -1 for "
             f"none (got {cfg.decay_half_life})"),
            (not (0 <= cfg.final_lr_frac <= 1 or cfg.final_lr_frac == -1), f"--final_lr_frac must be in [0, 1], or -1 "
             f"for the default (got {cfg.final_lr_frac})"),
            # numpy's and torch's generators take seeds in [0, 2^63): outside it the run would fail mid-way
            (not 0 <= cfg.seed < 2**63, f"--seed must be in [0, 2^63) (got {cfg.seed})")] + schedule_contradictions(cfg) + \
        ([] if cfg.resume else noise.refusals(cfg))   # a resume's own grad_accum is known later: resume_config


def schedule_contradictions(cfg):
    """Schedule flags the chosen schedule would ignore: refused, not silently dropped."""
    # a --decay_steps given to a cosine run means the user expects a decay that will not happen
    wsd_only = {"decay_steps": -1, "decay_start": -1, "decay_shape": "exp", "decay_half_life": -1.0}
    ignored = [f"--{k}" for k, default in wsd_only.items() if cfg.schedule != "wsd" and getattr(cfg, k) != default]
    ignored += ["--cosine_period"] * (cfg.schedule not in ("cosine", "cosine_loop") and cfg.cosine_period != -1)
    ignored += ["--final_lr_frac"] * (cfg.schedule == "constant" and cfg.final_lr_frac != -1)
    return [(bool(ignored), f"{', '.join(ignored)} do(es) nothing with --schedule {cfg.schedule}: drop it or "
             "choose the schedule it belongs to")]


def check_lengths(cfg, total):
    """Schedule lengths against the run's steps: a warmup or decay longer than the run is a mistake."""
    # (a cosine period longer than the run is allowed: Figure 4's T > S arm stops before the decay ends;
    # so is a decay_start past the end: a stable trunk run in segments, branched later, §4.3)
    cli.check([(cfg.warmup_steps > total, f"--warmup_steps {cfg.warmup_steps} is longer than the run's {total} steps"),
               (cfg.decay_steps > total, f"--decay_steps {cfg.decay_steps} is longer than the run's {total} steps")])


def resume_config(cls, saved, explicit, may_change, resumed_path, differ=()):
    """The resumed run's flags (saved: its config dict), changed only where may_change allows.
    differ: differences the trainer found elsewhere (train.py: model flags), refused in the same line."""
    # a changed lr, batch or data would silently make a different run out of the saved one: refused, each
    # differing flag named. Flags a newer version added take their defaults (absent from `saved`).
    names = {f.name for f in fields(cls)}
    old = cls(**{k: v for k, v in saved.items() if k in names})
    differ = [f"--{k}: checkpoint has {getattr(old, k)!r}, given {v!r}" for k, v in explicit.items()
              if k not in may_change and getattr(old, k) != v] + list(differ)
    cli.check([(bool(differ), "cannot resume with a different configuration: " + "; ".join(differ))])
    one_off = {k: getattr(cls, k) for k in ONE_OFF | (may_change & {"bench", "dry_run"})}
    # the resumed folder itself unless --out_dir names another (a decay branched into a copy, §4.3)
    changes = {k: v for k, v in explicit.items() if k in may_change}
    new = dataclasses.replace(old, **{**one_off, "out_dir": os.path.dirname(resumed_path), **changes})
    cli.check(noise.refusals(new))   # --noise_scale given to a resume: against the saved --grad_accum
    return new


def schedule(cfg, max_steps):
    """lr(step) from the schedule flags (wsd.resolve: the one home of their defaults)."""
    # max_steps is the trainer's schedule length: train.py's --max_steps, dpo.py's epochs when -1.
    # Resolved before any file is written, so a bad combination is refused with nothing to undo.
    check_lengths(cfg, max_steps)
    return wsd.resolve(cfg.schedule, lr=cfg.lr, max_steps=max_steps, warmup=cfg.warmup_steps,
                       decay_steps=cfg.decay_steps, decay_start=cfg.decay_start, shape=cfg.decay_shape,
                       final_frac=cfg.final_lr_frac, half_life=cfg.decay_half_life, period=cfg.cosine_period)


def optimizer(model, cfg, device):
    """AdamW over the model's muP groups (§3.1, Table 7): each group's lr is lr(step) * lr_scale."""
    # fused on CUDA: one kernel updates every parameter instead of several launches per tensor
    return torch.optim.AdamW(model.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps, fused=device.startswith("cuda"))


def autocast(device, dtype):
    """-> (autocast context, grad scaler): fp16 needs the scaler (its small gradients underflow), bf16 does not."""
    # the weights stay fp32 (Adam's small updates would vanish in bf16); only the matmuls drop precision
    kind = device.split(":")[0]
    ctx = torch.autocast(kind, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return ctx, torch.amp.GradScaler(kind, enabled=dtype == torch.float16)


# ----------------------------------------------------------------------------- the run's state

@dataclass(eq=False)
class Run:
    """Everything the loop reads and changes. A trainer subclasses it with its data and its hooks."""
    cfg: Any                          # the trainer's config (a LoopConfig subclass)
    kind: str                         # checkpoint kind: "pretrain", "dpo"
    dist: Any                         # parallel.setup(): rank, world, local, device
    model: torch.nn.Module            # what the step calls: DDP-wrapped and compiled when asked
    raw: torch.nn.Module              # the model itself: checkpoints, evaluation, MoE statistics
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]     # the schedule, a pure function of the step
    total: int                        # steps in the schedule (train.py: --max_steps)
    autocast: Any
    scaler: torch.amp.GradScaler
    tokenizer: dict                   # checkpoint.tokenizer_record: saved beside the weights
    step: int = 0
    tokens: int = 0                   # tokens the run has trained on (the x axis of the paper's curves)
    last_ckpt: Optional[str] = None
    resumed: bool = False
    saved_step: int = -1              # the step of the newest checkpoint this process wrote
    sharded: bool = False             # FSDP: sharded checkpoints (checkpoint.save_sharded)
    plot_name: str = "loss.png"
    noise: Any = None                 # noise.Tracker under --noise_scale (train.py), made at the first step
    log: Any = field(default=None)    # metrics.MetricsLog, made in __post_init__

    def __post_init__(self):
        # only rank 0 writes metrics; the others' log calls are no-ops
        self.log = metrics.MetricsLog(self.cfg.out_dir, enabled=self.dist.rank == 0)

    @property
    def master(self):
        return self.dist.rank == 0

    # -- the hooks a trainer fills in --

    def micro_loss(self, micro):
        """-> (objective to backpropagate, {name: detached scalar} to log, tokens it scored)."""
        raise NotImplementedError

    def evaluate(self):
        """-> {name: float} on the held-out data; every rank calls it."""
        raise NotImplementedError

    def eval_line(self, row):
        """The line printed after an evaluation."""
        raise NotImplementedError

    def log_extra(self, row):
        """Further training metrics for a logged row (e.g. MFU); row already has the step's."""
        return {}

    def checkpoint_state(self):
        """What the trainer needs beyond the loop's state to resume exactly (data position, batch order)."""
        return {}

    def start_folder(self, resumed):
        """The run folder's first write: its files besides the checkpoint, and the metrics so far."""
        raise NotImplementedError

    def plot(self):
        raise NotImplementedError

    def done_line(self):
        return f"done: {self.step} steps, {self.tokens:,} tokens; checkpoint, metrics.jsonl and {self.plot_name} in {self.cfg.out_dir}"


def restore(run, resumed):
    """Exactly where the saved run stopped: weights, optimizer moments, scaler, RNG, step, tokens."""
    # all of it, or the resumed run drifts from the uninterrupted one: fresh Adam moments jolt the
    # weights; torch's RNG state too, for any step that draws from it (tests/test_loop.py checks bitwise)
    checkpoint.restore(resumed, run.raw, run.optimizer)   # ckpt.pt or sharded, into a sharded model or not
    if resumed.get("scaler"):
        run.scaler.load_state_dict(resumed["scaler"])      # {} when the saved run was not fp16
    torch.set_rng_state(resumed["rng"])
    run.step, run.tokens, run.last_ckpt, run.resumed = resumed["step"], resumed["tokens"], resumed["path"], True


def last_step(run):
    # --stop_at ends this process early; the lr keeps following the whole schedule, so a resume continues it
    return min(run.total, run.cfg.stop_at) if run.cfg.stop_at >= 0 else run.total


def check_resumable(step, total, stop_at, path):
    """A resume must have steps left to take (checked before anything is written)."""
    if step >= (min(total, stop_at) if stop_at >= 0 else total):
        raise UsageError(f"{path} is at step {step}, already at the end of its {total} steps (--max_steps, "
                         "or --stop_at): give a larger --max_steps to train on")


def save(run):
    """The checkpoint: everything a resume needs to continue bitwise."""
    # the config as the run resolved it (defaults filled in): a resume compares flags against it, so a
    # changed default in a newer version cannot silently change a resumed run
    state = dict(step=run.step, tokens=run.tokens, config=dataclasses.asdict(run.cfg), tokenizer=run.tokenizer,
                 scaler=run.scaler.state_dict() if run.scaler.is_enabled() else {}, rng=torch.get_rng_state(),
                 **run.checkpoint_state())
    if run.sharded:   # every rank writes its slices
        run.last_ckpt = checkpoint.save_sharded(run.cfg.out_dir, run.kind, run.raw, run.optimizer, run.dist.rank, **state)
    elif run.master:   # the weights are identical on every rank after DDP's all-reduce
        run.last_ckpt = checkpoint.save(run.cfg.out_dir, run.kind, run.raw, optimizer=run.optimizer.state_dict(), **state)
    run.saved_step = run.step


# ----------------------------------------------------------------------------- one step

def step(run, lr):
    """One optimizer step over grad_accum micro-batches -> (metrics averaged over micro-batches and
    ranks, grad norm or None for a non-finite loss, tokens scored)."""
    G, device = run.cfg.grad_accum, run.dist.device
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]                 # muP: matrices get lr / m (Table 7)
    if run.noise is None and getattr(run.cfg, "noise_scale", False):   # a trainer opts in with the flag
        run.noise = noise.Tracker(run)   # before the first backward: it may hook into DDP
    sums, n_tokens = {}, 0
    for micro in range(G):
        # DDP all-reduces the gradients on the last micro-batch only (parallel.accumulate)
        with parallel.accumulate(run.model, sync=micro == G - 1):
            objective, scalars, n = run.micro_loss(micro)
        run.scaler.scale(objective / G).backward()           # the mean over micro-batches
        if micro == 0 and run.noise:   # the small batch's gradient: micro-batch 0's, still on its own
            run.noise.after_first(n)
        for name, value in {"objective": objective, **scalars}.items():
            sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach().float() / G
        n_tokens += n
    # one all-reduce for every metric: every rank logs, and stops on, the same numbers
    names = list(sums)
    values = parallel.average(torch.stack([sums[k] for k in names]), run.dist)
    averaged = dict(zip(names, values))
    if not torch.isfinite(averaged["objective"]):   # returned before the update: the weights stay good
        run.optimizer.zero_grad(set_to_none=True)
        return averaged, None, n_tokens
    del averaged["objective"]   # the trainer's own scalars are what it logs
    run.scaler.unscale_(run.optimizer)   # clip the true gradient, not the fp16-scaled one
    # the norm is returned (and logged) even with clipping off: its spikes foretell a diverging run
    grad_norm = parallel.clip_grad_norm(run.raw, run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf)
    if run.noise:   # the big batch's: the whole step's norm, before clipping (noise.py)
        run.noise.after_step(grad_norm, n_tokens)
    run.scaler.step(run.optimizer)   # a plain optimizer.step() unless fp16, where inf/NaN steps are skipped
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return averaged, grad_norm, n_tokens


# ----------------------------------------------------------------------------- the loop

def train(run, resumed=None, script="train.py"):
    """step, log, evaluate, checkpoint, until the end (or --stop_at, or a signal) -> exit code."""
    # the handlers go in before the run folder is first written: a Ctrl-C from here on always ends
    # with a checkpoint, never with a folder that refuses both a new run and --resume
    with cli.StopSignals() as stop:
        run.start_folder(resumed)   # the first write; the progress bar only after it (a refusal stays one line)
        with tqdm(total=last_step(run), initial=run.step, desc=script[:-3], unit="step", dynamic_ncols=True,
                  disable=not run.master) as bar:
            code = steps(run, stop, bar, script)
    if code == 0 and run.master:
        run.plot()
        print(run.done_line())
    return code


def steps(run, stop, bar, script):
    """The loop proper: from run.step to the last step -> exit code."""
    cfg, last = run.cfg, last_step(run)
    if run.step == 0 and not run.resumed and cfg.eval_interval:   # the loss at initialisation: the curves' first point
        evaluation(run, dict(step=0, tokens=0), bar)
    t0, shown = time.time(), {}
    while run.step < last and not stopping(stop, run):
        lr = run.lr_at(run.step)                # the schedule is a pure function of the step
        scalars, grad_norm, n_tokens = step(run, lr)
        if grad_norm is None:                   # NaN/inf: stop with exit 1 rather than train on garbage
            if run.master:
                bar.close()
                print(f"{script}: the loss is {scalars['objective'].item()} at step {run.step}; stopping. Last good "
                      f"checkpoint: {run.last_ckpt or 'none saved yet'}. Try a lower --lr or --grad_clip, then "
                      "--resume from it.", file=sys.stderr)
            return 1
        run.step, run.tokens = run.step + 1, run.tokens + n_tokens * run.dist.world
        if run.dist.device.startswith("cuda") and run.step % cfg.log_interval == 0:
            torch.cuda.synchronize()            # GPU time: wait for the queued kernels
        dt, t0 = time.time() - t0, time.time()
        row = log_row(run, lr, scalars, grad_norm, n_tokens * run.dist.world / dt)
        if cfg.eval_interval and (run.step % cfg.eval_interval == 0 or run.step == run.total):
            evaluation(run, row, bar)           # logs the row itself, with the evaluation in it
        elif len(row) > 3:                      # more than step, tokens, lr: something was measured
            run.log(row)
        shown.update({k: f"{v:.3g}" for k, v in row.items() if k in ("lr", "train_loss", "loss", "accuracy")})
        bar.set_postfix(shown)                  # the last measured values, between log steps too
        bar.update(1)
        if run.step % cfg.ckpt_interval == 0 or run.step == last:
            save(run)
        t0 = time.time()   # the checkpoint and the plot are not part of the next step's time
    if stopping(stop, run):   # called on every rank: a collective
        return stopped(run, stop, bar)
    if run.step == 0:   # --stop_at 0: the initial weights, as a checkpoint a later --resume continues
        save(run)
    return 0


def evaluation(run, row, bar):
    """Evaluate into row, log it, say it, redraw the plot (at every evaluation: a stopped run has one)."""
    row.update(run.evaluate())
    run.log(row)
    if run.master:
        bar.write(run.eval_line(row))
        run.plot()


def stopping(stop, run):
    """Whether any rank caught a signal: then every rank stops at this same step."""
    flag_ = torch.tensor(float(stop.signal is not None), device=run.dist.device)
    return bool(parallel.total(flag_, run.dist).item())


def stopped(run, stop, bar):
    """A signal: the step in progress finished; save it, say how to continue, exit 130 / 143."""
    if run.saved_step != run.step:   # not already saved at this step
        save(run)
    bar.close()
    if run.master:
        print(f"stopped by signal at step {run.step}; checkpoint saved: {run.last_ckpt}. Continue with --resume {run.cfg.out_dir}")
    return stop.exit_code or 130   # another rank's signal: this rank exits as Ctrl-C would


def log_row(run, lr, scalars, grad_norm, tokens_per_s):
    """A metrics row: every step has step, tokens, lr; every log_interval (and the last) the measures."""
    # the lr is the one the step used (logged after it, under the new step number): the curve of
    # loss against lr lines up with the schedule's formula at step - 1
    row = dict(step=run.step, tokens=run.tokens, lr=lr)
    if run.step % run.cfg.log_interval == 0 or run.step == run.total:   # .item() syncs, so not every step
        row.update({k: v.item() for k, v in scalars.items()}, grad_norm=grad_norm.item(), tokens_per_s=tokens_per_s)
        row.update(run.log_extra(row), **(run.noise.row() if run.noise else {}))
    return row


def bench(run, steps=30):
    """Seconds per step of real training steps (not logged, nothing written), past warm-up."""
    # the same step() the loop runs, so the figure is the loop's speed, not a microbenchmark's
    # the middle third onwards, without the slowest: a cold cache or a neighbour's burst is not the figure
    times = []
    for _ in range(steps):
        t = time.time()
        step(run, run.lr_at(run.step))
        if run.dist.device.startswith("cuda"):
            torch.cuda.synchronize()   # kernels run async: wait for them
        times.append(time.time() - t)
    steady = sorted(times[steps // 3:])[: max(1, 2 * steps // 3)]
    return sum(steady) / len(steady)
