"""Test-suite settings. The models under test are tiny and several tests start 2-3 worker processes, so one
intra-op thread per process avoids oversubscribing the CI machine's two cores (with two threads each, small
ops spend their time waiting at OpenMP barriers). The parity fixtures were also produced with one thread."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import pytest  # noqa: E402

import pe_model  # noqa: E402

TINY_CORE = {  # a 3-block PE-core CLIP with a class token: 32 px, patch 8 (a 4x4 grid)
    "model_class": "CLIP",
    "vision_cfg": {"patch_size": 8, "width": 32, "layers": 3, "heads": 2, "mlp_ratio": 2.0, "output_dim": 16,
                   "image_size": 32, "use_cls_token": True},
    "text_cfg": {"context_length": 32, "width": 32, "heads": 2, "layers": 1, "output_dim": 16},
}


@pytest.fixture(scope="module")
def core_checkpoint(tmp_path_factory):
    """A tiny PE-core CLIP checkpoint (random weights, seed 0) in the format train_clip.py writes; the
    alignment stages start from it."""
    torch.manual_seed(0)
    model = pe_model.build_model(TINY_CORE)
    path = str(tmp_path_factory.mktemp("core") / "core.pt")
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, path)
    return path
