"""Fused 2D-RoPE attention: softmax(rot(q) rot(k)^T / sqrt(D)) v in Triton kernels, forward and backward.

Every block of PE's vision tower (Bolya et al. 2025, arXiv 2504.13181; official code: core/vision_encoder/rope.py
and pe.py of facebookresearch/perception_models) rotates q and k with 2D RoPE, then runs attention. Here the
rotation is one Triton pass per tensor around a flash-attention kernel (FlashAttention-2, Dao 2023), and the
backward's inverse rotation happens in registers.

    rope_attention(q, k, v, angles)            q, k, v (B, H, N, D); angles (N, D) float32 -> (B, H, N, D)
    rope_attention_reference(q, k, v, angles)  the same in plain PyTorch: rope_apply, then SDPA
    rope_attention_triton(q, k, v, angles)     the Triton kernels, as torch.library custom ops with autograd
    rope_apply(x, angles)                      the rotation itself, x (..., N, D) -> same shape and dtype
    rope_angles_2d(grid_h, grid_w, head_dim, use_cls_token, device=None)   the official (N, D) angle table

`rope_attention` takes the Triton kernels for CUDA tensors and under TRITON_INTERPRET=1 (the tests), the reference
otherwise, and on CUDA for head dims the kernels do not take (warning once) and for float32 (FP32_CUDA_PATH).
Tests: python -m pytest -q tests/test_rope_attention.py    Benchmark: python bench/rope_attention.py

The rotation (the official convention). Adjacent pairs (2i, 2i+1) share one angle a_i:
    out[2i]   = t[2i]   cos a_i - t[2i+1] sin a_i
    out[2i+1] = t[2i+1] cos a_i + t[2i]   sin a_i
in float32, cast back to the input dtype, as the official code does. The first half of D holds column angles
x f_j, the second half row angles y f_j, f_j = 10000^(-4j/D); a class token has a row of zeros.

The kernels read (N, D/2) cos and sin tables (one angle per pair, cached per angle table). Each tile is rotated
once, in float32, and rounded to the input dtype, so the tensor cores see what rotate-then-attend would:
  * forward: a rotation kernel writes rot(k); one program per (query block, batch*head) rotates its q tile in
    registers, then loops over the rot(k) blocks with the online softmax (exp2, log2(e) folded into the scale).
    Stores O and the base-2 log-sum-exp LSE (float32, (B*H, N)).
  * backward: rot(q) and rot(k) are recomputed. dq kernel, one program per query block: stores Delta =
    rowsum(dO * O), loops over key blocks recomputing P = exp2(S - LSE), dS = P * (dO v^T - Delta),
    d rot(q) += scale * dS rot(k). dk/dv kernel (after it, reading Delta), one program per key block:
    dv += P^T dO, d rot(k) += scale * dS^T rot(q). The rotation is orthogonal, so dq = rot(d rot(q), -angles)
    (dk alike), applied in registers before dq and dk are stored.
Saved for backward: q, k, v (unrotated: views of a fused qkv stay views), O, LSE and the angle table. Rows beyond
N are masked; key columns beyond N get score -inf (forward) or probability 0 (backward). A head dim that is not
a power of two (96 for PE-G) is padded with zeros.
"""

import math
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


# ---------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the CPU path, the readable statement of what the kernels compute.

def rope_angles_2d(grid_h, grid_w, head_dim, use_cls_token, theta=10000.0, device=None):
    """The official 2D-RoPE angle table (Rope2D in the official rope.py), (N, head_dim) float32: the patch grid in
    row-major order, N = grid_h * grid_w, +1 with a class token first (angle 0). Grid indices start at 1 with a
    class token, else at 0 (official quirk). The same bits on any device: only the frequencies (a pow) use the CPU."""
    if head_dim % 4 != 0:
        raise ValueError(f"rope_angles_2d: head_dim={head_dim} must be a multiple of 4 (two axes, pairs)")
    # head_dim/4 frequencies per axis: theta^(-2j / (head_dim/2)) = theta^(-4j / head_dim) (not 1D RoPE's)
    freqs = (theta ** (-torch.arange(0, head_dim // 4, dtype=torch.float32) * 4 / head_dim)).to(device)
    start = 1 if use_cls_token else 0
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32, device=device) + start,
                          torch.arange(grid_w, dtype=torch.float32, device=device) + start, indexing="ij")
    # (gh*gw, head_dim/4) each: column (then row) index times each frequency, each angle twice (interleaved
    # pairs); column angles fill the first half of the head dim, rows the second
    angles = torch.cat([(axis.reshape(-1, 1) * freqs).repeat_interleave(2, dim=-1) for axis in (x, y)], dim=-1)
    if use_cls_token:
        angles = torch.cat([angles.new_zeros(1, head_dim), angles], dim=0)  # (N, head_dim), class row = identity
    return angles


def rope_apply(x, angles):
    """Rotate adjacent pairs (2i, 2i+1) of x (..., N, D) by angles (N, D); float32 math, x's dtype out."""
    if angles.dim() != 2 or x.dim() < 2 or tuple(angles.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"rope_apply: angles of shape {tuple(angles.shape)} must be (N, D) = "
                         f"{tuple(x.shape[-2:])}, the last two dims of x")
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # (..., N, D) -> (..., N, D/2, 2)
    # the partner of each element with the sign of the rotation: (t0, t1) -> (-t1, t0)
    partner = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., N, D)
    angles = angles.float()
    return (x32 * angles.cos() + partner * angles.sin()).to(x.dtype)


def rope_attention_reference(q, k, v, angles):
    """softmax(rot(q) rot(k)^T / sqrt(D)) v with the rotation done first, in plain PyTorch."""
    return F.scaled_dot_product_attention(rope_apply(q, angles), rope_apply(k, angles), v)


# ---------------------------------------------------------------------------------------------------
# Triton kernels. program_id(0) is the batch*head index (CUDA's grid axes 1 and 2 stop at 65,535), program_id(1)
# the row block. q, k, v (and dO) are read with the caller's (batch, head, row) strides, the last one being 1;
# rot(q), rot(k), O, dq, dk, dv are contiguous (B, H, N, D). DOT_DTYPE is the operand type of tl.dot: the input
# dtype on a GPU; float32 under the interpreter (its tl.dot cannot multiply bfloat16), operands still rounded.

@triton.jit
def _load_rows(PTR, offs_rows, mask_rows, offs_cols, mask_cols, row_stride):
    """A (rows, cols) tile of a matrix with unit column stride; zeros outside the masks."""
    return tl.load(PTR + offs_rows[:, None] * row_stride + offs_cols[None, :],
                   mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)


@triton.jit
def _rotate(x, COS, SIN, offs_rows, mask_rows, offs_p, mask_p, HALF: tl.constexpr, INVERSE: tl.constexpr,
            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """x (ROWS, BLOCK_D), the tile of these token rows, with its pairs (2i, 2i+1) rotated in float32 by their
    angles, loaded as cos and sin tiles (ROWS, BLOCK_D/2); INVERSE: by -angle (used on the gradients)."""
    cos = _load_rows(COS, offs_rows, mask_rows, offs_p, mask_p, HALF)
    sin = _load_rows(SIN, offs_rows, mask_rows, offs_p, mask_p, HALF)
    sin = -sin if INVERSE else sin
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (ROWS, BLOCK_D // 2, 2)))  # (ROWS, BLOCK_D/2) each
    return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (ROWS, BLOCK_D))


@triton.jit
def _rope_rotate_kernel(X, COS, SIN, OUT, stride_z, stride_h, stride_n, H, N, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """rot(x) for BLOCK_M rows of one (batch, head), stored contiguous (B, H, N, D) in x's dtype."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_p = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D // 2)
    mask_m, mask_d, mask_p = offs_m < N, offs_d < HEAD_DIM, offs_p < HEAD_DIM // 2
    x = _load_rows(X + (bh // H) * stride_z + (bh % H) * stride_h, offs_m, mask_m, offs_d, mask_d, stride_n)
    x = _rotate(x, COS, SIN, offs_m, mask_m, offs_p, mask_p, HEAD_DIM // 2, False, BLOCK_M, BLOCK_D)
    tl.store(OUT + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], x.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _rope_attn_fwd_kernel(Q, KR, V, COS, SIN, O, LSE, stride_z, stride_h, stride_n, H, N, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    base = (bh // H) * stride_z + (bh % H) * stride_h  # this (batch, head) in q and v
    out_base = bh * N * HEAD_DIM  # ... and in the contiguous rot(k) and O
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_p = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D // 2)  # offs_p: pair index
    mask_m, mask_d, mask_p = offs_m < N, offs_d < HEAD_DIM, offs_p < HEAD_DIM // 2

    # rot(q) for this query block, once, rounded to the input dtype like rotate-then-attend would
    q = _rotate(_load_rows(Q + base, offs_m, mask_m, offs_d, mask_d, stride_n), COS, SIN, offs_m, mask_m, offs_p,
                mask_p, HEAD_DIM // 2, False, BLOCK_M, BLOCK_D).to(Q.dtype.element_ty).to(DOT_DTYPE)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _load_rows(KR + out_base, offs_n, mask_n, offs_d, mask_d, HEAD_DIM).to(DOT_DTYPE)  # rot(k), rotated already
        v = _load_rows(V + base, offs_n, mask_n, offs_d, mask_d, stride_n).to(DOT_DTYPE)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + out_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _rope_attn_bwd_dq_kernel(QR, KR, V, COS, SIN, O, DO, LSE, DELTA, DQ, stride_z, stride_h, stride_n,
                             stride_doz, stride_doh, stride_don, H, N, qk_scale, sm_scale,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    base = (bh // H) * stride_z + (bh % H) * stride_h  # v: the caller's layout
    do_base = (bh // H) * stride_doz + (bh % H) * stride_doh
    out_base = bh * N * HEAD_DIM  # rot(q), rot(k), O and DQ: contiguous
    row_base = bh * N  # LSE and Delta
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_p = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D // 2)
    mask_m, mask_d, mask_p = offs_m < N, offs_d < HEAD_DIM, offs_p < HEAD_DIM // 2

    q = _load_rows(QR + out_base, offs_m, mask_m, offs_d, mask_d, HEAD_DIM).to(DOT_DTYPE)
    do = _load_rows(DO + do_base, offs_m, mask_m, offs_d, mask_d, stride_don).to(DOT_DTYPE)
    o = _load_rows(O + out_base, offs_m, mask_m, offs_d, mask_d, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # Delta_i = sum_j P_ij dP_ij = dO_i . O_i
    tl.store(DELTA + row_base + offs_m, delta, mask=mask_m)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _load_rows(KR + out_base, offs_n, mask_n, offs_d, mask_d, HEAD_DIM).to(DOT_DTYPE)
        v = _load_rows(V + base, offs_n, mask_n, offs_d, mask_d, stride_n).to(DOT_DTYPE)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)  # the forward's probabilities
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # softmax backward
        dq += tl.dot(ds.to(KR.dtype.element_ty).to(DOT_DTYPE), k, input_precision=DOT_PRECISION)

    # d rot(q) -> dq: rotate back by -angle (cos/sin loaded here, not kept live through the loop; dk too)
    dq = _rotate(dq * sm_scale, COS, SIN, offs_m, mask_m, offs_p, mask_p, HEAD_DIM // 2, True, BLOCK_M, BLOCK_D)
    tl.store(DQ + out_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _rope_attn_bwd_dkdv_kernel(QR, KR, V, COS, SIN, DO, LSE, DELTA, DK, DV, stride_z, stride_h, stride_n,
                               stride_doz, stride_doh, stride_don, H, N, qk_scale, sm_scale,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    base = (bh // H) * stride_z + (bh % H) * stride_h  # v: the caller's layout
    do_base = (bh // H) * stride_doz + (bh % H) * stride_doh
    out_base = bh * N * HEAD_DIM  # rot(q), rot(k), DK and DV: contiguous
    row_base = bh * N  # LSE and Delta
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d, offs_p = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D // 2)
    mask_n, mask_d, mask_p = offs_n < N, offs_d < HEAD_DIM, offs_p < HEAD_DIM // 2

    k = _load_rows(KR + out_base, offs_n, mask_n, offs_d, mask_d, HEAD_DIM).to(DOT_DTYPE)
    v = _load_rows(V + base, offs_n, mask_n, offs_d, mask_d, stride_n).to(DOT_DTYPE)

    dk, dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = _load_rows(QR + out_base, offs_m, mask_m, offs_d, mask_d, HEAD_DIM).to(DOT_DTYPE)
        do = _load_rows(DO + do_base, offs_m, mask_m, offs_d, mask_d, stride_don).to(DOT_DTYPE)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)

        # transposed scores: rows are this program's keys, columns the query block
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.where(mask_m[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(DO.dtype.element_ty).to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(QR.dtype.element_ty).to(DOT_DTYPE), q, input_precision=DOT_PRECISION)

    dk = _rotate(dk * sm_scale, COS, SIN, offs_n, mask_n, offs_p, mask_p, HEAD_DIM // 2, True, BLOCK_N, BLOCK_D)
    tile_n = mask_n[:, None] & mask_d[None, :]
    tl.store(DK + out_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=tile_n)
    tl.store(DV + out_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_n)


# ---------------------------------------------------------------------------------------------------
# Launching. The head dim is a compile-time constant; on a GPU each kernel is autotuned over a few tile
# shapes, keyed on N and the head dim; under the interpreter the tile shape is fixed (_blocks).
# _CONFIGS: (BLOCK_M, BLOCK_N, num_warps, num_stages, lowest compute capability); every config fits sm_80 and
# sm_90 shared memory (tests/test_rope_attention.py compiles them all); those marked 90 spill on sm_80.
_CONFIGS = {"fwd": [(128, 64, 4, 3, 80), (128, 64, 8, 3, 80), (128, 32, 4, 3, 80), (64, 64, 4, 3, 80),
                    (128, 128, 8, 2, 80), (64, 32, 4, 2, 80)],  # a tall query block, the keys stream through
            # dq: programs own BLOCK_M query rows. dk/dv: programs own BLOCK_N key rows, two accumulators.
            "dq": [(64, 64, 4, 2, 90), (64, 64, 8, 3, 90), (128, 64, 8, 2, 80), (64, 128, 8, 2, 90), (32, 64, 4, 2, 90)],
            "dkdv": [(64, 64, 8, 3, 90), (32, 64, 8, 2, 90), (32, 64, 8, 3, 80), (32, 128, 8, 2, 90),
                     (32, 64, 4, 2, 90), (32, 32, 4, 2, 80)],
            "rot": [(64, 0, 4, 1, 80)]}  # one elementwise pass, memory-bound: one config (BLOCK_N unused)
# float32 operands: tensor cores through tf32x3 (three tf32 products per fp32 one, float32-accurate)
_FP32_CONFIGS = {"fwd": [(64, 32, 8, 2, 80), (32, 32, 8, 2, 80)], "dq": [(64, 32, 8, 2, 80), (32, 32, 8, 2, 80)],
                 "dkdv": [(32, 32, 4, 2, 80), (32, 32, 8, 2, 80)], "rot": _CONFIGS["rot"]}
# float32 CUDA tensors in rope_attention: "reference" (rope_apply + SDPA, exact float32) or "triton" (tf32x3)
FP32_CUDA_PATH = "reference"
_INTERPRETER_BLOCK_M = 128
_launchers, _tables, _warned = {}, {}, set()
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_KERNELS = {"fwd": _rope_attn_fwd_kernel, "dq": _rope_attn_bwd_dq_kernel, "dkdv": _rope_attn_bwd_dkdv_kernel,
            "rot": _rope_rotate_kernel}


def _interpreted():
    """Whether the kernels run on the interpreter. Triton 3.x decides inside @triton.jit, for its own tl.*
    library too, i.e. when triton is first imported: setting TRITON_INTERPRET later has no effect."""
    return isinstance(_rope_attn_fwd_kernel, InterpretedFunction)


def _unsupported(head_dim):
    """Why the kernels cannot take this head dim, or None (tl.dot needs >= 16; tiles checked up to 128)."""
    if head_dim % 2 != 0 or not 16 <= head_dim <= 128:
        return f"head dim {head_dim} must be even and in [16, 128]"
    return None


def _route(is_cuda, interpreting, head_dim, dtype):
    """The path rope_attention takes: "triton" or "reference" (the dispatcher's decision, testable on CPU)."""
    if not (is_cuda or interpreting) or _unsupported(head_dim):
        return "reference"
    return FP32_CUDA_PATH if is_cuda and dtype == torch.float32 else "triton"


def _configs(name, fp32, capability):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel `name` for a GPU of this compute capability."""
    return [config[:4] for config in (_FP32_CONFIGS if fp32 else _CONFIGS)[name] if capability >= config[4]]


def _launch(name, grid, fp32, *args, **kwargs):
    """Launch kernel `name` on grid(meta): as it is under the interpreter, else autotuned for the GPU."""
    kernel = _KERNELS[name]
    if not _interpreted():
        major, minor = torch.cuda.get_device_capability()
        key = (name, fp32, 10 * major + minor)
        if key not in _launchers:
            tuning = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn} if bn else {"BLOCK_M": bm}, num_warps=warps,
                                    num_stages=stages) for bm, bn, warps, stages in _configs(*key)]
            _launchers[key] = triton.autotune(configs=tuning, key=["N", "HEAD_DIM"])(kernel)
        kernel = _launchers[key]
    kernel[grid](*args, **kwargs)


def _blocks(N, names=("BLOCK_M", "BLOCK_N")):
    """Tile sizes under the interpreter: large tiles run fastest there; tl.dot needs at least 16; and
    BLOCK_N = BLOCK_M / 2 (like most GPU configs) so that a mix-up of the two cannot pass the tests."""
    block_m = min(_INTERPRETER_BLOCK_M, max(16, triton.next_power_of_2(N)))
    return {n: {"BLOCK_M": block_m, "BLOCK_N": max(16, block_m // 2)}[n] for n in names} if _interpreted() else {}


def _pair_tables(angles):
    """The (N, D/2) float32 cos and sin tables, cached per angle tensor (and its in-place version)."""
    entry = _tables.get(id(angles))
    if entry is None or entry[0]() is not angles or entry[1] != angles._version:
        pair_angles = angles.detach()[:, 0::2].float()
        entry = (weakref.ref(angles), angles._version, pair_angles.cos().contiguous(), pair_angles.sin().contiguous())
        if len(_tables) >= 16:
            _tables.pop(next(iter(_tables)))
        _tables[id(angles)] = entry
    return entry[2], entry[3]


def _dot_args(dtype):
    """DOT_DTYPE (see the kernels) and the tl.dot precision (tf32x3 for float32 on a GPU; 16-bit: unused)."""
    if _interpreted():
        return dict(DOT_PRECISION="ieee", DOT_DTYPE=tl.float32)
    return dict(DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32", DOT_DTYPE=_TL_DTYPES[dtype])


def _rotated(x, cos, sin):
    """rot(x), contiguous (B, H, N, D) in x's dtype: one pass of the rotation kernel (x rows: unit stride)."""
    B, H, N, D = x.shape
    out = torch.empty(B, H, N, D, device=x.device, dtype=x.dtype)
    _launch("rot", lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"])), x.dtype == torch.float32, x, cos, sin,
            out, x.stride(0), x.stride(1), x.stride(2), H, N, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
            **_blocks(N, ["BLOCK_M"]))
    return out


def _check_inputs(q, k, v, angles):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"rope_attention: q, k, v must share one shape (B, H, N, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rope_attention: q, k, v must all be float32, float16 or bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    N, D = q.shape[-2:]
    if _unsupported(D):
        raise ValueError(f"rope_attention_triton: {_unsupported(D)}; use rope_attention_reference for others")
    if tuple(angles.shape) != (N, D):
        raise ValueError(f"rope_attention: angles of shape {tuple(angles.shape)} must be (N, D) = {(N, D)}")
    if not (q.device == k.device == v.device == angles.device):
        raise ValueError(f"rope_attention: q, k, v, angles on different devices: "
                         f"{q.device}, {k.device}, {v.device}, {angles.device}")
    if not (q.is_cuda or _interpreted()):
        late = " (set, but after triton was imported)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        raise RuntimeError(f"rope_attention_triton: {q.device} tensors need Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 in the environment before the first `import triton`{late}")


def _unit_last_stride(*tensors):
    """The tensors as they are if they share strides, the last 1 (e.g. views of a fused qkv: no copy), else copies."""
    if all(t.stride() == tensors[0].stride() for t in tensors) and tensors[0].stride(-1) == 1:
        return tensors
    return tuple(t.contiguous() for t in tensors)


# The kernels as torch.library custom ops (torch.compile traces through them without a graph break, by the fake
# implementations), the backward registered as the forward's autograd formula.

@torch.library.custom_op("pe_kernels::rope_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v = _unit_last_stride(q, k, v)  # (B, H, N, D), rows of D contiguous
    cos, sin = _pair_tables(angles)
    o = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    grid = lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))
    _launch("fwd", grid, q.dtype == torch.float32, q, _rotated(k, cos, sin), v, cos, sin, o, lse, q.stride(0),
            q.stride(1), q.stride(2), H, N, 1.4426950408889634 / math.sqrt(D),  # log2(e): the kernels use exp2
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), **_dot_args(q.dtype), **_blocks(N))
    return o, lse


@_fwd_op.register_fake
def _(q, k, v, angles):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B * H, N, dtype=torch.float32)


@torch.library.custom_op("pe_kernels::rope_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v = _unit_last_stride(q, k, v)
    (do,) = _unit_last_stride(do)
    cos, sin = _pair_tables(angles)
    qr, kr = _rotated(q, cos, sin), _rotated(k, cos, sin)  # recomputed: cheaper than keeping them
    dq, dk, dv = (torch.empty(B, H, N, D, device=q.device, dtype=q.dtype) for _ in range(3))
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(D)
    args = dict(stride_z=q.stride(0), stride_h=q.stride(1), stride_n=q.stride(2), stride_doz=do.stride(0),
                stride_doh=do.stride(1), stride_don=do.stride(2), H=H, N=N, qk_scale=sm_scale * 1.4426950408889634,
                sm_scale=sm_scale, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), **_dot_args(q.dtype), **_blocks(N))
    fp32 = q.dtype == torch.float32
    # the dq kernel also writes Delta = rowsum(dO * O), which the dk/dv kernel reads: launch it first
    _launch("dq", lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"])), fp32,
            qr, kr, v, cos, sin, o, do, lse, delta, dq, **args)
    _launch("dkdv", lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_N"])), fp32,
            qr, kr, v, cos, sin, do, lse, delta, dk, dv, **args)
    return dq, dk, dv


@_bwd_op.register_fake
def _(q, k, v, angles, o, lse, do):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, do, _dlse):
    q, k, v, angles, o, lse = ctx.saved_tensors
    return (*_bwd_op(q, k, v, angles, o, lse, do), None)  # angles get no gradient


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def rope_attention_triton(q, k, v, angles):
    """Fused RoPE attention with the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
    angles (N, D): the kernels read one angle per pair (column 2i), the official layout repeats it at 2i+1."""
    _check_inputs(q, k, v, angles)
    return _fwd_op(q, k, v, angles)[0]


def rope_attention(q, k, v, angles):
    """softmax(rot(q) rot(k)^T / sqrt(D)) v, q, k, v (B, H, N, D), angles (N, D) -> (B, H, N, D), by _route."""
    D = q.shape[-1]
    if _route(q.is_cuda, os.environ.get("TRITON_INTERPRET") == "1", D, q.dtype) == "triton":
        return rope_attention_triton(q, k, v, angles)
    if q.is_cuda and _unsupported(D) and D not in _warned:
        _warned.add(D)
        warnings.warn(f"rope_attention: {_unsupported(D)} for the Triton kernels; using rope_apply + SDPA")
    return rope_attention_reference(q, k, v, angles)
