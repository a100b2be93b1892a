"""Tests for tokenizer.py's Hugging Face side: our BPE exported as tokenizer.json (transformers' AutoTokenizer
must encode as tiktoken does), and released-MiniCPM-style tokenizer.json folders read through `tokenizers`."""
import codecs
import collections
import json
import pathlib
import sys

import pytest
import tiktoken

import tokenizers   # test dependencies (requirements-test.txt): never skipped
import transformers

import tokenizer
from cli import DataError

REPO = pathlib.Path(__file__).resolve().parent.parent
# what a tokenizer meets: code, contractions, numbers, whitespace runs, CJK, emoji (ZWJ sequences and
# flags), accents precomposed and combining, non-ASCII spaces, control bytes, and the end-of-text text
SAMPLES = [
    "def f(x):\n    return x**2  # it's\n\n\t\tdone",
    "I'M sure YOU'LL see we've they'd 's",
    "pi = 3.14159, 1234567 + 42 == 1234609; 1e-3",
    "a  b   c\n\n\n    \n\t\t x \r\n\r\n  end  ",
    "中文文本测试。我们的模型很小！ 日本語のテキスト",
    "emoji 😀🎉 👨\u200d👩\u200d👧 🇫🇷",
    "Café naïve résumé e\u0301te\u0301 Straße Ünïcödé ΑΒΓ абв ١٢٣",
    "nbsp\u00a0and\u3000ideographic\u200bspace\x00\x01\x7f",
    "one document<|endoftext|>another<|endoftext|><|endoftext|>",
    "<|endoftext", "   leading spaces", "",
]


# ----------------------------------------------------------------------------- export: ours -> tokenizer.json

@pytest.fixture(scope="module")
def bpe_enc(tmp_path_factory):
    """A bpe:1024 learned here on code and some CJK, loaded the way training loads it."""
    text = (REPO / "tokenizer.py").read_text() + (REPO / "data.py").read_text() + "中文文本测试。我们的模型很小。\n" * 20
    vocab, _ = tokenizer.learn_bpe(collections.Counter(tokenizer.split_chunks(text)), 1023)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.tiktoken"
    tokenizer.write_rank_file(path, vocab)
    return tokenizer.load_tokenizer("bpe:1024", str(path))


def exported(folder, enc):
    """Our export as hf.save_hf lays it out: config.json (model_type minicpm) beside the tokenizer."""
    (folder / "config.json").write_text(json.dumps({"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
                                                    "vocab_size": enc.n_vocab}))
    tokenizer.write_hf_tokenizer(str(folder), enc)
    return folder


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_autotokenizer_encodes_exactly_as_tiktoken(kind, bpe_enc, tmp_path):
    enc = bpe_enc if kind == "bpe" else tokenizer.load_tokenizer("byte")
    hf = transformers.AutoTokenizer.from_pretrained(str(exported(tmp_path, enc)))
    for text in SAMPLES:
        ids = hf(text)["input_ids"]   # add_special_tokens on (the default): still no BOS, as our models never saw one
        assert ids == enc.encode(text, allowed_special={tokenizer.EOT}), text
        assert hf.decode(ids) == text
    assert hf.eos_token_id == enc.eot_token and hf.bos_token_id is None and len(hf) == enc.n_vocab
    assert not list(tmp_path.glob("*.tmp"))   # written atomically: no temp file left behind


def test_exported_merges_reproduce_tiktoken_on_unseen_text(bpe_enc, tmp_path):
    """Beyond the samples: 200 windows of a file the BPE never saw, through the tokenizers package alone."""
    tok = tokenizers.Tokenizer.from_file(str(exported(tmp_path, bpe_enc) / "tokenizer.json"))
    text = (REPO / "cli.py").read_text() + (REPO / "checkpoint.py").read_text()
    windows = [text[i:i + 300] for i in range(0, len(text), len(text) // 200)]
    for w in windows:
        assert tok.encode(w, add_special_tokens=False).ids == bpe_enc.encode_ordinary(w)


def test_recover_merges_hand_worked():
    # ranks: "ab" 256, "cd" 257, "abcd" 258, "bcd" 259. BPE on "abcd" with ranks < 258: cd (257) is not
    # lowest, ab (256) is -> [ab][c][d] -> cd -> [ab][cd]: its merge is (ab, cd). "abcd" = "a" + "bcd" too,
    # which tiktoken merges at rank 258 as well, so that split follows; "bcd" = (b, cd) by the same rule.
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"cd": 257, b"abcd": 258, b"bcd": 259}
    assert tokenizer.recover_merges(ranks) == [(b"a", b"b"), (b"c", b"d"), (b"ab", b"cd"), (b"a", b"bcd"),
                                               (b"b", b"cd")]
    with pytest.raises(DataError, match="not a merge of two lower-ranked tokens"):   # "abc" with no "ab" or "bc"
        tokenizer.recover_merges({bytes([b]): b for b in range(256)} | {b"abc": 256})


def test_byte_unicode_map_is_gpt2s():
    spell = tokenizer.byte_unicode_map()
    # GPT-2's well-known spellings: a space is "Ġ", a newline "Ċ", a tab "ĉ"; printable ASCII stays itself
    assert (spell[32], spell[10], spell[9], spell[ord("A")], spell[255]) == ("Ġ", "Ċ", "ĉ", "A", "ÿ")
    assert len(set(spell.values())) == 256 and not any(c.isspace() for c in spell.values())


def test_only_our_tokenizers_are_exported(tmp_path):
    other = tiktoken.Encoding("other", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                              special_tokens={})
    with pytest.raises(DataError, match="only this project's tokenizers"):
        tokenizer.write_hf_tokenizer(str(tmp_path), other)


def test_folder_tokenizer_reads_our_export_like_tiktoken(bpe_enc, tmp_path):
    """A tokenizer.json of ours without its record: byte-level pieces map back to tiktoken's bytes."""
    tokenizer.write_hf_tokenizer(str(tmp_path), bpe_enc)
    ft = tokenizer.FolderTokenizer(str(tmp_path))
    assert (ft.n_vocab, ft.eot_token, ft.bos_token) == (bpe_enc.n_vocab, bpe_enc.eot_token, None)
    for text in SAMPLES:
        assert ft.encode(text) == bpe_enc.encode(text, allowed_special={tokenizer.EOT})
    assert all(ft.decode_single_token_bytes(i) == bpe_enc.decode_single_token_bytes(i) for i in range(1023))


# ----------------------------------------------------------------------------- released MiniCPM-style folders

TRAIN = ("The quick brown fox jumps over the lazy dog. It's a test, isn't it? Numbers: 12 345.\n"
         "def main():\n    return 42\n\n中文文本测试。我们的模型很小，但是可以读中文。Café naïve résumé.\n") * 30
CONTROL = ["<unk>", "<s>", "</s>"]
# texts to round-trip; the emoji and "ž" are not in TRAIN, so they can only be byte-fallback pieces
ROUND_TRIP = ["Hello world, it's the lazy dog.", "line one\nline two\n\n\tindented  twice   spaced",
              "中文测试，我们的模型。", "emoji 😀 and ž in text 🎉", "def main():\n    return 42\n"]


def released_folder(folder, style, add_bos_token=True):
    """A small tokenizer laid out as the releases are: <unk> <s> </s>, the 256 <0xXX> byte pieces (ids 3..258),
    then BPE pieces with "▁" for spaces. style "old": a Prepend + Replace normalizer and no pre-tokenizer
    (older conversions); "new": a Metaspace pre-tokenizer and a BOS template post-processor (newer ones)."""
    trained = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained.train_from_iterator([TRAIN], tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=CONTROL,
                                                                         show_progress=False))
    spec = json.loads(trained.to_str())
    vocab = {piece: i for i, piece in enumerate(CONTROL + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["added_tokens"] = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for i, t in enumerate(CONTROL)]
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}   # the last drops the dummy prefix's space
    if style == "old":
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        spec["pre_tokenizer"] = None
    else:
        spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                                  "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    tokenizers.Tokenizer.from_str(json.dumps(spec)).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", add_bos_token=add_bos_token, add_eos_token=False, bos_token="<s>",
        eos_token={"content": "</s>", "special": True}, unk_token="<unk>", legacy=True)))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05")   # the releases ship it too; it must not be needed
    return folder


@pytest.mark.parametrize("style", ["old", "new"])
def test_released_folder_round_trips_with_bos_and_byte_fallback(style, tmp_path):
    ft = tokenizer.load_folder_tokenizer(str(released_folder(tmp_path, style)))
    assert isinstance(ft, tokenizer.FolderTokenizer)
    assert (ft.bos_token, ft.eot_token, ft.n_vocab) == (1, 2, len(ft.tok.get_vocab()))
    assert "😀" not in ft.tok.get_vocab() and "▁😀" not in ft.tok.get_vocab()   # so it must fall back to bytes
    for text in ROUND_TRIP:
        ids = ft.encode(text)
        assert ids[0] == 1 and ids.count(1) == 1   # BOS once: not again from the "new" file's template
        assert ft.decode(ids) == text
        # token by token, as sample.py streams: the dummy prefix's space first, then exactly the text's bytes
        assert b"".join(ft.decode_single_token_bytes(i) for i in ids) == b" " + text.encode()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        assert "".join(utf8.decode(ft.decode_single_token_bytes(i)) for i in ids) == " " + text
    # "😀" is F0 9F 98 80: byte pieces <0xF0> <0x9F> <0x98> <0x80>, i.e. ids 3 + byte in this layout
    assert ft.encode("😀")[-4:] == [3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80]
    assert ft.decode_single_token_bytes(1) == b"" and ft.decode_single_token_bytes(3 + 0xE4) == b"\xe4"
    # the release's own loader (transformers) gives the same ids for the text
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert all(hf.encode(t, add_special_tokens=False) == ft.encode(t)[1:] for t in ROUND_TRIP)


def test_leading_space_round_trips_in_the_old_layout(tmp_path):
    # sentencepiece's dummy prefix is always added in the normalizer layout, so " x" -> "▁▁x" -> " x". (The
    # Metaspace layout, prepend_scheme "first", adds none before a space, and its decoder strips one: " x" -> "x".
    # That is the file's behavior, transformers' too; FolderTokenizer does not change it.)
    ft = tokenizer.FolderTokenizer(str(released_folder(tmp_path, "old")))
    assert ft.decode(ft.encode("  two leading spaces")) == "  two leading spaces"


def test_bos_follows_the_config_and_special_text(tmp_path):
    ft = tokenizer.FolderTokenizer(str(released_folder(tmp_path, "new", add_bos_token=False)))
    assert ft.encode("Hello")[0] != 1
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["add_bos_token"]   # unsaid: LlamaTokenizer's default, BOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ft = tokenizer.FolderTokenizer(str(tmp_path))
    assert ft.encode("Hello")[0] == 1
    # "</s>" written in a text is EOS for encode (as transformers reads it), characters for encode_ordinary
    assert 2 in ft.encode("end</s>") and 2 not in ft.encode_ordinary("end</s>") and 1 not in ft.encode_ordinary("x")
    assert ft.decode(ft.encode_ordinary("end</s>")) == "end</s>"


def test_load_folder_tokenizer_prefers_our_record(bpe_enc, tmp_path):
    tokenizer.write_rank_file(tmp_path / "ranks.tiktoken", [bpe_enc.decode_single_token_bytes(i) for i in range(1023)])
    (tmp_path / "tokenizer_record.json").write_text(json.dumps({"spec": "bpe:1024", "rank_file": "ranks.tiktoken"}))
    tokenizer.write_hf_tokenizer(str(tmp_path), bpe_enc)   # present too, but the record wins: tiktoken, as trained
    enc = tokenizer.load_folder_tokenizer(str(tmp_path))
    assert isinstance(enc, tiktoken.Encoding) and enc.encode(SAMPLES[0]) == bpe_enc.encode(SAMPLES[0])


def test_folder_errors_are_one_line(tmp_path, monkeypatch):
    def error(folder):
        with pytest.raises(DataError) as e:
            tokenizer.load_folder_tokenizer(str(folder))
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "is not a folder" in error(tmp_path / "nowhere")
    assert "pass --tokenizer" in error(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05")
    assert "tokenizer.json" in error(tmp_path)   # sentencepiece's file alone: say which file is needed
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    assert "not a tokenizer" in error(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert "cannot read" in error(tmp_path)
    (tmp_path / "tokenizer_record.json").write_text(json.dumps({"spec": "bpe:1024"}))
    assert "rank_file" in error(tmp_path)
    (tmp_path / "tokenizer_record.json").unlink()
    monkeypatch.setitem(sys.modules, "tokenizers", None)   # as if it were not installed
    assert "pip install tokenizers" in error(tmp_path)
