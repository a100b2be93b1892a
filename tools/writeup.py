"""Regenerate the experiments' tables and quoted numbers from the CSVs in docs/, so a write-up cannot
drift from its data.

A write-up (experiments/README.md, the verdict table of README.md, docs/kernels.md) marks what is
generated:

    <!-- table: NAME -->            a whole block, rewritten from TABLES[NAME]
    ...
    <!-- /table -->
    <!-- v: NAME ARG ... -->0.24<!-- /v -->     one number (or range) in a sentence, from VALUES[NAME]

Everything outside the markers is prose and is left alone. Numbers are computed from the full-precision
CSV values and rounded once, at the end (a difference of two rounded losses can be off by one in its
last digit).

Run:   python tools/writeup.py            rewrite the marked blocks in place
       python tools/writeup.py --check    exit 1 (naming the blocks) if a file is out of date
Test:  python -m pytest -q tests/test_writeup.py
"""
import argparse
import pathlib
import re
import sys

# the tables module sits next to this file: on the path however this is run (python tools/writeup.py, pytest)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from writeup_tables import ROOT, TABLES, VALUES, WriteupError  # noqa: E402
sys.path.insert(0, str(ROOT))
from atomic import atomic_write_text  # noqa: E402

FILES = [ROOT / "experiments" / "README.md", ROOT / "README.md", ROOT / "docs" / "kernels.md"]
# a table's block runs from its opening marker's line to the closing marker; a value sits inside a line
TABLE = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)
VALUE = re.compile(r"(<!-- v: ([^>]*?) -->)(.*?)(<!-- /v -->)", re.S)


def render(text):
    """The text with every marked table and value regenerated; unknown names are an error."""
    def table(m):
        if m.group(2) not in TABLES:
            raise WriteupError(f"unknown table '{m.group(2)}' (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[m.group(2)]() + m.group(4)

    def value(m):
        name, *args = m.group(2).split()
        if name not in VALUES:
            raise WriteupError(f"unknown value '{name}' (known: {', '.join(VALUES)})")
        try:   # the arguments are the write-up's text: a wrong count or an unknown arm is the author's slip
            return m.group(1) + VALUES[name](*args) + m.group(4)
        except (TypeError, KeyError, ValueError) as e:
            raise WriteupError(f"value '{m.group(2)}': bad arguments ({type(e).__name__}: {e})") from None
    return VALUE.sub(value, TABLE.sub(table, text))


def stale(old, new):
    """Names of the marked blocks whose text differs: what --check reports."""
    names = lambda t: [(m.group(2), m.group(3)) for rx in (TABLE, VALUE) for m in rx.finditer(t)]
    return sorted({a for (a, x), (_, y) in zip(names(old), names(new)) if x != y})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    p.add_argument("files", nargs="*", type=pathlib.Path, help="write-ups (default: the three listed in FILES)")
    args = p.parse_args(argv)
    texts = {}
    # every file is rendered before any is written: a missing file or a bad marker writes nothing
    for path in args.files or FILES:
        if not path.exists():
            print(f"writeup.py: {path} does not exist: pass a write-up with table markers", file=sys.stderr)
            return 2
        try:
            texts[path] = (path.read_text(), render(path.read_text()))
        except WriteupError as e:
            print(f"writeup.py: {path}: {e}", file=sys.stderr)
            return 2
    changed = {path: (old, new) for path, (old, new) in texts.items() if new != old}
    if args.check and changed:
        print("writeup.py: out of date: " + "; ".join(f"{p.name} ({', '.join(stale(o, n))})" for p, (o, n) in
                                                    changed.items()) + ": run python tools/writeup.py", file=sys.stderr)
        return 1
    for path, (_, new) in ({} if args.check else changed).items():
        atomic_write_text(new, str(path))   # the one atomic writer: never half a README
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
