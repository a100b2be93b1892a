"""Tests of experiments/long_context.py (§7.2): the passkey documents' layout checked by hand, and the
--quick run end to end (every arm x seed x length x depth in the CSV, the RoPE bases of the runs)."""
import csv
import math
import os
import random
import sys

import pytest

import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import long_context  # noqa: E402

FILLER = ["abcdefghij" * 50, "0123456789" * 50]


def test_passkey_document_layout_by_hand():
    # 20 bytes of filler, the needle after 25% of it (5 bytes), the question and key at the end
    key = "\x01"   # the first symbol of the set (1..8, 11, 12, 14..26, 28: 9, 10, 13, 27 are in the corpus)
    assert long_context.KEY_CLASSES == [[chr(c) for c in [*range(1, 9), 11, 12, *range(14, 27), 28]]]
    doc = long_context.passkey_doc(random.Random(0), FILLER[:1], 20, key, depth=0.25)
    needle = f"\nThe pass key is \x1e{key}. Remember it. \x1e{key} is the pass key.\n"   # \x1e: the marker
    question = f"\nWhat is the pass key? The pass key is \x1e{key}"
    # 17 + 2 + 15 + 2 + 18 = 54 bytes of needle, 39 + 2 = 41 of question, counted by hand
    assert len(needle) + len(question) == long_context.fixed_part() == 95
    assert len(doc) == 20 + 95
    assert doc[5:5 + len(needle)] == needle and doc.endswith(question)
    head, tail = doc[:5], doc[5 + len(needle):-len(question)]
    assert len(tail) == 15 and (head + tail) in "abcdefghij" * 50    # the filler, cut once and split
    # depth 0: the needle first; depth 1: the needle just before the question
    assert long_context.passkey_doc(random.Random(0), FILLER[:1], 20, key, 0.0).startswith(needle)
    assert long_context.passkey_doc(random.Random(0), FILLER[:1], 20, key, 1.0).endswith(needle + question)


def test_key_symbols_are_single_bytes_found_nowhere_in_the_corpus():
    # the j-th symbol of a key comes from the j-th set; the sets are disjoint control characters, one
    # byte each in UTF-8 (one token each), and no text of the corpus holds one (else a false needle)
    classes = long_context.KEY_CLASSES
    assert len(classes) == long_context.KEY_LEN and all(len(c) == long_context.KEY_SET for c in classes)
    assert len(set().union(*map(set, classes))) == long_context.KEY_LEN * long_context.KEY_SET
    assert long_context.KEY_MARK == "\x1e" and all(long_context.KEY_MARK not in c for c in classes)
    assert all(len(ch.encode()) == 1 and not ch.isprintable() and ch not in "\t\n\r" for c in classes for ch in c)
    rng = random.Random(0)
    keys = [long_context.random_key(rng) for _ in range(200)]
    assert all(k[j] in classes[j] for k in keys for j in range(long_context.KEY_LEN))
    train, held = long_context.stdlib_texts(0.3)
    symbols = set(long_context.KEY_SYMBOLS)
    assert train and held and not any(symbols & set(t) for t in train + held)


def test_haystacks_are_exactly_the_test_length_and_end_in_the_key():
    setup = dict(lengths=[128, 256], keys=3)
    tests = long_context.haystacks(FILLER, setup)
    K = long_context.KEY_LEN
    for L, (rows, keys, depths) in tests.items():
        assert len(rows) == len(keys) == len(depths) == 3 * len(long_context.DEPTHS)
        for row, key in zip(rows, keys):
            assert len(row) == L and row[0] == long_context.EOT          # a document start, then L - 1 bytes
            assert bytes(row[-K:]).decode() == key and len(key) == K
            assert bytes(row[1:]).decode().count(key) == 3                 # twice in the needle, once answered
    # the same test set for every arm and run: a pure function of its seed
    assert long_context.haystacks(FILLER, setup)[128][0] == tests[128][0]


def test_quick_run_writes_every_arm_and_the_right_rope_bases(tmp_path):
    out = tmp_path / "out"
    assert long_context.main(["--quick", "--out", str(out)]) == 0
    for name in ("long_context_passkey.png", "long_context_loss.png"):
        assert open(out / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "long_context.csv")))
    setup = long_context.SCALES["quick"]
    seeds = (1337, 1338)
    passkey = {(r["arm"], int(r["seed"]), int(r["length"]), float(r["depth"])): float(r["value"])
               for r in rows if r["kind"] == "passkey"}
    assert set(passkey) == {(a, s, L, d) for a in "abcde" for s in seeds for L in setup["lengths"]
                            for d in long_context.DEPTHS}
    assert all(0 <= v <= 1 for v in passkey.values())
    # accuracies are multiples of 1 / keys per cell
    assert all(abs(v * setup["keys"] - round(v * setup["keys"])) < 1e-9 for v in passkey.values())
    losses = [r for r in rows if r["kind"] == "loss"]
    # octaves [0, 16), [16, 32), ..., [256, 512): 6 per arm and seed, covering the 512-token windows
    assert len(losses) == 5 * 2 * 6
    assert all(0 < float(r["value"]) < 2 * math.log(257) for r in losses)
    assert {(int(r["pos_lo"]), int(r["pos_hi"])) for r in losses} == {(0, 16), (16, 32), (32, 64), (64, 128),
                                                                     (128, 256), (256, 512)}
    # the continued runs: 2x the length (quick), ABF's base 5e5 and the NTK-aware base for 4x by hand,
    # 1e4 * 4 ** (16 / 14) with head_dim 16 = 48,760.5; the base model keeps 1e4
    runs = out / "runs" / "long_context"
    for name, theta, block in (("base", 1e4, 128), ("abf", 5e5, 256), ("ntk", 48760.546, 256)):
        cfg = checkpoint.load(str(runs / f"{name}_s1337"))["model_config"]
        assert cfg["rope_theta"] == pytest.approx(theta, rel=1e-6) and cfg["block_size"] == block
        assert cfg["rope_scaling"] == "none"   # NTK at inference is the evaluation's change, not the run's


def test_bad_flags_exit_2_with_one_line(capsys):
    assert long_context.main(["--ct_steps", "0"]) == 2
    assert capsys.readouterr().err == "long_context.py: --ct_steps must be at least 1\n"
