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
    standing in for RoPE + SDPA (the official ResidualAttentionBlock; these fixtures have no LayerScale)."""
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


def test_vision_tower_caches_its_angle_table_per_grid_outside_the_state_dict():
    import pe_model
    torch.manual_seed(0)
    tower = pe_model.VisionTransformer(patch_size=8, width=64, layers=1, heads=4, mlp_ratio=2.0, image_size=32,
                                       use_cls_token=True, pool_type="tok")
    keys = list(tower.state_dict())
    with torch.inference_mode():  # first built here: still a normal tensor, so a training step may save it
        first = tower.embed(torch.randn(2, 3, 32, 32))[1]
    assert not first.is_inference() and torch.equal(first, rope_angles_2d(4, 4, 16, use_cls_token=True))
    tower.forward_features(torch.randn(2, 3, 32, 32)).sum().backward()
    assert tower.embed(torch.randn(1, 3, 32, 32))[1] is first  # built once per grid, reused
    other = tower.embed(torch.randn(1, 3, 48, 40))[1]  # a 6 x 5 grid: its own table
    assert torch.equal(other, rope_angles_2d(6, 5, 16, use_cls_token=True))
    assert list(tower.state_dict()) == keys


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


def interpreter_rotation_case():
    """The rotation kernel (one pass per tensor, before the flash loops) against rope_apply, on a strided view
    in bfloat16 (rounding once, like rope_apply) and float32; N = 197 is not a multiple of the row tile."""
    generator = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 197, 3, 3, 96, generator=generator)  # (B, N, 3, H, D): D = 96 is padded to 128
    angles = (torch.rand(197, 48, generator=generator) * 100 - 50).repeat_interleave(2, dim=-1)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        k = qkv.to(dtype).permute(2, 0, 3, 1, 4)[1]  # (B, H, N, D), non-contiguous
        ours, ref = ra._rotated(k, *ra._pair_tables(angles)), rope_apply(k, angles).float()
        # largest difference in units of 2^-7 |ref| (one bfloat16 rounding step at most is <= 1)
        errors[str(dtype)] = (((ours.float() - ref).abs() / (ref.abs() * 2 ** -7 + 1e-30)).max().item(),
                              ours.dtype == dtype and ours.is_contiguous())
    return errors


class RopeBlock(torch.nn.Module):
    """A PE vision block's attention half (pre-norm, fused qkv, 2D RoPE attention, projection)."""

    def __init__(self, width=64, heads=2):
        super().__init__()
        self.heads, self.norm = heads, torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x, angles):
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return x + self.proj(rope_attention(q, k, v, angles).transpose(1, 2).flatten(2))


def interpreter_compile_case():
    """torch.compile through the Triton attention (custom ops): graph breaks, and compiled gradients."""
    torch.manual_seed(0)
    block, x = RopeBlock(), torch.randn(2, 17, 64, requires_grad=True)
    angles = rope_angles_2d(4, 4, 32, use_cls_token=True)
    explained = torch._dynamo.explain(block)(x, angles)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(x, angles).square().sum(), (x, *block.parameters()))
    eager = torch.autograd.grad(block(x, angles).square().sum(), (x, *block.parameters()))
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "error": max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, eager))}


def interpreter_jobs():
    """Every interpreter check as (result key, function), cheapest first within each kind."""
    jobs = [(case_id(case), lambda case=case: interpreter_case(*case)) for case in INTERPRETER_CASES]
    jobs.append(("strided", interpreter_strided_case))
    jobs.append(("rotation", interpreter_rotation_case))
    jobs.append(("compile", interpreter_compile_case))
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


def test_rotation_kernel_matches_rope_apply(interpreter_results):
    results = interpreter_results["rotation"]
    assert results["torch.float32"][0] < 2 ** -10 and results["torch.float32"][1], results  # float32 math both
    # bfloat16: the same float32 rotation rounded once, at most one step apart (the interpreter's cast to
    # bfloat16 truncates, half the elements differ by one step; a GPU rounds to nearest like torch)
    assert results["torch.bfloat16"][0] <= 1 and results["torch.bfloat16"][1], results


def test_torch_compile_traces_the_triton_attention_without_graph_break(interpreter_results):
    result = interpreter_results["compile"]
    assert result["graph_breaks"] == 0 and result["graphs"] == 1, result
    assert result["error"] < 1e-5, result


@pytest.mark.parametrize("name,variant", BLOCK0_CASES)
def test_triton_reproduces_official_block0(interpreter_results, name, variant):
    assert interpreter_results[f"block0-{name}{variant}"] < 1e-5


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compiles for real GPUs (no GPU needed): Triton's own backend and bundled ptxas, with the
# specialisations a launch gets (16-byte aligned pointers, strides divisible by 16). The default suite
# compiles every config in bf16 at head dim 64 for sm_80 and sm_90, and one config per kernel for the other
# cases; PE_AOT_FULL=1 compiles the whole matrix (every config, D 64 and 96, bf16 and fp32, both targets).

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use: A100, H100
AOT_FULL = os.environ.get("PE_AOT_FULL") == "1"


def aot_compile(kernel, specs, capability, num_warps, num_stages):
    """Compile `kernel` for sm_<capability>. specs: arg name -> "*bf16" (pointer), "i32", "i32D" (divisible
    by 16), "fp32", or ("c", value) for a constexpr. Returns (shared bytes, spilled bytes, MMA opcodes)."""
    import contextlib, io, re  # noqa: E401
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        spec = specs[name]
        if isinstance(spec, tuple):
            signature[name], constants[name] = "constexpr", spec[1]
            continue
        signature[name] = spec.rstrip("D")
        if spec.startswith("*") or spec.endswith("D"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    log, dump, always = io.StringIO(), knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills, printed on stdout
    knobs.compilation.always_compile = True  # a cache hit runs no ptxas: no log, and spills would read as 0
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                                      target=GPUTarget("cuda", capability, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = dump, always
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    assert found, "no ptxas -v output: spills unknown"
    spills = [int(a) + int(b) for a, b in found]
    mma = set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*", compiled.asm["ptx"]))
    return compiled.metadata.shared, max(spills, default=0), mma


def rope_specs(name, dtype, D, block_m, block_n):
    kernel = ra._KERNELS[name]
    specs = {"H": "i32", "N": "i32", "qk_scale": "fp32", "sm_scale": "fp32", "HEAD_DIM": ("c", D),
             "BLOCK_M": ("c", block_m), "BLOCK_N": ("c", block_n), "BLOCK_D": ("c", 1 << (D - 1).bit_length()),
             "DOT_PRECISION": ("c", "tf32x3" if dtype == "fp32" else "tf32"),
             "DOT_DTYPE": ("c", getattr(ra.tl, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))}
    for arg in kernel.arg_names:
        if arg not in specs:
            specs[arg] = "i32D" if arg.startswith("stride") else "*fp32" if arg in ("COS", "SIN", "LSE", "DELTA") \
                else "*" + dtype
    return kernel, specs


def rope_aot_cases():
    cases = []
    for capability in (80, 90):
        for dtype, D in (("bf16", 64), ("bf16", 96), ("fp32", 64), ("fp32", 96)):
            for name in ("fwd", "dq", "dkdv", "rot"):
                for j, config in enumerate(ra._configs(name, dtype == "fp32", capability)):
                    full_only = not (dtype == "bf16" and D == 64) and (j > 0 or capability == 80)
                    marks = [pytest.mark.skipif(full_only and not AOT_FULL, reason="PE_AOT_FULL=1 compiles it")]
                    cases.append(pytest.param(capability, name, dtype, D, config, marks=marks,
                                              id=f"sm{capability}-{name}-{dtype}-D{D}-{'-'.join(map(str, config))}"))
    return cases


@pytest.mark.parametrize("capability,name,dtype,D,config", rope_aot_cases())
def test_kernels_compile_for_gpus_ahead_of_time(capability, name, dtype, D, config):
    if ra._interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process: no GPU compiler")
    block_m, block_n, warps, stages = config
    shared, spilled, mma = aot_compile(*rope_specs(name, dtype, D, block_m, block_n), capability, warps, stages)
    assert shared <= SHARED_LIMIT[capability], f"{shared} bytes of shared memory"
    if dtype == "bf16" and D == 64:
        assert spilled == 0, f"{spilled} bytes of register spills"
    assert mma or name == "rot", "no tensor-core MMA in the PTX"  # bf16, and fp32 through tf32x3; rot: no dot


def test_rope_attention_routes_what_the_kernels_cannot_take_to_the_reference():
    assert ra._route(True, False, 64, torch.bfloat16) == "triton"
    assert ra._route(False, True, 64, torch.float32) == "triton"  # interpreter
    assert ra._route(False, False, 64, torch.bfloat16) == "reference"  # CPU
    for D in (8, 15, 33, 256):  # too small for tl.dot, odd, too large: the reference, never a crash
        assert ra._route(True, False, D, torch.bfloat16) == "reference"
    assert ra._route(True, False, 64, torch.float32) == ra.FP32_CUDA_PATH


class GridRecorder:
    """Stands in for ra._launch: records each launch's grid for every tile config it could get, no run."""

    def __init__(self):
        self.grids = []

    def __call__(self, name, grid, fp32, *args, **kwargs):
        configs = ra._configs(name, fp32, 80) + ra._configs(name, fp32, 90)
        metas = [kwargs] if "BLOCK_M" in kwargs else [{"BLOCK_M": bm, "BLOCK_N": bn} for bm, bn, _, _ in configs]
        self.grids += [grid(meta) for meta in metas]


def test_launch_grids_stay_within_cuda_limits_at_70000_batch_heads(monkeypatch):
    recorder = GridRecorder()
    monkeypatch.setattr(ra, "_launch", recorder)
    q = torch.randn(7000, 10, 1, 16)  # B*H = 70,000 > 65,535, tiny N and D
    angles = rope_angles_2d(1, 1, 16, use_cls_token=False)
    o, lse = ra._fwd_op(q, q, q, angles)  # the custom ops run on CPU tensors here: the launches are recorded
    ra._bwd_op(q, q, q, angles, o, lse, q)
    assert len(recorder.grids) >= 3
    for grid in recorder.grids:
        assert grid[0] == 70000 and all(size < 65536 for size in grid[1:]), grid


# ---------------------------------------------------------------------------------------------------
# On a CUDA GPU (skipped without one; bench/gpu_check.py runs them).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


def cuda_errors(dtype, B, H, N, D, attention=rope_attention_triton):
    """Relative errors of out, dq, dk, dv against float64, q, k, v strided views of one fused projection and
    a non-contiguous output gradient."""
    generator = torch.Generator(device="cuda").manual_seed(N * 100 + D)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", generator=generator).to(dtype)
    grad_out = torch.randn(B, N, H, D, device="cuda", generator=generator).to(dtype).transpose(1, 2)
    angles = (torch.rand(N, D // 2, device="cuda", generator=generator) * 60 - 30).repeat_interleave(2, dim=-1)
    results = []
    for attend, fused in ((attention, qkv.clone().requires_grad_()), (attention64, qkv.double().requires_grad_())):
        out = attend(*fused.permute(2, 0, 3, 1, 4), angles)
        results.append((out, torch.autograd.grad(out, fused, grad_out.to(out.dtype))[0]))
    (out, grad), (out64, grad64) = results
    scale = grad64.norm().clamp_min(1e-30)
    return {"out": ((out.double() - out64).norm() / out64.norm()).item(),
            "dqkv": ((grad.double() - grad64).norm() / scale).item()}


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("N", [1, 17, 197, 257, 577, 1025])
@pytest.mark.parametrize("D", [16, 64, 96])
def test_cuda_fused_attention_matches_float64(dtype, N, D):
    errors = cuda_errors(getattr(torch, dtype), 2, 3, N, D)
    assert all(error < CUDA_TOLERANCE[dtype] for error in errors.values()), errors


@cuda
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("name", ["fwd", "dq", "dkdv", "rot"])
def test_cuda_every_autotune_config_launches(monkeypatch, fp32, name):
    major, minor = torch.cuda.get_device_capability()
    for config in ra._configs(name, fp32, 10 * major + minor):
        monkeypatch.setattr(ra, "_launchers", {})
        monkeypatch.setattr(ra, "_configs", lambda n, f, c, only=config, real=ra._configs: [only] if n == name
                            else real(n, f, c))
        dtype = torch.float32 if fp32 else torch.bfloat16
        errors = cuda_errors(dtype, 2, 2, 257, 64)
        assert all(error < CUDA_TOLERANCE[str(dtype)[6:]] for error in errors.values()), (config, errors)
        monkeypatch.undo()


@cuda
def test_cuda_65536_batch_heads():
    errors = cuda_errors(torch.bfloat16, 4096, 16, 3, 16)
    assert all(error < 2e-2 for error in errors.values()), errors


@cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_block_under_bf16_autocast(checkpointing):
    torch.manual_seed(0)
    block, x = RopeBlock(128, 2).cuda(), torch.randn(4, 197, 128, device="cuda", requires_grad=True)
    angles = rope_angles_2d(14, 14, 64, use_cls_token=True, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.utils.checkpoint.checkpoint(block, x, angles, use_reentrant=False) if checkpointing \
            else block(x, angles)
    grads = torch.autograd.grad(out.float().square().sum(), (x, *block.parameters()))
    reference = RopeBlock(128, 2).cuda()
    reference.load_state_dict(block.state_dict())
    monkey = ra.rope_attention_triton
    try:
        ra.rope_attention_triton = rope_attention_reference  # the same block, rotate-then-SDPA
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = torch.autograd.grad(reference(x, angles).float().square().sum(), (x, *reference.parameters()))
    finally:
        ra.rope_attention_triton = monkey
    for ours, theirs in zip(grads, expected):
        assert ((ours - theirs).norm() / theirs.norm()).item() < 3e-2


if __name__ == "__main__":  # python tests/test_rope_attention.py SHARD SHARDS, with TRITON_INTERPRET=1
    torch.set_num_threads(1)
    print(json.dumps(run_interpreter_checks(int(sys.argv[1]), int(sys.argv[2]))))
