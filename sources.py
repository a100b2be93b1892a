"""Reading a corpus for data.py: which files are text, how each is cut into pieces of work, and the
documents of one piece. A piece is at most about --chunk_mb of text, so a 2 GB shard is tokenized by
every worker at once and no process ever holds more than a few pieces, whatever the size of a file.

    .txt .md .py        one document per file (a lone .txt/.md: one per paragraph); read whole
    .jsonl              one document per line, field --text_field; pieces are byte ranges of the file
    .jsonl.gz .jsonl.zst  the same lines, decompressed in order by the main process (a compressed
                        stream cannot be entered in the middle) and handed out in line-aligned blocks
    .parquet            one document per row of column --text_field; pieces are row ranges of a row group

pyarrow (parquet) and zstandard (.zst) are optional: only the formats that need them import them.
"""
import gzip
import json
import re
import zlib
from typing import NamedTuple

from cli import DataError

FORMATS = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "jsonl", ".jsonl.gz": "gz",
           ".jsonl.zst": "zst", ".parquet": "parquet"}


def file_format(path) -> str | None:
    """The format of a file by its name ("jsonl", "gz", ...), None for files that are not text we read."""
    name = path.name
    # the longest matching ending: a.jsonl.gz is "gz", not skipped as an unknown ".gz"
    ends = [suffix for suffix in FORMATS if name.endswith(suffix)]
    return FORMATS[max(ends, key=len)] if ends else None


def need(module: str, package: str, path):
    """An optional package, imported only when a file needs it; missing: one line saying what to install."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DataError(f"{path} needs the {package} package: pip install {package}") from None


# A tuple, not a class with methods: pieces are pickled to the worker processes, and a compressed
# file's piece carries its lines with it (the worker cannot seek into the compressed stream itself).
class Piece(NamedTuple):
    """One unit of work: a part of one file (kind "text", "lines", "block" or "rows")."""
    kind: str
    path: object            # pathlib.Path
    start: int = 0          # lines: byte offset; rows: first row; block: the first line's number
    end: int = 0            # lines: byte offset (exclusive); rows: last row (exclusive)
    size: int = 0           # bytes of text, about: the progress bar's and the BPE sample's measure
    group: int = 0          # rows: the parquet row group
    data: bytes = b""       # block: the decompressed lines themselves
    single: bool = False    # text: the corpus is this one file (cut into paragraphs)


# ----------------------------------------------------------------------------- cutting files into pieces

def pieces(files, chunk_bytes: int, text_field: str):
    """Every file's pieces, in file order, lazily: compressed files are read as the pieces are consumed."""
    # in file order, and in order within a file: the .bin files are the pieces' ids concatenated, so the
    # output is today's for the same documents, and the same for any number of workers
    for path in files:
        fmt = file_format(path)
        if fmt == "text":
            yield Piece("text", path, size=path.stat().st_size, single=len(files) == 1)
        elif fmt == "jsonl":   # byte ranges; a line belongs to the range it starts in (see documents)
            size = path.stat().st_size
            yield from (Piece("lines", path, a, min(a + chunk_bytes, size), min(a + chunk_bytes, size) - a)
                        for a in range(0, size, chunk_bytes))
        elif fmt == "parquet":
            yield from parquet_pieces(path, chunk_bytes, text_field)
        else:
            yield from compressed_blocks(path, fmt, chunk_bytes)


def parquet_pieces(path, chunk_bytes: int, text_field: str):
    """Row ranges of each row group, each about chunk_bytes of (uncompressed) data."""
    # FineWeb-Edu's shards hold ~1 GB of text in row groups of ~100 MB: the row group is the unit the
    # format can read alone, and a large one is cut further, into row ranges
    meta = parquet_file(path, text_field).metadata   # the footer only: no rows are read here
    for g in range(meta.num_row_groups):
        rows, size = meta.row_group(g).num_rows, meta.row_group(g).total_byte_size
        k = max(1, -(-size // chunk_bytes))   # ceil: a row group larger than a chunk is cut into k ranges
        for i in range(k):
            a, b = rows * i // k, rows * (i + 1) // k
            if b > a:
                yield Piece("rows", path, a, b, size * (b - a) // max(rows, 1), group=g)


def parquet_file(path, text_field: str):
    """A pyarrow ParquetFile whose schema has a string column text_field (checked from the footer)."""
    pq = need("pyarrow.parquet", "pyarrow", path)
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as e:   # ArrowInvalid and friends, with multi-line messages
        raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}): re-download or remove it") from None
    # checked from the footer before any work: a wrong --text_field fails at once, not an hour in
    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (it has {', '.join(schema.names[:8])}): "
                        f"pass --text_field with the column that holds the text")
    if str(schema.field(text_field).type) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {text_field!r} holds {schema.field(text_field).type}, not text: pass --text_field")
    return pf


def open_compressed(path, fmt):
    """A binary stream of a .jsonl.gz or .jsonl.zst file's decompressed bytes."""
    if fmt == "gz":
        return gzip.open(path, "rb")
    zstd = need("zstandard", "zstandard", path)
    # read_across_frames: files written as several frames (e.g. by parallel compressors) read whole
    return zstd.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)


def compressed_blocks(path, fmt, chunk_bytes: int):
    """Line-aligned blocks of about chunk_bytes of a compressed JSONL file, decompressed in order."""
    # the main process decompresses (gzip ~300 MB/s, zstd ~1 GB/s: faster than a worker tokenizes) and the
    # workers parse and tokenize the blocks; the part after a block's last newline starts the next block
    line, rest = 1, b""
    try:
        with open_compressed(path, fmt) as f:
            while True:
                chunk = f.read(chunk_bytes)
                block = rest + chunk
                cut = block.rfind(b"\n") + 1 if chunk else len(block)   # at the end: everything left
                if cut:
                    yield Piece("block", path, line, size=cut, data=block[:cut])
                    line += block.count(b"\n", 0, cut)
                rest = block[cut:]
                if not chunk:
                    return
    except (OSError, EOFError, zlib.error) as e:   # BadGzipFile is an OSError; a truncated stream an EOFError
        raise DataError(f"{path} is not a valid {fmt} file ({type(e).__name__}: {e}): re-download or remove it") from None
    except Exception as e:   # zstandard.ZstdError (not importable without the package)
        if type(e).__name__ != "ZstdError":
            raise
        raise DataError(f"{path} is not a valid zst file ({e}): re-download or remove it") from None


# ----------------------------------------------------------------------------- the documents of a piece

def documents(piece: Piece, text_field: str):
    """The piece's non-empty documents (str), in file order."""
    if piece.kind == "text":
        texts = text_documents(piece.path, piece.single)
    elif piece.kind == "rows":
        texts = parquet_rows(piece, text_field)
    else:
        texts = jsonl_documents(piece, text_field)
    return [t for t in texts if t and not t.isspace()]   # empty documents would only add EOTs


def text_documents(path, single_file: bool) -> list[str]:
    """A whole file, or each paragraph of a lone .txt/.md."""
    # a lone text file (shakespeare) as one document would leave nothing for validation
    text = path.read_bytes().decode("utf-8", errors="replace")  # a few stdlib test files are not UTF-8
    if single_file and path.suffix in (".txt", ".md"):
        return re.split(r"\n\s*\n", text)
    return [text]


def parquet_rows(piece: Piece, text_field: str):
    """Rows [start, end) of one row group, read in batches (a row group may hold gigabytes)."""
    # 1024 rows a batch: a piece never holds its whole row group in memory; rows before the range are
    # skipped (decoded, then dropped), the price of a row group cut into k ranges (k ~ its size / chunk)
    pf, seen = parquet_file(piece.path, text_field), 0
    for batch in pf.iter_batches(batch_size=1024, row_groups=[piece.group], columns=[text_field]):
        lo, hi = max(piece.start - seen, 0), min(piece.end - seen, batch.num_rows)
        if hi > lo:
            yield from (t for t in batch.column(0).slice(lo, hi - lo).to_pylist() if t is not None)
        seen += batch.num_rows
        if seen >= piece.end:
            return


def jsonl_bytes(piece: Piece) -> tuple[bytes, int]:
    """(the bytes of the lines that start in the piece, their byte offset in the file; 0 for a block)."""
    if piece.kind == "block":
        return piece.data, 0
    with open(piece.path, "rb") as f:
        if piece.start:   # the line running into the range began in the previous piece: that piece reads it
            f.seek(piece.start - 1)
            f.readline()
        at = f.tell()
        # read at once, not line by line (a third of the time went to readline); the last line that
        # starts before the end is completed: a line belongs to the piece it starts in
        lines = f.read(max(piece.end - at, 0))
        return (lines + f.readline() if lines and not lines.endswith(b"\n") else lines), at


def jsonl_documents(piece: Piece, text_field: str):
    raw, at = jsonl_bytes(piece)
    # split as bytes, each line decoded alone: one decoded 16 MB string would be up to 64 MB (a single
    # emoji makes Python store every character in 4 bytes) and twice as slow to split
    for k, line in enumerate(raw.split(b"\n")):   # not splitlines(): JSON may hold \u2028
        line = line.decode("utf-8", errors="replace")
        if not line or line.isspace():   # isspace, not strip(): no copy of the line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{line_name(piece, at, k)} is not valid JSON ({e.msg}): fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{line_name(piece, at, k)} has no string {text_field!r} field: each .jsonl line needs one "
                            f"(or pass --text_field)")
        yield record[text_field]


def line_name(piece: Piece, at: int, k: int) -> str:
    """path:line of the k-th line of a piece read from byte offset `at`, counted only for an error message."""
    if piece.kind == "block":
        return f"{piece.path}:{piece.start + k}"
    lines = 1 + k
    with open(piece.path, "rb") as f:   # in 16 MB reads: the offset may be gigabytes into the file
        while at > 0:
            lines += f.read(min(at, 1 << 24)).count(b"\n")
            at -= 1 << 24
    return f"{piece.path}:{lines}"
