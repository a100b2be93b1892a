"""Data for MiniCPM: turn a text corpus into token files, and read random training windows from them.

    python data.py                                   # this Python's own standard library, bpe:4096
    python data.py --source shakespeare --tokenizer byte
    python data.py --source 'shards/*.jsonl' --tokenizer cl100k_base --workers 16
    python data.py --source fineweb-edu/ --tokenizer path/to/MiniCPM-2B-sft-bf16    # parquet, released tokenizer
    python data.py --source code/ --tokenizer bpe:4096@data/stdlib-bpe4096/tokenizer.tiktoken   # a shared BPE

Writes data/<name>/{train.bin, val.bin, meta.json} (+ tokenizer.tiktoken for bpe:N, tokenizer.json for a
released folder), each document followed by its end-of-text token. Memory stays at a few --chunk_mb pieces
per worker, whatever the size of a file (sources.py). Sources, tokenizers and the split are in the README.
"""
import argparse
import collections
import glob
import hashlib
import inspect
import json
import multiprocessing
import os
import pathlib
import platform
import re
import shutil
import sys
import sysconfig
import time
import urllib.request

import numpy as np
import torch
from tqdm import tqdm

import cli
from atomic import atomic_write
from cli import DataError   # one line, exit 2, like every bad input
from sources import FORMATS, documents, file_format, pieces   # the formats, and cutting files into pieces
# The tokenizers (byte, bpe:N learned here, tiktoken's named encodings) live in tokenizer.py; their
# names are data.py's too, so a reader (and sample.py, dpo.py) finds them where the data is made.
from tokenizer import (EOT, GPT4_SPLIT, RELEASED_TOKENIZER, TIKTOKEN_NAMES, check_tokenizer, encode_documents,  # noqa: F401
                       learn_bpe, load_tokenizer, parse_tokenizer, split_chunks, tokenizer_source, write_rank_file)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_FRACTION = 0.01   # 1% of the documents (~300 KB of the stdlib): room for a 64K-token eval set
SPLIT_RULE = "content-sha256"  # recorded in meta.json: data prepared under an older rule is prepared again
SMALL_CORPUS_BYTES = 64e6  # up to this size, the validation fallback (below) may read every file twice


# ----------------------------------------------------------------------------- sources and documents

def list_files(source: str, data_dir: str, log) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The source's files in sorted order, and the root folder that document keys are relative to."""
    path, root = pathlib.Path(source), None
    if source == "stdlib":
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])   # on every machine, no download: the default corpus
        # installed packages differ between machines; the standard library of one Python version does not
        files = [p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    elif source == "shakespeare":
        files = [download(SHAKESPEARE_URL, pathlib.Path(data_dir) / "downloads" / "tinyshakespeare.txt", log)]
    elif glob.has_magic(source):
        files = [p for p in map(pathlib.Path, glob.glob(source, recursive=True)) if p.is_file() and file_format(p)]
        # the files' common folder: they are sorted, and named, by their path inside it, wherever it lives
        root = pathlib.Path(os.path.commonpath([p.parent.resolve() for p in files])) if files else None
        files = [p.resolve() for p in files]
    elif path.is_dir():
        root = path.resolve()
        files = [p for p in root.rglob("*") if p.is_file() and file_format(p)]
    elif path.is_file():
        files = [path.resolve()]
    else:
        raise DataError(f"source {source!r} is not stdlib, shakespeare, or an existing file, directory or glob")
    if not files:
        raise DataError(f"source {source!r} has no {'/'.join(FORMATS)} files: point --source at some text")
    root = root or files[0].parent  # a single file's folder
    # sorted by relative path, not by rglob's (file-system) order: the same files give the same train.bin
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def download(url: str, path: pathlib.Path, log) -> pathlib.Path:
    if path.exists():   # downloaded once, then reused offline
        return path
    log(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}): this machine seems offline; "
                        f"fetch input.txt elsewhere and pass it with --source path/to/input.txt") from None
    write_atomic(path, body)   # a cut connection must not leave a half file that the check above would accept
    return path


def key_hash(key: str | bytes) -> float:
    """A string's (or its UTF-8 bytes') place in [0, 1), the same on every machine and Python run."""
    raw = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") / 2**64  # not hash(): salted per process


def is_val(text: str | bytes, forced_val: float | None) -> bool:
    """The ~1% of documents whose *content* hashes lowest."""
    # keyed by content, not by path, so the split never depends on the order or number of other
    # documents, or on the format that holds them, and copies of one text (the stdlib holds one 58-byte
    # file 8 times) always fall on the same side: validation never holds a document that is also in train
    return (h := key_hash(text)) == forced_val or h < VAL_FRACTION


def fallback_val_key(files, text_field: str) -> float | None:
    """The lowest content hash, when hashing alone would leave validation empty (small corpora only)."""
    # a corpus of a few documents (one short .jsonl) may have none under VAL_FRACTION: the lowest joins validation
    if sum(p.stat().st_size for p in files) > SMALL_CORPUS_BYTES:
        return None
    hashes = [key_hash(text) for piece in pieces(files, 1 << 24, text_field) for text in documents(piece, text_field)]
    # None when all texts are one (nothing would be left to train on) or hashing already found one
    return None if len(set(hashes)) < 2 or min(hashes) < VAL_FRACTION else min(hashes)


# ----------------------------------------------------------------------------- preparing a dataset
# Worker processes read and tokenize pieces of files (sources.py); results come back in piece order,
# so the output does not depend on the number of workers.

_worker = {}   # the worker process's tokenizer and settings, set once per process


def _init_worker(spec, rank_file, text_field, forced_val):
    # one core per process: the tokenizers package would otherwise start a thread per core in each worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(enc=load_tokenizer(spec, rank_file) if spec else None, text_field=text_field, forced_val=forced_val)


def _count_train_chunks(group) -> collections.Counter:
    """Chunk counts of the training documents of a group of pieces (groups keep the merging cheap)."""
    # training documents only: a tokenizer learned on validation text would flatter the validation loss
    counts = collections.Counter()
    for piece in group:
        for text in documents(piece, _worker["text_field"]):
            if not is_val(text, _worker["forced_val"]):
                counts.update(split_chunks(text))
    return counts


def _tokenize_piece(piece) -> dict:
    """A piece's token ids per split, each document followed by EOT, with document and byte counts."""
    enc, texts = _worker["enc"], documents(piece, _worker["text_field"])
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32   # 2 bytes per token while the vocabulary fits
    out = {split: {"ids": [], "documents": 0, "bytes": 0} for split in ("train", "val")}
    for text, ids in zip(texts, encode_documents(enc, texts)):
        raw = text.encode()   # once: the split's hash and the byte count both need it
        split = out["val" if is_val(raw, _worker["forced_val"]) else "train"]
        split["ids"].append(ids)   # an array per document, not one long Python list
        split["documents"] += 1
        split["bytes"] += len(raw)   # UTF-8 bytes: the denominator of bits per byte
    for split in out.values():   # one conversion to the file's dtype for the whole piece
        split["ids"] = np.concatenate(split["ids"]).astype(dtype) if split["ids"] else np.zeros(0, dtype)
    return {**out, "size": piece.size}   # size: the progress bar's measure (file bytes, not text bytes)


def run_jobs(fn, jobs, workers: int, init_args):
    """fn over jobs in order, in worker processes when workers > 1, with at most 2 jobs per worker in flight."""
    if workers <= 1:   # in this process: no pickling, and a debugger or profiler sees the work
        _init_worker(*init_args)
        yield from map(fn, jobs)
        return
    # not Pool.imap: it reads its whole input at once (every block of a compressed file) and keeps every
    # finished result behind a slow one. Here a job is sent only when an earlier result was taken.
    with multiprocessing.Pool(workers, _init_worker, init_args) as pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_name(source: str, tokenizer: str) -> str:
    path = pathlib.Path(source)
    while glob.has_magic(str(path)) and path != path.parent:  # a glob is named after its folder
        path = path.parent
    stem = source if source in ("stdlib", "shakespeare") else path.resolve().stem
    name, at, ranks = tokenizer.partition("@")
    if at:   # bpe:N@data/stdlib-bpe4096/tokenizer.tiktoken -> bpeN-from-stdlib-bpe4096
        tokenizer = f"{name}-from-{pathlib.Path(ranks).resolve().parent.name}"
    elif os.sep in tokenizer or os.path.isdir(tokenizer) and not tokenizer.startswith("bpe:"):
        tokenizer = pathlib.Path(tokenizer).resolve().name   # a released folder: its name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{tokenizer.replace(':', '')}")


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    # whole file or none (atomic.atomic_write, the one writer): a reader, or a second
    # preparation, never sees a half-written meta.json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), lambda f: f.write(data))


def learn_tokenizer(jobs, n_tokens: int, workers: int, sample_mb: float, init_args, log, quiet: bool) -> list[bytes]:
    """bpe:N's vocabulary (without EOT), learned on the training documents of the first sample_mb of pieces."""
    started, groups, size = time.time(), [], 0
    for piece in jobs:  # the first pieces in path order, so the sample is the same every time
        if size > sample_mb * 1e6:
            break
        if not groups or size > 4e6 * len(groups):  # groups of about 4 MB
            groups.append([])
        groups[-1].append(piece)
        size += piece.size
    log(f"learning bpe:{n_tokens} on the training documents of {sum(map(len, groups))} pieces ({size / 1e6:.1f} MB)")
    counts = collections.Counter()   # chunk -> count: BPE works on unique chunks, weighted
    for group_counts in run_jobs(_count_train_chunks, groups, workers, (None, None, *init_args[2:])):
        counts.update(group_counts)
    vocab, _ = learn_bpe(counts, n_tokens - 1, quiet)   # - 1: EOT is the N-th token
    log(f"learned {len(vocab) - 256} merges in {time.time() - started:.1f} s")
    return vocab


def tokenize_pieces(jobs, out, init_args, workers: int, total, quiet: bool) -> dict:
    """Write out/train.bin.tmp and val.bin.tmp; returns documents, bytes and tokens per split."""
    stats = {split: {"documents": 0, "bytes": 0, "tokens": 0} for split in ("train", "val")}
    # streamed to disk piece by piece, in order: a corpus (or a file) larger than memory still prepares
    with (tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=quiet) as bar,
          open(out / "train.bin.tmp", "wb") as train_f, open(out / "val.bin.tmp", "wb") as val_f):
        for result in run_jobs(_tokenize_piece, jobs, workers, init_args):
            for split, f in (("train", train_f), ("val", val_f)):
                f.write(result[split]["ids"].tobytes())   # raw ids, no header: np.memmap reads them back
                stats[split]["tokens"] += len(result[split]["ids"])
                for k in ("documents", "bytes"): stats[split][k] += result[split][k]
            bar.update(result["size"])
    return stats


def prepare(source: str = "stdlib", tokenizer: str = "bpe:4096", data_dir: str = "data", name: str | None = None,
            quiet: bool = False, *, workers: int = 0, bpe_sample_mb: float = 64.0, force: bool = False,
            text_field: str = "text", chunk_mb: float = 16.0) -> pathlib.Path:
    """Prepare data_dir/name/ and return it; at once if it is already prepared from this source and tokenizer."""
    started = time.time()
    cli.check_dataset(source, name)   # an empty --source, a --name outside data_dir
    log = (lambda *a: None) if quiet else print   # quiet: train.py's other ranks, and tests
    spec, given_file, n_bpe = tokenizer_source(tokenizer)
    if given_file:   # kept as an absolute path: train.py --init_from names the same folder in its own way
        tokenizer = f"{spec}@{os.path.abspath(given_file)}" if "@" in tokenizer else os.path.abspath(tokenizer)
    out = pathlib.Path(data_dir) / (name or default_name(source, tokenizer))
    if (out / "meta.json").exists() and not force:
        meta = load_meta(out)
        held = (meta["source"], meta.get("tokenizer_arg", meta["tokenizer"]), meta.get("text_field", "text"))
        if held != (source, tokenizer, text_field):   # never overwrite other data silently
            raise DataError(f"{out} holds {held[0]} with {held[1]} (text field {held[2]!r}), not {source} with "
                            f"{tokenizer} ({text_field!r}): pass another --name, or --force to overwrite it")
        if meta.get("split") == SPLIT_RULE:   # prepared already: every run after the first starts at once
            return out
        log(f"{out} was split by an older rule: preparing it again")   # made by an older data.py
    workers = workers or os.cpu_count() or 1   # cpu_count() may be None
    _, files = list_files(source, data_dir, log)
    forced_val = fallback_val_key(files, text_field)
    jobs = lambda: pieces(files, max(1, int(chunk_mb * 1e6)), text_field)  # noqa: E731  a new pass each call
    tok = dict(spec=spec, given_file=given_file, n_bpe=n_bpe, arg=tokenizer, text_field=text_field, forced_val=forced_val)
    meta, stats, seconds = build_folder(out, lambda work: _build(work, jobs, files, source, tok, workers, bpe_sample_mb, log, quiet))
    n_bytes, n_tokens = (stats["train"][k] + stats["val"][k] for k in ("bytes", "tokens"))
    log(f"prepared {out}: {stats['train']['documents'] + stats['val']['documents']:,} documents, {n_bytes / 1e6:.1f} MB, "
        f"{n_tokens:,} tokens, {stats['train']['bytes'] / max(stats['train']['tokens'], 1):.2f} bytes/token (train), "
        f"tokenized at {n_bytes / 1e6 / seconds:.1f} MB/s, {time.time() - started:.1f} s in all")
    return out


def build_folder(out: pathlib.Path, build):
    """build(work folder) beside out, then swapped in whole: -> what build returns."""
    # a failure (or Ctrl-C) leaves the old dataset whole, no partial one; a killed run's is cleared next time
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = build(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
    return result


def tokenizer_files(out, tok, jobs, workers, bpe_sample_mb, log, quiet) -> str | None:
    """The tokenizer's file in the dataset folder (learned, or copied), named as meta.json's rank_file."""
    if not (tok["n_bpe"] or tok["given_file"]):
        return None   # byte, tiktoken's named encodings: the name is the whole tokenizer
    rank_file = RELEASED_TOKENIZER if tok["spec"] == RELEASED_TOKENIZER else "tokenizer.tiktoken"
    if tok["n_bpe"]:
        init = (None, None, tok["text_field"], tok["forced_val"])
        write_rank_file(out / rank_file, learn_tokenizer(jobs(), tok["n_bpe"], workers, bpe_sample_mb, init, log, quiet))
        return rank_file
    shutil.copyfile(tok["given_file"], out / rank_file)   # the dataset is self-contained, as a learned one
    folder = pathlib.Path(tok["given_file"]).parent
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):   # a release's BOS/EOS rules go along
        if rank_file == RELEASED_TOKENIZER and (folder / extra).is_file():
            shutil.copyfile(folder / extra, out / extra)
    return rank_file


def _build(out, jobs, files, source, tok, workers, bpe_sample_mb, log, quiet):
    """The dataset in folder `out`: tokenizer, .bin files, then meta.json. -> (meta, stats, seconds)."""
    rank_file = tokenizer_files(out, tok, jobs, workers, bpe_sample_mb, log, quiet)   # relative to the folder
    rank_path = str(out / rank_file) if rank_file else None
    enc = load_tokenizer(tok["spec"], rank_path)
    tokenize_started = time.time()   # the speed reported below is the tokenizer's, without BPE learning
    # a compressed (or parquet) file's text size is known only once read: the bar then counts without a total
    total = None if any(file_format(p) in ("gz", "zst", "parquet") for p in files) else sum(p.stat().st_size for p in files)
    stats = tokenize_pieces(jobs(), out, (tok["spec"], rank_path, tok["text_field"], tok["forced_val"]), workers, total, quiet)
    tokenize_seconds = time.time() - tokenize_started
    documents = stats["train"]["documents"] + stats["val"]["documents"]
    if documents < 2:
        raise DataError(f"source {source!r} has {documents} non-empty document(s): it needs at least 2, one for validation")
    if stats["val"]["documents"] == 0:
        raise DataError(f"none of the {documents} documents of {source!r} fell in the 1% validation split: "
                        f"cut the text into more, smaller documents (e.g. one per .jsonl line)")
    for split in ("train", "val"):   # only now, with both splits checked, do the .bin files appear
        os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
    # tokenizer_sha256: the tokenizer file's hash, so that a trainer can tell that two datasets (a mixture)
    # or a dataset and a released model share one tokenizer; null where the name says it all (byte, gpt2 ...)
    sha = rank_path and hashlib.sha256(pathlib.Path(rank_path).read_bytes()).hexdigest()
    meta = {"source": source, "tokenizer": tok["spec"], "rank_file": rank_file, "vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token, "dtype": "uint16" if enc.n_vocab <= 2**16 else "uint32",
            "split_pattern": None if tok["spec"] == RELEASED_TOKENIZER else GPT4_SPLIT, "split": SPLIT_RULE,
            "tokenizer_arg": tok["arg"], "tokenizer_sha256": sha, "text_field": tok["text_field"], **stats}
    if source == "stdlib":
        meta["python"] = platform.python_version()  # the corpus changes with the Python version
    write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta, stats, tokenize_seconds


# ----------------------------------------------------------------------------- reading prepared data

def load_meta(dataset_dir) -> dict:
    """meta.json of a prepared dataset, checked."""
    path = pathlib.Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist: prepare the data first with python data.py")
    try:
        meta = json.loads(path.read_text())
        complete = (all(k in meta for k in ("source", "tokenizer", "rank_file", "vocab_size", "eot_id", "dtype"))
                    and all(isinstance(meta[split].get(k), int) for split in ("train", "val")
                            for k in ("documents", "bytes", "tokens")))
    except (ValueError, KeyError, TypeError, AttributeError):
        complete = False
    if not complete:
        raise DataError(f"{path} is not a complete data.py meta.json: prepare the data again with --force")
    # a vocabulary that outgrew its dtype would have wrapped token ids around silently
    if meta["dtype"] not in ("uint16", "uint32") or meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1:
        raise DataError(f"{path}: dtype {meta['dtype']!r} cannot hold {meta['vocab_size']} token ids")
    return meta


_open_tokens = {}  # (path, size, mtime) -> memmap: opened and checked once; a re-prepared file is opened anew


def open_tokens(bin_path) -> np.ndarray:
    """A checked, read-only memory map of a prepared train.bin or val.bin (never read whole)."""
    # the checks make a truncated or stale file one clear error instead of garbage batches
    path = pathlib.Path(bin_path).resolve()
    if not path.is_file():
        raise DataError(f"{path} does not exist: prepare the data first with python data.py")
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key in _open_tokens:
        return _open_tokens[cache_key]
    meta = load_meta(path.parent)
    if path.stem not in ("train", "val"):
        raise DataError(f"{path}: expected train.bin or val.bin next to its meta.json")
    dtype, tokens = np.dtype(meta["dtype"]), meta[path.stem]["tokens"]
    if stat.st_size != tokens * dtype.itemsize:
        raise DataError(f"{path} has {stat.st_size} bytes, but meta.json says {tokens} {dtype.name} tokens "
                        f"({tokens * dtype.itemsize} bytes): prepare the data again with --force")
    ids = np.memmap(path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype)
    for start in range(0, tokens, 1 << 24):  # checked in slices, so memory stays small
        top = int(ids[start:start + (1 << 24)].max())
        if top >= meta["vocab_size"]:
            raise DataError(f"{path} holds token id {top}, outside meta.json's vocab_size "
                            f"{meta['vocab_size']}: prepare the data again with --force")
    _open_tokens[cache_key] = ids
    return ids


def get_batch(bin_path, batch_size: int, seq_len: int, *, seed: int, step: int, rank: int = 0,
              world_size: int = 1, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows x and targets y = x shifted by one, int64 [batch_size, seq_len]."""
    # a pure function of its arguments, no loader state: resuming at a step gives the same batches,
    # and each (rank, micro_step) has its own stream
    ids = open_tokens(bin_path)
    if len(ids) < seq_len + 1:
        raise DataError(f"{bin_path} holds {len(ids)} tokens, fewer than one window of seq_len + 1 = "
                        f"{seq_len + 1}: use a shorter sequence length or more data")
    rng = np.random.default_rng([seed, step, micro_step, rank, world_size])
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)   # windows may cross documents (EOT between)
    windows = torch.from_numpy(ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def eval_windows(bin_path, seq_len: int, n_tokens: int = 0) -> torch.Tensor:
    """The fixed validation set, int64 [n, seq_len + 1] (inputs and targets shifted by one)."""
    # the whole split cut into consecutive windows (n_tokens 0), or ceil(n_tokens / seq_len) windows
    # spread evenly over it, so a sample of the split still sees every part of it
    ids = open_tokens(bin_path)
    if len(ids) < seq_len + 1:
        raise DataError(f"{bin_path} holds {len(ids)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    starts = eval_starts(len(ids), seq_len, n_tokens)
    return torch.from_numpy(ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))


def eval_starts(n_ids: int, seq_len: int, n_tokens: int = 0) -> np.ndarray:
    """Where eval_windows' windows start in a split of n_ids tokens (mixture.py reads masks at the same places)."""
    most = (n_ids - 1) // seq_len
    n = most if n_tokens <= 0 else min(most, -(-n_tokens // seq_len))   # -(-a // b): ceil in integers
    return np.arange(n) * seq_len if n == most else np.linspace(0, n_ids - seq_len - 1, n).round().astype(np.int64)


# ----------------------------------------------------------------------------- command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag help with defaults; the module docstring as written."""


FLAG_HELP = {  # one flag per prepare() argument, with prepare()'s default
    "source": "stdlib (this Python's library), shakespeare, or a local file, folder or glob of "
              ".txt/.md/.py/.jsonl/.jsonl.gz/.jsonl.zst/.parquet",
    "tokenizer": "bpe:N (N-token BPE learned on the corpus), byte, gpt2, cl100k_base, o200k_base, bpe:N@RANK_FILE "
                 "(another dataset's tokenizer.tiktoken: shared, not learned) or a released MiniCPM folder",
    "text_field": "the JSON field / parquet column holding each document's text",
    "chunk_mb": "MB of text per piece of work: memory is a few pieces per worker, whatever a file's size",
    "name": "dataset folder name; None: made from source and tokenizer, e.g. stdlib-bpe4096", "quiet": "print nothing",
    "data_dir": "prepared data goes to DATA_DIR/NAME/", "workers": "processes for reading and tokenizing (0: all cores)",
    "bpe_sample_mb": "learn bpe:N on at most this many MB of training files (the first ones in path order)",
    "force": "prepare again even if NAME is already prepared"}


def parse_args(argv=None) -> dict:
    """prepare()'s arguments from the command line (an unknown flag names the closest one)."""
    parser = cli.Parser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    # the flags are prepare()'s arguments, so the command line and the function cannot drift apart
    for name, param in inspect.signature(prepare).parameters.items():
        if param.default is False:
            parser.add_argument("--" + name, action="store_true", help=FLAG_HELP[name])
        else:
            kind = str if param.default is None else type(param.default)
            parser.add_argument("--" + name, type=kind, default=param.default, help=FLAG_HELP[name])
    args = cli.parse(parser, argv)
    cli.check([(args["workers"] < 0, "--workers must be >= 0 (0: every core)"),
               (not args["bpe_sample_mb"] > 0, "--bpe_sample_mb must be > 0"),
               (not args["chunk_mb"] > 0, "--chunk_mb must be > 0"), (not args["text_field"], "--text_field must not be empty")])
    return args


def main(argv=None):
    return cli.main("data.py", lambda a: prepare(**parse_args(a)) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
