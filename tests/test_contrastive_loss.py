"""kernels/contrastive_loss.py against a naive float64 full-matrix CLIP loss: loss value and the
gradients of both feature sets and of the logit scale, on the PyTorch reference path and on the
Triton path (CPU interpreter); the DDP gradient convention with 2 and 3 gloo processes, equal and
unequal local batches; and that the reference never builds the B x B logit matrix.

Triton's interpreter must be on (TRITON_INTERPRET=1) when triton is first imported, and another
test module may have imported triton in this pytest process already; so the Triton cases run in
spawned processes whose environment has the variable from the start (the same three processes
that run the distributed checks).

Run: python -m pytest -q tests/test_contrastive_loss.py
"""

import functools
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import kernels.contrastive_loss as closs  # noqa: E402

LOGIT_SCALE = 100.0  # CLIP's clamp value (1/0.01): the sharpest softmax, the hardest case for precision

# (global batch, d, dtype, Triton block). Each path covers every batch (1, 7, 1000, 4097) and every
# d (32, 96, 512). The interpreter runs tiles in Python, so its large batches get small d and large
# blocks; the small blocks on small batches exercise the masked row, column and d edges.
REFERENCE_CASES = [(1, 512, "float32"), (7, 32, "float32"), (7, 96, "float32"),
                   (1000, 512, "float32"), (4097, 96, "float32"), (1000, 96, "bfloat16")]
TRITON_CASES = [(1, 32, "float32", 16), (7, 96, "float32", 64), (7, 512, "float32", 64),
                (1000, 96, "float32", 512), (4097, 32, "float32", 1024), (300, 96, "bfloat16", 128)]
TOLERANCE = {"float32": 1e-4, "bfloat16": 1.5e-2}  # relative to the largest expected magnitude


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Tile loops issue many small ops; on a shared, oversubscribed CPU two OpenMP threads spin at
    every op's barrier (10x slower here), one thread does not. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(global_batch, dim, seed=0):
    """L2-normalised image features and text features correlated with them (positives stand out)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(global_batch, dim, generator=generator), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(global_batch, dim, generator=generator), dim=-1)
    return image, text, torch.tensor(LOGIT_SCALE)


def run_loss(loss_fn, image, text, scale, dtype="float32", upstream=1.0, **kwargs):
    """Loss and gradients of loss_fn on copies of the inputs cast to dtype; `upstream` is the
    gradient flowing into the loss."""
    image = image.to(getattr(torch, dtype)).requires_grad_()
    text = text.to(getattr(torch, dtype)).requires_grad_()
    scale = scale.clone().requires_grad_()
    loss = loss_fn(image, text, scale, **kwargs)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    return {"loss": loss.detach(), "grad_image": image.grad, "grad_text": text.grad,
            "grad_scale": scale.grad}


def naive_loss(image, text, scale):
    """The B x B logit matrix and the mean of the two cross-entropies: the definition."""
    logits = scale * image @ text.T                                    # (B, B)
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@functools.cache
def naive_float64(global_batch, dim, dtype):
    """The expected results, from the inputs as rounded to dtype, computed in float64."""
    image, text, scale = make_batch(global_batch, dim)
    rounded = [t.to(getattr(torch, dtype)).double() for t in (image, text)]
    return run_loss(naive_loss, *rounded, scale.double(), dtype="float64")


def assert_matches(result, expected, rtol, grad_factor=1.0, rows=slice(None), check_scale_grad=True):
    """Same loss; feature gradients (rows `rows`) and scale gradient = grad_factor x expected.
    Tolerances are relative to the largest expected magnitude (at least 1 for the loss)."""
    def check(name, actual, wanted, floor=0.0):
        largest = max(wanted.abs().max().item() if wanted.numel() else 0.0, floor)
        torch.testing.assert_close(actual.double(), wanted, rtol=0, atol=rtol * largest + 1e-9,
                                   msg=lambda message: f"{name}: {message}")
    check("loss", result["loss"], expected["loss"], floor=1.0)
    check("grad_image", result["grad_image"], grad_factor * expected["grad_image"][rows])
    check("grad_text", result["grad_text"], grad_factor * expected["grad_text"][rows])
    if check_scale_grad:
        check("grad_scale", result["grad_scale"], grad_factor * expected["grad_scale"])


@pytest.mark.parametrize("global_batch,dim,dtype", REFERENCE_CASES)
def test_reference_path_matches_naive_float64(global_batch, dim, dtype):
    image, text, scale = make_batch(global_batch, dim)
    result = run_loss(closs.contrastive_loss_reference, image, text, scale, dtype, chunk_size=512)
    expected = naive_float64(global_batch, dim, dtype)
    assert_matches(result, expected, TOLERANCE[dtype])


@pytest.fixture(scope="module")
def spawned_results(tmp_path_factory):
    """Everything that needs the Triton interpreter or several processes, in one spawn (see below)."""
    out_dir = tmp_path_factory.mktemp("spawned")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the children inherit it from their start
    try:
        mp.spawn(_spawned_worker, args=(_free_port(), str(out_dir)), nprocs=3)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return lambda name: torch.load(out_dir / f"{name}.pt", weights_only=True)


@pytest.mark.parametrize("global_batch,dim,dtype,block", TRITON_CASES)
def test_triton_path_matches_naive_float64(spawned_results, global_batch, dim, dtype, block):
    result = spawned_results(f"triton_{global_batch}_{dim}_{dtype}")
    expected = naive_float64(global_batch, dim, dtype)
    assert_matches(result, expected, TOLERANCE[dtype])


def test_upstream_gradient_scales_all_gradients():
    image, text, scale = make_batch(50, 16)
    result = run_loss(closs.contrastive_loss_reference, image, text, scale, upstream=0.3, chunk_size=16)
    assert_matches(result, naive_float64(50, 16, "float32"), 1e-4, grad_factor=0.3)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def test_reference_never_materialises_the_logit_matrix():
    global_batch, dim, chunk = 1024, 32, 128
    image, text, scale = make_batch(global_batch, dim)
    image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()
    with LargestTensor() as recorder:
        closs.contrastive_loss_reference(image, text, scale, chunk_size=chunk).backward()
    # the largest tensors are the (B, d) features and gradients, not (B, B) = 4.2M logits
    assert recorder.numel == global_batch * dim
    assert image.grad is not None and text.grad is not None and scale.grad is not None


def test_dispatch_uses_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(closs, "contrastive_loss_triton", lambda *a, **k: pytest.fail("took the Triton path"))
    image, text, scale = make_batch(9, 8)
    torch.testing.assert_close(closs.contrastive_loss(image, text, scale),
                               closs.contrastive_loss_reference(image, text, scale))


def test_dispatch_uses_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(closs, "contrastive_loss_triton", lambda *a, **k: "triton")
    image, text, scale = make_batch(9, 8)
    assert closs.contrastive_loss(image, text, scale) == "triton"


def test_triton_path_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        closs.contrastive_loss_triton(*make_batch(9, 8))


def test_mismatched_feature_shapes_raise():
    image, text, scale = make_batch(9, 8)
    with pytest.raises(ValueError, match="must both be"):
        closs.contrastive_loss(image, text[:5], scale)


# -----------------------------------------------------------------------------
# Processes with TRITON_INTERPRET=1 from their start: three gloo ranks, each holding a slice of the
# same global batch (make_batch with the same seed); two-rank runs use the subgroup of ranks 0 and 1.
# Afterwards the three share out the single-process Triton cases.

DIST_DIM = 24
SPLITS = {3: [(8, 8, 8), (11, 5, 0)], 2: [(16, 16), (3, 21)]}  # local batch of each rank


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _split_name(path, split, rank):
    return f"{path}_{'-'.join(map(str, split))}_{rank}"


def _spawned_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    groups = {3: dist.group.WORLD, 2: dist.new_group([0, 1])}  # every rank takes part in new_group
    paths = {"reference": functools.partial(closs.contrastive_loss_reference, chunk_size=8),
             "triton": functools.partial(closs.contrastive_loss_triton, block_size=16)}
    for world_size, splits in SPLITS.items():
        if rank >= world_size:
            continue
        for split in splits:
            image, text, scale = make_batch(sum(split), DIST_DIM)
            local = slice(sum(split[:rank]), sum(split[: rank + 1]))
            for path, loss_fn in paths.items():
                result = run_loss(loss_fn, image[local], text[local], scale, group=groups[world_size])
                torch.save(result, os.path.join(out_dir, _split_name(path, split, rank) + ".pt"))
    dist.destroy_process_group()
    for global_batch, dim, dtype, block in TRITON_CASES[rank::3]:
        image, text, scale = make_batch(global_batch, dim)
        result = run_loss(closs.contrastive_loss_triton, image, text, scale, dtype, block_size=block)
        torch.save(result, os.path.join(out_dir, f"triton_{global_batch}_{dim}_{dtype}.pt"))


def check_ddp_convention(spawned_results, world_size):
    for split in SPLITS[world_size]:
        expected = naive_float64(sum(split), DIST_DIM, "float32")
        for path in ["reference", "triton"]:
            results = [spawned_results(_split_name(path, split, rank)) for rank in range(world_size)]
            for rank, result in enumerate(results):
                # the full global loss on every rank; world_size x this rank's slice of the gradients
                rows = slice(sum(split[:rank]), sum(split[: rank + 1]))
                assert result["grad_image"].shape == result["grad_text"].shape == (split[rank], DIST_DIM)
                assert_matches(result, expected, 1e-4, grad_factor=world_size, rows=rows,
                               check_scale_grad=False)
            # the scale's gradients average over ranks to the full-batch one (DDP's all-reduce mean)
            mean_scale_grad = torch.stack([r["grad_scale"] for r in results]).double().mean()
            torch.testing.assert_close(mean_scale_grad, expected["grad_scale"], rtol=1e-4, atol=1e-7)


def test_two_processes_follow_the_ddp_gradient_convention(spawned_results):
    check_ddp_convention(spawned_results, world_size=2)


def test_three_processes_with_unequal_local_batches(spawned_results):
    check_ddp_convention(spawned_results, world_size=3)
