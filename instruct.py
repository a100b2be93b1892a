"""An embedded, offline instruction set for supervised fine-tuning (§5), made from this Python's standard
library source (data.py's default "stdlib" corpus), as preference.py's pairs are made for DPO.

    python instruct.py --out instruct.jsonl                 # the training conversations (chat.py reads them)
    python instruct.py --out heldout.jsonl --split val      # the held-out items, as conversations

Two families, each graded by exact match on held-out items (greedy reply, stopped at EOS, stripped):

  knowledge  "Complete this line of Python: def setUp(" -> "self):". The lines are those the standard library
             holds at least MIN_COUNT times, cut where the corpus itself makes the rest the most common one.
             Items are split into train and held-out BY LINE, and no training conversation contains a
             held-out line: a held-out completion can only have been learned in pre-training. This is what
             §5's point needs to be measurable: SFT teaches the format, knowledge comes from pre-training.
  skill      "Write a call to the function NAME with the argument ARG." -> "NAME(ARG)" (training also has
             "... with no arguments." -> "NAME()"). NAME and ARG are short function names the library
             defines; every NAME and every ARG occurs in training, but the held-out (NAME, ARG) pairs never
             do: the transformation is learned from the instruction set itself, and applied to new pairs.

Measured with tools/instruct_probe.py (tiny model, bpe:4096, 600 steps of stdlib + conversations, then 300
SFT steps): skill 100% held out; knowledge 9%, and 10% when the held-out lines are removed from the corpus:
at that scale the knowledge family is at its floor of guessable syntax ("(self):"), not recall; its
"knowledge/novel" score (answers no training item shares) was 0 in both runs.

Everything is seeded: the same Python version gives the same items on every machine.
"""
import argparse
import bisect
import collections
import functools
import json
import pathlib
import random
import re
import sys
import sysconfig

import numpy as np

import cli
from atomic import atomic_write

SEED = 1234
MIN_COUNT = 20                  # a line must occur this often in the corpus to be "knowledge"
LINE_CHARS = (12, 60)           # shorter lines have nothing to complete, longer ones are too hard to recall
N_TRAIN = {"knowledge": 2000}   # at most: the frequent lines give ~950 items
N_HELD_OUT = 250                # per family: enough that a 10-point difference is more than noise
SKILL_NAMES = 40                # 40 functions x 40 arguments: 1600 calls, 250 of them held out
KNOWLEDGE_ASK = "Complete this line of Python: {}"
SKILL_ASK = ("Write a call to the function {} with no arguments.", "Write a call to the function {} with the argument {}.")
# the codecs' 256-line tables ("'D'  #  0x44 -> LATIN CAPITAL LETTER D") would teach a pattern, not recall
TABLE_LINE = re.compile(r"0x[0-9A-Fa-f]{2,4} ->")
NAME = re.compile(r"^\s*def ([a-z]{3,8})\(", re.M)   # short lowercase function names


# ----------------------------------------------------------------------------- the corpus

@functools.lru_cache(maxsize=1)
def stdlib_texts() -> tuple[str, ...]:
    """The standard library's .py sources, chosen as data.py's "stdlib" corpus chooses them, in path order."""
    # read here rather than through data.py, whose sources are being reworked: the rule is the same
    # (every .py under the stdlib folder, installed packages left out), so the items stay what
    # pre-training on data.py's "stdlib" corpus saw
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    return tuple(p.read_bytes().decode("utf-8", errors="replace") for p in files)


@functools.lru_cache(maxsize=1)
def line_counts() -> collections.Counter:
    """Stripped non-empty lines of the corpus -> how many times each occurs."""
    # stripped: indentation depends on where a line sits, its knowledge does not
    return collections.Counter(s for text in stdlib_texts() for line in text.split("\n") if (s := line.strip()))


def cut_points(line: str) -> list[int]:
    """Where a line may be cut: word starts, leaving at least a third before and 3 characters after."""
    # word starts keep the question readable ("def setUp(" + "self):", never "def se" + "tUp(self):"),
    # and a third of the line is enough context to pin most lines down
    starts = [m.start() for m in re.finditer(r"\w+|[^\w\s]+", line)]
    return [k for k in starts if len(line) // 3 <= k <= len(line) - 3]


def well_posed(line: str, cuts: list[int], sorted_lines, counts) -> list[int]:
    """The cuts after which this line is strictly the corpus's most common continuation of its first part."""
    # a cut whose first part goes on another way as often is a guess, not knowledge: it is left out
    # sorted_lines is sorted, so the lines that start with a prefix are one contiguous range of it
    good = []
    for k in cuts:
        lo = bisect.bisect_left(sorted_lines, line[:k])
        hi = bisect.bisect_left(sorted_lines, line[:k] + "\U0010ffff")   # every line that starts with line[:k]
        top2 = np.sort(counts[lo:hi])[-2:]
        if top2[-1] == line_counts()[line] and (len(top2) < 2 or top2[0] < top2[1]):
            good.append(k)
    return good


@functools.lru_cache(maxsize=1)
def knowledge_lines() -> dict[str, list[int]]:
    """Frequent lines -> their well-posed cuts (lines with none are left out)."""
    # a few hundred lines: what occurs 20+ times in 31 MB of code is mostly idiom (setUp, imports, raise)
    freq = line_counts()
    sorted_lines = sorted(freq)
    counts = np.array([freq[s] for s in sorted_lines])   # in sorted_lines' order, for range maxima
    out = {}
    for line, n in sorted(freq.items()):
        if n >= MIN_COUNT and LINE_CHARS[0] <= len(line) <= LINE_CHARS[1] and not line.startswith("#") \
                and not TABLE_LINE.search(line):
            cuts = well_posed(line, cut_points(line), sorted_lines, counts)
            if cuts:
                out[line] = cuts
    return out


# ----------------------------------------------------------------------------- the two families

def knowledge_item(line: str, k: int) -> dict:
    # line and count are kept for the tests and for accuracy by frequency; the conversation uses user, answer
    prefix, answer = line[:k].rstrip(), line[k:].strip()
    return dict(user=KNOWLEDGE_ASK.format(prefix), answer=answer, family="knowledge", line=line, count=line_counts()[line])


@functools.lru_cache(maxsize=1)
def knowledge_split() -> tuple[list[dict], list[dict]]:
    """-> (training items, held-out items): held-out lines are chosen first, then kept out of training."""
    # own generators, seeded: the draws do not depend on what else the process drew before
    rng = random.Random(SEED)
    lines = knowledge_lines()
    order = sorted(lines)
    rng.shuffle(order)
    held = order[:N_HELD_OUT]
    # a training line that holds a held-out line, or is held in one ("return self" in "return self.x"),
    # would state (part of) a held-out completion: such lines are in neither split
    train_lines = [s for s in order[N_HELD_OUT:] if not any(h in s or s in h for h in held)]
    # held-out: one cut per line, the one nearest the middle; training: every well-posed cut
    held_items = [knowledge_item(s, min(lines[s], key=lambda k: abs(k - len(s) / 2))) for s in held]
    # several cuts of one training line teach that any prefix can be asked, not one position per line
    train_items = [knowledge_item(s, k) for s in train_lines for k in lines[s]]
    rng.shuffle(train_items)
    return train_items[:N_TRAIN["knowledge"]], held_items


def skill_item(name: str, arg: str | None) -> dict:
    # a copy task: the answer is in the question, so only the format has to be learned, which is what
    # SFT teaches quickly
    user = SKILL_ASK[0].format(name) if arg is None else SKILL_ASK[1].format(name, arg)
    return dict(user=user, answer=f"{name}()" if arg is None else f"{name}({arg})", family="skill")


def skill_names() -> tuple[list[str], list[str]]:
    """-> (function names, argument names): the library's most often defined short names, 40 each."""
    # short, common names (one or two tokens of bpe:4096): our first probe used any defined name (up
    # to 24 characters, unseen at test time) and a 4-layer model copied none of them in 900 steps.
    # No name is a part of another, so "f(x)" can only occur in a text as that very call.
    counts = collections.Counter(NAME.findall("\n".join(stdlib_texts())))
    names = []
    for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(name) <= 8 and not any(name in n or n in name for n in names):
            names.append(name)
    return names[:2 * SKILL_NAMES:2], names[1:2 * SKILL_NAMES:2]   # alternate: both lists mix common and rare


@functools.lru_cache(maxsize=1)
def skill_split() -> tuple[list[dict], list[dict]]:
    """-> (training items, held-out items): held out are (function, argument) PAIRS never trained on."""
    # every function and every argument is met in training, each in other pairs: what is held out is
    # the combination, so a correct held-out answer is the transformation applied, not a recalled reply
    functions, args = skill_names()
    pairs = [(f, a) for f in functions for a in args]
    random.Random(SEED + 1).shuffle(pairs)
    seen = "\n".join(f"{i['user']}\n{i['answer']}" for i in knowledge_split()[0])
    # a held-out call written in a knowledge item ("close(self)" say) would be stated in training
    held = [p for p in pairs if f"{p[0]}({p[1]})" not in seen][:N_HELD_OUT]
    train = [skill_item(f, a) for f, a in pairs if (f, a) not in held] + [skill_item(f, None) for f in functions]
    random.Random(SEED + 1).shuffle(train)
    return train, [skill_item(f, a) for f, a in held]


# ----------------------------------------------------------------------------- what other scripts use

def items(split: str) -> list[dict]:
    """Both families' items of a split ("train" or "val"), in a seeded order."""
    if split not in ("train", "val"):
        raise cli.UsageError(f"split {split!r}: use train or val")
    part = 0 if split == "train" else 1   # "val": the held-out items, never trained on
    out = knowledge_split()[part] + skill_split()[part]
    if part:
        # a held-out answer that also answers a training item ("(self):") can be right without recall; the
        # probe found every correct held-out answer among those. "novel" marks the others: recall only
        trained = {i["answer"] for i in knowledge_split()[0] + skill_split()[0]}
        out = [{**i, "novel": i["answer"] not in trained} if i["family"] == "knowledge" else i for i in out]
    random.Random(SEED + 2).shuffle(out)   # families interleaved: a file's first lines hold both
    return out


def conversations(split: str = "train") -> list[dict]:
    """[{"messages": [user, assistant], "family"}]: chat.py's input (held-out ones: "val")."""
    return [dict(messages=[dict(role="user", content=i["user"]), dict(role="assistant", content=i["answer"])],
                 family=i["family"]) for i in items(split)]


def grade(items_, outputs) -> dict:
    """Exact-match accuracy per family, "all", and "knowledge/novel" (held-out answers that answer no
    training item: recall from pre-training only) of model replies, stripped: {key: (correct, total)}."""
    if len(items_) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(items_)} items")
    # stripped both sides: a model that adds a space or a newline before EOS still answered correctly
    score = collections.defaultdict(lambda: [0, 0])
    for item, out in zip(items_, outputs):
        for key in (item["family"], "all") + ((f"{item['family']}/novel",) if item.get("novel") else ()):
            score[key][0] += out.strip() == item["answer"].strip()
            score[key][1] += 1
    return {k: tuple(v) for k, v in score.items()}


def main(argv=None):
    # the file is what chat.py --source reads; written whole (atomic), so a rerun never sees half of it
    def run(argv):
        p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        p.add_argument("--out", required=True, help="the JSONL file to write")
        p.add_argument("--split", default="train", choices=["train", "val"], help="train, or val (the held-out items)")
        a = cli.parse(p, argv)
        lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations(a["split"]))
        atomic_write(a["out"], lambda f: f.write(lines.encode()))
        print(f"wrote {a['out']}: {lines.count(chr(10))} conversations ({a['split']})")
    return cli.main("instruct.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
