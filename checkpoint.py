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

Nothing read here can run code. DCP itself would: it reads .metadata with plain pickle.load and its
non-tensor items (the optimizer's param_groups) with torch.load(weights_only=False), so every DCP read
goes through DataReader and DataPlanner below, which accept only DCP's own metadata classes and
plain data.
"""
import io
import json
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

import hf
import tokenizer
from atomic import atomic_save, atomic_write, atomic_write_text, disk_error
from cli import UsageError, check_writable
from minicpm import MiniCPM, MiniCPMConfig

# kind -> the script that writes (and resumes) it; sft is train.py --sft (conversations, masked loss)
KINDS = {"pretrain": "train.py", "sft": "train.py", "dpo": "dpo.py"}
# Keys older checkpoints saved in model_config that are runtime choices, not architecture.
RUNTIME_KEYS = ("attn_impl",)


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
        with reading(sharded_folder(path)):   # a step folder deleted or truncated by hand: one line, as for ckpt.pt
            ckpt = load_sharded(sharded_folder(path), weights)
        return check_kind(check_model_config(ckpt), kind)
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
    for key in RUNTIME_KEYS if isinstance(ckpt["model_config"], dict) else ():   # old checkpoints saved these: ignored
        ckpt["model_config"].pop(key, None)
    ckpt["path"] = path
    return check_kind(check_model_config(ckpt), kind)


def load_hf_folder(folder, kind=None):
    """A Hugging Face folder (a released MiniCPM: config.json, weights, tokenizer.json) as load() returns a
    ckpt.pt: the model's state dict, model_config, step 0, the tokenizer record and path (folder/config.json,
    so that its dirname is the folder, as a ckpt.pt's is its run folder)."""
    import hashlib
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
    kinds = (kind,) if isinstance(kind, str) else kind or ()   # kind: one kind, or those one script resumes
    if kinds and ckpt["kind"] not in kinds:
        writer = KINDS.get(ckpt["kind"])
        if writer is None:   # a kind no script of this version writes: say so, not a KeyError
            raise UsageError(f"{path} has checkpoint kind {ckpt['kind']!r}, which this version does not know: "
                             f"start a new run from its weights with --init_from")
        raise UsageError(f"{path} is a {ckpt['kind']} checkpoint written by {writer}, not a {' or '.join(kinds)} "
                         f"one: resume it with {writer}, or start a new run from its weights "
                         f"with --init_from {os.path.dirname(path)}")
    return ckpt


def check_model_config(ckpt):
    """ckpt, when its model_config has only MiniCPMConfig's fields: an unknown key is named, not a TypeError."""
    # a newer version's field, or a hand-edited file: MiniCPMConfig(**config) would fail deep in a script
    config = ckpt["model_config"]
    unknown = sorted(set(config) - {f.name for f in fields(MiniCPMConfig)}) if isinstance(config, dict) else ["(not a dict)"]
    if unknown:
        raise UsageError(f"{ckpt['path']}: its model_config has the key {unknown[0]!r}, unknown to this version's "
                         "MiniCPMConfig: use the version of this project that wrote it, or remove the key")
    return ckpt


def build_model(ckpt, device="cpu", **runtime):
    """The checkpoint's model; runtime: the caller's choices (attn_impl, grad_ckpt)."""
    model = MiniCPM(MiniCPMConfig(**ckpt["model_config"]), **runtime)   # its keys checked by load() (check_model_config)
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
    try:
        with warnings.catch_warnings():   # one process (--fsdp without torchrun): DCP warns there is no group
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(root, name),
                     no_dist=not dist.is_initialized())
    except CheckpointException as e:   # a BaseException wrapping each rank's error: a full disk is an OSError
        if rank == 0:   # every rank has failed (DCP gathers them): the half-written folder only takes space
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        raise dcp_cause(e, lambda c: disk_error(c, root, os.path.join(root, name))) from None
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
        # every key DCP's metadata lists (DCP's public load fills only a state dict given in advance,
        # with tensors of known shapes): torch's _load_state_dict_from_keys, with our reader and planner
        full = {}
        _load_state_dict(full, storage_reader=DataReader(folder), planner=WholePlanner(), no_dist=not dist.is_initialized())
        ckpt["model"] = full["model"]
        ckpt["optimizer"] = optimizer_by_position(full["optimizer"])   # as optimizer.state_dict() writes it
    return ckpt


# ----------------------------------------------------------------------------- reading DCP as data only

# Every global a DCP .metadata file may name (torch 2.13's metadata.py and filesystem.py): DCP's own
# dataclasses, torch.Size, the layout (pickled as a call of _get_layout("torch.strided")) and the path
# DCP records the checkpoint was written to. Dtypes (torch.float32, ...) are allowed by type, below.
DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath")}


class NotData(pickle.UnpicklingError):
    """A checkpoint file that holds something other than tensors and plain data: code, refused."""


class MetadataUnpickler(pickle.Unpickler):
    # pickle calls find_class for every global a file names, before anything is called: refusing all
    # but DCP_GLOBALS leaves a .metadata file nothing to run (os.system, eval, ... are never resolved)
    def find_class(self, module, name):
        if (module, name) in DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise NotData(f".metadata names {module}.{name}, which is not checkpoint data")


class DataReader(FileSystemReader):
    """DCP's file reader, with .metadata read by MetadataUnpickler instead of pickle.load."""

    def __init__(self, folder):
        super().__init__(folder)
        # read now, outside DCP: DCP would log a failed read with its traceback (several lines on stderr),
        # then look for the per-rank __0.metadata that a checkpoint of ours never has
        with open(os.path.join(folder, ".metadata"), "rb") as f:
            self.metadata = MetadataUnpickler(f).load()
        if not isinstance(self.metadata, dcp.Metadata):
            raise NotData(f".metadata holds a {type(self.metadata).__name__}, not DCP's Metadata")

    def read_metadata(self, *args, **kwargs):
        # what FileSystemReader.read_metadata adds to the file's contents: this load's id
        self.metadata.storage_meta = self.metadata.storage_meta or dcp.metadata.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class DataOnlyBytes:
    """A planner mixin: DCP's non-tensor items (param_groups' lr, betas, names) read as data only."""
    # DCP's own load_bytes uses torch.load(weights_only=False); the value is read here with
    # weights_only=True, then handed on re-saved, so DCP's code puts it in place without our copy of it
    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise NotData(f"the item {read_item.dest_index.fqn} holds objects other than plain data") from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


class DataPlanner(DataOnlyBytes, DefaultLoadPlanner):
    """dcp.load's default planner (a state dict given in advance), data only."""


class WholePlanner(DataOnlyBytes, _EmptyStateDictLoadPlanner):
    """The planner that builds the state dict from the metadata (_load_state_dict_from_keys'), data only."""


def dcp_cause(e, convert):
    """convert(the first rank's error) of a CheckpointException; a Ctrl-C or exit in it is raised as itself."""
    causes = [exc for exc, _ in e.failures.values()] or [e]
    for exc in causes:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return exc
    return convert(causes[0])


def unreadable(folder, e):
    if isinstance(e, NotData):   # say what was refused: a user who wrote the file by other means can see why
        return UsageError(f"cannot read the sharded checkpoint in {folder}: {e}; refused, nothing in it was run")
    return UsageError(f"cannot read the sharded checkpoint in {folder} ({type(e).__name__}): "
                      "incomplete, or not written by this project")


@contextmanager
def reading(folder):
    """Any failure to read a sharded checkpoint as one UsageError naming folder (a Ctrl-C stays one)."""
    # DCP raises CheckpointException, a BaseException, for a missing or truncated shard file (wrapping
    # each rank's error); a truncated .metadata is an EOFError or UnpicklingError from DataReader
    try:
        yield
    except UsageError:
        raise
    except CheckpointException as e:
        raise dcp_cause(e, lambda c: unreadable(folder, c)) from None
    except Exception as e:
        raise unreadable(folder, e) from None


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
        with reading(ckpt["path"]):
            dcp.load(state, storage_reader=DataReader(ckpt["sharded"]), planner=DataPlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return
    if "model" not in ckpt:   # a sharded checkpoint resumed without --fsdp: assembled whole
        with reading(ckpt["path"]):
            ckpt = load_sharded(ckpt["path"])
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
    check_writable(out_dir, "--out_dir")   # a file, /proc, a read-only disk: said now, not after the data is read
    same = resumed_path and os.path.abspath(out_dir) == os.path.dirname(os.path.abspath(resumed_path))
    # either file marks a run: a crash before the first checkpoint still leaves metrics worth keeping
    taken = [n for n in ("ckpt.pt", "sharded", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, n))]
    if taken and not same and not overwrite:
        raise UsageError(f"{out_dir} already holds a run ({', '.join(taken)}): continue it with --resume "
                         f"{out_dir}, or replace it with --overwrite (or choose another --out_dir)")


def start_run_folder(out_dir, rank_file=None, record=None):
    """Create out_dir, clear a crashed writer's leftovers, and copy the tokenizer's rank file into it."""
    # beside the checkpoint, as record["rank_file"]: the folder still samples after the data is deleted
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temps(out_dir)
    if rank_file and record and record.get("rank_file"):
        with open(rank_file, "rb") as f:
            ranks = f.read()
        atomic_write(os.path.join(out_dir, record["rank_file"]), lambda f: f.write(ranks))
        # a release's BOS/EOS rules live beside its tokenizer.json: without them a sample would lose its BOS
        for extra in ("tokenizer_config.json", "special_tokens_map.json") if record["rank_file"] == "tokenizer.json" else ():
            src = os.path.join(os.path.dirname(rank_file), extra)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, extra))


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
