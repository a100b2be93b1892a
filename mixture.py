"""Data mixtures for train.py: several prepared datasets, each training sequence drawn from one of them
by weight, and a second mixture from the decay's first step on (§5, "two-stage pre-training").

    --data stdlib:0.7,instruct:0.3        the mixture (default: --source alone)
    --decay_data stdlib:0.6,instruct:0.4  from the WSD decay's start on; MiniCPM mixes high-quality and
                                          SFT data into the decay (Table 1: C-Eval 40.0 -> 52.6 at 2.4B)

A component is a source as --source takes it (stdlib, a local file, folder or glob) or conversations
(`instruct`, the embedded instruction set, or a chat .jsonl: chat.py), prepared on first use. Weights are
relative (normalised to sum to 1). Every component must share one tokenizer: the first text component's
tokenizer is the run's (or, with conversations alone, the --init_from checkpoint's), and conversations
are tokenized with it. Conversations carry a loss mask: only the assistant's replies are scored, so the
same draw serves supervised fine-tuning (train.py --sft).
"""
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

import chat
import cli
import data
from cli import UsageError

MIX_STREAM = 7   # a key of its own in the draw's seed: the mixture's stream never equals a plain run's


@dataclass
class Component:
    name: str          # as the user wrote it: also the suffix of its validation metrics
    weight: float      # normalised within its mixture
    folder: str        # the prepared dataset
    meta: dict
    masked: bool       # conversations: targets outside the assistant's replies are -100


def parse(spec, flag="--data"):
    """'a:0.7,b:0.3' -> [(name, weight)], weights normalised; bad input one line naming the flag."""
    pairs = []
    for part in spec.split(","):
        part = part.strip()
        # rpartition: a Windows-less path may hold no ':', and "a:b:0.5" is the component "a:b"
        name, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise UsageError(f"{flag}: weight {weight!r} of {name or part!r} is not a number (NAME:WEIGHT,...)") from None
        if not name or not 0 < w < float("inf"):
            raise UsageError(f"{flag}: {part!r} needs a name and a finite weight > 0 (NAME:WEIGHT,...)")
        pairs.append((name, w))
    names = [n for n, _ in pairs]
    cli.check([(len(set(names)) != len(names), f"{flag}: a component is named twice ({spec})")])
    total = sum(w for _, w in pairs)
    return [(n, w / total) for n, w in pairs]


def is_chat(name):
    """Conversations: the embedded instruction set, or a .jsonl whose first line is a conversation."""
    if name == "instruct":
        return True
    if not (name.endswith(".jsonl") and os.path.isfile(name)):
        return False   # a .jsonl of {"text": ...} documents is pre-training text (data.py --text_field)
    with open(name, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        line = json.loads(first)
    except ValueError:
        return False   # data.py reports the bad line with its number when it reads the file
    return isinstance(line, dict) and bool({"messages", "conversations", "prompt"} & line.keys())


def tokenizer_identity(meta, folder):
    """What must be equal for two datasets' ids to mean the same text: vocabulary, EOT, the file's bytes."""
    # two bpe:4096 files learned on different text share a name and a size but not their ids
    rank = meta.get("rank_file")
    digest = hashlib.sha256(pathlib.Path(folder, rank).read_bytes()).hexdigest() if rank else meta["tokenizer"]
    return meta["vocab_size"], meta["eot_id"], digest


def prepare(pairs, cfg, tok=None, quiet=False):
    """The components of a mixture, prepared. tok: the run's tokenizer (spec, rank file path) when known
    already (the stable mixture's, or an --init_from checkpoint's); else the first text component's."""
    for name, _ in pairs:   # every conversation file read and checked first: a bad line costs no preparation
        if is_chat(name) and name != "instruct":
            chat.read_source(name)
    comps = []
    # text first: its tokenizer becomes the run's, and the conversations are tokenized with it
    for name, weight in sorted(pairs, key=lambda p: is_chat(p[0])):
        if is_chat(name):
            if tok is None:   # conversations alone, from scratch: --source's tokenizer, as a plain run's
                folder = data.prepare(cfg.source, cfg.tokenizer, cfg.data_dir, quiet=quiet)
                tok = spec_of(folder, data.load_meta(folder))
            folder = chat.prepare(name, tok[0], cfg.data_dir, rank_file=tok[1], quiet=quiet)
        else:
            folder = data.prepare(name, cfg.tokenizer, cfg.data_dir, quiet=quiet)
        meta = data.load_meta(folder)
        tok = tok or spec_of(folder, meta)
        comps.append(Component(name, weight, str(folder), meta, bool(meta.get("chat"))))
    order = [n for n, _ in pairs]   # back in the order the user gave: the first is the headline metric
    comps.sort(key=lambda c: order.index(c.name))
    check_tokenizers(comps)
    return comps


def spec_of(folder, meta):
    """(spec, absolute rank file or None): how chat.prepare tokenizes conversations as this dataset."""
    return meta["tokenizer"], meta["rank_file"] and os.path.abspath(os.path.join(folder, meta["rank_file"]))


def check_tokenizers(comps):
    """One tokenizer for all: another one's ids would be valid numbers meaning other text."""
    ids = [tokenizer_identity(c.meta, c.folder) for c in comps]
    for c, i in zip(comps, ids):
        if i != ids[0]:
            raise UsageError(f"--data components {comps[0].name} and {c.name} were prepared with different "
                             f"tokenizers ({comps[0].meta['tokenizer']} vs {c.meta['tokenizer']}, or other merges): "
                             f"prepare them with one (data.py --tokenizer bpe:N@RANK_FILE)")


# ----------------------------------------------------------------------------- reading

def windows(comp, split, starts, seq_len):
    """x, y int64 [n, seq_len] at the given starts; y is -100 where a conversation's mask says unscored."""
    path = os.path.join(comp.folder, f"{split}.bin")
    ids = data.open_tokens(path)
    rows = starts[:, None] + np.arange(seq_len + 1)          # [n, seq_len + 1]
    if comp.masked:   # the mask of the *target* decides: assistant tokens and their EOS (chat.targets)
        return chat.targets(ids[rows], chat.open_mask(path)[rows])
    w = torch.from_numpy(ids[rows].astype(np.int64))
    return w[:, :-1], w[:, 1:]


def check_length(comp, split, seq_len):
    n_ids = len(data.open_tokens(os.path.join(comp.folder, f"{split}.bin")))
    if n_ids < seq_len + 1:
        raise UsageError(f"{comp.folder}/{split}.bin holds {n_ids} tokens, fewer than one window of "
                         f"--seq_len + 1 = {seq_len + 1}: use a shorter --seq_len or more data")
    return n_ids


def get_batch(comps, batch_size, seq_len, *, seed, step, micro_step):
    """[batch_size, seq_len] inputs and targets, each row from a component drawn by weight.
    A pure function of (seed, step, micro_step), as data.get_batch: resume and any split of the batch
    over processes and accumulation steps read the same rows."""
    rng = np.random.default_rng([seed, step, micro_step, MIX_STREAM])
    which = rng.choice(len(comps), size=batch_size, p=[c.weight for c in comps])   # [B] component per row
    x = torch.empty(batch_size, seq_len, dtype=torch.int64)
    y = torch.empty(batch_size, seq_len, dtype=torch.int64)
    for i, comp in enumerate(comps):
        rows = np.flatnonzero(which == i)
        if len(rows):   # random windows of this component's train split (they may cross documents)
            starts = rng.integers(0, check_length(comp, "train", seq_len) - seq_len, size=len(rows))
            x[rows], y[rows] = windows(comp, "train", starts, seq_len)
    return x, y


def eval_windows(comp, seq_len, n_tokens):
    """The component's fixed validation set, x and y int64 [n, seq_len] (y -100 where unscored), at the
    places data.eval_windows takes them: the same windows at every evaluation and for every run."""
    n_ids = check_length(comp, "val", seq_len)
    return windows(comp, "val", data.eval_starts(n_ids, seq_len, n_tokens), seq_len)


def bytes_per_token(comp):
    # of the scored text: for conversations the replies' bytes and tokens only (chat.py counts both)
    val = comp.meta["val"]
    return val["scored_bytes"] / val["scored_tokens"] if comp.masked else val["bytes"] / val["tokens"]
