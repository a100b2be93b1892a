"""The tokenizers of data.py: bytes, a byte-level BPE learned on the corpus (bpe:N, written as a
tiktoken rank file), and tiktoken's named encodings. Every one ends its vocabulary with <|endoftext|>,
the document separator; tiktoken does the encoding, so a learned BPE encodes at tiktoken's speed.
"""
import base64
import collections
import heapq
import os
import pathlib

import regex
import tiktoken.load  # also binds tiktoken
from tqdm import tqdm

from cli import DataError

EOT = "<|endoftext|>"
# GPT-4's pre-split (tiktoken's cl100k_base pattern): contractions, words with one leading non-letter,
# numbers of up to 3 digits, punctuation runs, newlines, and whitespace that is not before a word.
GPT4_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
TIKTOKEN_NAMES = ("gpt2", "cl100k_base", "o200k_base")   # tiktoken's own encodings, downloaded on first use


# ----------------------------------------------------------------------------- byte-level BPE

split_chunks = regex.compile(GPT4_SPLIT).findall  # text -> GPT-4-style chunks; merges never cross them


def merge_pair(tokens: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each (a, b) by new, left to right, without overlaps ("aaa" with (a, a) -> [aa, a])."""
    out, i = [], 0
    while i < len(tokens):
        merge = tokens[i] == a and i + 1 < len(tokens) and tokens[i + 1] == b   # a plain loop: chunks are short
        out.append(new if merge else tokens[i])
        i += 2 if merge else 1
    return out


def learn_bpe(chunk_counts: dict[str, int], n_tokens: int, quiet: bool = True):
    """Merge until there are n_tokens tokens (bpe:N adds EOT); returns (token bytes by rank, merged pairs)."""
    # Each step merges the most frequent adjacent pair (ties: the smallest pair of ids). Work is done once
    # per unique chunk, weighted by its count; after a merge only the chunks holding the pair are re-counted,
    # and a lazy max-heap finds the next pair: each changed count is pushed anew, and stale entries skipped.
    vocab = [bytes([b]) for b in range(256)]   # byte-level: the 256 bytes first, so any text is encodable
    rank = {token: i for i, token in enumerate(vocab)}
    chunks, weights = [list(chunk.encode()) for chunk in chunk_counts], list(chunk_counts.values())
    pair_counts = collections.defaultdict(int)
    chunks_with = collections.defaultdict(set)  # pair -> chunks that hold (or once held) it
    for i, tokens in enumerate(chunks):
        for pair in zip(tokens, tokens[1:]):
            pair_counts[pair] += weights[i]
            chunks_with[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]   # heapq is a min-heap: counts negated
    heapq.heapify(heap)
    merges, bar = [], tqdm(total=n_tokens - len(vocab), desc="learning BPE", unit="merge", disable=quiet)
    while len(vocab) < n_tokens and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:  # stale: a newer entry holds its current count
            continue
        a, b = pair
        token = vocab[a] + vocab[b]
        if token not in rank:  # should two merges spell the same bytes, they share one token
            rank[token] = len(vocab)
            vocab.append(token)
            bar.update()
        new, changed = rank[token], set()
        merges.append(pair)
        for i in chunks_with.pop(pair):
            old_tokens = chunks[i]
            new_tokens = merge_pair(old_tokens, a, b, new)
            if len(new_tokens) == len(old_tokens):
                continue
            for p in zip(old_tokens, old_tokens[1:]):
                pair_counts[p] -= weights[i]
                changed.add(p)
            for p in zip(new_tokens, new_tokens[1:]):
                pair_counts[p] += weights[i]
                chunks_with[p].add(i)
                changed.add(p)
            chunks[i] = new_tokens
        del pair_counts[pair]   # merged everywhere: it cannot occur again
        for p in changed:
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    bar.close()
    if len(vocab) < n_tokens:
        raise DataError(f"the training text has too few distinct pairs for more than bpe:{len(vocab) + 1}: "
                        f"use a smaller bpe:N or more text")
    return vocab, merges


def write_rank_file(path: pathlib.Path, vocab: list[bytes]) -> None:
    """tiktoken's rank-file format: one 'base64(token bytes) rank' line per token."""
    # tiktoken re-derives the merges from the ranks: a pair's merge is the rank of their concatenation
    text = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(vocab))
    tmp = pathlib.Path(str(path) + ".tmp")   # written whole, then renamed: never half a rank file
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_tokenizer(spec: str) -> int | None:
    """Validate a tokenizer spec; returns N for bpe:N, else None."""
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or not 257 <= int(n) <= 2**31:   # 256 bytes + EOT at least
            raise DataError(f"tokenizer {spec!r}: N in bpe:N must be an integer from 257 up, e.g. bpe:4096")
        return int(n)
    if spec == "byte" or spec in TIKTOKEN_NAMES:
        return None
    raise DataError(f"unknown tokenizer {spec!r}: use bpe:N (e.g. bpe:4096), byte, {', '.join(TIKTOKEN_NAMES)}")


def read_rank_file(path) -> dict[bytes, int]:
    """A rank file read here, not with tiktoken.load: tiktoken caches every file it loads in a temp
    folder keyed by the path's *name*, so a dataset prepared again at the same path (or another
    checkout's data/stdlib-bpe4096/) would silently get the old merges back."""
    with open(path, "rb") as f:
        pairs = [line.split() for line in f.read().splitlines() if line.strip()]
    try:
        return {base64.b64decode(token): int(rank) for token, rank in pairs}
    except ValueError:
        raise DataError(f"{path} is not a tiktoken rank file (base64 token, rank per line): prepare the data again") from None


def load_tokenizer(spec: str, rank_file: str | None = None) -> tiktoken.Encoding:
    """A tiktoken Encoding for spec that knows EOT; bpe:N reads its merges from rank_file."""
    n = parse_tokenizer(spec)
    if spec in TIKTOKEN_NAMES:
        try:
            return tiktoken.get_encoding(spec)
        except Exception as e:  # tiktoken raises whatever its HTTP client raised
            raise DataError(f"could not load tiktoken's {spec!r} ({type(e).__name__}): it is downloaded on first "
                            f"use, so connect once or set TIKTOKEN_CACHE_DIR to a cache holding it; "
                            f"offline, use bpe:4096 or byte") from None
    if spec != "byte" and (rank_file is None or not os.path.isfile(rank_file)):
        raise DataError(f"tokenizer {spec!r} needs its rank file, and {rank_file!r} is not a file: "
                        f"prepare the data again or pass the tokenizer.tiktoken saved beside it")
    ranks = {bytes([b]): b for b in range(256)} if spec == "byte" else read_rank_file(rank_file)
    if n and len(ranks) != n - 1:   # n is None for byte
        raise DataError(f"{rank_file} holds {len(ranks)} tokens, but {spec} needs {n - 1} (+ EOT)")
    # EOT gets the id after the last rank, so vocab_size = ranks + 1
    return tiktoken.Encoding(spec.replace(":", ""), pat_str=GPT4_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
