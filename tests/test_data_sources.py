"""Tests for data.py's sources (parquet, .jsonl, .jsonl.gz, .jsonl.zst, cut into pieces below the file), its
released-folder and shared (bpe:N@RANK_FILE) tokenizers, train.py --init_from a released folder, and
interruption. Every expected token stream is computed here from the documents, independently of data.py."""
import gzip
import hashlib
import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import tiktoken.load
import tokenizers
import torch
import torch.nn.functional as F
import zstandard

import data
import hf
import train
from conftest import metrics, small_config
from minicpm import MiniCPM
from test_data import make_text
from test_tokenizer import released_folder as released_tokenizer

DOCS_SEED = 7


def released_folder(folder, style):
    # test_tokenizer's builder writes into an existing folder; here each release gets a new one
    folder.mkdir(parents=True, exist_ok=True)
    return released_tokenizer(folder, style)


def corpus_docs(n=240):
    """n documents of code-like text; a few with non-ASCII text and a JSON line separator."""
    rng = random.Random(DOCS_SEED)
    docs = [f"document {i}\n" + make_text(rng, rng.randrange(5, 50)) for i in range(n)]
    docs[3] += " \u2028 ünïcode 中文 😀"
    docs[10] = "   \n"   # blank: dropped by every format alike
    return docs


def content_hash(text):   # the split rule written out: the first 8 bytes of sha256 as a fraction of 2**64
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def expected_split(docs):
    """(train documents, validation documents) in order: the ~1% of lowest content hash, or the lowest one."""
    docs = [d for d in docs if d.strip()]
    val = [d for d in docs if content_hash(d) < 0.01] or [min(docs, key=content_hash)]
    return [d for d in docs if d not in val], [d for d in docs if d in val]


def jsonl_bytes(docs, field="text"):
    # one record per line with an extra key, and one blank line (skipped, as today) to shift the offsets
    return "".join(json.dumps({"id": i, field: d}) + "\n" + ("\n" if i == 5 else "") for i, d in enumerate(docs)).encode()


def write_formats(folder, docs):
    """The same documents as today's .txt files, and as each new format: {name: source path}."""
    for i, d in enumerate(docs):
        (folder / "txt").mkdir(parents=True, exist_ok=True)
        (folder / "txt" / f"d{i:04d}.txt").write_text(d)
    raw = jsonl_bytes(docs)
    (folder / "docs.jsonl").write_bytes(raw)
    (folder / "docs.jsonl.gz").write_bytes(gzip.compress(raw))
    half = raw.index(b"\n", len(raw) // 2) + 1   # two zstd frames, as parallel compressors write
    zc = zstandard.ZstdCompressor()
    (folder / "docs.jsonl.zst").write_bytes(zc.compress(raw[:half]) + zc.compress(raw[half:]))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), folder / "docs.parquet", row_group_size=37)
    return {"txt": folder / "txt", **{f: folder / f"docs.{f}" for f in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")}}


def bins(dataset):
    # the two token files as bytes: "identical" means byte for byte, as a cached dataset is compared
    return tuple((dataset / f"{split}.bin").read_bytes() for split in ("train", "val"))


def byte_stream(docs):   # the byte tokenizer: a document's UTF-8 bytes, then EOT (256)
    return np.array([t for d in docs for t in [*d.encode(), 256]], dtype=np.uint16).tobytes()


# ----------------------------------------------------------------------------- formats, pieces, workers

def test_every_format_and_worker_count_gives_todays_stream(tmp_path):
    docs = corpus_docs()
    sources = write_formats(tmp_path, docs)
    train_docs, val_docs = expected_split(docs)
    expected = (byte_stream(train_docs), byte_stream(val_docs))
    assert 1 <= len(val_docs) < 10
    # today's format (a folder of .txt files) and every new one; pieces of ~1-2 KB, so the one file of each
    # format is cut into ~10-70 pieces (parquet: 7 row groups, each cut into row ranges) over 1 to 3 workers
    runs = [("txt", 1, 16.0), ("jsonl", 1, 16.0), ("jsonl", 3, 0.001), ("jsonl.gz", 2, 0.002),
            ("jsonl.zst", 3, 0.001), ("parquet", 1, 16.0), ("parquet", 3, 0.001)]
    for fmt, workers, chunk_mb in runs:
        out = data.prepare(str(sources[fmt]), "byte", data_dir=str(tmp_path / "d"), name=f"{fmt}-{workers}",
                           quiet=True, workers=workers, chunk_mb=chunk_mb)
        assert bins(out) == expected, (fmt, workers, chunk_mb)
        meta = data.load_meta(out)
        assert (meta["train"]["documents"], meta["val"]["documents"]) == (len(train_docs), len(val_docs))


def test_a_piece_boundary_on_a_line_start_loses_and_repeats_nothing(tmp_path):
    docs = [f"line {i} " + "x" * (i % 7) for i in range(400)]
    raw = jsonl_bytes(docs)
    (tmp_path / "a.jsonl").write_bytes(raw)
    line_len = raw.index(b"\n") + 1   # the first line's length: a piece of exactly that size starts on line 2
    # a range ending just before, at, or just after a line start, and ranges smaller than a line: each
    # line must be read by exactly the piece it starts in
    for chunk in (line_len, line_len - 1, line_len + 1, 1, 3):
        out = data.prepare(str(tmp_path / "a.jsonl"), "byte", data_dir=str(tmp_path / "d"), name=f"c{chunk}",
                           quiet=True, workers=1, chunk_mb=chunk / 1e6)
        assert bins(out) == tuple(map(byte_stream, expected_split(docs))), chunk


def test_text_field_names_the_column(tmp_path):
    docs = corpus_docs(60)
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(docs, field="content"))
    pq.write_table(pa.table({"content": docs}), tmp_path / "c.parquet", row_group_size=10)
    for src in ("c.jsonl", "c.parquet"):
        out = data.prepare(str(tmp_path / src), "byte", data_dir=str(tmp_path / "d"), name=src, quiet=True, workers=1,
                           text_field="content")
        assert bins(out) == tuple(map(byte_stream, expected_split(docs)))
        assert data.load_meta(out)["text_field"] == "content"


# ----------------------------------------------------------------------------- tokenizers

def large_released_folder(folder):
    """A released-style folder whose vocabulary (70,000) needs uint32 ids, as MiniCPM's 122,753 does."""
    released_folder(folder, "new")
    # 70,000 ids: past uint16, so data.py must switch to uint32 exactly as it will for the real release
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), 70_000)})   # pieces no merge makes: ids only
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return folder


def test_released_folder_tokenizes_to_the_tokenizers_packages_ids(tmp_path):
    folder = large_released_folder(tmp_path / "MiniCPM-like")
    docs = corpus_docs(80)
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(docs))
    # one file cut into ~2 KB pieces, over 1 and 2 workers: the batch encoder must not depend on either
    runs = [data.prepare(str(tmp_path / "docs.jsonl"), str(folder), data_dir=str(tmp_path / "d"), name=f"w{w}",
                         quiet=True, workers=w, chunk_mb=0.002) for w in (1, 2)]
    assert bins(runs[0]) == bins(runs[1])
    meta = data.load_meta(runs[0])
    assert (meta["dtype"], meta["vocab_size"], meta["eot_id"], meta["tokenizer"]) == ("uint32", 70_000, 2, "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))   # the package itself, nothing of ours
    for split, split_docs in zip(("train", "val"), expected_split(docs)):
        # BOS before each document (add_bos_token), EOS after it: the release's framing of a document
        want = [t for d in split_docs for t in [1, *tok.encode(d, add_special_tokens=False).ids, 2]]
        assert np.fromfile(runs[0] / f"{split}.bin", dtype=np.uint32).tolist() == want
    assert meta["tokenizer_sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    assert (runs[0] / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()
    assert data.default_name(str(tmp_path / "docs.jsonl"), str(folder)) == "docs-MiniCPM-like"


def test_a_shared_rank_file_is_reused_not_learned(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(4):
        (tmp_path / "a" / f"code{i}.py").write_text(make_text(random.Random(i), 1000))
    first = data.prepare(str(tmp_path / "a"), "bpe:300", data_dir=str(tmp_path / "d"), name="first", quiet=True,
                         workers=1, bpe_sample_mb=1)
    ranks = first / "tokenizer.tiktoken"
    docs = corpus_docs(60)
    pq.write_table(pa.table({"text": docs}), tmp_path / "other.parquet", row_group_size=20)
    # a second corpus in another format, with the first one's merges: what a data mixture needs
    spec = f"bpe:300@{ranks}"
    out = data.prepare(str(tmp_path / "other.parquet"), spec, data_dir=str(tmp_path / "d"), quiet=True, workers=2)
    assert out.name == "other-bpe300-from-first"
    meta, sha = data.load_meta(out), hashlib.sha256(ranks.read_bytes()).hexdigest()
    assert meta["tokenizer_sha256"] == data.load_meta(first)["tokenizer_sha256"] == sha
    assert (out / "tokenizer.tiktoken").read_bytes() == ranks.read_bytes()
    enc = tiktoken.Encoding("ref", pat_str=data.GPT4_SPLIT, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(ranks)),
                            special_tokens={data.EOT: 299})   # tiktoken's own reader of the file
    train_docs, _ = expected_split(docs)
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == [t for d in train_docs for t in enc.encode_ordinary(d) + [299]]
    with pytest.raises(data.DataError, match="holds 299 tokens"):
        data.prepare(str(tmp_path / "other.parquet"), f"bpe:400@{ranks}", data_dir=str(tmp_path / "d"), quiet=True)
    with pytest.raises(data.DataError, match="only bpe:N takes @RANK_FILE"):
        data.prepare(str(tmp_path / "other.parquet"), f"byte@{ranks}", data_dir=str(tmp_path / "d"), quiet=True)


# ----------------------------------------------------------------------------- train.py --init_from a release

def release(folder, style="new", seed=0):
    """A released-style MiniCPM folder: config.json, model.safetensors, tokenizer.json (+ config)."""
    from safetensors.torch import save_file
    released_folder(folder, style)
    n_vocab = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    # random weights are enough: the test compares losses of one function computed two ways
    torch.manual_seed(seed)
    model = MiniCPM(small_config(vocab_size=n_vocab))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf.hf_config(model)))
    return folder


def test_init_from_a_released_folder_starts_at_its_loss(tmp_path):
    folder = release(tmp_path / "MiniCPM-like")
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(corpus_docs(120)))
    out = tmp_path / "run"
    # no --tokenizer: a released folder brings its own
    args = ["--init_from", str(folder), "--source", str(tmp_path / "docs.jsonl"), "--data_dir", str(tmp_path / "d"),
            "--out_dir", str(out), "--batch_size", "4", "--seq_len", "32", "--max_steps", "1", "--eval_tokens", "0",
            "--dtype", "float32", "--device", "cpu"]
    assert train.main(args) == 0
    first = metrics(out)[0]
    assert first["step"] == 0
    # the same windows, read here from val.bin, through the model hf.load_hf reads, in float64
    val = np.fromfile(tmp_path / "d" / "docs-MiniCPM-like" / "val.bin", dtype=np.uint16).astype(np.int64)
    n = (len(val) - 1) // 32
    windows = torch.from_numpy(np.stack([val[i * 32:i * 32 + 33] for i in range(n)]))
    model = hf.load_hf(str(folder)).double().eval()
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert first["val_loss"] == pytest.approx(want, rel=1e-5)
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    # and its BOS/EOS rules beside it: the run folder samples with the release's BOS
    assert (out / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()


def test_a_release_decays_on_a_mixture_with_its_own_tokenizer(tmp_path):
    # §5 on released weights: text and conversations both tokenized with the folder's tokenizer.json
    folder = release(tmp_path / "MiniCPM-like")
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(corpus_docs(120)))
    convos = [{"prompt": f"word {i}", "response": f"answer {i}"} for i in range(200)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convos))
    out = tmp_path / "run"
    args = ["--init_from", str(folder), "--decay_only", "--data", f"{tmp_path / 'docs.jsonl'}:0.5,{tmp_path / 'chat.jsonl'}:0.5",
            "--data_dir", str(tmp_path / "d"), "--out_dir", str(out), "--batch_size", "4", "--seq_len", "32",
            "--max_steps", "2", "--eval_tokens", "0", "--dtype", "float32", "--device", "cpu"]
    assert train.main(args) == 0
    chat_meta = json.loads(next((tmp_path / "d").glob("chat-*/meta.json")).read_text())
    assert chat_meta["bos_id"] is not None   # the release's BOS before each conversation
    assert f"val_bpb/{tmp_path / 'chat.jsonl'}" in metrics(out)[-1]


def one_line_exit_2(argv, capsys):
    code = train.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().split("\n")[-1]   # after the preparation's progress bar, if any
    assert code == 2 and err.startswith("train.py: "), err
    return err


def test_a_release_whose_tokenizer_is_not_the_datas_is_refused(tmp_path, capsys):
    folder = release(tmp_path / "rel", "new")
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(corpus_docs(60)))
    common = ["--init_from", folder, "--source", tmp_path / "docs.jsonl", "--data_dir", tmp_path / "d",
              "--batch_size", "2", "--seq_len", "16", "--max_steps", "1", "--device", "cpu"]
    err = one_line_exit_2([*common, "--tokenizer", "byte", "--out_dir", tmp_path / "a"], capsys)
    assert "vocabulary" in err and not (tmp_path / "a").exists()
    # the same vocabulary size, another tokenizer.json (the older conversion's normalizer): refused too
    other = released_folder(tmp_path / "other", "old")
    err = one_line_exit_2([*common, "--tokenizer", other, "--out_dir", tmp_path / "b"], capsys)
    assert "not with the tokenizer of" in err and not (tmp_path / "b").exists()
    # a folder that is not a MiniCPM release: a config.json of another model, or no weights
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "type_vocab_size": 2}))
    err = one_line_exit_2([*common[2:], "--init_from", tmp_path / "bert", "--out_dir", tmp_path / "c"], capsys)
    assert "config.json" in err and not (tmp_path / "c").exists()
    (folder / "model.safetensors").unlink()
    err = one_line_exit_2([*common, "--out_dir", tmp_path / "e"], capsys)
    assert "neither" in err and not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- bad inputs and interruption

def refused(source, tmp_path, match, **kw):
    # the house rule for bad input: one line naming what to do, and the data folder left as it was
    with pytest.raises(data.DataError, match=match) as e:
        data.prepare(str(source), kw.pop("tokenizer", "byte"), data_dir=str(tmp_path / "d"), quiet=True, **kw)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "d").glob("*")) if (tmp_path / "d").exists() else True   # nothing written


def test_bad_sources_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    docs = corpus_docs(40)
    pq.write_table(pa.table({"content": docs}), tmp_path / "no_text.parquet")
    refused(tmp_path / "no_text.parquet", tmp_path, r"no column 'text'.*--text_field")
    # garbage in the middle of the deflate stream: found only by decompressing, not from the header
    corrupt = bytearray(gzip.compress(jsonl_bytes(docs)))
    corrupt[len(corrupt) // 2:len(corrupt) // 2 + 40] = b"\xff" * 40
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl.gz").write_bytes(bytes(corrupt))
    refused(tmp_path / "bad", tmp_path, "not a valid gz file")
    monkeypatch.setattr(data, "SMALL_CORPUS_BYTES", 0)   # a large corpus: found while tokenizing, then cleared
    refused(tmp_path / "bad", tmp_path, "not a valid gz file", workers=2)
    (tmp_path / "bad" / "x.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs))[:-30])   # truncated
    refused(tmp_path / "bad", tmp_path, "not a valid gz file", workers=1)
    (tmp_path / "not_a_release").mkdir()
    refused(tmp_path / "no_text.parquet", tmp_path, "has no tokenizer_record.json or tokenizer.json",
            tokenizer=str(tmp_path / "not_a_release"))
    refused(tmp_path / "no_text.parquet", tmp_path, "unknown tokenizer", tokenizer="nope/")


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    docs = corpus_docs(30)
    (tmp_path / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "x.parquet")
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)   # as if not installed
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    refused(tmp_path / "x.jsonl.zst", tmp_path, "pip install zstandard$")
    refused(tmp_path / "x.parquet", tmp_path, "pip install pyarrow$")


def test_ctrl_c_keeps_the_old_dataset_and_a_second_run_starts_cleanly(tmp_path, monkeypatch):
    docs = corpus_docs(200)
    (tmp_path / "x.jsonl").write_bytes(jsonl_bytes(docs))
    kw = dict(data_dir=str(tmp_path / "d"), name="x", quiet=True, workers=2, chunk_mb=0.002)
    old = data.prepare(str(tmp_path / "x.jsonl"), "byte", **kw)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    (tmp_path / "x.jsonl").write_bytes(jsonl_bytes(docs[::-1]))   # the source changes, then the rerun is stopped
    real = data.run_jobs

    def interrupted(*args):   # Ctrl-C in the main process after two pieces were written
        for i, result in enumerate(real(*args)):
            if i == 2:
                raise KeyboardInterrupt
            yield result
    monkeypatch.setattr(data, "run_jobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(str(tmp_path / "x.jsonl"), "byte", force=True, **kw)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x"]   # no x.tmp, no x.old
    monkeypatch.setattr(data, "run_jobs", real)
    (tmp_path / "d" / "x.tmp").mkdir()   # what a kill -9 leaves: the next run clears it
    (tmp_path / "d" / "x.tmp" / "train.bin.tmp").write_bytes(b"\x00" * 1000)
    again = data.prepare(str(tmp_path / "x.jsonl"), "byte", force=True, **kw)
    assert bins(again) == tuple(map(byte_stream, expected_split(docs[::-1])))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x"]
    shutil.rmtree(again)
