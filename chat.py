"""Conversations in MiniCPM's chat template, as token ids and a loss mask: the data of supervised fine-tuning
(§5: the decay phase mixes SFT data into pre-training, then SFT proper; §7.1 DPO starts from that model).

    python chat.py --source conversations.jsonl --tokenizer byte
    python chat.py --source instruct --tokenizer bpe:4096 --rank_file data/stdlib-bpe4096/tokenizer.tiktoken

Each JSONL line is one conversation, in any of the shapes people have:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (OpenAI, UltraChat)
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}    (ShareGPT)
    {"prompt": "...", "response": "..."}                                           (one turn)
The template is the released MiniCPM chat models' `<用户>{user}<AI>{assistant}` per turn. It has no
system role: system text is put before the first user turn, separated by a blank line.

Writes data/<name>/{train.bin, val.bin, train.mask, val.mask, meta.json}: the .bin files as data.py
writes them (so data.open_tokens reads them), and one uint8 per token, 1 where the token is scored.
"""
import collections
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys

import numpy as np
import torch

import cli
import data
import instruct   # the embedded instruction set: a source of conversations (`instruct`)
import tokenizer
from atomic import atomic_write
from cli import DataError

USER, AI = "<用户>", "<AI>"   # MiniCPM-2B-sft/dpo's turn markers
SYSTEM_JOIN = "\n\n"          # system text, then the first user message
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


# ----------------------------------------------------------------------------- the template

def render_prompt(user_text: str) -> str:
    """The text a reply follows: `<用户>{user}<AI>`, the question stripped (the reply starts right after <AI>)."""
    return f"{USER}{user_text.strip()}{AI}"


def turns(messages) -> list[tuple[str, str]]:
    """[{"role", "content"}, ...] -> [(user, assistant), ...], checked; system text joins the first user turn."""
    # every check a malformed line needs is here, so that read_jsonl can name the line of any failure
    if not isinstance(messages, list) or not messages:
        raise DataError("no messages")
    system, pairs, pending = [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} has no string content")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"message {i} has unknown role {role!r}: use system, user or assistant")
        if role == "system":   # the template has no place for it but before the first question
            if pairs or pending is not None:
                raise DataError(f"message {i} is a system message after the conversation began")
            system.append(m["content"].strip())
        elif role == "user":
            if pending is not None:
                raise DataError(f"message {i} is a second user message in a row")
            pending = SYSTEM_JOIN.join(system + [m["content"].strip()]) if not pairs else m["content"]
        else:
            if pending is None:
                raise DataError(f"message {i} is an assistant message with no user message before it")
            if not m["content"].strip():   # an empty reply would teach the model to stop at once
                raise DataError(f"message {i} is an empty assistant message")
            pairs.append((pending, m["content"]))
            pending = None
    if pending is not None or not pairs:
        raise DataError("the conversation does not end with an assistant message")
    return pairs


def frame(enc) -> tuple[list[int], int]:
    """-> (BOS ids, EOS id) around a conversation: a release's (tokenizer_config.json), or ours."""
    # a released folder's tokenizer adds <s> before a text and ends a reply with </s>; our tokenizers have
    # one special token, <|endoftext|>, which ends every document: the conversation before this one already
    # ended with it, so a BOS here would double it (data.py's documents are "followed by EOT" too)
    if getattr(enc, "add_bos", False):
        return [enc.bos_token], enc.eot_token
    return [], enc.eot_token


def encode_text(enc, text: str) -> list[int]:
    # encode_ordinary: a user who writes "<|endoftext|>" or "</s>" gets those characters, not the token
    return enc.encode_ordinary(text)


def encode(messages, enc) -> tuple[list[int], list[int]]:
    """A conversation -> (ids, mask): BOS, then per turn `<用户>{user}<AI>` (mask 0), reply + EOS (mask 1)."""
    # segment by segment, so the mask's edge is a token edge: BPE encoding the whole text could merge the
    # last bytes of "<AI>" with the first of the reply into one token that is half prompt, half answer
    bos, eos = frame(enc)
    ids, mask = list(bos), [0] * len(bos)
    for user, reply in turns(messages):
        prompt = encode_text(enc, render_prompt(user))
        answer = encode_text(enc, reply.strip()) + [eos]   # the EOS is scored: the model must learn to stop
        ids += prompt + answer
        mask += [0] * len(prompt) + [1] * len(answer)
    return ids, mask


def prompt_ids(user_text: str, enc) -> list[int]:
    """What generation starts from: BOS (ours: the end-of-text token) + `<用户>{user}<AI>`."""
    return framed_ids(render_prompt(user_text), enc)


def framed_ids(rendered: str, enc) -> list[int]:
    """An already rendered prompt (`<用户>...<AI>`) as training saw it: after BOS, or our end-of-text."""
    # our models saw every conversation after an end-of-text token, so that is their "BOS" here
    bos, eos = frame(enc)
    return (bos or [eos]) + encode_text(enc, rendered)


def targets(ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """A window of ids [T + 1] and its mask -> inputs x [T], targets y [T] with -100 where unscored."""
    # position t predicts token t + 1, so the mask of the *target* decides (F.cross_entropy's ignore_index)
    # one window or a batch of them ([..., T + 1]): the shift is on the last axis
    ids, mask = torch.as_tensor(np.asarray(ids, dtype=np.int64)), torch.as_tensor(np.asarray(mask, dtype=bool))
    return ids[..., :-1], torch.where(mask[..., 1:], ids[..., 1:], -100)


# ----------------------------------------------------------------------------- reading conversations

def messages_of(record) -> list:
    """One JSON line -> OpenAI-style messages, whatever its shape."""
    # the shapes are told apart by their keys; the contents are checked afterwards by turns(), once
    if isinstance(record, dict) and "messages" in record:
        return record["messages"]
    if isinstance(record, dict) and "conversations" in record:   # ShareGPT: from/value
        convo = record["conversations"]
        if not isinstance(convo, list) or not all(isinstance(m, dict) for m in convo):
            raise DataError("'conversations' is not a list of {from, value} objects")
        unknown = [m.get("from") for m in convo if m.get("from") not in ROLES]
        if unknown:
            raise DataError(f"unknown speaker {unknown[0]!r}: use human, gpt or system")
        return [{"role": ROLES[m["from"]], "content": m.get("value")} for m in convo]
    # a single turn (Alpaca-like, or preference.py's prompt without its rejected side)
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    raise DataError("is not a conversation: expected 'messages', 'conversations' or 'prompt' + 'response'")


def read_jsonl(path) -> list[tuple[str, list]]:
    """A JSONL file -> [(line, messages)], every line checked before anything is written."""
    # read whole: every line is checked before the first one is tokenized, so a typo in line 90,000
    # costs a second, not a half-written dataset
    try:
        text = pathlib.Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): give a JSONL file of conversations") from None
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):   # not splitlines(): JSON may hold \u2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}): fix or remove that line") from None
        try:
            messages = messages_of(record)
            turns(messages)
        except DataError as e:   # the same message, with the place to fix it
            raise DataError(f"{path}:{lineno} {e}: fix or remove that line") from None
        out.append((line, messages))
    if not out:
        raise DataError(f"{path} holds no conversations")
    return out


def instruct_val():
    return instruct.conversations("val")


def instruct_items(split: str = "val") -> list[dict]:
    """The instruction set's items as exact-match tasks: [{"prompt": the template text a reply follows,
    "answer", "family", "novel" (knowledge only)}] (eval.py --task instruct)."""
    return [dict(prompt=render_prompt(i["user"]), answer=i["answer"], family=i["family"],
                 **({"novel": i["novel"]} if "novel" in i else {})) for i in instruct.items(split)]


def read_source(source):
    """-> [(key line, messages)] of a .jsonl file, or of the embedded instruction set ("instruct")."""
    if source == "instruct":
        # the training conversations, then the 500 held-out ones (the items eval.py --task instruct scores)
        return [(json.dumps(c, ensure_ascii=False), c["messages"]) for split in ("train", "val")
                for c in instruct.conversations(split)]
    if not os.path.isfile(source):
        raise DataError(f"source {source!r} is not instruct or an existing .jsonl file")
    return read_jsonl(source)


# ----------------------------------------------------------------------------- preparing a dataset

def sha256(path) -> str:
    # recorded in meta.json: a trainer mixing this folder with a pretraining one compares the two hashes,
    # since two bpe:4096 files learned on different text share a name and a size but not their ids
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def check_tokenizer(spec: str, rank_file):
    """The tokenizer, checked before anything is written -> (n of bpe:N or None, files to copy in)."""
    n_bpe = tokenizer.parse_tokenizer(spec)
    if rank_file and not os.path.isfile(rank_file):
        raise DataError(f"rank_file {rank_file!r} is not a file: give the pretraining dataset's tokenizer.tiktoken")
    if spec == tokenizer.RELEASED_TOKENIZER:   # a released folder's tokenizer.json, and its configs beside it
        if not rank_file:
            raise DataError("tokenizer tokenizer.json needs rank_file: the released folder's tokenizer.json")
        folder = os.path.dirname(os.path.abspath(rank_file))
        return None, [os.path.join(folder, f) for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                      if os.path.isfile(os.path.join(folder, f))]
    if rank_file and not n_bpe:
        raise DataError(f"tokenizer {spec!r} has no rank file: drop rank_file, or use bpe:N")
    if rank_file or not n_bpe:   # a rank file of the wrong size, or tiktoken's offline download, fails here
        data.load_tokenizer(spec, rank_file)
    return n_bpe, [rank_file] if rank_file else []


def split_flags(lines) -> list[bool]:
    """data.is_val of each JSON line; a file too small for the 1% gets its lowest-hash line as validation."""
    # the JSON line is the content key: a conversation repeated in a file falls on one side, and the
    # split of a line does not depend on the lines around it
    flags = [data.is_val(line, None) for line in lines]
    if not any(flags) and len(set(lines)) > 1:   # as data.py's fallback: the choice is the content's, not the order's
        low = min(set(lines), key=lambda line: hashlib.sha256(line.encode()).digest())
        flags = [line == low for line in lines]
    return flags


def encode_split(conversations, enc, dtype) -> tuple[np.ndarray, np.ndarray, dict]:
    """Conversations -> ids, mask (aligned, 1-D) and their counts."""
    # "bytes" and "tokens" mean what they mean in data.py (all the text, every id in the .bin, which
    # data.open_tokens checks against the file size); "scored_*" count the replies and their EOS only
    ids, mask, stats = [], [], dict(documents=0, bytes=0, tokens=0, scored_bytes=0, scored_tokens=0)
    for messages in conversations:
        i, m = encode(messages, enc)
        ids.append(np.array(i, dtype=dtype))
        mask.append(np.array(m, dtype=np.uint8))
        pairs = turns(messages)
        scored = sum(len(reply.strip().encode()) for _, reply in pairs)
        stats["documents"] += 1
        stats["bytes"] += sum(len(render_prompt(user).encode()) for user, _ in pairs) + scored
        stats["tokens"] += len(i)
        # bits per byte of the replies = masked loss / ln 2 / (scored_bytes / scored_tokens)
        stats["scored_bytes"] += scored
        stats["scored_tokens"] += int(sum(m))
    cat = lambda parts, t: np.concatenate(parts) if parts else np.zeros(0, t)   # noqa: E731
    return cat(ids, dtype), cat(mask, np.uint8), stats


def learn_rank_file(path, conversations, n_bpe: int) -> None:
    """bpe:N learned on the training conversations' text (prompts and replies), written as a rank file."""
    # training conversations only, as data.py learns on training documents: a tokenizer fitted to the
    # validation text would flatter its loss. Usually a chat set should reuse the pretraining rank file
    # instead (rank_file=): a model cannot change tokenizers between pre-training and SFT.
    counts = collections.Counter()
    for messages in conversations:
        for user, reply in turns(messages):
            counts.update(tokenizer.split_chunks(render_prompt(user) + reply.strip()))
    tokenizer.write_rank_file(path, tokenizer.learn_bpe(counts, n_bpe - 1)[0])   # - 1: EOT is the N-th token


def build(work, convos, source, spec, n_bpe, copies, log) -> dict:
    """The dataset in folder `work`: tokenizer files, .bin and .mask per split, then meta.json."""
    # the tokenizer's files travel with the data (meta.json names them relative to the folder), so a
    # trainer reads the exact file these ids were made with, and rank_sha256 tells it from another one
    rank_file = os.path.basename(copies[0]) if copies else None   # tokenizer.json's configs come after it
    for path in copies:
        shutil.copyfile(path, work / os.path.basename(path))
    if n_bpe and not copies:
        rank_file = "tokenizer.tiktoken"
        log(f"learning bpe:{n_bpe} on the training conversations")
        learn_rank_file(work / rank_file, [m for _, m, val in convos if not val], n_bpe)
    enc = data.load_tokenizer(spec, str(work / rank_file) if rank_file else None)
    dtype = "uint16" if enc.n_vocab <= 2**16 else "uint32"   # as data.py: 2 bytes a token while the vocabulary fits
    meta = {"source": source, "tokenizer": spec, "rank_file": rank_file, "vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token, "bos_id": frame(enc)[0][0] if frame(enc)[0] else None, "dtype": dtype,
            "split_pattern": tokenizer.GPT4_SPLIT, "split": getattr(data, "SPLIT_RULE", "content-sha256"),
            "chat": True, "template": f"{USER}{{user}}{AI}{{assistant}}",
            "rank_sha256": sha256(work / rank_file) if rank_file else None}
    if source == "instruct":
        meta["python"] = sys.version.split()[0]   # the instruction set is made from this Python's library
        meta["val_split"] = "held-out"            # instruct.py's held-out items, not a 1% draw
    else:
        meta["source_sha256"] = sha256(source)
    for split, val in (("train", False), ("val", True)):
        ids, mask, meta[split] = encode_split([m for _, m, v in convos if v == val], enc, dtype)
        # raw ids and raw mask bytes, no header: np.memmap reads either back, aligned position by position
        atomic_write(str(work / f"{split}.bin"), lambda f: f.write(ids.tobytes()))
        atomic_write(str(work / f"{split}.mask"), lambda f: f.write(mask.tobytes()))
    # meta.json last: its presence is what says the folder is complete
    atomic_write(str(work / "meta.json"), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return meta


def default_name(source: str, spec: str) -> str:
    # "-chat" keeps it apart from data.py's folder of the same source and tokenizer, e.g. a .jsonl of both
    stem = source if source == "instruct" else pathlib.Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{spec.replace(':', '')}-chat")


def prepare(source: str = "instruct", tokenizer_spec: str = "bpe:4096", data_dir: str = "data", rank_file: str = None,
            name: str = None, *, quiet: bool = False, force: bool = False) -> pathlib.Path:
    """Prepare data_dir/name/ from a .jsonl file or "instruct"; at once if it is already prepared."""
    log = (lambda *a: None) if quiet else print   # quiet: tests, and a trainer's other ranks
    cli.check_dataset(source, name)   # a --name that leaves data_dir is refused, as data.py refuses it
    n_bpe, copies = check_tokenizer(tokenizer_spec, rank_file)
    out = pathlib.Path(data_dir) / (name or default_name(source, tokenizer_spec))
    lines = read_source(source)   # every line checked: a bad one stops here, before any file is written
    want = {"source": source, "tokenizer": tokenizer_spec, "rank_sha256": sha256(rank_file) if rank_file else None,
            "source_sha256": None if source == "instruct" else sha256(source),
            "python": sys.version.split()[0] if source == "instruct" else None,
            "val_split": "held-out" if source == "instruct" else None}   # folders made before it are made again
    # prepared already from the same bytes with the same tokenizer: every run after the first starts at once
    if (out / "meta.json").exists() and not force:
        meta = data.load_meta(out)
        if (meta["source"], meta["tokenizer"]) != (source, tokenizer_spec):   # never overwrite other data silently
            raise DataError(f"{out} holds {meta['source']} with {meta['tokenizer']}, not {source} with "
                            f"{tokenizer_spec}: pass another name, or force=True (--force) to overwrite it")
        if all(meta.get(k) == v for k, v in want.items() if v is not None):
            return out
    # the instruction set's validation split is its held-out items (no 1% draw): the bits/byte of the
    # replies train.py reports and eval.py's exact match are then measured on the same questions
    flags = ([i >= len(lines) - len(instruct_val()) for i in range(len(lines))] if source == "instruct"
             else split_flags([k for k, _ in lines]))
    convos = [(key, messages, val) for (key, messages), val in zip(lines, flags)]
    # built beside `out` and swapped in whole, as data.prepare does: a failure leaves the old folder as it was
    meta = data.build_folder(out, lambda work: build(work, convos, source, tokenizer_spec, n_bpe, copies, log))
    log(f"prepared {out}: {meta['train']['documents']:,} + {meta['val']['documents']:,} conversations, "
        f"{meta['train']['tokens']:,} + {meta['val']['tokens']:,} tokens, "
        f"{meta['train']['scored_tokens'] / max(1, meta['train']['tokens']):.0%} of them scored")
    return out


# ----------------------------------------------------------------------------- reading prepared data

def open_mask(bin_path) -> np.ndarray:
    """The loss mask beside a prepared train.bin / val.bin, checked against the tokens it goes with."""
    ids = data.open_tokens(bin_path)
    path = pathlib.Path(bin_path).with_suffix(".mask")
    if not path.is_file() or path.stat().st_size != len(ids):   # a pretraining folder has no masks at all
        raise DataError(f"{path} is missing or not one byte per token of {bin_path}: prepare it with python chat.py")
    return np.memmap(path, dtype=np.uint8, mode="r") if len(ids) else np.zeros(0, np.uint8)


def get_batch(bin_path, batch_size: int, seq_len: int, *, seed: int, step: int, rank: int = 0,
              world_size: int = 1, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """data.get_batch's windows, with -100 in y where the target is not a reply token: int64 [B, T]."""
    # the same windows as data.get_batch for the same arguments (the same generator), so a mixture can
    # draw from either kind of folder alike; windows may start mid-conversation, as pretraining's do
    ids, mask = data.open_tokens(bin_path), open_mask(bin_path)
    if len(ids) < seq_len + 1:
        raise DataError(f"{bin_path} holds {len(ids)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step, micro_step, rank, world_size])
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
    where = starts[:, None] + np.arange(seq_len + 1)   # [B, T + 1]
    return targets(ids[where], mask[where])


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    # prepare()'s arguments as flags; cli.main turns any DataError into one line on stderr and exit 2
    def run(argv):
        p = cli.parser(__doc__)
        p.add_argument("--source", default="instruct", help="a .jsonl file of conversations, or instruct (instruct.py)")
        p.add_argument("--tokenizer", default="bpe:4096", help="bpe:N, byte, gpt2, cl100k_base, o200k_base, tokenizer.json")
        p.add_argument("--rank_file", default=None, help="reuse this bpe rank file (or a release's tokenizer.json)")
        p.add_argument("--data_dir", default="data", help="prepared data goes to DATA_DIR/NAME/")
        p.add_argument("--name", default=None, help="dataset folder name (default: from source and tokenizer)")
        p.add_argument("--force", action="store_true", help="prepare again even if NAME is already prepared")
        a = cli.parse(p, argv)
        prepare(a["source"], a["tokenizer"], a["data_dir"], a["rank_file"], a["name"], force=a["force"])
    return cli.main("chat.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
