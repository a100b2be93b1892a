"""Command-line plumbing shared by the entry scripts (train.py, sample.py, dpo.py, data.py): flags
from a dataclass, the one error type, the device and dtype choice, and Ctrl-C / SIGTERM handling.

A script's configuration is a dataclass whose fields are its flags (`flag(default, help)`); bad
input of any kind is a `UsageError`, which `main` prints as one line and turns into exit code 2.
Exit codes of every script: 0 done, 1 the run failed (a NaN loss, a disk error), 2 bad input
(nothing was written), 130 / 143 stopped by Ctrl-C / SIGTERM after saving a checkpoint.
"""
import argparse
import difflib
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import field, fields

import torch


class UsageError(Exception):
    """A problem with the user's request (a flag, a path, a file): one line, exit code 2."""


class DataError(UsageError, ValueError):
    """A corpus, tokenizer or prepared dataset that cannot be used (data.py, tokenizer.py)."""


def flag(default, help):
    """A dataclass field that is also a --flag, with its help text."""
    # the help lives next to the default, so a config dataclass documents its own --help
    return field(default=default, metadata={"help": help})


def str2bool(text):
    # argparse's type=bool would turn "false" into True (any non-empty string is truthy)
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (argparse would print the whole usage, ~30 lines)."""

    def error(self, message):
        # raised, not printed: cli.main turns it into one line and exit 2, and train.main(argv)
        # callers (experiments) get an exception instead of argparse's sys.exit in their process
        raise UsageError(message.replace("argument ", "") + "; see --help")


def parser(doc):
    """A parser whose --help is the script's docstring: its first paragraph above the flags, the rest below."""
    head, _, tail = doc.partition("\n\n")
    # allow_abbrev=False: a prefix like --warm must not silently mean --warmup_steps; Raw keeps the layout
    return Parser(description=head, epilog=tail, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_flags(group, dataclass, help=None, suppress=False):
    """One --name per field, typed like its default."""
    # bool fields take true/false, or nothing for true (`--compile` == `--compile true`)
    # suppress=True leaves a flag that was not given out of the result, so the caller can tell
    # given from default (a resume keeps the checkpoint's value unless the flag was given)
    for f in fields(dataclass):
        text = (help or {}).get(f.name) or f.metadata.get("help", "")  # a caller's help overrides the field's
        kw = dict(type=str2bool, nargs="?", const=True) if f.type in (bool, "bool") else dict(type=type(f.default))
        default = argparse.SUPPRESS if suppress else f.default
        group.add_argument(f"--{f.name}", default=default, help=f"{text} (default: {f.default!r})", **kw)


def parse(p, argv):
    """The given flags as a dict; an unknown flag is one line naming the closest valid one."""
    # parse_known_args: an unknown flag comes back to us, so the message can name the closest valid one
    given, unknown = p.parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=")[0]   # "--lr=3e-3" -> "--lr": suggest a name, not a value
        names = [o for a in p._actions for o in a.option_strings]
        close = difflib.get_close_matches(bad, names, n=1, cutoff=0.5)
        raise UsageError(f"unknown flag {bad}" + (f"; did you mean {close[0]}?" if close else "; see --help"))
    # float("inf") and float("nan") parse: an lr or a beta of inf would only fail steps later, as a NaN loss
    values = vars(given)
    check([(not math.isfinite(values[a.dest]), f"{a.option_strings[0]} {values[a.dest]}: must be a finite number")
           for a in p._actions if isinstance(values.get(a.dest), float)])
    return values


def dataclass_flags(dataclass, doc, argv):
    """dataclass(**flags): the common case of a script whose flags are one dataclass."""
    p = parser(doc)
    add_flags(p, dataclass)
    return dataclass(**parse(p, argv))


def check(problems):
    """Raise one UsageError listing every (condition, message) pair whose condition holds."""
    # every problem at once: a user fixing flags one error per run would need as many runs
    bad = [message for failed, message in problems if failed]
    if bad:
        raise UsageError("; ".join(bad))


def check_writable(path, flag):
    """UsageError unless `path` (a folder, made later if missing) could be made and written in."""
    # probed by making and removing an empty folder in the nearest existing one: permission bits cannot
    # tell (root passes them all, and /proc says rwx to no avail); nothing is left behind
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file: give a folder (it is made if missing)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror}): give a writable folder") from None


def check_dataset(source, name):
    """data.py's and chat.py's --source and --name: an empty source, or a name that leaves --data_dir."""
    # pathlib reads "" as the current folder; "../x" or "/abs" would write (with --force: replace) a
    # folder outside data_dir
    if not source:
        raise DataError("--source is empty: give stdlib, shakespeare, or a file, folder or glob")
    if name is not None and (name in ("", ".", "..") or "/" in name or os.sep in name):
        raise DataError(f"--name {name!r} must be a plain folder name inside --data_dir (no '/', not '..')")


# ----------------------------------------------------------------------------- device and dtype

def pick_device(name):
    """"auto": cuda, else mps, else cpu. An explicit device must exist on this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    # checked here, not left to torch: its error for a missing GPU comes deep in a traceback, after
    # the run folder was already created
    kind = name.split(":")[0]   # "cuda:1" -> "cuda"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name} is not one of cpu, cuda, cuda:N, mps, auto")
    return name


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(name, device):
    """The compute dtype for autocast; the weights themselves stay float32."""
    if name not in DTYPES:
        raise UsageError(f"--dtype {name} is not one of {', '.join(DTYPES)}")
    if name == "auto":
        # bf16 on CUDA (fp16 on GPUs without bf16, e.g. V100/T4), fp32 elsewhere: on CPUs without
        # native bf16, bf16 matmuls ran 8x slower than fp32 on our 2-core test machine
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name != "float32" and device == "cpu":
        print(f"note: --dtype {name} on a CPU is emulated on most CPUs and can be several times slower "
              "than float32", file=sys.stderr)
    return getattr(torch, name)


def memory_bytes(device):
    """All the memory of a device in bytes: a GPU's own, else the machine's RAM (MPS shares it); None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # no sysconf (Windows): nothing to compare with
        return None


def check_memory(need, device, what, fix):
    """UsageError when `what` needs more bytes than the device has at all: a request that cannot run."""
    # the whole memory, not what is free now: only a request that could never fit is refused, and the
    # figure is said before a run folder is written (torch or numpy would fail later, in a traceback)
    have = memory_bytes(device)
    if have and need > have:
        raise UsageError(f"{what} would take {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
                         f"memory of {device}: {fix}")


# ----------------------------------------------------------------------------- stopping and exiting

class StopSignals:
    """Inside `with StopSignals() as stop:` Ctrl-C and SIGTERM only set `stop.signal`."""
    # the loop then finishes its step, saves a checkpoint and exits with 128 + the signal's number
    # (130, 143), the shell's convention; a KeyboardInterrupt mid-step could leave a half-written
    # optimizer state, and SIGTERM (a cluster's preemption) would otherwise kill without saving

    def __enter__(self):
        self.signal = None
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        # restore the old handlers: train.main called from an experiment must leave Ctrl-C working
        for s, handler in self.old.items():
            signal.signal(s, handler)

    @property
    def exit_code(self):
        return 128 + self.signal if self.signal else 0


# seconds a quiet rank (not 0) waits before exiting on bad input: ample for rank 0 to print and exit
QUIET_RANK_WAIT_S = 10


def main(script, run, argv):
    """run(argv) -> exit code, with every expected failure one line on stderr."""
    try:
        return run(sys.argv[1:] if argv is None else argv) or 0
    # bad input exits 2 with no traceback; ValueError too, since float("3e-3x") and friends are
    # user input; any other exception is a bug and keeps its traceback
    except (UsageError, ValueError) as e:
        say(f"{script}: {e}")
        if os.environ.get("RANK", "0") != "0":   # under torchrun: rank 0 must be the first to fail, or its
            time.sleep(QUIET_RANK_WAIT_S)        # agent could SIGTERM it before it prints; it ends us first
        return 2
    # an operating-system error (disk full, permission, missing folder) names its path and exits 1
    except OSError as e:   # names the file; the last good checkpoint was never touched (atomic writes)
        where = f" {e.filename}" if e.filename else ""
        say(f"{script}: cannot use{where}: {e.strerror or e}")
        return 1


def say(line):
    # under torchrun every rank meets the same bad input: rank 0 alone says it, once, not N times
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
