"""Test-session settings shared by every test file."""

from __future__ import annotations

import os

# Two cores, and many tests spawn two ranks: one intra-op thread per process avoids
# oversubscription (OpenMP spin-waits make an oversubscribed CPU run several times
# slower). Set before torch is imported so that subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
