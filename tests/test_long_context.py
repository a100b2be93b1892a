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
    doc = long_context.passkey_doc(random.Random(0), FILLER[:1], 20, "71432", depth=0.25)
    needle = "\nThe pass key is 71432. Remember it. 71432 is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is 71432"
    assert len(needle) + len(question) == long_context.fixed_part(5) == 104
    assert len(doc) == 20 + 104
    assert doc[5:5 + len(needle)] == needle and doc.endswith(question)
    head, tail = doc[:5], doc[5 + len(needle):-len(question)]
    assert len(tail) == 15 and (head + tail) in "abcdefghij" * 50    # the filler, cut once and split
    # depth 0: the needle first; depth 1: the needle just before the question
    assert long_context.passkey_doc(random.Random(0), FILLER[:1], 20, "12345", 0.0).startswith(needle.replace("71432", "12345"))
    assert long_context.passkey_doc(random.Random(0), FILLER[:1], 20, "12345", 1.0).endswith(
        needle.replace("71432", "12345") + question.replace("71432", "12345"))


def test_haystacks_are_exactly_the_test_length_and_end_in_the_key():
    setup = dict(lengths=[128, 256], keys=3)
    tests = long_context.haystacks(FILLER, setup)
    for L, (rows, keys, depths) in tests.items():
        assert len(rows) == len(keys) == len(depths) == 3 * len(long_context.DEPTHS)
        for row, key in zip(rows, keys):
            assert len(row) == L and row[0] == long_context.EOT          # a document start, then L - 1 bytes
            assert bytes(row[-5:]).decode() == key and len(key) == 5 and key.isdigit()
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
    with pytest.raises(SystemExit) as e:
        long_context.parse_args(["--seeds", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "long_context.py: --seeds must be at least 1"
