"""data.py's preparation speed and memory on corpora of growing size, against the tokenizer alone.

Builds one .jsonl file per size (one big file, as a FineWeb shard is: every worker must share it),
prepares each with `python data.py` in a child process, and measures its wall time and the peak memory
of its whole process tree (main + workers), polled from /proc: the sum of RSS, and of PSS, which counts
a page shared by the forked workers once. The tokenizer's own throughput is measured on the same text
with the same number of processes (each encodes its share of the documents, read before the clock starts).

Run:   nice -n 10 python tools/data_bench.py [--sizes_mb 256,1024,2048] [--workers 2] [--tokenizer bpe:1024]
Goals: preparation >= 0.8x the tokenizer's raw throughput; peak memory flat as the corpus grows, and
under 2 GB with 2 workers (data.py's --chunk_mb bounds it, not the size of a file).
"""
import argparse
import json
import os
import pathlib
import random
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

# the repo's flat scripts (data.py, tokenizer.py) are not a package: the repo root goes on the path, so
# this runs as `python tools/data_bench.py` from any folder, and the pool's workers find them too
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenizer  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from this be are it or an def return class import "
         "self None True while if else print value index count lambda yield model data token über naïve 中文 😀").split()


# ----------------------------------------------------------------------------- corpora

def write_corpus(path: pathlib.Path, size_mb: int, seed: int = 0) -> None:
    """A .jsonl of ~2 KB documents, size_mb in all; each document distinct (a numbered mix of paragraphs)."""
    rng = random.Random(seed)
    # paragraphs drawn once and recombined: writing 2 GB of fresh random words would take minutes
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(60, 300))) for _ in range(2048)]
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            text = f"document {i}\n" + paras[i % 2048] + "\n\n" + paras[(i * 7 + 3) % 2048]
            line = json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written, i = written + len(line.encode()), i + 1


# ----------------------------------------------------------------------------- the tokenizer alone

def _raw_share(args):
    """Encode documents [lo, hi) of the file's first lines, timing the encoding only -> (bytes, seconds)."""
    path, lo, hi, spec, rank_file = args
    enc = tokenizer.load_tokenizer(spec, rank_file)
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n >= hi:
                break
            if n >= lo:
                texts.append(json.loads(line)["text"])
    start, cpu = time.perf_counter(), time.process_time()
    for _ in tokenizer.encode_documents(enc, texts):   # what data.py's workers call: ids + end-of-text per document
        pass
    return sum(len(t.encode()) for t in texts), time.perf_counter() - start, time.process_time() - cpu


def raw_throughput(path, n_docs, workers, spec, rank_file) -> tuple[float, float]:
    """(MB/s, MB per CPU second) of the tokenizer alone over the first n_docs documents, split evenly over
    `workers` processes. Per CPU second too: on a shared machine the wall time depends on the neighbours."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one core per process, as in data.py's workers
    shares = [(str(path), n_docs * k // workers, n_docs * (k + 1) // workers, spec, rank_file) for k in range(workers)]
    with Pool(workers) as pool:
        results = pool.map(_raw_share, shares)
    # the processes run at once: the slowest one's time is the wall time of the whole
    mb = sum(r[0] for r in results) / 1e6
    return mb / max(r[1] for r in results), mb / sum(r[2] for r in results)


# ----------------------------------------------------------------------------- preparation, measured

def tree_memory(root_pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes of root_pid and all its descendants, from /proc."""
    # polled, not getrusage: RUSAGE_CHILDREN's maxrss is the largest single process, never their sum, and
    # the sum of RSS counts the pages the forked workers share with the main process (torch) once each
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])   # after the command name, which may hold spaces
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue   # the process ended while we looked
    rss = pss = 0
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:   # "Rss:   123 kB" lines after the address range
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("Rss:", "Pss:"))}
            rss, pss = rss + fields["Rss"], pss + fields["Pss"]
        except (OSError, KeyError, ValueError):
            continue
    return rss, pss


def cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children (and theirs, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prepare_measured(source, spec, workers, data_dir, chunk_mb) -> dict:
    """Run data.py on source in a child process; -> MB/s (text bytes / wall time) and peak tree memory."""
    cmd = [sys.executable, str(ROOT / "data.py"), "--source", str(source), "--tokenizer", spec, "--data_dir",
           str(data_dir), "--workers", str(workers), "--chunk_mb", str(chunk_mb), "--quiet", "--force"]
    start, peak_rss, peak_pss = time.perf_counter(), 0, 0
    cpu = cpu_seconds()
    child = subprocess.Popen(cmd)
    while child.poll() is None:
        rss, pss = tree_memory(child.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu   # the whole tree: its workers were waited for
    if child.returncode:
        sys.exit(f"data_bench.py: {' '.join(cmd)} failed with exit code {child.returncode}")
    # throughput over the text itself (meta.json's bytes), not the file: JSON quoting is not work done
    meta = json.loads(next(pathlib.Path(data_dir).glob(f"{pathlib.Path(source).stem}-*/meta.json")).read_text())
    text_bytes = meta["train"]["bytes"] + meta["val"]["bytes"]
    return dict(mb=text_bytes / 1e6, seconds=seconds, mb_s=text_bytes / 1e6 / seconds, rss=peak_rss, pss=peak_pss, cpu=cpu,
                tokens=meta["train"]["tokens"] + meta["val"]["tokens"])


def learned_rank_file(folder: pathlib.Path, n: int, corpus: pathlib.Path) -> str:
    """bpe:n learned once on a few MB of the corpus (data.py's learning), reused as bpe:n@RANK_FILE."""
    sample = folder / "sample.jsonl"
    with open(corpus, "rb") as src, open(sample, "wb") as dst:
        dst.writelines(line for _, line in zip(range(1500), src))
    subprocess.run([sys.executable, str(ROOT / "data.py"), "--source", str(sample), "--tokenizer", f"bpe:{n}",
                    "--data_dir", str(folder / "bpe"), "--name", "bpe", "--quiet"], check=True)
    return str(folder / "bpe" / "bpe" / "tokenizer.tiktoken")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", default="256,1024,2048", help="corpus sizes, comma-separated")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk_mb", type=float, default=16.0)
    p.add_argument("--tokenizer", default="bpe:1024", help="bpe:N (learned once on a sample), or a released folder")
    p.add_argument("--raw_docs", type=int, default=30000, help="documents (~2 KB each) for the raw throughput")
    p.add_argument("--dir", default="", help="scratch folder (default: a temporary one, deleted after)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        tmp, sizes = pathlib.Path(tmp), [int(s) for s in args.sizes_mb.split(",")]
        # one file per size, each a single file: the case where only cutting below the file lets every
        # worker help, and where reading the whole file (as data.py once did) would cost its size in memory
        corpora = {}
        for size in sizes:
            corpora[size] = tmp / f"corpus{size}.jsonl"
            write_corpus(corpora[size], size)
        spec, rank_file = args.tokenizer, None
        if spec.startswith("bpe:"):
            rank_file = learned_rank_file(tmp, int(spec[4:]), corpora[sizes[0]])
            spec = f"{spec}@{rank_file}"
        load_spec = spec.split("@")[0] if rank_file else tokenizer.folder_tokenizer(spec)[0]
        raw_file = rank_file or tokenizer.folder_tokenizer(spec)[1]
        raw, raw_cpu = raw_throughput(corpora[sizes[-1]], args.raw_docs, args.workers, load_spec, raw_file)
        print(f"tokenizer {args.tokenizer}, {args.workers} workers, --chunk_mb {args.chunk_mb}: the tokenizer alone "
              f"{raw:.1f} MB/s, {raw_cpu:.1f} MB per CPU second ({args.workers} processes, {args.raw_docs} documents)")
        print(f"{'corpus MB':>10} {'tokens':>13} {'seconds':>8} {'MB/s':>7} {'x raw':>6} {'MB/CPU s':>9} {'x raw':>6} "
              f"{'peak RSS MB':>12} {'peak PSS MB':>12}")
        for size in sizes:
            r = prepare_measured(corpora[size], spec, args.workers, tmp / "data", args.chunk_mb)
            per_cpu = r["mb"] / r["cpu"]   # preparation's MB per CPU second, startup (Python, torch) included
            print(f"{r['mb']:>10.0f} {r['tokens']:>13,} {r['seconds']:>8.1f} {r['mb_s']:>7.1f} {r['mb_s'] / raw:>6.2f} "
                  f"{per_cpu:>9.1f} {per_cpu / raw_cpu:>6.2f} {r['rss'] / 1e6:>12.0f} {r['pss'] / 1e6:>12.0f}", flush=True)
            for f in (tmp / "data").glob("*/*.bin"):
                f.unlink()   # 2 GB of tokens per size: disk, not the measure


if __name__ == "__main__":
    main()
