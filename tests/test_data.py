"""Tests for data.py: the BPE trainer against a naive one, preparation, the split, the loader, downloads, errors."""
import collections
import http.server
import json
import pathlib
import random
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import data  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is was for on that with as by at from this be are it or an def return "
         "class import self None True while if else elif print value index count lambda yield").split()


def make_text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS) if rng.random() < 0.9 else str(rng.randrange(10000)))
        if rng.random() < 0.12:
            lines.append(" " * rng.choice((0, 4, 8)) + " ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)]) + "\n"


def make_corpus(folder: pathlib.Path, n_files: int, seed: int = 0, start: int = 0) -> dict[str, str]:
    """n_files small text files with distinct contents; returns {relative path: text}."""
    rng, texts = random.Random(seed), {}
    for i in range(start, start + n_files):
        rel = f"sub{i % 3}/doc{i:04d}.txt"
        texts[rel] = f"document {i}\n" + make_text(rng, 40)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(texts[rel])
    return texts


def decoded_documents(dataset: pathlib.Path, split: str) -> list[str]:
    """A split's documents, read back from its .bin independently of get_batch."""
    meta = json.loads((dataset / "meta.json").read_text())
    ids = np.fromfile(dataset / f"{split}.bin", dtype=meta["dtype"]).tolist()
    rank_file = dataset / meta["rank_file"] if meta["rank_file"] else None
    enc = data.load_tokenizer(meta["tokenizer"], str(rank_file) if rank_file else None)
    docs, current = [], []
    for token in ids:
        if token == meta["eot_id"]:
            docs.append(enc.decode(current))
            current = []
        else:
            current.append(token)
    assert current == [], "every document ends with EOT"
    return docs


# ----------------------------------------------------------------------------- pre-split and BPE

def test_split_chunks_matches_hand_worked_gpt4_split():
    assert data.split_chunks("Hello world's  12345\n\n\tx = 1") == \
        ["Hello", " world", "'s", " ", " ", "123", "45", "\n\n", "\tx", " =", " ", "1"]
    assert data.split_chunks("I'LL don't!!  \r\nfoo") == ["I", "'LL", " don", "'t", "!!", "  \r\n", "foo"]
    assert data.split_chunks("    def f(x):\n        return x\n") == \
        ["   ", " def", " f", "(x", "):\n", "       ", " return", " x", "\n"]


def naive_bpe(chunks: list[str], n_tokens: int):
    """Reference trainer: every occurrence kept, all pairs recounted from scratch before each merge."""
    words = [list(c.encode()) for c in chunks]
    vocab, merges = [bytes([b]) for b in range(256)], []
    while len(vocab) < n_tokens:
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent, then smallest ids
        token = vocab[best[0]] + vocab[best[1]]
        if token not in vocab:
            vocab.append(token)
        new = vocab.index(token)
        merges.append(best)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return vocab, merges


@pytest.mark.parametrize("kind", ["words", "tiny alphabet"])
def test_bpe_trainer_equals_naive_reference_merge_for_merge(kind):
    rng = random.Random(1)
    if kind == "words":
        text = make_text(rng, 1500) + "aaaaaaa bbbb aaa ééé 😀😀"
    else:  # few symbols, long runs: many ties and overlapping pairs like (a, a) in "aaa"
        text = " ".join("".join(rng.choice("ab") for _ in range(rng.randrange(1, 9))) for _ in range(400))
    chunks = data.split_chunks(text)
    n_tokens = 256 + (120 if kind == "words" else 60)
    counts = {}
    for c in chunks:
        counts[c] = counts.get(c, 0) + 1
    vocab, merges = data.learn_bpe(counts, n_tokens)
    ref_vocab, ref_merges = naive_bpe(chunks, n_tokens)
    assert merges == ref_merges
    assert vocab == ref_vocab
    assert len(vocab) == n_tokens == len(set(vocab))


def test_bpe_that_the_corpus_cannot_reach_is_an_error():
    with pytest.raises(data.DataError, match="smaller bpe:N"):
        data.learn_bpe({"ab": 3, "cd": 1}, 300)


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    make_corpus(root / "corpus", 120)
    return data.prepare(str(root / "corpus"), "bpe:400", data_dir=str(root / "data"), quiet=True, workers=2)


def test_rank_file_is_tiktoken_format_and_round_trips_unicode(bpe_dataset):
    meta = data.load_meta(bpe_dataset)
    rank_file = bpe_dataset / "tokenizer.tiktoken"
    ranks = tiktoken.load.load_tiktoken_bpe(str(rank_file))  # tiktoken's own reader
    assert len(ranks) == 399 and sorted(ranks.values()) == list(range(399))
    assert all(ranks[bytes([b])] == b for b in range(256))
    enc = data.load_tokenizer("bpe:400", str(rank_file))
    assert enc.n_vocab == meta["vocab_size"] == 400
    assert enc.encode(data.EOT, allowed_special="all") == [meta["eot_id"]] == [399]
    rng = random.Random(2)
    samples = ["", "\x00\r\n\t", "naïve café 你好 😀 e\u0301 \u2028 \U0010ffff", make_text(rng, 200)]
    for _ in range(30):  # arbitrary code points (surrogates cannot be encoded as UTF-8)
        samples.append("".join(chr(c) for c in (rng.randrange(0x110000) for _ in range(60))
                               if not 0xD800 <= c < 0xE000))
    for s in samples:
        assert enc.decode(enc.encode_ordinary(s)) == s
    in_domain = make_text(rng, 300)
    assert len(enc.encode_ordinary(in_domain)) < len(in_domain.encode()) / 2  # the merges compress
    # tiktoken's Rust regex splits exactly like data.split_chunks: encoding piecewise changes nothing
    assert enc.encode_ordinary(samples[3]) == [t for c in data.split_chunks(samples[3]) for t in enc.encode_ordinary(c)]


def test_byte_tokenizer_is_the_bytes_plus_eot():
    enc = data.load_tokenizer("byte")
    s = "héllo 😀\n"
    assert enc.encode_ordinary(s) == list(s.encode())
    assert enc.n_vocab == 257 and enc.eot_token == 256


# ----------------------------------------------------------------------------- preparing

def test_prepare_reproduces_the_documents_and_is_byte_identical(tmp_path):
    texts = make_corpus(tmp_path / "corpus", 150)
    (tmp_path / "corpus" / "empty.py").write_text("")
    (tmp_path / "corpus" / "ignored.csv").write_text("a,b\n")
    a = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path / "d"), name="a", quiet=True, workers=1)
    b = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path / "d"), name="b", quiet=True, workers=2)
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    train, val = decoded_documents(a, "train"), decoded_documents(a, "val")
    assert sorted(train + val) == sorted(texts.values())
    in_order = [texts[k] for k in sorted(texts)]
    assert train == [t for t in in_order if t in train]  # sorted path order within a split
    meta = data.load_meta(a)
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"], meta["rank_file"]) == (257, 256, "uint16", None)
    for split, docs in (("train", train), ("val", val)):
        assert meta[split]["documents"] == len(docs)
        assert meta[split]["bytes"] == sum(len(d.encode()) for d in docs)
        assert meta[split]["tokens"] == meta[split]["bytes"] + len(docs)  # byte tokens + one EOT each
    assert 1 <= len(val) <= 8
    # prepared already: returns at once without touching the files
    mtime = (a / "train.bin").stat().st_mtime_ns
    assert data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path / "d"), name="a", quiet=True) == a
    assert (a / "train.bin").stat().st_mtime_ns == mtime
    with pytest.raises(data.DataError, match="--force"):
        data.prepare(str(tmp_path / "corpus"), "bpe:300", data_dir=str(tmp_path / "d"), name="a", quiet=True)


def test_bpe_preparation_is_byte_identical(bpe_dataset, tmp_path):
    again = data.prepare(str(bpe_dataset.parent.parent / "corpus"), "bpe:400", data_dir=str(tmp_path), quiet=True,
                         workers=1)
    assert again.name == "corpus-bpe400"
    for f in ("tokenizer.tiktoken", "train.bin", "val.bin", "meta.json"):
        assert (again / f).read_bytes() == (bpe_dataset / f).read_bytes()


def test_split_is_by_document_hash_about_one_percent_and_stable(tmp_path):
    keys = [f"dir/file{i}.py" for i in range(20000)]
    assert 0.008 < sum(data.key_hash(k) < 0.01 for k in keys) / len(keys) < 0.012
    make_corpus(tmp_path / "corpus", 300)
    first = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path), name="one", quiet=True, workers=1)
    val_before = set(decoded_documents(first, "val"))
    train_before = set(decoded_documents(first, "train"))
    make_corpus(tmp_path / "corpus", 200, seed=5, start=300)  # more documents must not move the old ones
    second = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path), name="two", quiet=True, workers=1)
    val_after = set(decoded_documents(second, "val"))
    assert val_before and val_before <= val_after
    assert not (train_before & val_after)


def test_validation_never_holds_a_document_that_is_also_in_train(tmp_path):
    """The split is keyed by content: copies of one text under other names (the stdlib ships some
    files several times) land on the same side, so no validation document is trained on."""
    texts = make_corpus(tmp_path / "corpus", 300)
    for rel, text in texts.items():    # every document twice more, under other paths
        for copy in ("copy_a", "copy_b"):
            (tmp_path / "corpus" / copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "corpus" / copy / rel).write_text(text)
    out = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path), quiet=True, workers=1)
    train, val = decoded_documents(out, "train"), decoded_documents(out, "val")
    assert val and not set(val) & set(train)
    assert all(val.count(v) == 3 for v in val)          # each validation text with its copies
    expected = {t for t in texts.values() if data.key_hash(t) < 0.01}   # the ~1% of lowest content hash
    assert set(val) == expected


def test_eval_windows_are_the_whole_split_or_spread_evenly(byte_dataset):
    ids = data.open_tokens(byte_dataset / "val.bin")
    whole = data.eval_windows(byte_dataset / "val.bin", 16, 0)
    n = (len(ids) - 1) // 16
    assert whole.shape == (n, 17) and whole[:, :-1].flatten().tolist() == ids[:n * 16].tolist()
    some = data.eval_windows(byte_dataset / "val.bin", 16, 64)       # 4 windows, first and last at the ends
    assert some.shape == (4, 17) and some[0].tolist() == ids[:17].tolist()
    assert some[-1].tolist() == ids[len(ids) - 17:].tolist()


def test_small_corpus_still_gets_one_validation_document(tmp_path):
    texts = make_corpus(tmp_path / "corpus", 4)
    assert not any(data.key_hash(t) < 0.01 for t in texts.values())  # so hashing alone gives no validation
    lowest = min(texts, key=lambda k: data.key_hash(texts[k]))
    out = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path), quiet=True, workers=1)
    assert decoded_documents(out, "val") == [texts[lowest]]
    assert len(decoded_documents(out, "train")) == 3


def test_jsonl_glob_and_single_file_sources(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    lines = [json.dumps({"text": f"record {i} \u2028 ünïcode", "id": i}) for i in range(60)]
    (folder / "a.jsonl").write_text("\n".join(lines[:30]) + "\n\n")
    (folder / "b.jsonl").write_text("\n".join(lines[30:]) + "\n")
    (folder / "c.txt").write_text("not picked by the glob\n")
    out = data.prepare(str(folder / "*.jsonl"), "byte", data_dir=str(tmp_path / "d"), quiet=True, workers=2)
    docs = decoded_documents(out, "train") + decoded_documents(out, "val")
    assert sorted(docs) == sorted(f"record {i} \u2028 ünïcode" for i in range(60))
    # one text file given alone is cut into documents at blank lines
    (tmp_path / "play.txt").write_text("\n\n".join(f"SPEAKER {i}:\nline {i}" for i in range(50)) + "\n")
    out = data.prepare(str(tmp_path / "play.txt"), "byte", data_dir=str(tmp_path / "d"), quiet=True, workers=1)
    meta = data.load_meta(out)
    assert meta["train"]["documents"] + meta["val"]["documents"] == 50


# ----------------------------------------------------------------------------- the loader

@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("byte")
    make_corpus(root / "corpus", 200, seed=3)
    return data.prepare(str(root / "corpus"), "byte", data_dir=str(root), quiet=True, workers=1)


def test_get_batch_windows_are_deterministic_contiguous_and_in_range(byte_dataset):
    path = byte_dataset / "train.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    x, y = data.get_batch(path, 8, 32, seed=7, step=3)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    x2, y2 = data.get_batch(path, 8, 32, seed=7, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(y.max()) < 257
    haystack = tokens.tobytes()
    for row_x, row_y in zip(x, y):
        window = torch.cat([row_x, row_y[-1:]]).numpy().astype(np.uint16).tobytes()
        at = haystack.find(window)
        while at % 2:  # a match must start on a token boundary
            at = haystack.find(window, at + 1)
        assert at >= 0
    assert isinstance(data.open_tokens(path), np.memmap)  # read through a memory map, not loaded


def test_get_batch_differs_across_ranks_micro_steps_steps_and_seeds(byte_dataset):
    path = byte_dataset / "train.bin"
    base = dict(seed=1, step=10, rank=0, world_size=4, micro_step=0)
    x0, _ = data.get_batch(path, 4, 16, **base)
    for change in (dict(rank=1), dict(rank=3), dict(micro_step=1), dict(step=11), dict(seed=2)):
        x1, _ = data.get_batch(path, 4, 16, **{**base, **change})
        assert not torch.equal(x0, x1), change


# ----------------------------------------------------------------------------- downloads

def serve(text: str, hits: list):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_shakespeare_downloads_once_from_the_url(tmp_path, monkeypatch):
    text = "\n\n".join(f"First Citizen:\nSpeech number {i}, good friends." for i in range(80)) + "\n"
    hits = []
    server = serve(text, hits)
    try:
        monkeypatch.setattr(data, "SHAKESPEARE_URL", f"http://127.0.0.1:{server.server_port}/input.txt")
        out = data.prepare("shakespeare", "byte", data_dir=str(tmp_path), quiet=True, workers=1)
        data.prepare("shakespeare", "byte", data_dir=str(tmp_path), name="again", quiet=True, workers=1)
    finally:
        server.shutdown()
    assert hits == ["/input.txt"]
    assert out.name == "shakespeare-byte"
    assert (tmp_path / "downloads" / "tinyshakespeare.txt").read_text() == text
    docs = decoded_documents(out, "train") + decoded_documents(out, "val")
    assert sorted(docs) == sorted(p for p in text.split("\n\n"))


def test_shakespeare_offline_says_so_and_how_to_pass_a_file(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(data, "SHAKESPEARE_URL", f"http://127.0.0.1:{port}/input.txt")
    with pytest.raises(data.DataError, match=r"offline.*--source path/to/input.txt") as e:
        data.prepare("shakespeare", "byte", data_dir=str(tmp_path), quiet=True)
    assert "\n" not in str(e.value)


def test_large_vocabulary_is_stored_as_uint32(tmp_path, monkeypatch):
    # stands in for cl100k_base (which needs network): bytes plus EOT at id 69999, so 70000 ids
    fake = tiktoken.Encoding("fake", pat_str=data.GPT4_SPLIT, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={data.EOT: 69_999})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    texts = make_corpus(tmp_path / "corpus", 40)
    out = data.prepare(str(tmp_path / "corpus"), "cl100k_base", data_dir=str(tmp_path), quiet=True, workers=1)
    meta = data.load_meta(out)
    assert (meta["dtype"], meta["vocab_size"], meta["eot_id"], out.name) == ("uint32", 70_000, 69_999,
                                                                             "corpus-cl100k_base")
    assert (out / "train.bin").stat().st_size == 4 * meta["train"]["tokens"]
    assert sorted(decoded_documents(out, "train") + decoded_documents(out, "val")) == sorted(texts.values())


def test_named_tiktoken_encoding_offline_is_one_clear_line(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(data.DataError, match="TIKTOKEN_CACHE_DIR") as e:
        data.load_tokenizer("cl100k_base")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- errors

def test_empty_sources_are_errors(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(data.DataError, match="has no"):
        data.prepare(str(tmp_path / "nothing"), "byte", data_dir=str(tmp_path), quiet=True)
    (tmp_path / "blank").mkdir()
    for i in range(3):
        (tmp_path / "blank" / f"{i}.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="has 0 non-empty document.*needs at least 2"):
        data.prepare(str(tmp_path / "blank"), "byte", data_dir=str(tmp_path), quiet=True, workers=1)
    with pytest.raises(data.DataError, match="not stdlib, shakespeare, or an existing"):
        data.prepare(str(tmp_path / "missing"), "byte", data_dir=str(tmp_path), quiet=True)


def test_large_corpus_with_no_validation_document_is_an_error(tmp_path, monkeypatch):
    texts = make_corpus(tmp_path / "corpus", 4)
    assert not any(data.key_hash(t) < 0.01 for t in texts.values())
    monkeypatch.setattr(data, "SMALL_CORPUS_BYTES", 0)  # as if the corpus were too large to read twice
    with pytest.raises(data.DataError, match="none of the 4 documents.*validation"):
        data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path), quiet=True, workers=1)


def test_bad_jsonl_lines_are_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match=r"x.jsonl:2 has no string 'text' field"):
        data.prepare(str(tmp_path / "x.jsonl"), "byte", data_dir=str(tmp_path), quiet=True, workers=1)


def test_split_shorter_than_a_window_is_an_error(byte_dataset):
    n_val = data.load_meta(byte_dataset)["val"]["tokens"]
    data.get_batch(byte_dataset / "val.bin", 2, n_val - 1, seed=0, step=0)  # exactly one window fits
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.get_batch(byte_dataset / "val.bin", 2, n_val, seed=0, step=0)


def test_bin_that_does_not_fit_meta_is_an_error(tmp_path):
    make_corpus(tmp_path / "corpus", 30)
    out = data.prepare(str(tmp_path / "corpus"), "byte", data_dir=str(tmp_path), quiet=True, workers=1)
    with open(out / "train.bin", "ab") as f:
        f.write(b"\x01\x00")
    with pytest.raises(data.DataError, match="bytes, but meta.json says"):
        data.get_batch(out / "train.bin", 1, 4, seed=0, step=0)
    tokens = np.fromfile(out / "val.bin", dtype=np.uint16)
    tokens[5] = 300  # the byte vocabulary has 257 ids
    tokens.tofile(out / "val.bin")
    with pytest.raises(data.DataError, match="token id 300"):
        data.get_batch(out / "val.bin", 1, 4, seed=0, step=0)
    (out / "meta.json").write_text('{"source": "x"}')
    with pytest.raises(data.DataError, match="not a complete"):
        data.load_meta(out)


def test_unknown_tokenizer_is_an_error(tmp_path):
    for spec in ("gpt5", "bpe:", "bpe:100", "bpe4096"):
        with pytest.raises(data.DataError, match="tokenizer"):
            data.prepare("stdlib", spec, data_dir=str(tmp_path), quiet=True)
    with pytest.raises(data.DataError, match="rank file"):
        data.load_tokenizer("bpe:4096")


def test_command_line_prints_one_line_and_exits_2(tmp_path):
    run = subprocess.run([sys.executable, "data.py", "--tokenizer", "nope", "--data_dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "unknown tokenizer 'nope'" in run.stderr
    help_text = subprocess.run([sys.executable, "data.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    for flag in ("--source", "--tokenizer", "--data_dir", "--name", "--workers", "--bpe_sample_mb", "--force",
                 "--quiet"):
        assert flag in help_text


def test_a_rank_file_prepared_again_at_the_same_path_is_read_anew(tmp_path):
    """tiktoken's own loader caches local files by their path: a BPE learned again into the same file
    must not come back with the old merges."""
    path = tmp_path / "tokenizer.tiktoken"
    first, _ = data.learn_bpe(collections.Counter(data.split_chunks("aaaa bbbb aaaa")), 259)
    data.write_rank_file(path, first)
    assert data.load_tokenizer("bpe:260", str(path)).encode("aaaa") != data.load_tokenizer("byte").encode("aaaa")
    second, _ = data.learn_bpe(collections.Counter(data.split_chunks("cccc dddd cccc")), 259)
    data.write_rank_file(path, second)
    enc = data.load_tokenizer("bpe:260", str(path))
    assert enc.decode_single_token_bytes(256) == second[256] != first[256]
