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
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_rope_attention import AOT_FULL, SHARED_LIMIT, aot_compile  # noqa: E402  (one compile helper)

LOGIT_SCALE = 100.0  # CLIP's clamp value (1/0.01): the sharpest softmax, the hardest case for precision

# (global batch, d, dtype, Triton block). Each path covers every d (32, 96, 512) and batches of 1, 7 and
# more than 300. The interpreter runs tiles in Python (about 5 ms a tile), so the Triton path stops at
# 1025 = 16 tiles + 1 of the default 64 (and 128, the largest tile); the reference goes to 4097.
REFERENCE_CASES = [(1, 512, "float32"), (7, 32, "float32"), (7, 96, "float32"),
                   (1000, 512, "float32"), (4097, 96, "float32"), (1000, 96, "bfloat16")]
TRITON_CASES = [(1, 32, "float32", 16), (7, 96, "float32", 64), (7, 512, "float32", 64),
                (300, 96, "float32", 128), (1025, 32, "float32", 64), (300, 96, "bfloat16", 64)]
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
    if rank < len(CANCELLATION_KINDS):
        kind = CANCELLATION_KINDS[rank]
        for path, loss_fn in (("triton", closs.contrastive_loss_triton), ("reference", closs.contrastive_loss_reference)):
            result = run_loss(loss_fn, *cancellation_batch(kind), dtype="bfloat16")
            torch.save(result, os.path.join(out_dir, f"cancellation_{kind}_{path}.pt"))
    if rank == 2:
        torch.save(compile_loss_check(), os.path.join(out_dir, "compile.pt"))


def compile_loss_check():
    """torch.compile through the Triton loss (custom ops): graph breaks, and the compiled gradients."""
    image, text, scale = (t.requires_grad_() for t in make_batch(40, 32))
    explained = torch._dynamo.explain(closs.contrastive_loss_triton)(image, text, scale)
    compiled = torch.compile(closs.contrastive_loss_triton, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(image, text, scale), (image, text, scale))
    eager = torch.autograd.grad(closs.contrastive_loss_triton(image, text, scale), (image, text, scale))
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "error": max((a - b).abs().max().item() for a, b in zip(grads, eager))}


def test_torch_compile_traces_the_triton_loss_without_graph_break(spawned_results):
    result = spawned_results("compile")
    assert result["graph_breaks"] == 0 and result["graphs"] == 1, result
    assert result["error"] < 1e-6, result


def cancellation_batch(kind, n=64, dim=32):
    """bf16 features at logit scale 100 where the gradient cancels: clusters of 4 near-duplicate pairs
    (weights within a cluster cancel), or confident positives (P_ii + Q_ii near 2)."""
    generator = torch.Generator().manual_seed(0)
    if kind == "clusters":
        centers = torch.randn(n // 4, dim, generator=generator).repeat_interleave(4, 0)
        image = F.normalize(centers + 0.03 * torch.randn(n, dim, generator=generator), dim=-1)
    else:
        image = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    noise = 0.03 if kind == "clusters" else 0.2
    text = F.normalize(image + noise * torch.randn(n, dim, generator=generator), dim=-1)
    return image.bfloat16(), text.bfloat16(), torch.tensor(LOGIT_SCALE)


CANCELLATION_KINDS = ["clusters", "confident"]


@pytest.mark.parametrize("kind", CANCELLATION_KINDS)
def test_bf16_gradient_survives_cancellation(spawned_results, kind):
    """The Triton bf16 feature gradients within 3x the reference's bf16 error, both against float64 on the
    same bf16 inputs (before the in-tile diagonal and the split weights: 2% and 400%, vs 0.2%)."""
    image, text, scale = cancellation_batch(kind)
    expected = run_loss(naive_loss, image.double(), text.double(), scale.double(), dtype="float64")
    errors = {}
    for path in ("triton", "reference"):
        result = spawned_results(f"cancellation_{kind}_{path}")
        errors[path] = max(((result[name].double() - expected[name]).norm() / expected[name].norm()).item()
                           for name in ("grad_image", "grad_text"))
    assert errors["reference"] < 5e-3, errors
    assert errors["triton"] <= 3 * errors["reference"], errors


def test_tile_sizes_above_the_checked_ones_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for block in (256, 1024, 8, 48):
        with pytest.raises(ValueError, match="block_size"):
            closs.contrastive_loss_triton(*make_batch(9, 8), block_size=block)


def test_column_splits_fill_the_gpu_at_pe_scale():
    # b = 256 rows per rank against B = 65,536 texts, 132 SMs (H100): 4 row blocks alone would idle the GPU
    splits, per_split = closs._column_splits(256, 65536, 64, 4 * 132)
    assert 4 * splits >= 132 and splits * per_split >= 65536 > (splits - 1) * per_split and per_split % 64 == 0
    assert closs._column_splits(65536, 256, 64, 4 * 132) == (1, 256)  # the text side fills it by its rows
    assert closs._column_splits(8, 24, 16, 8) == (2, 16)  # as in the distributed tests: splits are tested


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    grids = []
    monkeypatch.setattr(closs, "_launch", lambda kernel, grid, *args, **kwargs: grids.append(grid))
    image, text = torch.zeros(70000, 16), torch.zeros(70000, 16)
    lse_rows, lse_cols = closs._tile_lse_triton(image, text, torch.ones(1), 16)
    closs._tile_directions_triton(image, text, torch.ones(1), lse_rows, lse_cols, 0, 16)
    assert len(grids) == 4 and all(grid[0] == 4375 and grid[1] < 65536 for grid in grids), grids


def loss_aot_cases():
    cases = []
    for capability in (80, 90):
        for dtype in ("bf16", "fp32"):
            for dim in (64, 512):  # the sum in registers (one feature slice), and through `out`
                for block in (64, closs.MAX_BLOCK):
                    full_only = block != 64 or (capability == 80 and dtype == "fp32")
                    marks = [pytest.mark.skipif(full_only and not AOT_FULL, reason="PE_AOT_FULL=1 compiles it")]
                    cases.append(pytest.param(capability, dtype, dim, block, marks=marks,
                                              id=f"sm{capability}-{dtype}-d{dim}-block{block}"))
    return cases


@pytest.mark.parametrize("capability,dtype,dim,block", loss_aot_cases())
def test_kernels_compile_for_gpus_ahead_of_time(capability, dtype, dim, block):
    if isinstance(closs._lse_kernel, InterpretedFunction):
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process: no GPU compiler")
    args = closs._kernel_args(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]), dim, block)
    warps, stages = args.pop("num_warps"), args.pop("num_stages")
    args["PRECISION"] = "tf32x3" if dtype == "fp32" else "tf32"  # what a GPU gets (this process may differ)
    specs = {name: ("c", value) for name, value in args.items()}
    specs.update(n_rows="i32", n_cols="i32", dim="i32D", cols_per_split="i32D", diag_offset="i32",
                 ONE_SLICE=("c", dim <= args["BLOCK_D"]))
    for kernel in (closs._lse_kernel, closs._direction_kernel):
        for name in kernel.arg_names:
            if name.endswith("ptr"):
                specs[name] = "*" + dtype if name in ("rows_ptr", "cols_ptr") else "*fp32"
        shared, spilled, mma = aot_compile(kernel, specs, capability, warps, stages)
        assert shared <= SHARED_LIMIT[capability], f"{kernel.__name__}: {shared} bytes of shared memory"
        if dtype == "bf16" and block == 64:
            assert spilled == 0, f"{kernel.__name__}: {spilled} bytes of register spills"
        assert mma, f"{kernel.__name__}: no tensor-core MMA in the PTX"  # bf16, and fp32 through tf32x3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_triton_path_matches_naive_float64(dtype):
    image, text, scale = (t.cuda() for t in make_batch(4097, 1024))
    result = run_loss(closs.contrastive_loss_triton, image, text, scale, dtype)  # default tile
    rounded = [t.to(getattr(torch, dtype)).double() for t in (image, text)]
    expected = run_loss(naive_loss_cuda, *rounded, scale.double(), dtype="float64")
    assert_matches(result, expected, TOLERANCE[dtype])


def naive_loss_cuda(image, text, scale):
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


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
