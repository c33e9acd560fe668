"""Chunked all-gather CLIP contrastive loss: memory linear in the global batch.

PE trains its CLIP stage with a global batch of 32K-64K pairs (Bolya et al. 2025, §2.1). The usual loss builds the
B x B logit matrix (or b x B per rank in open_clip's "local loss"): 16 GiB of fp32 logits at B = 65,536 before any
gradient. This file computes the same loss, with the same gradients, while only one tile of logits exists at a time
(the idea of Inf-CL, Cheng et al. 2024): memory holds the features (B, d), r and c (B,), A and C (B, d) below and
one tile, nothing of size B x B or b x B, at the price of recomputing the logits in the backward.

The loss. Image features I (B, d) and text features T (B, d) are L2-normalised; s is the logit scale (the
multiplier: the caller passes `logit_scale.exp()`). Logits L_ij = s * I_i . T_j; pair i is the positive of row i
and of column i. With the row and column log-sum-exps r_i = log sum_j exp(L_ij) and c_j = log sum_i exp(L_ij) (the
image -> text and text -> image softmax normalisers), the symmetric CLIP loss (mean of the two cross-entropies) is

    loss = 1/(2B) * [ sum_i r_i + sum_j c_j - 2 * sum_i L_ii ].

Forward: r and c tile by tile, with the online log-sum-exp of FlashAttention: per row a running maximum m and a
running sum l of exp(L - m), for a new tile m_new = max(m, max_j L_ij), l = l * exp(m - m_new) + sum_j
exp(L_ij - m_new), at the end r_i = m + log l (columns alike). Only r (B,) and c (B,) are saved.

Backward: tiles recomputed from the saved log-sum-exps. With P_ij = exp(L_ij - r_i) (row softmax) and
Q_ij = exp(L_ij - c_j) (column softmax), dloss/dL_ij = (P_ij + Q_ij - 2 [i == j]) / (2B). Each tile is reduced
right away into the weighted sums A_i = sum_j (P_ij + Q_ij) T_j and C_j = sum_i (P_ij + Q_ij) I_i (B, d each),
from which, the diagonal (positive-pair) term being added outside the tiles,

    dloss/dI_i = s/(2B) * (A_i - 2 T_i)
    dloss/dT_j = s/(2B) * (C_j - 2 I_j)
    dloss/ds   = 1/(2B) * sum_i I_i . (A_i - 2 T_i)     (L depends on s and I only via s*I)

Distributed. With `group` set, rank k holds b_k pairs (sizes may differ between ranks). The text features of every
rank are all-gathered (B, d); each rank owns the rows of its own images: it computes r_i for its rows over all B
columns, and a partial c_j over its rows, combined across ranks with an all-reduce of (max, sum of exp). In the
backward, A_i of its rows is complete locally, while its partial C_j over all B texts is reduce-scattered (summed)
to the rank that owns text j. Every rank does B * b_k of the B^2 tile work.

Gradient convention (the one DDP needs): DDP averages parameter gradients over ranks, so each rank returns
world_size x its slice of the full-batch feature gradients, and world_size x its share of the scale gradient;
after DDP's averaging the parameter gradients equal those of the single-process full-batch loss. The returned
loss is the full global loss on every rank.

Paths: `contrastive_loss_reference` (pure PyTorch, the same tiling and memory bound: the CPU path and the readable
statement of what the kernels compute), `contrastive_loss_triton` (two Triton kernels as torch.library custom ops,
fp32 accumulation, any B and d, fp32/bf16/fp16 inputs) and `contrastive_loss`, which picks one.
Tests: python -m pytest -q tests/test_contrastive_loss.py    Benchmark: python bench/contrastive_loss.py
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -----------------------------------------------------------------------------
# Distributed helpers: gather rows of possibly unequal size, send row gradients back to owners.

def _group_info(group):
    """(world_size, rank) of `group`; group=None means one process, no communication."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_batch_sizes(local_batch, dim, device, group):
    """Every rank's local batch size, in rank order; checks that d agrees on every rank."""
    world_size, _ = _group_info(group)
    if world_size == 1:
        return [local_batch]
    shape = torch.tensor([local_batch, dim], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    dims = sorted({d for _, d in shapes})
    if len(dims) != 1:
        raise ValueError(f"contrastive_loss: feature dimension differs between ranks: (batch, d) per "
                         f"rank = {shapes}; every rank must pass features of the same d")
    return [n for n, _ in shapes]


def _all_gather_rows(local, sizes, group):
    """(b_k, d) on rank k -> (B, d) on every rank, B = sum(sizes); padded with zero rows to max(sizes) for the
    collective, since all_gather needs equal shapes."""
    world_size, _ = _group_info(group)
    if world_size == 1:
        return local
    padded = F.pad(local, (0, 0, 0, max(sizes) - local.shape[0]))
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes)])  # (B, d)


def _reduce_scatter_rows(full, sizes, group):
    """(B, d) partial sums on every rank -> (b_k, d) on rank k: the sum over ranks of rank k's rows."""
    world_size, rank = _group_info(group)
    if world_size == 1:
        return full
    max_rows = max(sizes)
    chunks = [F.pad(rows, (0, 0, 0, max_rows - rows.shape[0])) for rows in full.split(sizes)]  # equal shapes
    mine = full.new_empty(max_rows, full.shape[1])
    dist.reduce_scatter(mine, chunks, group=group)
    return mine[: sizes[rank]]


def _logsumexp_across_ranks(partial_lse, group):
    """Each rank holds log sum over its rows; returns log sum over all rows (same on every rank)."""
    world_size, _ = _group_info(group)
    if world_size == 1:
        return partial_lse
    running_max = partial_lse.clone()
    dist.all_reduce(running_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(partial_lse - running_max)  # a rank with no rows holds -inf -> contributes 0
    dist.all_reduce(sum_exp, group=group)
    return running_max + torch.log(sum_exp)


# -----------------------------------------------------------------------------
# The tile computations, PyTorch reference. image (b, d) = this rank's rows; text_all (B, d).

def _tiles(n_rows, n_cols, size):
    """(rows, cols) slices of the (size, size) tiles of an n_rows x n_cols matrix, row by row."""
    for row in range(0, n_rows, size):
        for col in range(0, n_cols, size):
            yield slice(row, row + size), slice(col, col + size)


def _tile_lse_reference(image, text_all, scale, chunk_size):
    """Row log-sum-exps r (b,) over all B columns and partial column log-sum-exps (B,) over the
    b local rows, one (chunk, chunk) tile of logits at a time."""
    image = image.float() * scale        # fold s into the rows once, in fp32
    text_all = text_all.float()
    lse_rows = image.new_full((image.shape[0],), float("-inf"))
    lse_cols = image.new_full((text_all.shape[0],), float("-inf"))
    for rows, cols in _tiles(image.shape[0], text_all.shape[0], chunk_size):
        logits = image[rows] @ text_all[cols].T                  # (chunk, chunk)
        lse_rows[rows] = torch.logaddexp(lse_rows[rows], logits.logsumexp(1))
        lse_cols[cols] = torch.logaddexp(lse_cols[cols], logits.logsumexp(0))
    return lse_rows, lse_cols


def _tile_directions_reference(image, text_all, scale, lse_rows, lse_cols, offset, chunk_size):
    """A_i - 2 T_i for the local rows (b, d) and the partial C_j = sum_{local i} (P_ij + Q_ij) I_i for all
    columns (B, d), less 2 I_j on this rank's own columns (from `offset` on), tiles recomputed."""
    image, text_all = image.float(), text_all.float()
    scaled_image = image * scale
    row_sums, col_sums = torch.zeros_like(image), torch.zeros_like(text_all)  # A (b, d), C (B, d)
    for rows, cols in _tiles(image.shape[0], text_all.shape[0], chunk_size):
        logits = scaled_image[rows] @ text_all[cols].T           # (chunk, chunk)
        weights = torch.exp(logits - lse_rows[rows, None])      # P
        weights += logits.sub_(lse_cols[None, cols]).exp_()     # + Q (in place: CPU time)
        row_sums[rows].addmm_(weights, text_all[cols])          # += (chunk, chunk) @ (chunk, d)
        col_sums[cols].addmm_(weights.T, image[rows])
    row_sums.sub_(text_all[offset: offset + image.shape[0]], alpha=2)    # the positive pairs
    col_sums[offset: offset + image.shape[0]].sub_(image, alpha=2)
    return row_sums, col_sums


# -----------------------------------------------------------------------------
# The tile computations, Triton. One kernel does "rows against columns"; each is launched twice with the roles of
# images and texts swapped (L^T = s T I^T), which gives the columns' quantities without atomics. Grid: axis 0 the
# row blocks, axis 1 splits of the columns (as flash-decoding splits the keys), so that a small local batch against
# a large global one still fills the GPU; the splits' partial log-sum-exps and sums are combined afterwards.
# PRECISION: "tf32x3" for fp32 features (tensor cores, fp32-accurate); 16-bit features take 16-bit tensor-core
# products, exact in the fp32 accumulator.

@triton.jit
def _tile_dots(rows_ptr, cols_ptr, row_offsets, col_offsets, row_valid, col_valid, dim, BLOCK: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """rows[i] . cols[j] for one (BLOCK, BLOCK) tile, accumulated in fp32 over BLOCK_D-wide feature slices
    (padded rows, columns and features load as zero)."""
    dots = tl.zeros((BLOCK, BLOCK), tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        feats = d_start + tl.arange(0, BLOCK_D)
        feat_valid = feats < dim
        row_tile = tl.load(rows_ptr + row_offsets[:, None] + feats[None, :],
                           mask=row_valid[:, None] & feat_valid[None, :], other=0.0)
        col_tile = tl.load(cols_ptr + col_offsets[:, None] + feats[None, :],
                           mask=col_valid[:, None] & feat_valid[None, :], other=0.0)
        if UPCAST_DOT:
            row_tile, col_tile = row_tile.to(tl.float32), col_tile.to(tl.float32)
        dots = tl.dot(row_tile, tl.trans(col_tile), dots, input_precision=PRECISION)
    return dots


@triton.jit
def _weighted_dot(weights, col_tile, acc, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + weights @ col_tile. With 16-bit features the fp32 weights go in as a 16-bit high part plus the
    16-bit rounding of the remainder (two tensor-core products): one cast would keep 8 bits of each weight
    (bf16), and where weights of near-duplicate columns cancel, that error would dominate the gradient."""
    if col_tile.dtype == tl.float32:
        return tl.dot(weights, col_tile, acc, input_precision=PRECISION)
    high = weights.to(col_tile.dtype)
    low = (weights - high.to(tl.float32)).to(col_tile.dtype)
    if UPCAST_DOT:
        high, low, col_tile = high.to(tl.float32), low.to(tl.float32), col_tile.to(tl.float32)
    acc = tl.dot(high, col_tile, acc, input_precision=PRECISION)
    return tl.dot(low, col_tile, acc, input_precision=PRECISION)


@triton.jit
def _lse_kernel(rows_ptr, cols_ptr, scale_ptr, lse_ptr, n_rows, n_cols, dim, cols_per_split, BLOCK: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """lse[split, i] = log sum_{j in split} exp(s * rows[i] . cols[j]), online over the split's column blocks."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_valid = rows < n_rows
    row_offsets = rows.to(tl.int64) * dim
    col_lo = tl.program_id(1) * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
    scale = tl.load(scale_ptr)
    running_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK,), tl.float32)
    for col_start in range(col_lo, col_hi, BLOCK):
        cols = col_start + tl.arange(0, BLOCK)
        col_valid = cols < col_hi
        dots = _tile_dots(rows_ptr, cols_ptr, row_offsets, cols.to(tl.int64) * dim, row_valid, col_valid, dim,
                          BLOCK, BLOCK_D, PRECISION, UPCAST_DOT)
        logits = tl.where(col_valid[None, :], scale * dots, float("-inf"))        # (BLOCK, BLOCK)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) \
            + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(lse_ptr + tl.program_id(1) * n_rows + rows, running_max + tl.log(running_sum), mask=row_valid)


@triton.jit
def _direction_kernel(rows_ptr, cols_ptr, scale_ptr, lse_rows_ptr, lse_cols_ptr, out_ptr, n_rows, n_cols, dim,
                      cols_per_split, diag_offset, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ONE_SLICE: tl.constexpr):
    """out[split, i] = sum_{j in split} W_ij cols[j], W_ij = exp(L_ij - lse_rows[i]) + exp(L_ij - lse_cols[j])
    - 2 [j == i + diag_offset], L_ij = s rows[i] . cols[j].

    The positive pair's -2 is subtracted inside the tile, in fp32, where P_ii + Q_ii - 2 is small and exact; added
    later it would cancel against a rounded P_ii + Q_ii near 2. The (BLOCK, d) sum stays in registers when d fits
    one BLOCK_D slice (ONE_SLICE); a larger d (PE: 1024-1280) does not fit, and each slice is added to this
    program's own rows of `out` (zeros) instead, with a barrier ordering the threads' stores before the next
    tile's loads of the same addresses."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_valid = rows < n_rows
    row_offsets = rows.to(tl.int64) * dim
    col_lo = tl.program_id(1) * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
    out_rows = out_ptr + tl.program_id(1).to(tl.int64) * n_rows * dim + row_offsets
    scale = tl.load(scale_ptr)
    lse_rows = tl.load(lse_rows_ptr + rows, mask=row_valid, other=0.0)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for col_start in range(col_lo, col_hi, BLOCK):
        cols = col_start + tl.arange(0, BLOCK)
        col_valid = cols < col_hi
        col_offsets = cols.to(tl.int64) * dim
        lse_cols = tl.load(lse_cols_ptr + cols, mask=col_valid, other=0.0)
        logits = scale * _tile_dots(rows_ptr, cols_ptr, row_offsets, col_offsets, row_valid, col_valid, dim,
                                    BLOCK, BLOCK_D, PRECISION, UPCAST_DOT)                # (BLOCK, BLOCK)
        # padded rows are never stored; padded columns load zero features, so they add nothing
        weights = tl.exp(logits - lse_rows[:, None]) + tl.exp(logits - lse_cols[None, :])
        weights -= tl.where(cols[None, :] == rows[:, None] + diag_offset, 2.0, 0.0)
        for d_start in range(0, dim, BLOCK_D):
            feats = d_start + tl.arange(0, BLOCK_D)
            feat_valid = feats < dim
            col_tile = tl.load(cols_ptr + col_offsets[:, None] + feats[None, :],
                               mask=col_valid[:, None] & feat_valid[None, :], other=0.0)
            if ONE_SLICE:
                acc = _weighted_dot(weights, col_tile, acc, PRECISION, UPCAST_DOT)
            else:
                out_ptrs = out_rows[:, None] + feats[None, :]
                out_mask = row_valid[:, None] & feat_valid[None, :]
                part = _weighted_dot(weights, col_tile, tl.load(out_ptrs, mask=out_mask, other=0.0), PRECISION,
                                     UPCAST_DOT)
                tl.store(out_ptrs, part, mask=out_mask)
                tl.debug_barrier()
    if ONE_SLICE:
        feats = tl.arange(0, BLOCK_D)
        tl.store(out_rows[:, None] + feats[None, :], acc, mask=row_valid[:, None] & (feats < dim)[None, :])


MAX_BLOCK = 128  # the largest tile the kernels are compiled and checked for (tests/test_contrastive_loss.py)


def _triton_interpret():  # the dispatch rule (the kernels themselves follow it from `import triton` on)
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_args(dtype, dim, block):
    """The kernels' constants. UPCAST_DOT: Triton's CPU interpreter multiplies bf16 tiles as raw integers,
    so under it 16-bit tiles are upcast to fp32 before tl.dot (16-bit products are exact in fp32)."""
    interpret = _triton_interpret()
    slice_width = min(block, 32 if dtype == torch.float32 else 64, triton.next_power_of_2(dim))
    return dict(BLOCK=block, BLOCK_D=max(16, slice_width),  # tl.dot needs >= 16
                PRECISION="tf32x3" if dtype == torch.float32 and not interpret else "ieee",
                UPCAST_DOT=interpret and dtype != torch.float32, num_warps=4 if block <= 64 else 8,
                num_stages=3 if block <= 64 else 2)


def _column_splits(n_rows, n_cols, block, programs):
    """(splits, columns per split) for grid axis 1: enough (row block, split) programs to fill `programs`, each
    split at least one column tile, and at most max(1, n_cols // n_rows) splits, so that the partial results
    (splits x n_rows) stay within the size of the columns: memory linear in the batch."""
    row_blocks, col_tiles = triton.cdiv(n_rows, block), triton.cdiv(n_cols, block)
    splits = max(1, min(triton.cdiv(programs, row_blocks), col_tiles, n_cols // max(n_rows, 1)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split * block


def _programs(device):
    """How many programs fill the device: 4 per SM on a GPU."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else 8  # the interpreter: a small grid, so that the tests' batches split their columns


def _launch(kernel, grid, *args, **kwargs):
    kernel[grid](*args, **kwargs)


@torch.library.custom_op("pe_kernels::contrastive_lse", mutates_args=())
def _tile_lse_triton(image: torch.Tensor, text_all: torch.Tensor, scale: torch.Tensor,
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image, text_all = image.contiguous(), text_all.contiguous()
    args = _kernel_args(image.dtype, image.shape[1], block_size)
    results = []
    for rows, cols in ((image, text_all), (text_all, image)):  # r over all columns; partial c over local rows
        if rows.shape[0] == 0 or cols.shape[0] == 0:  # no local rows: empty partial sums
            results.append(torch.full((rows.shape[0],), float("-inf"), device=rows.device))
            continue
        splits, per_split = _column_splits(rows.shape[0], cols.shape[0], block_size, _programs(rows.device))
        lse = torch.empty(splits, rows.shape[0], dtype=torch.float32, device=rows.device)
        _launch(_lse_kernel, (triton.cdiv(rows.shape[0], block_size), splits), rows, cols, scale, lse,
                rows.shape[0], cols.shape[0], rows.shape[1], per_split, **args)
        results.append(torch.logsumexp(lse, 0) if splits > 1 else lse[0])
    return results[0], results[1]


@_tile_lse_triton.register_fake
def _(image, text_all, scale, block_size):
    return image.new_empty(image.shape[0], dtype=torch.float32), image.new_empty(text_all.shape[0], dtype=torch.float32)


@torch.library.custom_op("pe_kernels::contrastive_directions", mutates_args=())
def _tile_directions_triton(image: torch.Tensor, text_all: torch.Tensor, scale: torch.Tensor, lse_rows: torch.Tensor,
                            lse_cols: torch.Tensor, offset: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image, text_all = image.contiguous(), text_all.contiguous()
    dim = image.shape[1]
    args = _kernel_args(image.dtype, dim, block_size)
    one_slice = dim <= args["BLOCK_D"]
    results = []
    for rows, cols, lse_r, lse_c, diag in ((image, text_all, lse_rows, lse_cols, offset),
                                           (text_all, image, lse_cols, lse_rows, -offset)):
        if rows.shape[0] == 0 or cols.shape[0] == 0:
            results.append(torch.zeros(rows.shape[0], dim, dtype=torch.float32, device=rows.device))
            continue
        splits, per_split = _column_splits(rows.shape[0], cols.shape[0], block_size, _programs(rows.device))
        out = (torch.empty if one_slice else torch.zeros)(splits, rows.shape[0], dim, dtype=torch.float32,
                                                           device=rows.device)
        _launch(_direction_kernel, (triton.cdiv(rows.shape[0], block_size), splits), rows, cols, scale, lse_r, lse_c,
                out, rows.shape[0], cols.shape[0], dim, per_split, diag, ONE_SLICE=one_slice, **args)
        results.append(out.sum(0) if splits > 1 else out[0])
    return results[0], results[1]


@_tile_directions_triton.register_fake
def _(image, text_all, scale, lse_rows, lse_cols, offset, block_size):
    return image.new_empty(image.shape, dtype=torch.float32), text_all.new_empty(text_all.shape, dtype=torch.float32)


# -----------------------------------------------------------------------------
# The loss: one autograd.Function around the tile computations and the communication.

class _GlobalContrastiveLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, group, use_triton, tile_size):
        world_size, _ = _group_info(group)
        local_batch, dim = image_features.shape
        sizes = _gather_batch_sizes(local_batch, dim, image_features.device, group)
        global_batch = sum(sizes)
        if global_batch == 0:
            raise ValueError("contrastive_loss: the global batch is empty")
        text_all = _all_gather_rows(text_features, sizes, group)                 # (B, d)
        scale = logit_scale.detach().float().reshape(1)

        tile_lse = _tile_lse_triton if use_triton else _tile_lse_reference
        lse_rows, lse_cols_partial = tile_lse(image_features, text_all, scale, tile_size)
        lse_cols = _logsumexp_across_ranks(lse_cols_partial, group)             # (B,)

        positives = scale * torch.vdot(image_features.float().flatten(), text_features.float().flatten())  # sum L_ii
        local_sums = torch.stack([lse_rows.sum(), positives.reshape(())])
        if world_size > 1:
            dist.all_reduce(local_sums, group=group)
        loss = (local_sums[0] + lse_cols.sum() - 2 * local_sums[1]) / (2 * global_batch)

        ctx.save_for_backward(image_features, text_features, text_all, logit_scale, lse_rows, lse_cols)
        ctx.group, ctx.sizes, ctx.use_triton, ctx.tile_size = group, sizes, use_triton, tile_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        image_features, text_features, text_all, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
        world_size, rank = _group_info(ctx.group)
        scale = logit_scale.detach().float().reshape(1)

        tile_directions = _tile_directions_triton if ctx.use_triton else _tile_directions_reference
        image_direction, text_directions = tile_directions(image_features, text_all, scale, lse_rows, lse_cols,
                                                           sum(ctx.sizes[:rank]), ctx.tile_size)  # (b, d), (B, d)
        text_direction = _reduce_scatter_rows(text_directions, ctx.sizes, ctx.group)  # (b, d): C_j - 2 I_j

        # world_size x (the full-batch gradient), which DDP averages over ranks; in place: less peak memory
        coef = grad_loss.float() * world_size / (2 * sum(ctx.sizes))
        grad_scale = coef * torch.vdot(image_features.float().flatten(), image_direction.flatten())
        grad_image = image_direction.mul_(coef * scale)                           # s (A_i - 2 T_i)
        grad_text = text_direction.mul_(coef * scale)                             # s (C_j - 2 I_j)
        return (grad_image.to(image_features.dtype), grad_text.to(text_features.dtype),
                grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype), None, None, None)


def _check_inputs(image_features, text_features, logit_scale):
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"contrastive_loss: image_features {tuple(image_features.shape)} and "
                         f"text_features {tuple(text_features.shape)} must both be (batch, d)")
    if image_features.dtype != text_features.dtype or image_features.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"contrastive_loss: features must share one dtype among {SUPPORTED_DTYPES}, "
                         f"got {image_features.dtype} and {text_features.dtype}")
    if not torch.is_tensor(logit_scale) or logit_scale.numel() != 1:
        raise ValueError("contrastive_loss: logit_scale must be a one-element tensor (the multiplier, "
                         "e.g. model.logit_scale.exp())")


def contrastive_loss_reference(image_features, text_features, logit_scale, group=None, chunk_size=1024):
    """Symmetric CLIP loss over the global batch, pure PyTorch, (chunk_size, chunk_size) tiles.

    image_features, text_features: (b, d) L2-normalised features of this rank; logit_scale: the multiplier (already
    exp'd), a one-element tensor. group: a torch.distributed process group to gather over (None = this process
    only). Returns the global loss (fp32 scalar); the module docstring has the gradient convention."""
    _check_inputs(image_features, text_features, logit_scale)
    return _GlobalContrastiveLoss.apply(image_features, text_features, logit_scale, group, False, chunk_size)


def contrastive_loss_triton(image_features, text_features, logit_scale, group=None, block_size=64):
    """The same loss with the Triton tile kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    block_size: rows and columns per tile, a power of two in [16, MAX_BLOCK]."""
    _check_inputs(image_features, text_features, logit_scale)
    if not 16 <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"contrastive_loss_triton: block_size must be a power of two in [16, {MAX_BLOCK}] "
                         f"(the tiles the kernels are compiled and checked for), got {block_size}")
    if not (image_features.is_cuda or _triton_interpret()):
        raise RuntimeError("contrastive_loss_triton: needs CUDA tensors, or TRITON_INTERPRET=1 for "
                           "CPU tensors; use contrastive_loss_reference on CPU")
    return _GlobalContrastiveLoss.apply(image_features, text_features, logit_scale, group, True, block_size)


def contrastive_loss(image_features, text_features, logit_scale, group=None):
    """CLIP loss over the global batch: Triton for CUDA tensors or under TRITON_INTERPRET=1, else the reference."""
    if image_features.is_cuda or _triton_interpret():
        return contrastive_loss_triton(image_features, text_features, logit_scale, group)
    return contrastive_loss_reference(image_features, text_features, logit_scale, group)
