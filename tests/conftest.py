"""Shared test setup: the repo root on sys.path (the scripts are flat files, not a package),
deterministic single-threaded torch, and the tiny configs every test file uses."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))
# Triton reads TRITON_INTERPRET when it is first imported, and transformers (test_hf.py, test_export.py)
# imports it at collection: without CUDA, kernels.py's tests run through Triton's interpreter, so it
# is switched on here, before any test module is imported (it changes nothing for CPU-only code).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def repo_root():
    return ROOT


def small_config(**overrides):
    """A model small enough for any test: 2 layers, d 64, 4 query heads over 2 KV heads."""
    from minicpm import MiniCPMConfig
    base = dict(vocab_size=97, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160, block_size=64)
    return MiniCPMConfig(**{**base, **overrides})


@pytest.fixture
def tiny_config():
    return small_config()


# Flags for a model small enough to train in seconds, used by the train.py-driven tests.
SMALL_MODEL = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--ffn_dim", "160",
               "--block_size", "64", "--batch_size", "4", "--seq_len", "32"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of real text (some of the standard library's own modules) and a data folder."""
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    root = tmp_path_factory.mktemp("corpus")
    for name in ["json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py", "textwrap.py",
                 "string.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py"]:
        (root / name.replace("/", "_")).write_text(open(os.path.join(stdlib, name), encoding="utf-8").read())
    return dict(source=str(root), data_dir=str(tmp_path_factory.mktemp("data")))


def metrics(out_dir):
    """The rows of a run's metrics.jsonl."""
    import json
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def pytest_configure(config):
    # tests/test_aot.py's full compile sweep (~30 s): `-m "not slow"` leaves such tests out
    config.addinivalue_line("markers", "slow: a test of more than ~20 s; deselect with -m 'not slow'")
