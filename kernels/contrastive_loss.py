"""
Chunked all-gather CLIP contrastive loss: memory linear in the global batch.

PE trains its CLIP stage with a global batch of 32K-64K pairs (PE paper, §2.1). The usual loss
builds the B x B logit matrix (or b x B per rank in open_clip's "local loss"); at B = 65,536 that is
16 GiB of fp32 logits before any gradient. This file computes the same loss, with the same
gradients, while only one tile of logits exists at a time.

The loss
--------
Image features I (B, d) and text features T (B, d) are L2-normalised; s is the logit scale (the
multiplier, i.e. the caller passes `logit_scale.exp()`). Logits L_ij = s * I_i . T_j; pair i is the
positive of row i and of column i. With the row and column log-sum-exps

    r_i = log sum_j exp(L_ij)         (image -> text softmax normaliser)
    c_j = log sum_i exp(L_ij)         (text -> image softmax normaliser)

the symmetric CLIP loss (mean of the two cross-entropies) is

    loss = 1/(2B) * [ sum_i r_i + sum_j c_j - 2 * sum_i L_ii ].

Forward: online log-sum-exp over tiles
--------------------------------------
r and c are computed tile by tile (tile = a block of rows x a block of columns of L). For each
row we keep a running maximum m and a running sum l of exp(L - m); when a new tile arrives,

    m_new = max(m, max_j L_ij),    l = l * exp(m - m_new) + sum_j exp(L_ij - m_new),

and at the end r_i = m + log l. (The same for columns.) Merging two partial log-sum-exps this way
is exactly logaddexp, which is what the PyTorch reference uses. Only r (B,) and c (B,) are saved.

Backward: recompute tiles from the saved log-sum-exps
-----------------------------------------------------
With P_ij = exp(L_ij - r_i) (row softmax) and Q_ij = exp(L_ij - c_j) (column softmax),
dloss/dL_ij = (P_ij + Q_ij - 2 [i == j]) / (2B). Each tile's P and Q are recomputed from the
features and the saved r, c, and reduced right away into the probability-weighted sums

    A_i = sum_j (P_ij + Q_ij) T_j          (B, d)
    C_j = sum_i (P_ij + Q_ij) I_i          (B, d)

from which, the diagonal (positive-pair) term being added outside the tiles,

    dloss/dI_i = s/(2B) * (A_i - 2 T_i)
    dloss/dT_j = s/(2B) * (C_j - 2 I_j)
    dloss/ds   = 1/(2B) * sum_i I_i . (A_i - 2 T_i)     (= (1/s) sum_i I_i . dloss/dI_i,
                                                          since L depends on s and I only via s*I)

Why memory is linear in B
-------------------------
What is stored: the features (B, d), r and c (B,), A and C (B, d), and one tile of logits
(block x block, a constant). Nothing of size B x B or b x B ever exists, so the global batch is
limited by the features, not the logits. The price is compute: the backward recomputes the
logits. The reference does 4 matmul-sized passes over the B x B tiles (1 forward, 3 backward)
where the naive loss does 3; the Triton kernels, which treat rows and columns in separate launches
so that no two programs write the same output (no atomics), do 6.

Distributed
-----------
With `group` set, rank k holds b_k pairs (sizes may differ between ranks). The text features of
every rank are all-gathered (B, d); each rank then owns the rows of its own images: it computes
r_i for its rows over all B columns, and a partial c_j over its rows, combined across ranks with
an all-reduce of (max, sum of exp). In the backward, A_i of its rows is complete locally, while
its partial C_j over all B texts is reduce-scattered (summed) to the rank that owns text j. Every
rank therefore does B * b_k of the B^2 tile work.

Gradient convention (the one DDP needs): DDP averages parameter gradients over ranks, so each
rank returns world_size x its slice of the full-batch feature gradients, and world_size x its
share of the scale gradient (so the average over ranks is the full-batch scale gradient). After
DDP's averaging the parameter gradients equal those of the single-process full-batch loss. The
returned loss value is the full global loss on every rank (not multiplied by world_size).

Paths
-----
`contrastive_loss_reference`: pure PyTorch, the same tiling and memory bound; the CPU path and
the readable statement of what the kernels compute. `contrastive_loss_triton`: two Triton
kernels (tile log-sum-exp, tile weighted sums), fp32 accumulation, any B and d (masked edges),
fp32/bf16/fp16 inputs. `contrastive_loss`: Triton for CUDA tensors or under TRITON_INTERPRET=1,
the reference otherwise.

Check it:   python -m pytest -q tests/test_contrastive_loss.py
Benchmark:  python bench/contrastive_loss.py
"""

import os

import torch
import torch.distributed as dist

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
    """(b_k, d) on rank k -> (B, d) on every rank, B = sum(sizes). Padded to max(sizes) for the
    collective, since all_gather needs equal shapes."""
    world_size, _ = _group_info(group)
    if world_size == 1:
        return local
    max_rows = max(sizes)
    padded = local.new_zeros(max_rows, local.shape[1])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes)])  # (B, d)


def _reduce_scatter_rows(full, sizes, group):
    """(B, d) partial sums on every rank -> (b_k, d) on rank k: the sum over ranks of rank k's rows."""
    world_size, rank = _group_info(group)
    if world_size == 1:
        return full
    max_rows = max(sizes)
    chunks = []
    for rows in full.split(sizes):
        padded = full.new_zeros(max_rows, full.shape[1])
        padded[: rows.shape[0]] = rows
        chunks.append(padded)
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

def _tile_lse_reference(image, text_all, scale, chunk_size):
    """Row log-sum-exps r (b,) over all B columns and partial column log-sum-exps (B,) over the
    b local rows, one (chunk, chunk) tile of logits at a time."""
    image = image.float() * scale        # fold s into the rows once, in fp32
    text_all = text_all.float()
    lse_rows = image.new_full((image.shape[0],), float("-inf"))
    lse_cols = image.new_full((text_all.shape[0],), float("-inf"))
    for row in range(0, image.shape[0], chunk_size):
        rows = slice(row, row + chunk_size)
        for col in range(0, text_all.shape[0], chunk_size):
            cols = slice(col, col + chunk_size)
            logits = image[rows] @ text_all[cols].T                  # (chunk, chunk)
            lse_rows[rows] = torch.logaddexp(lse_rows[rows], logits.logsumexp(1))
            lse_cols[cols] = torch.logaddexp(lse_cols[cols], logits.logsumexp(0))
    return lse_rows, lse_cols


def _tile_weighted_sums_reference(image, text_all, scale, lse_rows, lse_cols, chunk_size):
    """A_i = sum_j (P_ij + Q_ij) T_j for the local rows (b, d) and the partial
    C_j = sum_{local i} (P_ij + Q_ij) I_i for all columns (B, d), tiles recomputed."""
    image = image.float()
    text_all = text_all.float()
    scaled_image = image * scale
    row_sums = torch.zeros_like(image)        # A (b, d)
    col_sums = torch.zeros_like(text_all)     # C (B, d)
    for row in range(0, image.shape[0], chunk_size):
        rows = slice(row, row + chunk_size)
        for col in range(0, text_all.shape[0], chunk_size):
            cols = slice(col, col + chunk_size)
            logits = scaled_image[rows] @ text_all[cols].T           # (chunk, chunk)
            weights = torch.exp(logits - lse_rows[rows, None])      # P
            weights += logits.sub_(lse_cols[None, cols]).exp_()     # + Q (in place: CPU time)
            row_sums[rows].addmm_(weights, text_all[cols])          # += (chunk, chunk) @ (chunk, d)
            col_sums[cols].addmm_(weights.T, image[rows])
    return row_sums, col_sums


# -----------------------------------------------------------------------------
# The tile computations, Triton. One kernel does "rows against all columns"; each is launched
# twice with the roles of images and texts swapped (L^T = s T I^T), which gives the columns'
# quantities without atomics.

@triton.jit
def _tile_dots(rows_ptr, cols_ptr, row_offsets, col_offsets, row_valid, col_valid, dim, BLOCK: tl.constexpr,
               BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr):
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
        dots = tl.dot(row_tile, tl.trans(col_tile), dots, input_precision="ieee")
    return dots


@triton.jit
def _lse_kernel(rows_ptr, cols_ptr, scale_ptr, lse_ptr, n_rows, n_cols, dim,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """lse[i] = log sum_j exp(s * rows[i] . cols[j]) for one block of rows, online over column blocks."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_valid = rows < n_rows
    row_offsets = rows.to(tl.int64) * dim
    scale = tl.load(scale_ptr)
    running_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK,), tl.float32)
    for col_start in range(0, n_cols, BLOCK):
        cols = col_start + tl.arange(0, BLOCK)
        col_valid = cols < n_cols
        col_offsets = cols.to(tl.int64) * dim
        dots = _tile_dots(rows_ptr, cols_ptr, row_offsets, col_offsets, row_valid, col_valid, dim, BLOCK, BLOCK_D,
                          UPCAST_DOT)
        logits = tl.where(col_valid[None, :], scale * dots, float("-inf"))        # (BLOCK, BLOCK)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) \
            + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=row_valid)


@triton.jit
def _weighted_sum_kernel(rows_ptr, cols_ptr, scale_ptr, lse_rows_ptr, lse_cols_ptr, out_ptr,
                         n_rows, n_cols, dim, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST_DOT: tl.constexpr):
    """out[i] = sum_j (exp(L_ij - lse_rows[i]) + exp(L_ij - lse_cols[j])) cols[j], L_ij = s rows[i].cols[j].

    out (n_rows, d) is an fp32 buffer of zeros. d can be large (PE-G: 1280), so the (BLOCK, d)
    accumulator does not fit in registers: each tile's contribution is added to `out` in
    BLOCK_D-wide slices (load, dot-accumulate, store). Only this program touches these rows."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_valid = rows < n_rows
    row_offsets = rows.to(tl.int64) * dim
    scale = tl.load(scale_ptr)
    lse_rows = tl.load(lse_rows_ptr + rows, mask=row_valid, other=0.0)
    for col_start in range(0, n_cols, BLOCK):
        cols = col_start + tl.arange(0, BLOCK)
        col_valid = cols < n_cols
        col_offsets = cols.to(tl.int64) * dim
        lse_cols = tl.load(lse_cols_ptr + cols, mask=col_valid, other=0.0)
        dots = _tile_dots(rows_ptr, cols_ptr, row_offsets, col_offsets, row_valid, col_valid, dim, BLOCK, BLOCK_D,
                          UPCAST_DOT)
        logits = scale * dots                                                      # (BLOCK, BLOCK)
        # (padded rows are never stored; padded columns load zero features, so they add nothing)
        weights = tl.exp(logits - lse_rows[:, None]) + tl.exp(logits - lse_cols[None, :])
        for d_start in range(0, dim, BLOCK_D):
            feats = d_start + tl.arange(0, BLOCK_D)
            feat_valid = feats < dim
            col_tile = tl.load(cols_ptr + col_offsets[:, None] + feats[None, :],
                               mask=col_valid[:, None] & feat_valid[None, :], other=0.0)
            tile_weights = weights.to(col_tile.dtype)  # 16-bit inputs: 16-bit weights, as flash-attn's P
            if UPCAST_DOT:
                tile_weights, col_tile = tile_weights.to(tl.float32), col_tile.to(tl.float32)
            out_ptrs = out_ptr + row_offsets[:, None] + feats[None, :]
            out_mask = row_valid[:, None] & feat_valid[None, :]
            acc = tl.load(out_ptrs, mask=out_mask, other=0.0)                      # (BLOCK, BLOCK_D)
            acc = tl.dot(tile_weights, col_tile, acc, input_precision="ieee")
            tl.store(out_ptrs, acc, mask=out_mask)


def _triton_interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_sizes(dim, block_size):
    block_d = max(16, min(block_size, triton.next_power_of_2(dim)))  # tl.dot needs >= 16
    return block_size, block_d


def _upcast_dot(dtype):
    """tl.dot on 16-bit tiles multiplies exactly and accumulates in fp32. Triton's CPU interpreter
    (3.9) multiplies bf16 tiles as raw integers, so under it 16-bit tiles are upcast to fp32 before
    tl.dot: products of 16-bit floats are exact in fp32, so the result is the same up to the order
    of summation."""
    return _triton_interpret() and dtype != torch.float32


def _tile_lse_triton(image, text_all, scale, block_size):
    image, text_all = image.contiguous(), text_all.contiguous()
    (n_image, dim), n_text = image.shape, text_all.shape[0]
    block, block_d = _block_sizes(dim, block_size)
    upcast = _upcast_dot(image.dtype)
    lse_rows = torch.empty(n_image, dtype=torch.float32, device=image.device)
    lse_cols = torch.empty(n_text, dtype=torch.float32, device=image.device)
    if n_image > 0:
        _lse_kernel[(triton.cdiv(n_image, block),)](image, text_all, scale, lse_rows, n_image, n_text,
                                                   dim, BLOCK=block, BLOCK_D=block_d, UPCAST_DOT=upcast)
        _lse_kernel[(triton.cdiv(n_text, block),)](text_all, image, scale, lse_cols, n_text, n_image,
                                                  dim, BLOCK=block, BLOCK_D=block_d, UPCAST_DOT=upcast)
    else:
        lse_cols.fill_(float("-inf"))  # no local rows: empty partial sums
    return lse_rows, lse_cols


def _tile_weighted_sums_triton(image, text_all, scale, lse_rows, lse_cols, block_size):
    image, text_all = image.contiguous(), text_all.contiguous()
    (n_image, dim), n_text = image.shape, text_all.shape[0]
    block, block_d = _block_sizes(dim, block_size)
    upcast = _upcast_dot(image.dtype)
    row_sums = torch.zeros(n_image, dim, dtype=torch.float32, device=image.device)  # A (b, d)
    col_sums = torch.zeros(n_text, dim, dtype=torch.float32, device=image.device)   # C (B, d)
    if n_image > 0:
        _weighted_sum_kernel[(triton.cdiv(n_image, block),)](
            image, text_all, scale, lse_rows, lse_cols, row_sums, n_image, n_text, dim,
            BLOCK=block, BLOCK_D=block_d, UPCAST_DOT=upcast)
        _weighted_sum_kernel[(triton.cdiv(n_text, block),)](
            text_all, image, scale, lse_cols, lse_rows, col_sums, n_text, n_image, dim,
            BLOCK=block, BLOCK_D=block_d, UPCAST_DOT=upcast)
    return row_sums, col_sums


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

        positives = scale * torch.vdot(image_features.float().flatten(),
                                       text_features.float().flatten())             # sum_i L_ii
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
        world_size, _ = _group_info(ctx.group)
        scale = logit_scale.detach().float().reshape(1)

        tile_sums = _tile_weighted_sums_triton if ctx.use_triton else _tile_weighted_sums_reference
        row_sums, col_sums_all = tile_sums(image_features, text_all, scale, lse_rows, lse_cols,
                                           ctx.tile_size)                        # (b, d), (B, d)
        col_sums = _reduce_scatter_rows(col_sums_all, ctx.sizes, ctx.group)      # (b, d), summed

        # world_size x (the full-batch gradient): DDP's average over ranks then gives the full one.
        # In-place updates of the (b, d) buffers keep the peak memory down.
        coef = grad_loss.float() * world_size / (2 * sum(ctx.sizes))
        image_direction = row_sums.sub_(text_features.float(), alpha=2)          # A_i - 2 T_i
        grad_scale = coef * torch.vdot(image_features.float().flatten(), image_direction.flatten())
        grad_image = image_direction.mul_(coef * scale)                           # s (A_i - 2 T_i)
        grad_text = col_sums.sub_(image_features.float(), alpha=2).mul_(coef * scale)  # s (C_j - 2 I_j)
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


def contrastive_loss_reference(image_features, text_features, logit_scale, group=None,
                               chunk_size=1024):
    """Symmetric CLIP loss over the global batch, pure PyTorch, (chunk_size, chunk_size) tiles.

    image_features, text_features: (b, d) L2-normalised features of this rank; logit_scale: the
    multiplier (already exp'd), a one-element tensor. group: a torch.distributed process group to
    gather over (None = this process only). Returns the global loss (fp32 scalar); see the module
    docstring for the gradient convention."""
    _check_inputs(image_features, text_features, logit_scale)
    return _GlobalContrastiveLoss.apply(image_features, text_features, logit_scale, group, False,
                                        chunk_size)


def contrastive_loss_triton(image_features, text_features, logit_scale, group=None, block_size=64):
    """The same loss with the Triton tile kernels (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1). block_size: rows and columns per tile (a power of two >= 16)."""
    _check_inputs(image_features, text_features, logit_scale)
    if not (image_features.is_cuda or _triton_interpret()):
        raise RuntimeError("contrastive_loss_triton: needs CUDA tensors, or TRITON_INTERPRET=1 for "
                           "CPU tensors; use contrastive_loss_reference on CPU")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"contrastive_loss_triton: block_size must be a power of two >= 16, got "
                         f"{block_size}")
    return _GlobalContrastiveLoss.apply(image_features, text_features, logit_scale, group, True,
                                        block_size)


def contrastive_loss(image_features, text_features, logit_scale, group=None):
    """CLIP loss over the global batch: the Triton path for CUDA tensors or under
    TRITON_INTERPRET=1, the PyTorch reference otherwise. group=None: single process."""
    if image_features.is_cuda or _triton_interpret():
        return contrastive_loss_triton(image_features, text_features, logit_scale, group)
    return contrastive_loss_reference(image_features, text_features, logit_scale, group)
