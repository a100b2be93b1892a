"""Preference pairs for dpo.py: reading them from JSONL, the embedded default task, and collating a
batch into the tensors the DPO loss scores (Rafailov et al. 2023). MiniCPM's DPO (§7.1) aligns on
UltraFeedback, whose pairs have this {prompt, chosen, rejected} shape.

A pair is three lists of token ids and a held_out flag. A hash decides which pairs are held out (to
measure preference accuracy): the same split on every machine and run, whatever the batch order.
"""
import json
import os
import random

import numpy as np
import torch

import cli
import data
from cli import UsageError

# The embedded default task: 48 tokens of real context, then 16 tokens of continuation (short: the
# default run takes minutes on a CPU, and a real continuation is still told from another document's).
TASK_PROMPT_LEN, TASK_RESPONSE_LEN = 48, 16


def collate(pairs, max_len, pad_id, bos_id):
    """B pairs of token-id lists {prompt, chosen, rejected} -> input_ids, labels [2B, T]."""
    # the B chosen sequences, then the B rejected ones: one forward pass scores both sides of every pair
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            # the response is what DPO scores, so it is kept whole when it fits; a sequence longer than
            # max_len + 1 loses the left of its prompt (the far context), then the right of its response
            response = p[side][:max_len]
            # bos_id first (our corpora's <|endoftext|>: a document starts after one) gives the first
            # response token something to follow, even with an empty prompt
            prompt = ([bos_id] + p["prompt"])[-(max_len + 1 - len(response)):]
            seqs.append(prompt + response)
            starts.append(len(prompt))   # where the response begins
    T = max(len(s) for s in seqs) - 1   # inputs drop the last token, labels the first
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)   # [2B, T], padded on the right
    # -100 on the prompt and the padding: only response tokens are scored (Rafailov et al. Eq. 7)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)   # [2B, T]
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s) - 1] = torch.tensor(s[:-1])
        labels[i, start - 1:len(s) - 1] = torch.tensor(s[start:])   # position t predicts s[t + 1]
    return input_ids, labels


def build_default_pairs(tokens, eot_id, val_frac=0.2, prompt_len=TASK_PROMPT_LEN, response_len=TASK_RESPONSE_LEN, seed=0):
    """The default task from a token stream of documents separated by eot_id (a val.bin)."""
    # every non-overlapping window of a document gives prompt = its first prompt_len tokens, chosen =
    # the next response_len, rejected = the continuation of a random window of *another* document: a
    # preference a model of the corpus can learn (coherence), with no human labels needed
    docs, start = [], 0   # split at every eot_id; the separators themselves belong to no document
    for end in np.flatnonzero(tokens == eot_id).tolist() + [len(tokens)]:
        docs.append(tokens[start:end].tolist())
        start = end + 1
    n = prompt_len + response_len
    windows = [(d, i) for d, doc in enumerate(docs) for i in range(0, len(doc) - n + 1, n)]   # (document, offset)
    if len({d for d, _ in windows}) < 2:   # a rejected continuation must come from another document
        raise UsageError(f"the default task needs at least 2 validation documents of {n}+ tokens; "
                         f"found {len({d for d, _ in windows})}: use a bigger corpus or --data")
    # held-out windows are split off first, and rejected continuations come from the same split:
    # otherwise training would push down the very text that held-out pairs prefer
    rng, pairs = random.Random(seed), []
    for held in (False, True):
        # held out by a hash of the window's place, not by drawing: the same split on every run and machine
        pool = [(d, i) for d, i in windows if (data.key_hash(f"{d}:{i}") < val_frac) == held]
        for d, i in pool:
            others = [w for w in pool if w[0] != d]
            if others:   # a split may hold windows of a single document: those get no pair
                od, oi = rng.choice(others)
                pairs.append(dict(prompt=docs[d][i:i + prompt_len], chosen=docs[d][i + prompt_len:i + n],
                                  rejected=docs[od][oi + prompt_len:oi + n], held_out=held))
    return pairs


def read_pairs(path, tokenizer, val_frac):
    """A JSONL file of {prompt, chosen, rejected} strings -> pairs of token-id lists."""
    # each bad line is named (path:line) with exit 2: a long file must not fail with a bare traceback
    if not os.path.isfile(path):
        raise UsageError(f"--data {path} is not a file")
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:   # a binary file given by mistake: say so, not a codec traceback
        raise UsageError(f"--data {path} is not UTF-8 text (byte {e.start}): give a JSONL file of pairs") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():   # blank lines (a trailing newline, say) are not pairs
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise UsageError(f"{path}:{lineno} needs string fields prompt, chosen and rejected")
        # held out by a hash of the whole line: a pair stays on its side however the file is reordered;
        # encode_ordinary: the text's own "<|endoftext|>" is text, not our separator
        pairs.append(dict(held_out=data.key_hash(line + "\n") < val_frac,
                          **{k: tokenizer.encode_ordinary(rec[k]) for k in ("prompt", "chosen", "rejected")}))
    cli.check([(not pairs, f"--data {path} holds no pairs")])   # said here, where the cause is known
    return pairs
