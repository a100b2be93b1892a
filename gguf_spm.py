"""A released tokenizer.json (a MiniCPM folder's: SentencePiece BPE converted by Hugging Face) as the
vocabulary of export.py's --gguf file: llama.cpp's "llama" tokenizer model (llm_tokenizer_spm).

llama.cpp's SentencePiece tokenizer has no merge list. It splits the text into UTF-8 characters (after
" " -> "▁", and one "▁" in front when add_space_prefix says so), then repeatedly joins the adjacent pair
whose concatenation is a vocabulary piece of the HIGHEST score (ties: the leftmost pair); a character
that is no piece becomes its bytes' <0xXX> pieces. tokenizer.json's BPE instead joins the adjacent pair
of the LOWEST merge rank (ties: leftmost). So each piece is given the score -(rank of the first merge
that makes it): the two orders then agree wherever these checks pass (see check_merges):
  - the merges that make one piece are consecutive in the list. Hugging Face's SentencePiece converter
    writes them so: it lists every split of every piece into two pieces, sorted by the piece's score,
    and in a SentencePiece BPE model each merged piece has a score of its own;
  - every split that llama.cpp could join is a merge of the file (it joins ANY pair spelling a piece).
A file failing either (say one trained by the tokenizers package's BpeTrainer, which lists one merge a
piece), or one whose normalizer or pre-tokenizer llama.cpp has no twin for, is refused in one line.
"""
import json
import re

from cli import UsageError

SPACE = "▁"   # SentencePiece's space mark, which llama.cpp writes for " " (llama_escape_whitespace)
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")   # byte-fallback pieces, spelled as llama.cpp looks them up
# llama.cpp's token types (gguf.TokenType): what its loader and special-token splitter read
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def refuse(path, why):
    raise UsageError(f"--gguf: the released tokenizer {path} {why}: it cannot be written as llama.cpp's "
                     "SentencePiece vocabulary (export without --gguf, and convert with llama.cpp's own tools)")


def read_model(path):
    """tokenizer.json -> its parsed JSON, once its model is a byte-fallback BPE llama.cpp's SPM can run."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        refuse(path, f"is a {model.get('type')} model, not BPE")
    if not model.get("byte_fallback"):   # a byte-level BPE (GPT-2 style) spells bytes as characters
        refuse(path, "has no byte_fallback (a byte-level BPE, not SentencePiece-style)")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        refuse(path, "uses dropout or word prefixes/suffixes")
    if model.get("ignore_merges"):   # whole-word lookup first: llama.cpp always merges pair by pair
        refuse(path, "sets ignore_merges")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:   # llama.cpp's byte_to_token must find every byte of an unknown character
        refuse(path, f"lacks byte pieces ({missing[0]}...)")
    return spec


def space_prefix(path, spec):
    """-> (add_space_prefix, note or None): whether the file puts a "▁" before the text, as llama.cpp would."""
    # two conversions exist: older files normalize (Prepend "▁", Replace " " -> "▁") and pre-split
    # nothing; newer ones do both in a Metaspace pre-tokenizer. llama.cpp does exactly the first.
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    prepend = {"type": "Prepend", "prepend": SPACE} in steps
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE} in steps
    if len(steps) != prepend + replace:
        refuse(path, f"has a normalizer llama.cpp does not run ({json.dumps(norm)[:60]})")
    if pre is None and replace:
        return prepend, None
    if pre is None:   # spaces left as " ": llama.cpp would see "▁" where the file saw " "
        refuse(path, "writes no space as '▁' (neither a Replace normalizer nor a Metaspace pre-tokenizer)")
    if pre.get("type") != "Metaspace" or steps or pre.get("replacement") != SPACE:
        refuse(path, f"has a pre-tokenizer llama.cpp does not run ({json.dumps(pre)[:60]})")
    if pre.get("split", False):   # it would cut words at "▁": pieces with an inner "▁" are then never made
        inner = [p for p in spec["model"]["vocab"] if SPACE in p[1:]]
        if inner:
            refuse(path, f"splits at spaces, yet has pieces with an inner space ({inner[0]!r})")
    scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
    if scheme == "never":
        return False, None
    # Metaspace puts no "▁" before a text that begins with one (a space), nor ("first") after a special token
    # typed in the text; llama.cpp adds it in both places, as the older normalizer and SentencePiece do
    return True, ("a text that begins with a space, or text after a special token typed in it, gets one more "
                  "'▁' in llama.cpp than in this tokenizer.json (its Metaspace pre-tokenizer)")


def merge_scores(path, spec, added):
    """-> {piece: score}: -(rank of its first merge) for each piece a merge makes."""
    vocab = spec["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    first, pairs, last = {}, set(), None
    for rank, (a, b) in enumerate(merges):
        piece = a + b
        pairs.add((a, b))
        # a piece made again after another piece's merge: its two merges would need two scores. Added
        # tokens are left out: both tokenizers cut them out of the text before merging anything
        if piece in first and piece != last and piece not in added:
            refuse(path, f"makes {piece[:20]!r} by merges {first[piece]} and {rank}, with others between them")
        first.setdefault(piece, rank)
        last = piece
    check_splits(path, vocab, pairs, added)
    # Between one piece's own merges llama.cpp takes the leftmost pair, tokenizers the lower rank. That
    # matters only for two overlapping pairs spelling the same piece ([x][y][z], x+y == y+z), where
    # llama.cpp decides as SentencePiece itself does; the converter's file may not (not checked here)
    return {piece: float(-rank) for piece, rank in first.items()}


def check_splits(path, vocab, pairs, added):
    """Every split of a piece into two joinable parts is a merge: llama.cpp joins any pair that spells a piece."""
    # joinable: a piece, or a single character (an unknown one too: llama.cpp keeps it whole until the end)
    for piece in vocab:
        if piece in added or BYTE_PIECE.fullmatch(piece):
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if (a in vocab or len(a) == 1) and (b in vocab or len(b) == 1) and (a, b) not in pairs:
                refuse(path, f"does not merge {a[:20]!r} + {b[:20]!r}, which spell its piece {piece[:40]!r} (llama.cpp would)")


def vocabulary(path, enc, vocab_size):
    """-> dict of what write() puts in the file, every refusal raised before it is written."""
    spec = read_model(path)
    if vocab_size < enc.n_vocab:   # the file's vocabulary is the embedding's rows: a token past them has none
        refuse(path, f"has {enc.n_vocab} tokens, more than the model's {vocab_size} embedding rows")
    add_space, note = space_prefix(path, spec)
    decoder = enc.tok.get_added_tokens_decoder()   # {id: AddedToken}: content, special
    added = {t.content for t in decoder.values()}
    scores = merge_scores(path, spec, added)
    unk = spec["model"].get("unk_token")
    # pieces no merge makes (characters, bytes, specials) are never a joined pair's score in llama.cpp:
    # one score below every merged piece, as SentencePiece ranks single characters last
    floor = -float(len(spec["model"]["merges"]) + 1)
    tokens, types, token_scores = [], [], []
    for i in range(vocab_size):
        piece = enc.tok.id_to_token(i) if i < enc.n_vocab else None
        if piece is None:   # rows of the embedding past the tokenizer (a padded vocabulary): never produced
            tokens.append(f"[PAD{i}]"), types.append(UNUSED), token_scores.append(floor)
            continue
        if piece == unk:
            kind = UNKNOWN
        elif i in decoder:   # <s>, </s> are control (never text); other added tokens are cut out as text
            kind = CONTROL if decoder[i].special else USER_DEFINED
        else:
            kind = BYTE if BYTE_PIECE.fullmatch(piece) else NORMAL
        tokens.append(piece), types.append(kind), token_scores.append(scores.get(piece, floor))
    return dict(tokens=tokens, types=types, scores=token_scores, add_space_prefix=add_space, note=note,
                bos=enc.bos_token, eos=enc.eot_token, unk=enc.tok.token_to_id(unk) if unk else None,
                add_bos=enc.add_bos, add_eos=enc.add_eos)


def write(w, v):
    """The tokenizer keys of a GGUFWriter w from vocabulary()'s v: llama.cpp's "llama" (SPM) tokenizer."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")   # no pre-split: the SPM tokenizer merges across the whole text
    w.add_token_list(v["tokens"])
    w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)):
        if v[key] is not None:   # absent: llama.cpp's SPM defaults (1, 2, 0), never used without the token
            add(v[key])
    w.add_add_bos_token(v["add_bos"])   # as the folder's tokenizer_config.json: MiniCPM adds <s>
    w.add_add_eos_token(v["add_eos"])
    w.add_add_space_prefix(v["add_space_prefix"])
