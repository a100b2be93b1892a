"""Ahead-of-time compilation of kernels.py for GPUs this machine does not have, and what each costs.

Triton compiles for any NVIDIA target without the GPU being present: `triton.compile` with an explicit
GPUTarget runs the whole pipeline (Triton IR -> PTX -> ptxas -> cubin), and the `cuobjdump` shipped
in Triton's NVIDIA backend reads each cubin's resource usage. That checks, on a CPU-only machine,
what the autotuner would otherwise find out on the GPU: whether a tile size spills registers to local
memory (slow: every spilled value makes a round trip through L1/L2) or asks for more shared memory than
a block may have (the config fails to launch and the autotuner silently drops it).

Run:   python tools/aot.py [--targets sm_90] [--dtypes bf16] [--head_dims 64] [--out DIR]
       prints one row per compiled kernel and exits 1 if any spills or overflows shared memory.
Test:  python -m pytest -q tests/test_aot.py
"""
import csv
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# the repo's flat scripts (kernels.py) are not a package: put the repo root on the path, so this runs
# as `python tools/aot.py` from any folder (and the pool's worker processes, which re-import it, find them too)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Compute capability -> the most shared memory one block may use (opt-in), from the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability": 163 KB on 8.0 (A100),
# 227 KB on 9.0 (H100/H200). 8.6/8.9 (A10G, L40S, RTX 4090) allow only 99 KB: reported, not checked.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
SMALL_SMEM = 99 * 1024
DTYPES = {"bf16": "*bf16", "fp16": "*fp16"}    # the 16-bit inputs kernels.check_supported accepts on CUDA
AOT_HEAD_DIMS = (64, 128)                      # MiniCPM's head dim, and the common larger one
# A thread may hold at most 255 registers. These kernels call nothing and index no local arrays, so
# any stack frame or local memory holds values the registers could not: a spill. (Usually at 255
# registers; ptxas also spilled at 32 registers for some 4-warp head-dim-128 tiles on sm_80.)
COLUMNS = ["kernel", "target", "dtype", "head_dim", "BLOCK_M", "BLOCK_N", "warps", "stages",
           "regs", "stack", "local", "smem_bytes", "fits_99KB", "mma", "problem"]


def _kernels():
    """{name: (JITFunction, tiles(head_dim))} for every kernel kernels.py launches, where tiles are the
    (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner would time at that head dim."""
    import kernels

    def tuned(autotuner):   # the autotuner's own pruning decides, so this compiles exactly what it tries
        return lambda hd: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                           for c in autotuner.early_config_prune(autotuner.configs, {}, HEAD_DIM=hd)]
    return {"fwd": (kernels._attn_fwd.fn, tuned(kernels._attn_fwd)),
            "bwd_dkdv": (kernels._attn_bwd_dkdv.fn, tuned(kernels._attn_bwd_dkdv)),
            "bwd_dq": (kernels._attn_bwd_dq.fn, tuned(kernels._attn_bwd_dq)),
            # not autotuned: one launch shape, with Triton's default warps and stages
            "bwd_delta": (kernels._bwd_delta, lambda hd: [(kernels.DELTA_BLOCK, None, 4, 3)])}


def _source(fn, dtype, head_dim, block_m, block_n):
    """The ASTSource a training launch would produce: argument types plus the hints the JIT derives."""
    import triton
    sig, attrs = {}, {}
    # The JIT marks an integer or pointer argument divisible by 16 when its value is, which lets the
    # compiler use 16-byte vector loads; in training, pointers, strides (multiples of the head dim)
    # and lengths (multiples of 16) all are. Head counts and GROUPS are left general.
    aligned = re.compile(r"^(Q|K|V|O|LSE|DO|DK|DV|DQ|DELTA|s[a-z]+[bht]|Tq|Tk|T_BUCKET)$")
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("LSE", "DELTA"):       # per-row fp32 statistics, whatever the input dtype
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):   # the [B, H, T, D] tensors
            sig[name] = DTYPES[dtype]
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if not p.is_constexpr and aligned.match(name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m}
    if block_n is not None:
        consts.update(BLOCK_N=block_n, CAUSAL=True)   # causal: the masked and unmasked loops both compile
    return triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _resources(cubin):
    """{'regs', 'stack', 'local', 'static_smem'} of the one function in a cubin, read by cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    # e.g. "REG:231 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:656 ..." on the line after "Function _attn_fwd:"
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[1]))
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                static_smem=int(fields["SHARED"]))


def compile_one(job):
    """Compile one (kernel, target, dtype, head dim, config) and return its table row."""
    import triton
    from triton.backends.compiler import GPUTarget
    name, target, dtype, head_dim, (bm, bn, warps, stages) = job
    fn = _kernels()[name][0]
    cc, smem_limit = TARGETS[target]
    compiled = triton.compile(_source(fn, dtype, head_dim, bm, bn), target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    r = _resources(compiled.asm["cubin"])
    # Which tensor-core instruction the matmuls became: Hopper's asynchronous warpgroup wgmma on sm_90,
    # Ampere's mma.sync on sm_80; "-" would mean tl.dot fell back to plain FMAs (the delta kernel has no dot).
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    # Triton allocates its tiles in dynamic shared memory (metadata.shared, what the launch asks for);
    # the cubin's static part (barriers, reserved bytes) comes on top.
    smem = compiled.metadata.shared + r["static_smem"]
    problems = []
    if r["stack"] or r["local"]:
        problems.append(f"spills ({r['stack']} B stack, {r['local']} B local)")
    if smem > smem_limit:
        problems.append(f"smem {smem} > {smem_limit}")
    return dict(kernel=name, target=target, dtype=dtype, head_dim=head_dim, BLOCK_M=bm, BLOCK_N=bn or "-",
                warps=warps, stages=stages, regs=r["regs"], stack=r["stack"], local=r["local"],
                smem_bytes=smem, fits_99KB="yes" if smem <= SMALL_SMEM else "no", mma=mma, problem="; ".join(problems))


# One job = (kernel, target, dtype, head dim, tile); the table is their product.
def jobs(targets=tuple(TARGETS), dtypes=tuple(DTYPES), head_dims=AOT_HEAD_DIMS):
    return [(name, t, d, hd, cfg) for name, (_, tiles) in _kernels().items() for t in targets for d in dtypes
            for hd in head_dims for cfg in tiles(hd)]


def run(targets=tuple(TARGETS), dtypes=tuple(DTYPES), head_dims=AOT_HEAD_DIMS, out_dir=None, workers=None):
    """Compile every job (in parallel processes: each compile is ~1 s of CPU), print the table, write
    aot.csv under out_dir if given; return the rows. Exits 1 when any row has a problem."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot.py: TRITON_INTERPRET=1 is set, which replaces the compiler; unset it", file=sys.stderr)
        sys.exit(2)
    # the jobs are independent and compiling is single-threaded: one process per core
    todo = jobs(targets, dtypes, head_dims)
    t0 = time.time()
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        rows = list(pool.map(compile_one, todo))
    print("\t".join(COLUMNS))
    for row in rows:
        print("\t".join(str(row[c]) for c in COLUMNS))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "aot.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    # the whole table is printed first, so a failure can be read next to the tiles that passed
    bad = [r for r in rows if r["problem"]]
    print(f"{len(rows)} kernels compiled in {time.time() - t0:.0f} s, {len(bad)} with problems")
    if bad:
        sys.exit(f"aot.py: {len(bad)} of {len(rows)} kernels spill or overflow shared memory (see 'problem')")
    return rows


def from_flags(argv):
    """--targets/--dtypes/--head_dims/--out -> run(); bad flags raise cli.UsageError before anything compiles."""
    import cli
    import kernels
    # cli's parser raises UsageError for a bad flag, which cli.main prints as one line (exit 2)
    p = cli.Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated input dtypes")
    p.add_argument("--head_dims", default=",".join(map(str, AOT_HEAD_DIMS)), help="comma-separated head dims")
    p.add_argument("--out", default="bench", help="folder for aot.csv")
    args = p.parse_args(argv)
    # a target without a shared-memory limit in TARGETS would be compiled unchecked, and a head dim
    # the kernel refuses at run time is not worth compiling
    allowed = {"targets": list(TARGETS), "dtypes": list(DTYPES), "head_dims": [str(d) for d in kernels.HEAD_DIMS]}
    lists = {flag: getattr(args, flag).split(",") for flag in allowed}
    cli.check([(not set(given) <= set(allowed[flag]), f"--{flag} {getattr(args, flag)}: not all in "
                f"{','.join(allowed[flag])}") for flag, given in lists.items()])
    run(lists["targets"], lists["dtypes"], [int(d) for d in lists["head_dims"]], out_dir=args.out)
    return 0


def main(argv=None):   # -> exit code: 0, 1 (a kernel spills or overflows shared memory), 2 (bad flags)
    import cli
    return cli.main("aot.py", from_flags, argv)


if __name__ == "__main__":
    sys.exit(main())
