"""Shared test setup: the repo root on sys.path (the scripts are flat files, not a package),
deterministic single-threaded torch, and the tiny configs every test file uses."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


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
