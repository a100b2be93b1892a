"""Our files on disk: the `ckpt.pt` format, atomic writes, the run folder and the tokenizer record,
for every script that reads or writes them (the Hugging Face folder layouts are in hf.py).

ckpt.pt is one dict, loaded with torch.load(weights_only=True) (tensors and plain containers only,
so a checkpoint from elsewhere cannot run code):

    kind          "pretrain" (train.py) or "dpo" (dpo.py): a script resumes only its own kind
    model         the state dict, with the released parameter names
    model_config  the MiniCPMConfig fields: the architecture only (never runtime choices such as
                  the attention implementation, which the script running the model picks)
    config        the run's flags as given, so a resume reproduces the run
    tokenizer     {spec, rank_file, eot_id, vocab_size}: rank_file relative to the checkpoint folder
    step, optimizer, rng, ...: whatever the writing script needs to resume exactly

A run with --fsdp writes a sharded checkpoint instead, through torch.distributed.checkpoint (DCP),
each rank its own slice of every tensor, so no process ever holds the whole model:

    sharded/LATEST              the name of the complete step folder, replaced atomically
    sharded/step_00000100/      DCP's files (one per rank + .metadata) and state.pt: the ckpt.pt
                                dict without model and optimizer, whose tensors are in DCP's files

load() reads either; DCP reshards on load, so a sharded run resumes on any number of processes,
with or without --fsdp, and export.py converts it to ckpt.pt or a Hugging Face folder.
"""
import json
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from cli import UsageError
from minicpm import MiniCPM, MiniCPMConfig

KINDS = {"pretrain": "train.py", "dpo": "dpo.py"}   # kind -> the script that writes (and resumes) it
# Keys older checkpoints saved in model_config that are runtime choices, not architecture.
RUNTIME_KEYS = ("attn_impl",)


# ----------------------------------------------------------------------------- atomic writes

def atomic_write(path, write):
    """write(file) into a temporary file in the same folder, then rename over path."""
    # a crash (even kill -9) at any moment leaves either the old file or the new one, never a torn one;
    # the same folder, because a rename is atomic only within one file system
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # on disk before the rename, or a power cut could keep a renamed empty file
        os.chmod(tmp, 0o666 & ~current_umask())   # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)   # atomic on POSIX and Windows, even over an existing file
    except BaseException:   # KeyboardInterrupt too: never leave a .tmp- file behind on purpose
        os.unlink(tmp)
        raise


def current_umask():
    # the only way to read the umask is to set it: set it, then straight back
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temps(folder):
    """Delete the temporary files a killed writer left (atomic_write's .tmp-*)."""
    # they are never anything but half-written copies, and a checkpoint's can be gigabytes
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(folder, name))


# ----------------------------------------------------------------------------- ckpt.pt

def ckpt_path(path):
    # a run folder or the file itself: users pass either to --resume, --init_from and --ckpt
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def save(folder, kind, model, **state):
    """Write folder/ckpt.pt atomically; state holds the writing script's resume information."""
    assert kind in KINDS   # a programming error, not user input
    atomic_save(dict(kind=kind, model=model.state_dict(), model_config=asdict(model.config), **state), os.path.join(folder, "ckpt.pt"))
    shutil.rmtree(os.path.join(folder, "sharded"), ignore_errors=True)   # one checkpoint per folder: the newest
    return os.path.join(folder, "ckpt.pt")


def load(path, kind=None, device="cpu", weights=True):
    """A checkpoint (ckpt.pt, a sharded one, or the folder holding either) as a dict, with "path" added."""
    # kind: the kind the caller can resume; another kind is one line saying which script wrote it
    if sharded_folder(path):   # weights=False: the run's state only (an FSDP resume reads its slices later)
        try:
            ckpt = load_sharded(sharded_folder(path), weights)
        except Exception as e:   # a step folder deleted or truncated by hand: one line, as for ckpt.pt
            raise UsageError(f"cannot read the sharded checkpoint in {sharded_folder(path)} ({type(e).__name__}): "
                             "incomplete, or not written by this project") from None
        return check_kind(ckpt, kind)
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.exists(ckpt_path(path)):
        return load_hf_folder(path, kind)   # a released (Hugging Face) folder: its weights as a step-0 checkpoint
    path = ckpt_path(path)
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: train one with python train.py, or give the right folder")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        ckpt["model"], ckpt["model_config"], ckpt["step"]   # a KeyError here: a .pt file, but not ours
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}): corrupt, or not written by this project") from None
    ckpt.setdefault("kind", "pretrain")                     # written before kinds existed
    ckpt.setdefault("config", ckpt.pop("train_config", {}))
    for key in RUNTIME_KEYS:                                # old checkpoints saved these: ignore them
        ckpt["model_config"].pop(key, None)
    ckpt["path"] = path
    return check_kind(ckpt, kind)


def load_hf_folder(folder, kind=None):
    """A Hugging Face folder (a released MiniCPM: config.json, weights, tokenizer.json) as load() returns a
    ckpt.pt: the model's state dict, model_config, step 0, the tokenizer record and path (folder/config.json,
    so that its dirname is the folder, as a ckpt.pt's is its run folder)."""
    import hashlib
    import hf, tokenizer   # here: hf.py imports this module (atomic writes)
    if kind:   # a release has no run to continue (optimizer, step, flags)
        raise UsageError(f"{folder} is a Hugging Face folder, not a run to resume: start from it with --init_from {folder}")
    model = hf.load_hf(folder)
    spec, rank_file = tokenizer.folder_tokenizer(folder)
    enc = tokenizer.load_folder_tokenizer(folder)
    # sha256: the tokenizer file's hash, compared with a prepared dataset's meta.json tokenizer_sha256
    record = dict(spec=spec, rank_file=rank_file and os.path.basename(rank_file), eot_id=enc.eot_token,
                  vocab_size=model.config.vocab_size,
                  sha256=rank_file and hashlib.sha256(open(rank_file, "rb").read()).hexdigest())
    return dict(kind="pretrain", model=model.state_dict(), model_config=asdict(model.config), config={}, step=0,
                tokenizer=record, path=os.path.join(folder, "config.json"))


def check_kind(ckpt, kind):
    """ckpt, when its kind is the one the caller can resume (any kind when kind is None)."""
    path = ckpt["path"]
    # resuming a DPO run with train.py (or the reverse) would misread its optimizer and config
    if kind and ckpt["kind"] != kind:
        raise UsageError(f"{path} is a {ckpt['kind']} checkpoint written by {KINDS[ckpt['kind']]}, not a {kind} "
                         f"one: resume it with {KINDS[ckpt['kind']]}, or start a new run from its weights "
                         f"with --init_from {os.path.dirname(path)}")
    return ckpt


def build_model(ckpt, device="cpu", **runtime):
    """The checkpoint's model; runtime: the caller's choices (attn_impl, grad_ckpt)."""
    try:
        config = MiniCPMConfig(**ckpt["model_config"])
    except TypeError as e:
        raise UsageError(f"{ckpt['path']}: its model_config does not fit this version of minicpm.py ({e})") from None
    model = MiniCPM(config, **runtime)
    model.load_state_dict(ckpt["model"])   # strict: every key and shape must match the config
    return model.to(device)


# ----------------------------------------------------------------------------- sharded checkpoints (DCP)

def sharded_folder(path):
    """path/sharded (or path itself) when it holds a sharded checkpoint, else None."""
    for folder in (os.path.join(path, "sharded"), path):
        if os.path.isfile(os.path.join(folder, "LATEST")):
            return folder
    return None


def save_sharded(folder, kind, model, optimizer, rank, **state):
    """Every rank writes its slices into folder/sharded/step_N; LATEST names it once all are written."""
    # atomic at the folder level: LATEST moves (atomic_write) only after the barrier, so a crash while
    # writing leaves the previous step's folder named, complete; older step folders are deleted after
    root, name = os.path.join(folder, "sharded"), f"step_{state['step']:08d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)   # keyed by parameter name, each a DTensor slice
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(root, name),
             no_dist=not dist.is_initialized())   # one process (--fsdp without torchrun): no group to ask
    if rank == 0:
        atomic_save(dict(kind=kind, model_config=asdict(model.config), **state), os.path.join(root, name, "state.pt"))
    if dist.is_initialized():
        dist.barrier()   # every rank's file is on disk
    if rank == 0:
        atomic_write_text(name, os.path.join(root, "LATEST"))
        for old in set(os.listdir(root)) - {name, "LATEST"}:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        if os.path.exists(os.path.join(folder, "ckpt.pt")):   # a run folder holds one checkpoint: the newest
            os.unlink(os.path.join(folder, "ckpt.pt"))
    return root


def load_sharded(root, weights=True):
    """The ckpt.pt dict of a sharded checkpoint; weights: model and optimizer assembled whole."""
    folder = os.path.join(root, open(os.path.join(root, "LATEST")).read().strip())
    ckpt = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    ckpt.update(path=root, sharded=folder)   # path: dirname is the run folder, as for ckpt.pt
    if weights:   # every tensor whole, in one process: for export, sampling, or a resume without --fsdp
        # every key DCP's metadata lists: DCP's public load fills only a state dict given in advance
        # (tensors of known shapes), this private helper builds it from the metadata (torch 2.13)
        full = _load_state_dict_from_keys(checkpoint_id=folder)
        ckpt["model"] = full["model"]
        ckpt["optimizer"] = optimizer_by_position(full["optimizer"])   # as optimizer.state_dict() writes it
    return ckpt


# An optimizer's own state_dict() numbers the parameters by their position in its groups; DCP's
# (get_state_dict) names them, which is what lets it reshard. The two converters:

def optimizer_by_position(by_name):
    # position i is the i-th parameter name listed in the groups, in order
    position = {n: i for i, n in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    return dict(state={position[n]: s for n, s in by_name["state"].items()},
                param_groups=[{**g, "params": [position[n] for n in g["params"]]} for g in by_name["param_groups"]])


def optimizer_by_name(by_position, model, optimizer):
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return dict(state={names[i]: s for i, s in by_position["state"].items()},
                param_groups=[{**g, "params": [names[i] for i in g["params"]]} for g in by_position["param_groups"]])


def restore(ckpt, model, optimizer):
    """A resumed checkpoint's weights and optimizer state into model and optimizer, sharded or not."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded and "sharded" in ckpt:   # each rank reads only its slices, resharded to this many ranks
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=ckpt["sharded"])
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return
    if "model" not in ckpt:   # a sharded checkpoint resumed without --fsdp: assembled whole
        ckpt = load_sharded(os.path.dirname(ckpt["sharded"]))
    if sharded:   # a ckpt.pt resumed with --fsdp: whole tensors in, each rank keeps its slices
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"],
                       optim_state_dict=optimizer_by_name(ckpt["optimizer"], model, optimizer),
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])


# ----------------------------------------------------------------------------- a run's folder

def check_run_folder(out_dir, resumed_path=None, overwrite=False):
    """A new run never replaces an existing one by accident (--overwrite says it is meant)."""
    # continuing a run in its own folder is fine; continuing it into another folder must not land on
    # a third run either (it starts that folder's history from the resumed run's, cutting the third's)
    same = resumed_path and os.path.abspath(out_dir) == os.path.dirname(os.path.abspath(resumed_path))
    # either file marks a run: a crash before the first checkpoint still leaves metrics worth keeping
    taken = [n for n in ("ckpt.pt", "sharded", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, n))]
    if taken and not same and not overwrite:
        raise UsageError(f"{out_dir} already holds a run ({', '.join(taken)}): continue it with --resume "
                         f"{out_dir}, or replace it with --overwrite (or choose another --out_dir)")


def start_run_folder(out_dir, rank_file=None, record=None):
    """Create out_dir, clear a crashed writer's leftovers, and copy the tokenizer's rank file into it."""
    # beside the checkpoint, as record["rank_file"]: the folder is self-contained, so sample.py works
    # even after the data folder is deleted or re-prepared
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temps(out_dir)
    if rank_file and record and record.get("rank_file"):
        with open(rank_file, "rb") as f:
            ranks = f.read()
        atomic_write(os.path.join(out_dir, record["rank_file"]), lambda f: f.write(ranks))


# ----------------------------------------------------------------------------- tokenizer record

def tokenizer_record(meta):
    """What a checkpoint says of its tokenizer, from a data.py meta.json."""
    # rank_file is relative to the checkpoint folder, so a copied or moved folder still finds it
    name = "tokenizer.json" if meta["tokenizer"] == "tokenizer.json" else "tokenizer.tiktoken"   # a release's, or our BPE
    return dict(spec=meta["tokenizer"], rank_file=name if meta["rank_file"] else None,
                eot_id=meta["eot_id"], vocab_size=meta["vocab_size"])


def rank_file_path(ckpt):
    """The absolute path of the checkpoint's BPE rank file (None for byte / named encodings)."""
    rel = ckpt["tokenizer"]["rank_file"]
    return rel and os.path.join(os.path.dirname(ckpt["path"]), rel)
