"""Nothing we load may run code (checkpoint.py), and a checkpoint or disk we cannot use is one line.

A payload that would create a marker file is planted in each place a checkpoint keeps pickled data:
(a) a sharded checkpoint's .metadata, which DCP reads with plain pickle.load, (b) a non-tensor item of a
shard file, which DCP reads with torch.load(weights_only=False), (c) ckpt.pt and (d) a sharded state.pt.
Each plant is first shown to run under the stock loader (DCP's own reader, torch.load without
weights_only), so the tests below prove the refusal, not a file that would have failed to parse anyway;
then every loader and every entry script must refuse it: exit 2, one stderr line naming the path, no
marker. Sharded checkpoints are written by train.py --fsdp in one process (as in test_fsdp.py)."""
import dataclasses
import io
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.tensor import DTensor

import atomic
import checkpoint
import cli
import dpo
import export
import parallel
import sample
import train
from conftest import ROOT, SMALL_MODEL
from minicpm import MiniCPM, MiniCPMConfig

PLANTS = ["metadata", "bytes", "ckpt.pt", "state.pt"]


class Payload:
    """Unpickled, it runs `touch MARKER`: what a hostile checkpoint would do with a worse command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        # pickle stores "call os.system with this string": any loader that resolves the global runs it
        return os.system, (f"touch '{self.marker}'",)


# ----------------------------------------------------------------------------- the checkpoints

@pytest.fixture(scope="module")
def genuine(corpus, tmp_path_factory):
    """A real sharded run at step 1 of 4 (so it can be resumed, also on 2 processes with --grad_accum 1) and a
    ckpt.pt made from it by export.py."""
    root = tmp_path_factory.mktemp("genuine")
    assert train.main(["--source", corpus["source"], "--tokenizer", "byte", "--data_dir", corpus["data_dir"],
                       "--out_dir", str(root / "sharded_run"), *SMALL_MODEL, "--eval_tokens", "256", "--dtype", "float32",
                       "--max_steps", "4", "--warmup_steps", "1", "--stop_at", "1", "--fsdp", "--grad_accum", "2"]) == 0
    assert export.main(["--ckpt", str(root / "sharded_run"), "--out", str(root / "pt_run"), "--single"]) == 0
    return root


def step_folder(run):
    # the step folder LATEST names, where DCP's files and state.pt are
    return os.path.join(run, "sharded", open(os.path.join(run, "sharded", "LATEST")).read())


def read_metadata(step):
    # our restricted unpickler reading a genuine file: the allow-list is complete for what DCP writes
    with open(os.path.join(step, ".metadata"), "rb") as f:
        return checkpoint.MetadataUnpickler(f).load()


def write_metadata(step, md):
    # plain pickle.dump, as DCP's FileSystemWriter writes it
    with open(os.path.join(step, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def plant(genuine, kind, dest, marker):
    """A copy of the genuine run at dest with the payload planted in `kind`; -> dest."""
    shutil.copytree(genuine / ("pt_run" if kind == "ckpt.pt" else "sharded_run"), dest)
    if kind == "ckpt.pt" or kind == "state.pt":
        # (c), (d): the payload nested in the config dict of a genuine file
        path = dest / "ckpt.pt" if kind == "ckpt.pt" else os.path.join(step_folder(dest), "state.pt")
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["note"] = Payload(marker)
        torch.save(ckpt, path)
        return dest
    step = step_folder(dest)
    md = read_metadata(step)
    if kind == "metadata":   # (a): a real Metadata object, the payload nested inside its planner_data dict
        md.planner_data["note"] = Payload(marker)
    else:   # (b): the payload appended to the shard file, an optimizer item's entry pointed at it
        index = MetadataIndex("optimizer.param_groups.0.lr")
        info = md.storage_data[index]
        shard = os.path.join(step, info.relative_path)
        blob = io.BytesIO()
        torch.save(Payload(marker), blob)   # as DCP writes a non-tensor item: torch.save of the value
        data = blob.getvalue()
        md.storage_data[index] = dataclasses.replace(info, offset=os.path.getsize(shard), length=len(data))
        with open(shard, "ab") as f:
            f.write(data)
    write_metadata(step, md)   # for (b) a metadata of DCP's own classes only: it passes our unpickler
    return dest


@pytest.mark.parametrize("kind", PLANTS)
def test_each_plant_runs_code_under_the_stock_loader(genuine, tmp_path, kind):
    # the control: what the project did before, and what torch does by default, runs the payload
    marker = tmp_path / "marker"
    run = plant(genuine, kind, tmp_path / "run", marker)
    if kind == "metadata":
        FileSystemReader(step_folder(run)).read_metadata()
    elif kind == "bytes":
        _load_state_dict_from_keys(checkpoint_id=step_folder(run))
    else:
        torch.load(run / "ckpt.pt" if kind == "ckpt.pt" else os.path.join(step_folder(run), "state.pt"), weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- every loader, in-process

def one_line(e, run):
    # what cli.main prints: one line, naming the folder the user gave
    text = str(e)
    assert "\n" not in text and str(run) in text, text
    return text


@pytest.mark.parametrize("kind", PLANTS)
def test_checkpoint_load_refuses_every_plant(genuine, tmp_path, kind):
    # the one reader behind sample.py --ckpt, export.py --ckpt, train.py and dpo.py --init_from
    marker = tmp_path / "marker"
    run = plant(genuine, kind, tmp_path / "run", marker)
    with pytest.raises(cli.UsageError) as e:
        checkpoint.load(str(run))   # weights=True: the whole of it, as sample.py, export.py, --init_from read it
    assert not marker.exists()
    one_line(e.value, run)
    # the refusal says what it refused, not only that the file is bad
    assert {"metadata": f"names {os.system.__module__}.system", "bytes": "item optimizer.param_groups.0.lr"}.get(kind, "") in str(e.value)


@pytest.mark.parametrize("kind", ["metadata", "bytes", "state.pt"])
def test_load_sharded_and_restore_into_a_plain_model_refuse(genuine, tmp_path, kind):
    marker = tmp_path / "marker"
    run = plant(genuine, kind, tmp_path / "run", marker)
    root = checkpoint.sharded_folder(str(run))
    # load_sharded raises DCP's own error (checkpoint.load and restore make it one line), never runs the payload
    with pytest.raises(BaseException) as e:
        checkpoint.load_sharded(root, weights=True)
    assert not marker.exists() and not isinstance(e.value, cli.UsageError)
    if kind == "state.pt":
        with pytest.raises(pickle.UnpicklingError):
            checkpoint.load_sharded(root, weights=False)
        return
    # .metadata is read before DCP starts; a shard's item inside DCP, which wraps the error per rank
    causes = [exc for exc, _ in e.value.failures.values()] if kind == "bytes" else [e.value]
    assert causes and all(isinstance(exc, checkpoint.NotData) for exc in causes)
    # weights=False reads state.pt only (as train.py --resume does): fine; the slices come in restore
    ckpt = checkpoint.load(str(run), weights=False)
    model = MiniCPM(MiniCPMConfig(**ckpt["model_config"]))
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 0.1), lr=1e-3)
    with pytest.raises(cli.UsageError) as e:
        checkpoint.restore(ckpt, model, optimizer)
    assert not marker.exists()
    one_line(e.value, run)


def process_group(tmp_path):
    # a one-process gloo group: FSDP2 shards over it, and restore takes its dcp.load path (each rank its slices)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)


def sharded_model(ckpt):
    model = MiniCPM(MiniCPMConfig(**ckpt["model_config"]))
    parallel.shard(model, SimpleNamespace(world=1), torch.float32)
    return model, torch.optim.AdamW(model.param_groups(1e-3, 0.1), lr=1e-3)


@pytest.mark.parametrize("kind", ["genuine", "metadata", "bytes"])
def test_restore_into_a_sharded_model(genuine, tmp_path, kind):
    marker = tmp_path / "marker"
    run = plant(genuine, kind, tmp_path / "run", marker) if kind != "genuine" else genuine / "sharded_run"
    process_group(tmp_path)
    try:
        ckpt = checkpoint.load(str(run), weights=False)
        model, optimizer = sharded_model(ckpt)
        assert parallel.is_sharded(model)
        if kind != "genuine":
            with pytest.raises(cli.UsageError) as e:
                checkpoint.restore(ckpt, model, optimizer)
            assert not marker.exists()
            one_line(e.value, run)
            return
        checkpoint.restore(ckpt, model, optimizer)
    finally:
        dist.destroy_process_group()
    assert_as_stock_dcp_reads(run, model, optimizer)   # the positive case: a genuine checkpoint resumes whole


def test_genuine_checkpoints_load_whole_as_the_stock_loader_reads_them(genuine):
    ckpt = checkpoint.load(str(genuine / "sharded_run"))
    want = _load_state_dict_from_keys(checkpoint_id=step_folder(genuine / "sharded_run"))
    assert ckpt["model"].keys() == want["model"].keys() and ckpt["step"] == 1
    for name, w in want["model"].items():
        torch.testing.assert_close(ckpt["model"][name], w, rtol=0, atol=0, msg=name)
    # the non-tensor items (read by our planner with weights_only=True) are the same plain values
    for got, w in zip(ckpt["optimizer"]["param_groups"], want["optimizer"]["param_groups"]):
        assert {k: v for k, v in got.items() if k != "params"} == {k: v for k, v in w.items() if k != "params"}
    model = MiniCPM(MiniCPMConfig(**ckpt["model_config"]))
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 0.1), lr=1e-3)
    checkpoint.restore(checkpoint.load(str(genuine / "sharded_run"), weights=False), model, optimizer)
    assert_as_stock_dcp_reads(genuine / "sharded_run", model, optimizer)


def assert_as_stock_dcp_reads(run, model, optimizer):
    """Weights, Adam moments and groups restored equal what torch's own DCP loader reads from run."""
    # the reference is torch's loader itself: safe here, on a genuine checkpoint
    want = _load_state_dict_from_keys(checkpoint_id=step_folder(run))
    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t   # a sharded model's slices gathered
    for name, p in model.state_dict().items():
        torch.testing.assert_close(whole(p), want["model"][name], rtol=0, atol=0, msg=name)
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert len(optimizer.state) == len(want["optimizer"]["state"]) > 0
    for p, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(whole(state[key]), want["optimizer"]["state"][name_of[id(p)]][key], rtol=0, atol=0)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [g["lr_scale"] for g in want["optimizer"]["param_groups"]]


# ----------------------------------------------------------------------------- every entry script

ENTRIES = {   # RUN: the planted checkpoint; OUT: a folder that must not be created
    "sample.py --ckpt": ["sample.py", "--ckpt", "RUN", "--device", "cpu"],
    "train.py --init_from": ["train.py", "--init_from", "RUN", "--out_dir", "OUT", "--data_dir", "OUT"],
    "train.py --upcycle_from": ["train.py", "--upcycle_from", "RUN", "--out_dir", "OUT", "--data_dir", "OUT"],
    "train.py --resume": ["train.py", "--resume", "RUN"],   # reads state.pt, then the slices in restore
    "dpo.py --init_from": ["dpo.py", "--init_from", "RUN", "--out_dir", "OUT"],
    "dpo.py --resume": ["dpo.py", "--resume", "RUN"],
    "export.py --ckpt": ["export.py", "--ckpt", "RUN", "--out", "OUT"],
    "export.py --ckpt --single": ["export.py", "--ckpt", "RUN", "--out", "OUT", "--single"],
}
MAINS = {"sample.py": sample.main, "train.py": train.main, "dpo.py": dpo.main, "export.py": export.main}


def argv(entry, run, out):
    return [str(run) if a == "RUN" else str(out) if a == "OUT" else a for a in ENTRIES[entry]]


def assert_refused(code, err, run, out, marker):
    # the house rule for bad input: exit 2, one line naming the path, no traceback, nothing written
    assert not marker.exists()
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and str(run) in err, err
    assert not os.path.exists(out)   # nothing written


@pytest.fixture(scope="module")
def entry_runs(genuine, tmp_path_factory):
    """Each entry script run as a real process on its own copy of a .metadata plant, all at once."""
    # started together: 3-4 s of CPU for torch's import each, shared by the cores (~15 s on two idle ones)
    root, procs = tmp_path_factory.mktemp("entries"), {}
    for i, entry in enumerate(ENTRIES):
        (root / str(i)).mkdir()
        paths = SimpleNamespace(run=root / str(i) / "run", out=root / str(i) / "out", marker=root / str(i) / "marker")
        plant(genuine, "metadata", paths.run, paths.marker)
        procs[entry] = paths, subprocess.Popen([sys.executable, *argv(entry, paths.run, paths.out)], cwd=ROOT, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {entry: (paths, proc.wait(timeout=300), proc.communicate()[1]) for entry, (paths, proc) in procs.items()}


@pytest.mark.slow   # 8 processes; the same cases run in-process below in a second
@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_scripts_refuse_a_metadata_payload(entry_runs, entry):
    # a real process: a warning or a log record DCP prints (a traceback) would show here, on stderr
    paths, code, err = entry_runs[entry]
    assert_refused(code, err, paths.run, paths.out, paths.marker)


@pytest.mark.slow   # two processes under torchrun: 13-25 s
def test_sharded_resume_under_torchrun_refuses_a_metadata_payload(genuine, tmp_path):
    # each rank reads its own slices (restore's dcp.load): both refuse, rank 0 alone says so
    marker = tmp_path / "marker"
    run = plant(genuine, "metadata", tmp_path / "run", marker)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", "--resume", str(run), "--fsdp", "--grad_accum", "1"], cwd=ROOT, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:   # hung: kill torchrun and its workers together
            os.killpg(proc.pid, 9)
    assert not marker.exists() and proc.returncode != 0
    # torchrun adds its own report of the failed workers; ours is one line, once
    ours = [line for line in err.splitlines() if line.startswith("train.py: ")]
    assert len(ours) == 1 and "cannot read the sharded checkpoint" in ours[0] and str(run) in ours[0], err[-3000:]


@pytest.mark.parametrize("kind", PLANTS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_mains_refuse_every_plant(genuine, tmp_path, capsys, entry, kind):
    # in-process (each script's main, as its __main__ runs it) to keep the 32 cases to seconds
    marker, out = tmp_path / "marker", tmp_path / "out"
    run = plant(genuine, kind, tmp_path / "run", marker)
    args = argv(entry, run, out)
    code = MAINS[args[0]](args[1:])
    assert_refused(code, capsys.readouterr().err, run, out, marker)


# ----------------------------------------------------------------------------- unreadable is one line

def damaged(genuine, tmp_path, how):
    # what a copy interrupted, a disk error or a hand edit leaves: a file gone, or cut in the middle
    run = tmp_path / "run"
    shutil.copytree(genuine / "sharded_run", run)
    step = step_folder(run)
    shard = os.path.join(step, "__0_0.distcp")
    if how == "missing shard":
        os.unlink(shard)
    elif how == "truncated shard":
        os.truncate(shard, os.path.getsize(shard) // 2)
    else:   # a truncated .metadata
        os.truncate(os.path.join(step, ".metadata"), os.path.getsize(os.path.join(step, ".metadata")) // 2)
    return run


@pytest.mark.parametrize("how", ["missing shard", "truncated shard", "truncated metadata"])
def test_a_damaged_sharded_checkpoint_is_one_line_from_load_and_restore(genuine, tmp_path, how):
    # DCP raises CheckpointException, a BaseException, which an `except Exception` would let through
    run = damaged(genuine, tmp_path, how)
    with pytest.raises(cli.UsageError) as e:
        checkpoint.load(str(run))
    assert "cannot read the sharded checkpoint" in one_line(e.value, run)
    # a resume reads state.pt first (whole here) and meets the damage in restore: one line there too
    ckpt = checkpoint.load(str(run), weights=False)
    model = MiniCPM(MiniCPMConfig(**ckpt["model_config"]))
    with pytest.raises(cli.UsageError) as e:
        checkpoint.restore(ckpt, model, torch.optim.AdamW(model.param_groups(1e-3, 0.1), lr=1e-3))
    one_line(e.value, run)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_while_reading_stays_a_ctrl_c(genuine, monkeypatch, stop):
    # DCP wraps even a KeyboardInterrupt into its CheckpointException: it must come out as itself, not as bad input
    def interrupted(self, plan, planner):   # Ctrl-C arriving while the shard files are read
        raise stop()
    monkeypatch.setattr(checkpoint.DataReader, "read_data", interrupted)
    with pytest.raises(stop):
        checkpoint.load(str(genuine / "sharded_run"))


# ----------------------------------------------------------------------------- a full disk is one line

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes, unmounted afterwards."""
    mounted = []

    def mount(size):
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
        mounted.append(disk)
        return disk
    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


def test_ckpt_pt_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(genuine, small_disk, capsys):
    disk = small_disk(256 * 1024)
    (disk / "ckpt.pt").write_bytes(b"the previous checkpoint")
    # torch.save raises RuntimeError("unexpected pos"), not OSError: atomic_write makes it ENOSPC naming the file
    with pytest.raises(OSError) as e:
        atomic.atomic_save({"w": torch.zeros(100_000)}, str(disk / "ckpt.pt"))   # 400 KB
    assert e.value.errno == 28 and e.value.filename == str(disk / "ckpt.pt")
    assert os.listdir(disk) == ["ckpt.pt"] and (disk / "ckpt.pt").read_bytes() == b"the previous checkpoint"
    # through a script: export.py --single of the genuine run (about 1.2 MB) onto the small disk
    before = (genuine / "pt_run" / "ckpt.pt").read_bytes()
    code = export.main(["--ckpt", str(genuine / "pt_run"), "--out", str(disk / "out"), "--single"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == f"export.py: cannot use {disk / 'out' / 'ckpt.pt'}: No space left on device", err
    assert os.listdir(disk / "out") == [] and (genuine / "pt_run" / "ckpt.pt").read_bytes() == before


def test_sharded_checkpoint_on_a_full_disk_keeps_the_last_one(genuine, small_disk, capsys):
    # a disk with room for the run at step 1 and little more: the save of step 2 fills it mid-way
    # (tmpfs counts whole pages: the margin is far below the ~1.2 MB a second checkpoint needs)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(genuine / "sharded_run") for n in names)
    disk = small_disk(size + 128 * 1024)
    run = disk / "run"
    shutil.copytree(genuine / "sharded_run", run)
    # one step, then save_sharded: DCP's write fails inside its CheckpointException, reported as ENOSPC
    code = train.main(["--resume", str(run), "--stop_at", "2"])
    err = capsys.readouterr().err.strip().splitlines()   # (above it, the progress bar of the one step)
    assert code == 1 and not any("Traceback" in line for line in err)
    assert err[-1] == f"train.py: cannot use {run / 'sharded' / 'step_00000002'}: No space left on device", err[-1]
    assert sorted(os.listdir(run / "sharded")) == ["LATEST", "step_00000001"]   # the half-written step removed
    assert checkpoint.load(str(run))["step"] == 1


# ----------------------------------------------------------------------------- flags and ranks

FLOATS = [("train.py", train.TrainConfig), ("dpo.py", dpo.DPOConfig), ("sample.py", sample.SampleConfig),
          ("export.py", export.ExportConfig)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
@pytest.mark.parametrize("script,config", FLOATS, ids=[s for s, _ in FLOATS])
def test_non_finite_float_flags_are_refused_by_every_script(capsys, script, config, value):
    names = [f.name for f in dataclasses.fields(config) if f.type in (float, "float")]
    # export.py has no float flag today; a new one would be checked by the same rule in cli.parse
    assert names or script == "export.py"
    for name in names:
        code = MAINS[script]([f"--{name}={value}"])
        shown = {"1e999": "inf"}.get(value, value)   # what float() makes of it
        assert (code, capsys.readouterr().err) == (2, f"{script}: --{name} {shown}: must be a finite number\n")


def test_non_finite_model_flags_too_all_at_once(capsys):
    # the model overrides (minicpm.py's fields) go through cli.parse too; every bad flag in one line
    assert train.main(["--lr", "inf", "--init_std", "nan", "--beta1", "0.9"]) == 2
    assert capsys.readouterr().err == "train.py: --lr inf: must be a finite number; --init_std nan: must be a finite number\n"


def test_only_rank_0_prints(genuine, monkeypatch, capsys, tmp_path):
    # under torchrun every rank fails the same way: one line from rank 0, not one per process
    (tmp_path / "file").write_text("")
    bad_out = ["--ckpt", str(genuine / "pt_run"), "--out", str(tmp_path / "file" / "out"), "--single"]   # under a file
    for rank, lines in (("1", 0), ("0", 1)):   # the exit codes kept: torchrun reports the failure either way
        monkeypatch.setenv("RANK", rank)
        assert train.main(["--lr", "inf"]) == 2
        assert export.main(bad_out) == 2   # refused before loading (cli.check_writable)
        assert len(capsys.readouterr().err.splitlines()) == 2 * lines
