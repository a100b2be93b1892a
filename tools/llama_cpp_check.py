"""Check that a checkpoint runs in llama.cpp exactly as it runs here, token for token.

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d ~/.cache/minicpm-llama.cpp  # once, online
    python tools/llama_cpp_check.py --ckpt out/tiny --sdist ~/.cache/minicpm-llama.cpp/llama_cpp_python-0.3.36.tar.gz
    python tools/llama_cpp_check.py --ckpt out/tiny          # later runs: the cached build

llama.cpp is built from the copy vendored in the llama-cpp-python sdist (its Python bindings are not
built): cmake, CPU only, the two programs needed, llama-tokenize and llama-completion, with -j2 (about
4 minutes on 2 cores), cached in --cache. Nothing is downloaded: without a cached build, --sdist must
name the file. The checkpoint is exported with `export.py --gguf` into a temporary folder, then:

(a) tokens: llama-tokenize's ids for SAMPLES (code, Chinese, emoji, whitespace runs, CR/LF, NBSP,
    digits, accents) against our tokenizer's (a released tokenizer.json's too: BOS as it adds it);
(b) greedy decoding: llama-completion at temperature 0, --max_new_tokens for each of PROMPTS, against
    sample.py's greedy decoding (KV cache, float32). llama-completion prints text, not ids; its
    --prompt-cache-all session file holds every id it evaluated (prompt, then the generated ones),
    and that is what is compared.
At the first differing token our model's logits of both tokens are printed: a near tie is rounding
(llama.cpp sums its matmuls in another order), a wide gap a real difference.
Exit codes: 0 everything matched, 1 something differed (or the build failed), 2 bad input.
"""
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

# the repo's flat scripts are not a package: put the repo root on the path (as experiments/ do)
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import checkpoint  # noqa: E402
import cli  # noqa: E402
import export  # noqa: E402
import sample  # noqa: E402
import tokenizer  # noqa: E402
from cli import UsageError, flag  # noqa: E402

TARGETS = ("llama-tokenize", "llama-completion")
SDIST = "llama_cpp_python-0.3.36.tar.gz"   # the version this tool was checked with (llama.cpp of May 2026)
# Where the tokenizers of two implementations part: the regex's Unicode classes, whitespace before a
# word, CR/LF runs, digits in threes, bytes that are no whole character (emoji pieces), specials as text.
SAMPLES = [
    'def main():\n    xs = [1, 22, 333, 4444]  # sum\n\treturn f"{sum(xs)!r}"\r\n',
    "山东省最高的山是哪座山？泰山，海拔1545米。",
    "emoji 😀👍🏽 🇫🇷 and a family 👨\u200d👩\u200d👧 🦙🦙",
    "spaces:    four, tabs:\t\t, trailing   \n\n\n  ",
    "CR\rLF\nCRLF\r\n\r\n\n mixed\r\r end",
    "no\u00a0break\u00a0space, 1\u00a0000\u00a0000 and ideographic\u3000space",
    "digits 1234567890 3.14159 2026-12-03 007 ١٢٣",
    "accents: café naïve Zürich señor Ångström e\u0301 ﬁ",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "I'm sure you're right, he'll go; THEY'D say WE'VE it's",
    "text<|endoftext|>more text",   # the special token's text, read as plain text by both
    "   leading spaces, \u200b zero width",
]
PROMPTS = ["def main():\n    ", "import os\nimport sys\n\n\nclass ", "    for i in range(10):"]


@dataclass
class CheckConfig:
    ckpt: str = flag("out/tiny", "checkpoint to check: ckpt.pt or the run folder holding it")
    sdist: str = flag("", "llama-cpp-python sdist (.tar.gz) to build llama.cpp from ('': the cached build)")
    cache: str = flag(os.path.expanduser("~/.cache/minicpm-llama.cpp"), "folder of the cached build")
    gguf_dtype: str = flag("f32", "tensor type of the exported GGUF: f32, f16 or bf16")
    max_new_tokens: int = flag(64, "greedy tokens per prompt")
    threads: int = flag(1, "llama.cpp's threads")


# ----------------------------------------------------------------------------- building llama.cpp

def build(cache, sdist):
    """-> the folder holding TARGETS: the cached build, or one made now from sdist (cached then)."""
    build_dir, stamp = os.path.join(cache, "build"), os.path.join(cache, "build", "BUILT_FROM")
    bin_dir = os.path.join(build_dir, "bin")
    built = all(os.path.isfile(os.path.join(bin_dir, t)) for t in TARGETS) and os.path.isfile(stamp)
    # a cached build is reused unless --sdist names another version than the one it was built from
    if built and (not sdist or open(stamp).read() == os.path.basename(sdist)):
        print(f"llama.cpp: cached build in {bin_dir} ({open(stamp).read()})")
        return bin_dir
    if not sdist:
        raise UsageError(f"no llama.cpp build in {cache}: give --sdist, fetched once with `pip download "
                         f"llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d {cache}`")
    if not os.path.isfile(sdist):
        raise UsageError(f"--sdist {sdist} is not a file: the llama-cpp-python .tar.gz (see --help)")
    source = extract(sdist, os.path.join(cache, "src"))
    shutil.rmtree(build_dir, ignore_errors=True)   # a half-made build of another version would mix
    # CPU only, static binaries; no server, tests or examples (the web UI's configure step downloads)
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=OFF"]
    start, log = time.perf_counter(), os.path.join(cache, "build.log")
    with open(log, "w") as f:
        for command in (["cmake", "-S", source, "-B", build_dir, *options],
                        ["cmake", "--build", build_dir, "-j2", "--target", *TARGETS]):
            if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"the llama.cpp build failed: see {log}")
    with open(stamp, "w") as f:   # written last: a killed build is never taken for a finished one
        f.write(os.path.basename(sdist))
    print(f"llama.cpp: built {', '.join(TARGETS)} from {os.path.basename(sdist)} in "
          f"{time.perf_counter() - start:.0f} s -> {bin_dir}")
    return bin_dir


def extract(sdist, into):
    """The sdist's vendor/llama.cpp folder, extracted under into -> its path."""
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
            if not members:
                raise UsageError(f"--sdist {sdist} holds no vendor/llama.cpp: not a llama-cpp-python sdist")
            shutil.rmtree(into, ignore_errors=True)   # only now: a bad --sdist leaves the cache as it was
            tar.extractall(into, members=members, filter="data")   # "data": no paths outside into, no devices
    except tarfile.TarError as e:   # its message lists every compression tried, one per line
        raise UsageError(f"--sdist {sdist} is not a readable .tar.gz ({type(e).__name__})") from None
    top = members[0].name.split("/")[0]
    return os.path.join(into, top, "vendor", "llama.cpp")


def run_binary(bin_dir, name, *args):
    """A llama.cpp program's stdout; its stderr (the loader's log) is shown only when it fails."""
    result = subprocess.run([os.path.join(bin_dir, name), *args], capture_output=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{name} failed (exit {result.returncode}): " + " | ".join(tail))
    return result.stdout.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- (a) tokens

def check_tokens(bin_dir, gguf_path, enc, work):
    """llama-tokenize against our tokenizer on every sample, two ways -> the number of texts that differ."""
    # with special tokens read (llama-tokenize's default and llama-completion's prompts; sample.py's
    # prompts too) and without (--no-parse-special; tiktoken's encode_ordinary, i.e. training data)
    # A released tokenizer (a FolderTokenizer) puts <s> before a prompt, and so does llama.cpp, told by the
    # file's add_bos_token: compared with it; training data's encode_ordinary has none, --no-bos neither
    bos = ["--no-bos"] if not getattr(enc, "add_bos", False) else []
    bad = 0
    for i, text in enumerate(SAMPLES):
        path = os.path.join(work, f"text{i}.txt")
        with open(path, "wb") as f:   # bytes: CR and CRLF must reach llama.cpp as written
            f.write(text.encode())
        same = []
        for flags, ours in ((bos, enc.encode(text, allowed_special={tokenizer.EOT})),
                            (["--no-bos", "--no-parse-special"], enc.encode_ordinary(text))):
            # -f is read verbatim; --no-escape keeps a typed "\n" two characters
            out = run_binary(bin_dir, "llama-tokenize", "-m", gguf_path, "-f", path, "--ids",
                             "--no-escape", "--log-disable", *flags)
            theirs = [int(t) for t in out.strip().splitlines()[-1].strip("[]").split(",") if t.strip()]
            same.append(ours == theirs)
            if ours != theirs:
                k = first_difference(ours, theirs)
                print(f"    {' '.join(flags) or 'specials read'}: first difference at {k}: ours {piece(enc, ours, k)}, "
                      f"llama.cpp's {piece(enc, theirs, k)}")
        bad += not all(same)
        print(f"  tokens {'same' if all(same) else 'DIFFER'}: {len(ours):3d} ids  {text[:48]!r}")
    return bad


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def piece(enc, ids, k):
    """id k of ids and its bytes, or 'none' past the end."""
    return f"{ids[k]} {enc.decode_single_token_bytes(ids[k])!r}" if k < len(ids) else "none (ended)"


# ----------------------------------------------------------------------------- (b) greedy decoding

def read_session(path):
    """The token ids of a llama.cpp session file: magic 'ggsn', version, n, then n int32 ids."""
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<III", f.read(12))
        if magic != 0x6767736E:   # the state after the ids is llama.cpp's own: not read
            raise RuntimeError(f"{path} is not a llama.cpp session file")
        return list(struct.unpack(f"<{n}i", f.read(4 * n)))


def llama_greedy(bin_dir, gguf_path, prompt, n, cfg, work, i):
    """llama-completion at temperature 0 -> every id it evaluated (its prompt's, then its own)."""
    prompt_path, session = os.path.join(work, f"prompt{i}.txt"), os.path.join(work, f"session{i}.bin")
    with open(prompt_path, "wb") as f:
        f.write(prompt.encode())
    if os.path.exists(session):   # an existing one would be loaded as a cache of this prompt
        os.unlink(session)
    # -no-cnv: plain completion, no chat template; the session file is written at the end, all ids in it.
    # The KV cache is f16 by default (keys and values rounded to 11 bits: ties of a small model's logits
    # then break the other way): f32, and no flash attention, so that only the file's dtype rounds
    run_binary(bin_dir, "llama-completion", "-m", gguf_path, "-f", prompt_path, "-n", str(n), "--temp", "0",
               "-no-cnv", "--no-escape", "--seed", "0", "-t", str(cfg.threads), "--no-warmup",
               "-ctk", "f32", "-ctv", "f32", "-fa", "off",
               "--prompt-cache", session, "--prompt-cache-all", "--log-disable")
    return read_session(session)


def check_greedy(bin_dir, gguf_path, model, enc, cfg, work):
    """llama-completion against sample.generate on every prompt -> the number that differ."""
    bad = 0
    for i, prompt in enumerate(PROMPTS):
        ids = enc.encode(prompt, allowed_special={tokenizer.EOT})   # as sample.py encodes a prompt
        n = min(cfg.max_new_tokens, model.config.block_size - len(ids))   # sample.py's cap: within block_size
        ours = sample.generate(model, ids, n, temperature=0, stop_id=enc.eot_token)
        # sample.py drops the end-of-text it stops at; llama.cpp evaluates it: put it back to compare
        ours = ours + [enc.eot_token] * (len(ours) < n)
        theirs = llama_greedy(bin_dir, gguf_path, prompt, n, cfg, work, i)
        prompt_same, theirs = theirs[:len(ids)] == ids, theirs[len(ids):]
        same = prompt_same and ours == theirs
        bad += not same
        print(f"  greedy {'same' if same else 'DIFFER'}: prompt {len(ids)} ids ({'same' if prompt_same else 'DIFFER'}), "
              f"{len(ours)} new ids here, {len(theirs)} in llama.cpp  {prompt!r}")
        print(f"    text: {enc.decode(ours)!r}")
        if prompt_same and ours != theirs:
            show_divergence(model, enc, ids, ours, theirs)
    return bad


@torch.inference_mode()
def show_divergence(model, enc, ids, ours, theirs):
    """Our model's logits, at the first differing step, of our token and of llama.cpp's."""
    k = first_difference(ours, theirs)
    logits = model(torch.tensor([ids + ours[:k]]))[0][0, -1]   # [V], after the common prefix
    top2 = logits.topk(2).values
    print(f"    first difference at new token {k}: ours {piece(enc, ours, k)}, llama.cpp's {piece(enc, theirs, k)}")
    for name, seq in (("ours", ours), ("llama.cpp's", theirs)):
        if k < len(seq):
            print(f"    logit of {name}: {logits[seq[k]].item():.6f}")
    print(f"    our top-2 gap: {(top2[0] - top2[1]).item():.3g} (a gap near 0 is a rounding tie)")


# ----------------------------------------------------------------------------- command line

def run(argv):
    """Flags -> llama.cpp built (or cached) -> GGUF exported -> (a) and (b) -> exit code."""
    cfg = cli.dataclass_flags(CheckConfig, __doc__, argv)
    cli.check([(cfg.max_new_tokens < 1, "--max_new_tokens must be >= 1"), (cfg.threads < 1, "--threads must be >= 1")])
    ckpt = checkpoint.load(cfg.ckpt)   # before the build: a wrong path fails in a second, not minutes
    bin_dir = build(cfg.cache, cfg.sdist)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-check-") as work:
        gguf_path = os.path.join(work, "model.gguf")
        code = export.main(["--ckpt", cfg.ckpt, "--gguf", gguf_path, "--gguf_dtype", cfg.gguf_dtype])
        if code:
            return code
        model = checkpoint.build_model(ckpt).float().eval()
        enc = tokenizer.load_tokenizer(ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt))
        print(f"(a) llama-tokenize vs our tokenizer ({ckpt['tokenizer']['spec']}), {len(SAMPLES)} texts:")
        bad_tokens = check_tokens(bin_dir, gguf_path, enc, work)
        print(f"(b) llama-completion --temp 0 vs sample.py greedy, {cfg.max_new_tokens} new tokens, {len(PROMPTS)} prompts:")
        bad_greedy = check_greedy(bin_dir, gguf_path, model, enc, cfg, work)
    verdict = "every id matched" if not bad_tokens + bad_greedy else \
        f"{bad_tokens} of {len(SAMPLES)} texts and {bad_greedy} of {len(PROMPTS)} prompts differ"
    print(f"llama_cpp_check: {verdict}")
    return 1 if bad_tokens + bad_greedy else 0


def main(argv=None):
    return cli.main("llama_cpp_check.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
