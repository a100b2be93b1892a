"""tools/writeup.py: the write-ups agree with their CSVs, and cells read by hand from the CSVs.

The expected cells below were computed by hand from the full-precision values in docs/*.csv (quoted
in each test), not by the code under test.
"""
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import writeup  # noqa: E402

EXPERIMENTS = ROOT / "experiments" / "README.md"


def block(text, name):
    """The rows of a generated table, {first cell: [cells]}."""
    body = text.split(f"<!-- table: {name} -->\n")[1].split("<!-- /table -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_every_write_up_is_up_to_date(capsys):
    # the same check CI users run: a CSV changed without `python tools/writeup.py` fails here
    assert writeup.main(["--check"]) == 0, capsys.readouterr().err


def test_wsd_differences_from_full_precision_values():
    rows = block(EXPERIMENTS.read_text(), "wsd_vs_cosine_decay")
    # WSD exp 2.5%, lr 0.0025, seed 1337, T = 440: 1.7959017753601074; Cosine(T) to 10%, lr 0.005:
    # 1.7524223327636719 -> +0.04348 (the rounded 1.7959 - 1.7524 would give +0.044)
    assert rows["WSD exp 2.5% (0.0025)"][2].startswith("+0.043 /")
    # WSD exp 20% at T = 880: 1.5298421382904053 - 1.5263475179672241 = +0.00349
    assert rows["WSD exp 20% (0.0025)"][3].startswith("+0.003 /")
    assert rows["Cosine(T) to 10% (0.005)"][0] == "1.7524 / 1.8031"


def test_moe_cells_and_the_decay_sentence():
    text = EXPERIMENTS.read_text()
    rows = block(text, "moe_upcycling")
    # seed 1338, final losses: fresh Adam 1.3877346515655518, dense 1.4311943054199219 -> -0.04346
    assert rows["1338"][4] == "1.388 (-0.043)"
    # before the decay (step 2800) minus the end (3200): dense 1.6394 - 1.4022 = 0.237 and
    # 1.6729 - 1.4312 = 0.242; upcycled 1.6109 - 1.3579 = 0.253 and 1.6149 - 1.3757 = 0.239
    assert "The decay is worth <!-- v: moe_decay_worth -->0.24-0.25<!-- /v --> nats" in text


def test_scaling_and_long_context_cells():
    text = EXPERIMENTS.read_text()
    # N = 25,488: bpb 3.5404849..., 3.2627477..., 2.7741275..., 2.5353162...
    assert block(text, "scaling_law_grid")["25,488"] == ["3.5405", "3.2627", "2.7741", "2.5353"]
    # arm (e) at 2048, the 5 depths: seed 1337 0, .4, .25, 1, 1 -> 0.53; seed 1338 .4, .15, .25, .75, 1 -> 0.51
    assert block(text, "long_context_passkey")["(e) ABF + CT + NTK x4"][4] == "0.53 / 0.51"


def test_kernel_table_shared_memory_is_exact():
    # dK/dV 32 x 128, 8 warps, 3 stages: 49664 bytes on sm_80 = 48.5 KiB, 58880 on sm_90 = 57.5 KiB
    # (banker's rounding had printed 48 and 58)
    text = (ROOT / "docs" / "kernels.md").read_text()
    assert "| dK/dV | 32 x 128, 8, 3 | 241 / 48.5 | 209 / 57.5 / wgmma |" in text


def test_check_fails_on_a_stale_table_and_the_rewrite_fixes_it(tmp_path, capsys):
    good = EXPERIMENTS.read_text()
    path = tmp_path / "README.md"
    path.write_text(good.replace("| 25,488 | 3.5405 |", "| 25,488 | 3.5406 |"))
    assert writeup.main(["--check", str(path)]) == 1
    assert "scaling_law_grid" in capsys.readouterr().err
    assert writeup.main([str(path)]) == 0
    assert path.read_text() == good


@pytest.mark.parametrize("marker", ["<!-- table: no_such_table -->\n<!-- /table -->",
                                    "<!-- v: no_such_value -->1<!-- /v -->"])
def test_unknown_marker_is_one_line_and_writes_nothing(tmp_path, capsys, marker):
    path = tmp_path / "README.md"
    path.write_text(f"# notes\n\n{marker}\n")
    before = path.read_text()
    assert writeup.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_" in err
    assert path.read_text() == before
