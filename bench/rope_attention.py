"""Benchmark: fused 2D-RoPE attention (kernels/rope_attention.py) against rotate-then-SDPA.

Run: python bench/rope_attention.py

On a GPU: forward and forward+backward time (median of triton.testing.do_bench, milliseconds) and TFLOP/s of
the fused Triton kernel and of PyTorch's scaled_dot_product_attention with the rotation applied separately
(rope_attention_reference: rope_apply on q and k, then SDPA, which picks its flash backend for bf16), at
ViT shapes in bf16: B = 32, H = 16, N = 577 (ViT-L/14 at 336 px + cls) and 1025 (448 px), head dim 64
(PE-Core/Lang/Spatial up to L) and 96 (PE-G). Before timing, each shape's output and gradients are
checked against the reference. Target on an H100: forward+backward at least 1.2x faster than
rotate-then-SDPA.
Without a GPU it says so and times the reference on CPU (float32) at a small shape instead.

FLOPs counted: attention only, forward 4*B*H*N^2*D (two matmuls), backward 2.5x the forward (five
matmuls), the rotation's O(N*D) work ignored.
"""

import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from kernels.rope_attention import rope_angles_2d, rope_attention_reference, rope_attention_triton  # noqa: E402

GPU_SHAPES = [(32, 16, 577, 64), (32, 16, 1025, 64), (32, 16, 577, 96), (32, 16, 1025, 96)]  # (B, H, N, D)
CPU_SHAPE = (2, 4, 197, 64)  # ViT-B/16 at 224 px: cls + 14x14


def attention_flops(B, H, N, D, backward):
    forward = 4 * B * H * N * N * D
    return forward * 3.5 if backward else forward


def make_inputs(B, H, N, D, device, dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=generator) for _ in range(4))
    grid = int(round((N - 1) ** 0.5))  # N = cls + grid x grid
    angles = rope_angles_2d(grid, grid, D, use_cls_token=True).to(device)
    return [t.requires_grad_() for t in (q, k, v)], angles, grad_out


def forward_backward(attention, inputs, angles, grad_out):
    attention(*inputs, angles).backward(grad_out)


def check_against_reference(inputs, angles, grad_out):
    """Largest relative error (norm ratio) of output and gradients of the fused kernel vs the reference."""
    results = []
    for attention in (rope_attention_triton, rope_attention_reference):
        for t in inputs:
            t.grad = None
        out = attention(*inputs, angles)
        out.backward(grad_out)
        results.append([out.detach().float()] + [t.grad.float() for t in inputs])
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(*results))


def bench_gpu():
    import triton.testing
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print("| B | H | N | D | rel. err | fwd fused ms (TFLOP/s) | fwd rope+SDPA ms (TFLOP/s) | fwd speed-up "
          "| fwd+bwd fused ms (TFLOP/s) | fwd+bwd rope+SDPA ms (TFLOP/s) | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, H, N, D in GPU_SHAPES:
        inputs, angles, grad_out = make_inputs(B, H, N, D, "cuda", torch.bfloat16)
        error = check_against_reference(inputs, angles, grad_out)  # also compiles and autotunes the kernels
        row = [B, H, N, D, f"{error:.1e}"]
        for backward in (False, True):
            times = []
            for attention in (rope_attention_triton, rope_attention_reference):
                if backward:
                    fn = lambda: forward_backward(attention, inputs, angles, grad_out)  # noqa: E731
                else:
                    fn = lambda: attention(*inputs, angles)  # noqa: E731
                with torch.set_grad_enabled(backward):
                    ms = triton.testing.do_bench(fn, grad_to_none=inputs, return_mode="median")
                times.append(ms)
                row.append(f"{ms:.3f} ({attention_flops(B, H, N, D, backward) / ms * 1e-9:.0f})")
            row.append(f"{times[1] / times[0]:.2f}x")
        print("| " + " | ".join(str(x) for x in row) + " |", flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bench_cpu(repeats=5):
    B, H, N, D = CPU_SHAPE
    print(f"no CUDA GPU: the Triton kernels cannot be timed here (the interpreter is a correctness tool, not a "
          f"benchmark); timing the reference rope_apply + SDPA on CPU instead, float32, "
          f"{torch.get_num_threads()} threads of {os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    inputs, angles, grad_out = make_inputs(B, H, N, D, "cpu", torch.float32)
    print("| B | H | N | D | path | fwd ms (GFLOP/s) | fwd+bwd ms (GFLOP/s) |")
    print("|---|---|---|---|---|---|---|")
    row = [B, H, N, D, "rope_apply + SDPA (CPU)"]
    for backward in (False, True):
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            if backward:
                forward_backward(rope_attention_reference, inputs, angles, grad_out)
            else:
                with torch.no_grad():
                    rope_attention_reference(*inputs, angles)
            times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times[1:])
        row.append(f"{ms:.2f} ({attention_flops(B, H, N, D, backward) / ms * 1e-6:.1f})")
    print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    if torch.cuda.is_available():
        bench_gpu()
    else:
        bench_cpu()
