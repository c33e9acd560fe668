"""Test-suite settings. The models under test are tiny and several tests start 2-3 worker processes, so one
intra-op thread per process avoids oversubscribing the CI machine's two cores (with two threads each, small
ops spend their time waiting at OpenMP barriers). The parity fixtures were also produced with one thread."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
