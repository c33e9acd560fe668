"""Benchmark: fused 2D-RoPE attention (kernels/rope_attention.py) against fair rotate-then-attend baselines.

Run: python bench/rope_attention.py                       (the GPU if visible, else a small CPU run)
     python bench/rope_attention.py --shapes=2x4x197x64   (B x H x N x D, comma-separated list)

Methods (each checked against rope_attention_reference before timing, output and gradients):
  fused (Triton)             rope_attention_triton: the rotation once per tensor, flash attention on top
  rope + SDPA, eager         rope_attention_reference: rope_apply on q and k, then SDPA (its own backend pick)
  compiled rope + SDPA       rope_apply under torch.compile (one fused rotation kernel per tensor), then SDPA
  compiled rope + SDPA <b>   the same with SDPA held to one backend: flash, cuDNN, memory-efficient (CUDA;
                             a backend this GPU or build does not offer is reported and skipped)
On a GPU: forward and forward+backward time (median of triton.testing.do_bench, milliseconds) and TFLOP/s,
in bf16, at B = 32, H = 16, N = 577 (ViT-L/14 at 336 px + cls) and 1025 (448 px), head dim 64 (PE-Core/
Lang/Spatial up to L) and 96 (PE-G); then, per shape, the fused kernel's speed-up over the fastest
baseline. The goal (issue 14): forward+backward at least 1.2x faster than the best fair baseline.
Without a GPU it says so and times the baselines on CPU (float32) at a small shape: the Triton kernels
run there only under the interpreter, a correctness tool. If torch.compile fails (e.g. no C++ compiler
for inductor), the compiled rows say so and the others still run.

FLOPs counted: attention only, forward 4*B*H*N^2*D (two matmuls), backward 2.5x the forward (five
matmuls), the rotation's O(N*D) work ignored.
"""

import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from kernels.rope_attention import (rope_angles_2d, rope_apply, rope_attention_reference,  # noqa: E402
                                    rope_attention_triton)

GPU_SHAPES = [(32, 16, 577, 64), (32, 16, 1025, 64), (32, 16, 577, 96), (32, 16, 1025, 96)]  # (B, H, N, D)
CPU_SHAPES = [(2, 4, 197, 64)]  # ViT-B/16 at 224 px: cls + 14x14
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cuDNN": "CUDNN_ATTENTION", "mem-efficient": "EFFICIENT_ATTENTION"}
GOAL = 1.2


def attention_flops(B, H, N, D, backward):
    forward = 4 * B * H * N * N * D
    return forward * 3.5 if backward else forward


def make_inputs(B, H, N, D, device, dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=generator) for _ in range(4))
    grid = int(round((N - 1) ** 0.5))  # N = cls + grid x grid
    angles = rope_angles_2d(grid, grid, D, use_cls_token=True, device=device)
    return [t.requires_grad_() for t in (q, k, v)], angles, grad_out


def methods(device):
    """{name: attention(q, k, v, angles)}: the fused kernel (CUDA only) and the baselines."""
    compiled_rope = torch.compile(rope_apply)
    found = {}
    if device == "cuda":
        found["fused (Triton)"] = rope_attention_triton
    found["rope + SDPA, eager"] = rope_attention_reference
    found["compiled rope + SDPA"] = lambda q, k, v, a: F.scaled_dot_product_attention(
        compiled_rope(q, a), compiled_rope(k, a), v)
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for label, backend in SDPA_BACKENDS.items():
            def held(q, k, v, a, backend=getattr(SDPBackend, backend)):
                with sdpa_kernel(backend):  # the backward follows the forward's choice
                    return F.scaled_dot_product_attention(compiled_rope(q, a), compiled_rope(k, a), v)
            found[f"compiled rope + SDPA {label}"] = held
    return found


def forward_backward(attention, inputs, angles, grad_out):
    attention(*inputs, angles).backward(grad_out)


def error_against_reference(attention, inputs, angles, grad_out):
    """Largest relative error (norm ratio) of output and gradients of `attention` vs the reference; also
    the first run of each method (compiles, autotunes): a method that cannot run raises here."""
    results = []
    for method in (attention, rope_attention_reference):
        for t in inputs:
            t.grad = None
        out = method(*inputs, angles)
        out.backward(grad_out)
        results.append([out.detach().float()] + [t.grad.float() for t in inputs])
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(*results))


def time_cpu(fn, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def bench(device, shapes, repeats):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        import triton.testing
        timer = lambda fn, inputs: triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=inputs,  # noqa: E731
                                                           return_mode="median")
        rate, unit = 1e-9, "TFLOP/s"
    else:
        timer = lambda fn, inputs: time_cpu(fn, repeats)  # noqa: E731
        rate, unit = 1e-6, "GFLOP/s"
    print(f"| B | H | N | D | method | rel. err vs reference | fwd ms ({unit}) | fwd+bwd ms ({unit}) |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for B, H, N, D in shapes:
        inputs, angles, grad_out = make_inputs(B, H, N, D, device, dtype)
        best = {}  # method -> fwd+bwd ms
        for name, attention in methods(device).items():
            try:
                error = error_against_reference(attention, inputs, angles, grad_out)
            except Exception as failure:  # a backend this GPU lacks, or torch.compile without a compiler
                print(f"| {B} | {H} | {N} | {D} | {name} | not run: {type(failure).__name__}: "
                      f"{str(failure).splitlines()[0][:100] if str(failure) else ''} | - | - |", flush=True)
                continue
            row = [B, H, N, D, name, f"{error:.1e}"]
            for backward in (False, True):
                if backward:
                    fn = lambda: forward_backward(attention, inputs, angles, grad_out)  # noqa: E731
                else:
                    fn = lambda: attention(*inputs, angles)  # noqa: E731
                with torch.set_grad_enabled(backward):
                    ms = timer(fn, inputs)
                row.append(f"{ms:.3f} ({attention_flops(B, H, N, D, backward) / ms * rate:.1f})")
            best[name] = ms
            print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
        baselines = {name: ms for name, ms in best.items() if not name.startswith("fused")}
        if baselines:
            fastest = min(baselines, key=baselines.get)
            summary.append((B, H, N, D, fastest, baselines[fastest], best.get("fused (Triton)")))
    print("\n| B | H | N | D | best baseline (fwd+bwd) | its ms | fused ms | fused speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for B, H, N, D, fastest, base_ms, fused_ms in summary:
        fused, speed_up = (f"{fused_ms:.3f}", f"{base_ms / fused_ms:.2f}x") if fused_ms else ("-", "-")
        print(f"| {B} | {H} | {N} | {D} | {fastest} | {base_ms:.3f} | {fused} | {speed_up} |")
    speed_ups = [base_ms / fused_ms for *_, base_ms, fused_ms in summary if fused_ms]
    if speed_ups:
        print(f"fused fwd+bwd vs the best fair baseline: {min(speed_ups):.2f}x at worst over {len(speed_ups)} "
              f"shapes (goal >= {GOAL}x: {'met' if min(speed_ups) >= GOAL else 'not met'})")
    else:
        print("fused kernel not timed here (no CUDA GPU); baselines only")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def parse_args(argv):
    """--shapes=BxHxNxD,... (default: the GPU or the CPU list above), --repeats=N (CPU timing runs)."""
    options = {"shapes": "", "repeats": "5"}
    for arg in argv:
        name, _, value = arg.lstrip("-").partition("=")
        if name not in options:
            raise SystemExit(f"unknown option {arg}; the options are " + " ".join(f"--{n}=" for n in options))
        options[name] = value
    try:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in options["shapes"].split(",") if shape] or None
        repeats = int(options["repeats"])
    except ValueError:
        raise SystemExit(f"--shapes must be BxHxNxD[,BxHxNxD...] and --repeats an integer; got {argv}")
    if shapes and any(len(s) != 4 for s in shapes):
        raise SystemExit(f"--shapes: each shape is BxHxNxD, got {options['shapes']}")
    return shapes, repeats


def dry_run_check(argv):
    """For bench/gpu_check.py --dry-run, on any machine: the options parse and every method of the GPU run
    can be built (the SDPA backends exist in this torch); nothing is run or compiled."""
    shapes, _ = parse_args(argv)
    from torch.nn.attention import SDPBackend
    missing = [backend for backend in SDPA_BACKENDS.values() if not hasattr(SDPBackend, backend)]
    if missing:
        raise RuntimeError(f"torch {torch.__version__} has no SDPBackend {missing}")
    return f"parses; {len(shapes or GPU_SHAPES)} shapes x {len(methods('cuda'))} methods on CUDA"


if __name__ == "__main__":
    shapes, repeats = parse_args(sys.argv[1:])
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
        bench("cuda", shapes or GPU_SHAPES, repeats)
    else:
        print(f"no CUDA GPU: the Triton kernels cannot be timed here (the interpreter is a correctness tool, not a "
              f"benchmark); timing the baselines on CPU instead, float32, {torch.get_num_threads()} threads of "
              f"{os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}, "
              f"load average {os.getloadavg()[0]:.1f}")
        bench("cpu", shapes or CPU_SHAPES, repeats)
