"""Tests for kernels/rope_attention.py: the RoPE convention against the official fixtures, and the Triton
kernels (forward, dq, dk, dv) against a float64 oracle under Triton's CPU interpreter.

Run: python -m pytest -q tests/test_rope_attention.py

The interpreter checks run in two subprocesses (this file run as a script, one per core) with
TRITON_INTERPRET=1 in their environment: Triton 3.x reads the variable inside @triton.jit, for its own tl.*
library too, that is when triton is first imported, and another test module of the same pytest process
may have imported it first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import rope_attention as ra
from kernels.rope_attention import (rope_angles_2d, rope_apply, rope_attention, rope_attention_reference,
                                    rope_attention_triton)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
VISION_FIXTURES = ["core_cls_ls", "core_nocls_nols", "spatial_cls_nols", "spatial_nocls_ls"]
INPUT_VARIANTS = ["", "_res2", "_nonsquare"]  # grids 4x4, 6x6 and 5x3 (rows x columns)

# Interpreter cases (dtype, N, D, class_row): every N with every D, in float32 and in bfloat16; the class
# row flag alternates so that each N and each D is seen with and without it in both dtypes, and each
# (N, D) pair with it in one dtype and without it in the other. N = 1 + a square grid (cls + 4x4, 14x14,
# 16x16), none a multiple of a tile. The full 48-case product would cost about twice the time budget.
SEQ_LENS, HEAD_DIMS = [1, 17, 197, 257], [32, 64, 96]
INTERPRETER_CASES = [(dtype, N, D, (i + j + (dtype == "bfloat16")) % 2 == 0)
                     for dtype in ("float32", "bfloat16")
                     for i, N in enumerate(SEQ_LENS) for j, D in enumerate(HEAD_DIMS)] + [("float16", 17, 64, True)]
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
BLOCK0_CASES = [("spatial_cls_nols", variant) for variant in INPUT_VARIANTS] + [("core_nocls_nols", "_nonsquare")]


def case_id(case):
    dtype, N, D, class_row = case
    return f"{dtype}-N{N}-D{D}-{'cls' if class_row else 'nocls'}"


def load_fixture(name):
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def complex_rotation64(x, angles):
    """Oracle for the interleaved convention: the pair (x[2i], x[2i+1]) is the complex number
    x[2i] + i x[2i+1], multiplied by exp(i a_i); float64. x (..., N, D), angles (N, D)."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # (..., N, D/2)
    pair_angles = angles[:, 0::2].double()
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(pair_angles), pair_angles)).flatten(-2)


def attention64(q, k, v, angles):
    """softmax(rot(q) rot(k)^T / sqrt(D)) v in float64, written out (no SDPA)."""
    scores = complex_rotation64(q, angles) @ complex_rotation64(k, angles).transpose(-1, -2)
    return (scores / q.shape[-1] ** 0.5).softmax(-1) @ v.double()


def block0(blob, variant, attention):
    """Block 0 of the official vision tower on the fixture's `pre_blocks`, with `attention(q, k, v, angles)`
    standing in for RoPE + SDPA (pe_architecture.md §1.6; these fixtures have no LayerScale)."""
    config, state = blob["config"]["vision_cfg"], blob["state_dict"]
    prefix = "visual." if blob["config"]["model_class"] == "CLIP" else ""
    p = lambda name: state[prefix + "transformer.resblocks.0." + name]
    width, heads = config["width"], config["heads"]
    debug = blob["outputs"]["debug" + variant]
    grid_h, grid_w = debug["grid"]
    angles = rope_angles_2d(grid_h, grid_w, width // heads, config["use_cls_token"])
    x = debug["pre_blocks"]  # (B, N, W)
    h = F.layer_norm(x, (width,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
    qkv = F.linear(h, p("attn.in_proj_weight"), p("attn.in_proj_bias"))  # (B, N, 3W)
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, head_dim)
    out = attention(q, k, v, angles).transpose(1, 2).flatten(2)  # (B, heads, N, hd) -> (B, N, W)
    x = x + F.linear(out, p("attn.out_proj.weight"), p("attn.out_proj.bias"))
    h = F.layer_norm(x, (width,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
    h = F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias")))
    h = F.linear(h, p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
    return x + h, blob["outputs"]["intermediate" + variant][0]


# ---------------------------------------------------------------------------------------------------
# The RoPE convention and the reference path (in process, plain PyTorch).

@pytest.mark.parametrize("name", VISION_FIXTURES)
@pytest.mark.parametrize("variant", INPUT_VARIANTS)
def test_rope_angles_2d_equals_official_table(name, variant):
    blob = load_fixture(name)
    config, debug = blob["config"]["vision_cfg"], blob["outputs"]["debug" + variant]
    official = debug["rope_angles"]  # (N, head_dim)
    grid_h, grid_w = debug["grid"]
    ours = rope_angles_2d(grid_h, grid_w, config["width"] // config["heads"], config["use_cls_token"])
    assert torch.equal(ours, official)
    # the layout the kernels rely on: the two elements of a pair share one angle
    assert torch.equal(official[:, 0::2], official[:, 1::2])


def test_rope_apply_rotates_adjacent_pairs_like_complex_multiplication():
    torch.manual_seed(0)
    angles = load_fixture("core_cls_ls")["outputs"]["debug_nonsquare"]["rope_angles"]  # (16, 16), cls + 5x3
    x = torch.randn(2, 3, *angles.shape)
    torch.testing.assert_close(rope_apply(x, angles).double(), complex_rotation64(x, angles), atol=1e-6, rtol=1e-6)
    # the class row (angle 0) is the identity
    assert torch.equal(rope_apply(x, angles)[..., 0, :], x[..., 0, :])


def test_rope_apply_computes_in_float32_and_keeps_dtype():
    torch.manual_seed(0)
    angles = rope_angles_2d(6, 6, 64, use_cls_token=True)
    x = torch.randn(2, 4, 37, 64).bfloat16()
    out = rope_apply(x, angles)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rope_apply(x.float(), angles).bfloat16())


def test_rope_apply_rejects_mismatched_angles():
    with pytest.raises(ValueError, match="angles"):
        rope_apply(torch.randn(2, 17, 64), torch.zeros(16, 64))


@pytest.mark.parametrize("name", ["spatial_cls_nols", "core_nocls_nols"])
@pytest.mark.parametrize("variant", INPUT_VARIANTS)
def test_reference_reproduces_official_block0(name, variant):
    # The official block 0 with its RoPE, on the fixture's own input: a wrong frequency, x/y order,
    # pairing or class-row offset changes this output by 1e-2 to 1e-1.
    ours, official = block0(load_fixture(name), variant, rope_attention_reference)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)


def test_reference_matches_float64_oracle():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 197, 64).unbind(0)
    angles = rope_angles_2d(14, 14, 64, use_cls_token=True)
    torch.testing.assert_close(rope_attention_reference(q, k, v, angles).double(), attention64(q, k, v, angles),
                               atol=1e-5, rtol=1e-5)


def test_rope_attention_dispatches_on_device_and_interpreter(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 17, 32).unbind(0)
    angles = rope_angles_2d(4, 4, 32, use_cls_token=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(rope_attention(q, k, v, angles), rope_attention_reference(q, k, v, angles))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ra, "rope_attention_triton", lambda *args: "triton")
    assert rope_attention(q, k, v, angles) == "triton"


def test_triton_path_uses_qkv_views_without_copies():
    qkv = torch.randn(2, 17, 3, 4, 32)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # views of one fused projection: same strides, unit last stride
    assert all(a is b for a, b in zip(ra._unit_last_stride(q, k, v), (q, k, v)))
    copied = ra._unit_last_stride(q, k.contiguous(), v)  # mixed layouts: all made contiguous
    assert all(t.is_contiguous() for t in copied)


def test_triton_path_rejects_bad_inputs():
    q = torch.randn(1, 2, 17, 32)
    with pytest.raises(ValueError, match="angles"):
        rope_attention_triton(q, q, q, torch.zeros(16, 32))
    with pytest.raises(ValueError, match="head dim"):
        rope_attention_triton(*(torch.randn(1, 2, 17, 256),) * 3, torch.zeros(17, 256))
    with pytest.raises(ValueError, match="bfloat16"):
        rope_attention_triton(q, q, q.double(), torch.zeros(17, 32))
    if ra._interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process: CPU tensors are valid here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rope_attention_triton(q, q, q, torch.zeros(17, 32))


# ---------------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter (one subprocess, results as JSON).

def interpreter_case(dtype, N, D, class_row):
    """Relative errors of the Triton forward and gradients against the float64 oracle.

    Inputs are rounded to `dtype` first; the oracle sees the same rounded values. With N = 1 the softmax
    is constant, so dq and dk are exactly zero: their error is measured against the size of dv instead.
    """
    generator = torch.Generator().manual_seed(N * 1000 + D)
    dtype = getattr(torch, dtype)
    q, k, v, grad_out = (torch.randn(1, 2, N, D, generator=generator).to(dtype) for _ in range(4))  # B*H = 2
    if class_row:  # official table: class token (zero row) + a square grid
        angles = rope_angles_2d(int(round((N - 1) ** 0.5)), int(round((N - 1) ** 0.5)), D, use_cls_token=True)
    else:  # arbitrary angles, still one per pair
        angles = (torch.rand(N, D // 2, generator=generator) * 100 - 50).repeat_interleave(2, dim=-1)
    assert angles.shape == (N, D)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = rope_attention_triton(*inputs, angles)
    grads = torch.autograd.grad(out, inputs, grad_out)
    inputs64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = attention64(*inputs64, angles)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())
    scale_dv = grads64[2].norm()
    errors = {"dtype_kept": out.dtype == dtype and all(g.dtype == dtype for g in grads)}
    for name, ours, ref in zip(["out", "dq", "dk", "dv"], (out,) + grads, (out64,) + grads64):
        denominator = ref.norm() if ref.norm() > 0 else scale_dv
        errors[name] = ((ours.double() - ref).norm() / denominator).item()
    return errors


def interpreter_strided_case():
    """q, k, v as strided views of one fused (B, N, 3, H, D) projection (as in the model) and a transposed
    output gradient; B and H both > 1, so a mix-up of the batch and head strides cannot pass."""
    generator = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 3, 17, 32
    qkv = torch.randn(B, N, 3, H, D, generator=generator)
    grad_out = torch.randn(B, N, H, D, generator=generator)
    angles = rope_angles_2d(4, 4, D, use_cls_token=True)
    errors = {}
    for attention, dtype in ((rope_attention_triton, torch.float32), (attention64, torch.float64)):
        fused = qkv.to(dtype).requires_grad_()
        q, k, v = fused.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D), non-contiguous views
        out = attention(q, k, v, angles).transpose(1, 2)  # (B, N, H, D)
        errors[dtype] = (out, torch.autograd.grad(out, fused, grad_out.to(dtype))[0])
    (out, grad), (out64, grad64) = errors.values()
    return {"out": ((out.double() - out64).norm() / out64.norm()).item(),
            "dqkv": ((grad.double() - grad64).norm() / grad64.norm()).item()}


def interpreter_jobs():
    """Every interpreter check as (result key, function), cheapest first within each kind."""
    jobs = [(case_id(case), lambda case=case: interpreter_case(*case)) for case in INTERPRETER_CASES]
    jobs.append(("strided", interpreter_strided_case))
    for name, variant in BLOCK0_CASES:  # head_dim 16: official weights, input and angle table
        def block0_error(name=name, variant=variant):
            ours, official = block0(load_fixture(name), variant, rope_attention_triton)
            return (ours - official).abs().max().item()
        jobs.append((f"block0-{name}{variant}", block0_error))
    return jobs


def run_interpreter_checks(shard, shards):
    assert ra._interpreted(), "run with TRITON_INTERPRET=1 set before triton is imported"
    return {key: job() for key, job in interpreter_jobs()[shard::shards]}


SHARDS = 2  # one interpreter process per core


@pytest.fixture(scope="module")
def interpreter_results():
    # one BLAS/OpenMP thread per process: the interpreter's small numpy matmuls only lose time to threading
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, __file__, str(shard), str(SHARDS)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for shard in range(SHARDS)]
    results = {}
    for shard, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"interpreter subprocess {shard} failed (exit {proc.returncode}):\n{stderr[-5000:]}")
        results.update(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=case_id)
def test_triton_forward_and_gradients_match_float64(interpreter_results, case):
    errors = interpreter_results[case_id(case)]
    assert errors.pop("dtype_kept"), "output or gradients not in the input dtype"
    tolerance = TOLERANCE[case[0]]
    assert all(error < tolerance for error in errors.values()), f"{case_id(case)}: {errors} (tolerance {tolerance})"


def test_triton_reads_strided_qkv_views(interpreter_results):
    errors = interpreter_results["strided"]
    assert all(error < 1e-4 for error in errors.values()), errors  # NaN fails too


@pytest.mark.parametrize("name,variant", BLOCK0_CASES)
def test_triton_reproduces_official_block0(interpreter_results, name, variant):
    assert interpreter_results[f"block0-{name}{variant}"] < 1e-5


if __name__ == "__main__":  # python tests/test_rope_attention.py SHARD SHARDS, with TRITON_INTERPRET=1
    torch.set_num_threads(1)
    print(json.dumps(run_interpreter_checks(int(sys.argv[1]), int(sys.argv[2]))))
