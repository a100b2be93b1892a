"""The tokenizers of data.py: bytes, a byte-level BPE learned on the corpus (bpe:N, written as a
tiktoken rank file), and tiktoken's named encodings. Every one ends its vocabulary with <|endoftext|>,
the document separator; tiktoken does the encoding, so a learned BPE encodes at tiktoken's speed.

Hugging Face folders, both ways: `load_folder_tokenizer` reads a folder's tokenizer (our export's
tokenizer_record.json, else a released MiniCPM's tokenizer.json through the optional `tokenizers`
package), and `write_hf_tokenizer` writes ours as tokenizer.json, which transformers' AutoTokenizer reads.
`tokenizer_source` reads data.py's --tokenizer (a name, bpe:N@RANK_FILE, or a folder); `encode_documents`
frames each document as the tokenizer's model expects (BOS where a release adds it, then end-of-text).
"""
import base64
import collections
import heapq
import json
import os
import pathlib
import re

import numpy as np
import regex
import tiktoken.load  # also binds tiktoken
from tqdm import tqdm

from atomic import atomic_write
from cli import DataError

EOT = "<|endoftext|>"
# GPT-4's pre-split (tiktoken's cl100k_base pattern): contractions, words with one leading non-letter,
# numbers of up to 3 digits, punctuation runs, newlines, and whitespace that is not before a word.
GPT4_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# A checkpoint's record of a released tokenizer.json (dpo.py --hf on a released folder): the file,
# with tokenizer_config.json, is copied beside the checkpoint as a rank file is.
RELEASED_TOKENIZER = "tokenizer.json"
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
    atomic_write(str(path), lambda f: f.write(text.encode()))   # written whole, then renamed: never half a rank file


def parse_tokenizer(spec: str) -> int | None:
    """Validate a tokenizer spec; returns N for bpe:N, else None."""
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or not 257 <= int(n) <= 2**31:   # 256 bytes + EOT at least
            raise DataError(f"tokenizer {spec!r}: N in bpe:N must be an integer from 257 up, e.g. bpe:4096")
        return int(n)
    if spec in ("byte", RELEASED_TOKENIZER) or spec in TIKTOKEN_NAMES:
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
    if spec == RELEASED_TOKENIZER:   # a released folder's tokenizer.json, recorded by dpo.py: its folder holds it
        return FolderTokenizer(os.path.dirname(rank_file or "."))
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


# ----------------------------------------------------------------------------- Hugging Face folders

def byte_unicode_map() -> dict[int, str]:
    """GPT-2's byte -> character map: how byte-level tokenizer.json files spell token bytes as text."""
    # printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) move past 255, so no
    # token string holds whitespace, and a merge line "a b" splits unambiguously at its one space
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def read_json(path, default=None):
    """A JSON file's contents, default when it is absent; a broken file is a one-line DataError."""
    if default is not None and not os.path.isfile(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}): restore the file from its release") from None


def token_text(entry):
    """A special token as tokenizer_config.json writes it: "<s>", or {"content": "<s>", ...} (or null)."""
    return entry.get("content") if isinstance(entry, dict) else entry


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # sentencepiece's byte-fallback pieces, e.g. <0xE4>


class FolderTokenizer:
    """A folder's tokenizer.json with the interface of a tiktoken Encoding (what sample.py and dpo.py call).

    Released MiniCPM folders hold sentencepiece BPE converted to tokenizer.json: "▁" for spaces, a dummy
    "▁" before the text, <0xE4>-style pieces for bytes the vocabulary lacks (byte fallback), <s> (BOS)
    before every text. The `tokenizers` package runs the file itself, whichever normalizer/pre-tokenizer
    its conversion chose; this class adds BOS as tokenizer_config.json asks and maps ids to bytes.
    """

    def __init__(self, folder):
        path = os.path.join(folder, "tokenizer.json")
        try:
            import tokenizers   # optional: only released folders need it, so it is imported here
        except ImportError:
            raise DataError(f"{path} needs the tokenizers package: pip install tokenizers") from None
        spec = read_json(path)
        try:
            self.tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as e:   # the Rust side raises plain Exceptions with multi-line messages
            raise DataError(f"{path} is not a tokenizer the tokenizers package can read ({type(e).__name__}): "
                            f"restore it from the release or upgrade tokenizers") from None
        # tokenizer_config.json overrides special_tokens_map.json, as in transformers
        config = {**read_json(os.path.join(folder, "special_tokens_map.json"), {}),
                  **read_json(os.path.join(folder, "tokenizer_config.json"), {})}
        self.name, self.n_vocab = os.path.basename(os.path.abspath(folder)), self.tok.get_vocab_size(with_added_tokens=True)
        added = self.tok.get_added_tokens_decoder()
        self.specials = {i for i, t in added.items() if t.special}   # control tokens: no text of their own
        self.added = {i: t.content for i, t in added.items()}
        # EOS ends a sample (sample.py stops there); "</s>" is sentencepiece's default when no file names one
        self.eot_token = self.tok.token_to_id(token_text(config.get("eos_token")) or "</s>")
        if self.eot_token is None:
            raise DataError(f"{folder} names no end-of-text token in its vocabulary: its tokenizer_config.json needs eos_token")
        bos = token_text(config.get("bos_token"))
        self.bos_token = self.tok.token_to_id(bos) if bos else None
        # LlamaTokenizer(Fast) adds BOS unless told not to; other classes (ours) add nothing by default
        llama = str(config.get("tokenizer_class", "")).startswith("Llama")
        self.add_bos = bool(config.get("add_bos_token", llama)) and self.bos_token is not None
        self.add_eos = bool(config.get("add_eos_token", False))
        # byte-level files spell bytes with GPT-2's map; sentencepiece-style ones with "▁" and <0x..> pieces
        pipeline = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")], ensure_ascii=False)
        self.byte_level = '"ByteLevel"' in pipeline
        self.unbyte = {c: b for b, c in byte_unicode_map().items()}
        space = re.search(r'"replacement": "(.)"', pipeline)   # a Metaspace's space mark, "▁" in every release
        self.space = space[1] if space else "▁"

    def frame(self, ids):
        """BOS (and EOS) around a text's ids, as the folder's config asks."""
        return [self.bos_token] * self.add_bos + ids + [self.eot_token] * self.add_eos

    def encode(self, text, allowed_special=None):
        """Text -> ids with BOS (when the release adds it)."""
        # special tokens written in the text (e.g. "</s>") are read as those tokens, as transformers does;
        # allowed_special is tiktoken's switch for that, taken so that callers treat both kinds alike
        return self.frame(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_ordinary(self, text):
        """The text alone, as tiktoken's encode_ordinary: no BOS, and special-token text is plain text."""
        self.tok.encode_special_tokens = True   # "</s>" in a text is then the characters, not EOS
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids):
        """Ids -> text without the control tokens; the file's decoder also drops the dummy leading space."""
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_single_token_bytes(self, token):
        """One token's bytes, so that a stream of tokens can be decoded as UTF-8 piece by piece."""
        # a byte-fallback character arrives as several one-byte tokens: each alone is no text, only bytes
        piece = self.tok.id_to_token(token)
        if piece is None:
            raise KeyError(token)   # what tiktoken raises for an id outside its vocabulary
        if token in self.specials:
            return b""   # BOS/EOS/unk are markers, not text (decode skips them too)
        if token in self.added:
            return piece.encode()   # added tokens are stored as their text, in either kind of file
        if self.byte_level:
            return bytes(self.unbyte[c] for c in piece)
        byte = BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte[1], 16)]) if byte else piece.replace(self.space, " ").encode()


def folder_tokenizer(folder):
    """-> (spec, rank file path or None) of a Hugging Face folder's tokenizer: ours (tokenizer_record.json)
    or a release's tokenizer.json (spec RELEASED_TOKENIZER)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder: give a Hugging Face checkpoint folder")
    # our export names a tokenizer spec and a rank file: tiktoken builds it, exactly as in training
    record = os.path.join(folder, "tokenizer_record.json")
    if os.path.isfile(record):
        rec = read_json(record)
        try:
            spec, rank_file = rec["spec"], rec["rank_file"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{record} is not a tokenizer record ({type(e).__name__}): it needs spec and rank_file") from None
        return spec, rank_file and os.path.join(folder, rank_file)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return RELEASED_TOKENIZER, os.path.join(folder, "tokenizer.json")
    # sentencepiece's own format would need the sentencepiece package; the releases ship both files
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise DataError(f"{folder} holds only a sentencepiece tokenizer.model, not supported alone: copy the release's "
                        f"tokenizer.json beside it (the released MiniCPM folders ship one) or pass --tokenizer NAME[@RANK_FILE]")
    raise DataError(f"{folder} has no tokenizer_record.json or tokenizer.json: pass --tokenizer NAME[@RANK_FILE]")


def load_folder_tokenizer(folder):
    """The tokenizer of a Hugging Face folder (folder_tokenizer's), ready to encode."""
    spec, rank_file = folder_tokenizer(folder)
    return FolderTokenizer(folder) if spec == RELEASED_TOKENIZER else load_tokenizer(spec, rank_file)


def tokenizer_source(tokenizer: str) -> tuple[str, str | None, int | None]:
    """--tokenizer -> (spec as load_tokenizer takes it, a file to copy into the dataset, N of a bpe:N to learn)."""
    name, at, ranks = tokenizer.partition("@")
    if at:   # another dataset's merges: datasets meant to be mixed must share one tokenizer
        if not parse_tokenizer(name):
            raise DataError(f"--tokenizer {tokenizer}: only bpe:N takes @RANK_FILE, "
                            f"e.g. bpe:4096@data/stdlib-bpe4096/tokenizer.tiktoken")
        load_tokenizer(name, ranks)   # a missing file, or one of another size, fails here before any work
        return name, ranks, None
    if tokenizer in ("byte", *TIKTOKEN_NAMES) or tokenizer.startswith("bpe:"):   # names first: a folder "byte" is not it
        n = parse_tokenizer(tokenizer)
        if not n:
            load_tokenizer(tokenizer)  # a named tiktoken encoding fails here, offline, before any work
        return tokenizer, None, n
    if os.path.isdir(tokenizer):   # a released MiniCPM folder's tokenizer.json (or our export's record)
        spec, file = folder_tokenizer(tokenizer)
        FolderTokenizer(tokenizer) if spec == RELEASED_TOKENIZER else load_tokenizer(spec, file)   # readable?
        return spec, file, None
    raise DataError(f"unknown tokenizer {tokenizer!r}: use bpe:N (e.g. bpe:4096), byte, {', '.join(TIKTOKEN_NAMES)}, "
                    f"bpe:N@RANK_FILE, or a released MiniCPM folder (holding tokenizer.json)")


def encode_documents(enc, texts: list[str]):
    """Each document's ids followed by the end-of-text token (a list per document, yielded in order);
    a released tokenizer's BOS before them, if it adds one."""
    # yielded, not returned as one list: a piece's ids as Python ints take ~36 bytes a token
    if not isinstance(enc, FolderTokenizer):
        # tiktoken straight into a numpy array (30% faster than encode_ordinary's list); no special tokens
        # allowed, none disallowed: "<|endoftext|>" in a text is plain text, exactly as encode_ordinary
        eot = np.array([enc.eot_token], np.uint32)
        for text in texts:
            yield np.concatenate([enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()), eot])
        return
    enc.tok.encode_special_tokens = True   # "</s>" written in a text is characters, as encode_ordinary has it
    start = size = 0
    for i, text in enumerate(texts):   # the batch encoder (Rust, no offsets kept) on ~1 MB at a time
        size += len(text)
        if size > 1 << 20 or i == len(texts) - 1:
            for e in enc.tok.encode_batch_fast(texts[start:i + 1], add_special_tokens=False):
                yield [enc.bos_token] * enc.add_bos + e.ids + [enc.eot_token]
            start, size = i + 1, 0


def check_tokenizer(meta, record, where) -> None:
    """A model's tokenizer (its checkpoint's record) must be the data's: the same ids for the same text."""
    # a released folder's record carries its tokenizer.json's hash; older ckpt.pt records have none, and
    # the vocabulary size (train.py) is all that can be compared for them
    want = (record or {}).get("sha256")
    if want and meta.get("tokenizer_sha256") != want:
        raise DataError(f"the data was prepared with {meta.get('tokenizer_arg', meta['tokenizer'])}, not with the "
                        f"tokenizer of {where}: prepare it with --tokenizer {where}")


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that makes a merges-based BPE (Hugging Face's) encode as tiktoken does with ranks."""
    # tiktoken keeps only ranks and merges any adjacent pair whose concatenation is a token, lowest rank
    # first. A token's own merge is found by BPE on its bytes with the lower ranks only: that ends in two
    # parts. Every other split of the token into two tokens is listed right after: tiktoken merges those
    # too (learn_bpe lets two merges spell one token), and at the same rank.
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)   # the leftmost lowest, as tiktoken
            if pair_ranks[i] >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise DataError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens: not a BPE")
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        merges += [tuple(parts)] + [s for s in splits if s != tuple(parts) and s[0] in ranks and s[1] in ranks]
    return merges


def atomic_write_json(path, obj):
    # written whole, then renamed (atomic.py): a reader never sees half a file
    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")))


def write_hf_tokenizer(folder, enc: tiktoken.Encoding) -> None:
    """tokenizer.json + tokenizer_config.json for our bpe:N or byte tokenizer, for transformers' AutoTokenizer."""
    if enc.name != "byte" and not re.fullmatch(r"bpe\d+", enc.name):
        raise DataError(f"only this project's tokenizers (bpe:N, byte) can be exported, not {enc.name!r}")
    specials = sorted((enc.encode_single_token(text), text) for text in enc.special_tokens_set)   # [(id, EOT)]
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in dict(specials)}
    spell = byte_unicode_map()
    text = lambda token: "".join(spell[b] for b in token)   # noqa: E731  token bytes as tokenizer.json spells them
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)
    spec = dict(
        version="1.0", truncation=None, padding=None,
        added_tokens=[dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=True) for i, t in specials],
        normalizer=None,
        # the same pre-split as tiktoken (merges never cross a chunk), then bytes -> GPT-2's characters
        pre_tokenizer=dict(type="Sequence", pretokenizers=[
            dict(type="Split", pattern=dict(Regex=GPT4_SPLIT), behavior="Isolated", invert=False), byte_level]),
        post_processor=None,   # no BOS: our models never saw one
        decoder=byte_level,
        # ignore_merges: a chunk that is a whole token is that token, as tiktoken looks chunks up first
        model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                   fuse_unk=False, byte_fallback=False, ignore_merges=True,
                   vocab={text(t): i for t, i in ranks.items()},
                   merges=[f"{text(a)} {text(b)}" for a, b in recover_merges(ranks)]))
    eot = dict(specials)[enc.eot_token]
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=None, eos_token=eot, unk_token=None,
                  add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,   # keep " ." as is
                  added_tokens_decoder={str(i): dict(content=t, special=True, normalized=False, lstrip=False,
                                                     rstrip=False, single_word=False) for i, t in specials})
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "tokenizer.json"), spec)
    atomic_write_json(os.path.join(folder, "tokenizer_config.json"), config)
