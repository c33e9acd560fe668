"""Benchmark: the chunked contrastive loss (kernels/contrastive_loss.py) against the naive full-matrix
loss and open_clip's local loss: peak memory and time of forward+backward against the global batch B
(4,096, 16,384, 65,536; d = 512, fp32 features, logit scale 100).

Run: python bench/contrastive_loss.py                                 (CPU; and the GPU when visible)
     python bench/contrastive_loss.py --batches=65536 --methods=chunked --threads=1
Options: --batches=4096,16384,65536 --methods=chunked,naive,... --devices=cpu,cuda --threads=N (CPU).

Methods, all on one process:
  chunked            contrastive_loss over the whole batch (group=None): B x B logits in tiles.
  naive              the (B, B) logit matrix and the two cross-entropies.
  open_clip local/8  open_clip's local loss as rank 0 of 8 sees it: b = B/8 local pairs, (b, B)
                     logits per direction, the gathered features requiring grad (gather_with_grad).
  chunked/8          this loss's share of the work on rank 0 of 8: its b rows against all B texts
                     (the same tile functions, without the communication).
  open_clip local b=256, chunked b=256   the same two at a local batch of b = 256 pairs per GPU (PE's
                     scale: B / 256 ranks), where a b x B problem must still fill the GPU (issue 14).
The "/8" and "b=256" rows are per rank, so their time is about 1/8 (b/B) of the full-batch rows.

Peak memory is what forward+backward adds to the inputs. CPU (Linux): each case runs in a fresh
subprocess, resets its peak resident set once the inputs exist, and reports the growth of the peak
(getrusage ru_maxrss). GPU:
torch.cuda.max_memory_allocated minus the memory held before. A case whose estimated peak is
over the limit (8 GB on CPU, 90% of free memory on GPU) is skipped and printed as "skipped".
Time: best of 3 runs for B <= 4096, one run above (CPU); median of 3 after a warm-up (GPU). On CPU
also the process's CPU time (time.process_time, all its threads), which a shared, oversubscribed
machine disturbs far less than the wall-clock time.
On CPU the full-batch rows (chunked, naive) stop at B = 16,384 unless asked for with --methods:
B^2 d work at B = 65,536 is ~17 TFLOP, 10+ minutes on 2 cores; the "/8" rows cover that batch. The
"b=256" rows are for GPUs: on CPU they run at B <= 4,096 only, unless asked for with --methods.
Targets (issue 3): chunked peak linear in B; at B = 16,384 at most a tenth of the naive peak;
on CPU, chunked time within 1.5x of naive where naive fits.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere
import kernels.contrastive_loss as closs  # noqa: E402

BATCHES = [4096, 16384, 65536]
DIM = 512
LOGIT_SCALE = 100.0
RANKS = 8               # the "/8" rows: b = B / RANKS
CPU_LIMIT_GB = 8.0
CPU_FULL_BATCH_MAX = 16384  # default CPU sweep: full-batch methods up to this B (time, see above)
CPU_LOCAL_256_MAX = 4096    # default CPU sweep: the b=256 rows up to this B
LOCAL_BATCH = 256           # the "b=256" rows: pairs per GPU at PE scale
METHODS = ["chunked", "naive", "open_clip local/8", "chunked/8", "open_clip local b=256", "chunked b=256"]
# fp32 buffers of (B, B) (naive) or (b, B) (local loss) at the peak, to skip cases that cannot fit:
# measured 4.0-4.2 at B = 4096 and 16384 (bench/RESULTS.md), plus a margin
LOGIT_BUFFERS = 4.5


def local_rows(method, batch):
    """b, the rows (pairs) of rank 0 in a per-rank method."""
    return min(LOCAL_BATCH, batch) if method.endswith("b=256") else batch // RANKS


def estimated_peak_gb(method, batch):
    local = local_rows(method, batch)
    logits = {"naive": LOGIT_BUFFERS * batch * batch, "open_clip local/8": LOGIT_BUFFERS * local * batch,
              "open_clip local b=256": LOGIT_BUFFERS * local * batch}
    return 4 * (logits.get(method, 0) + 6 * batch * DIM) / 1e9


def make_inputs(batch, device):
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, DIM, generator=generator), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(batch, DIM, generator=generator), dim=-1)
    scale = torch.tensor(LOGIT_SCALE)
    return [t.to(device).requires_grad_() for t in (image, text, scale)]


def naive_loss(image, text, scale):
    logits = scale * image @ text.T                                        # (B, B)
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def open_clip_local_loss(image, text, scale, local):
    """Rank 0: its own b = `local` pairs against the gathered B (open_clip's local_loss=True)."""
    logits_per_image = scale * image[:local] @ text.T                      # (b, B)
    logits_per_text = scale * text[:local] @ image.T                       # (b, B)
    labels = torch.arange(local, device=image.device)                      # rank 0: offset 0
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def chunked_rank_work(image, text, scale, local):
    """The tile work of rank 0 in contrastive_loss: its b = `local` rows against all B texts, forward
    (log-sum-exps) and backward (weighted sums). Not differentiable; returns nothing."""
    image, text, scale = image.detach()[:local], text.detach(), scale.detach().reshape(1)
    if image.is_cuda:
        lse_rows, lse_cols = closs._tile_lse_triton(image, text, scale, 64)
        closs._tile_directions_triton(image, text, scale, lse_rows, lse_cols, 0, 64)
    else:
        lse_rows, lse_cols = closs._tile_lse_reference(image, text, scale, 1024)
        closs._tile_directions_reference(image, text, scale, lse_rows, lse_cols, 0, 1024)


def forward_backward(method, image, text, scale):
    local = local_rows(method, image.shape[0])
    if method.startswith("chunked") and method != "chunked":
        return chunked_rank_work(image, text, scale, local)
    if method.startswith("open_clip"):
        open_clip_local_loss(image, text, scale, local).backward()
    else:
        {"chunked": closs.contrastive_loss, "naive": naive_loss}[method](image, text, scale).backward()
    image.grad = text.grad = scale.grad = None


def peak_rss():
    """Peak resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss():
    """Resets the peak resident set to the current one (Linux: /proc/self/clear_refs, "5"), so the
    temporaries freed while the inputs were made do not hide part of the loss's peak; returns it."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return peak_rss()


def run_case(method, batch, device):
    """One case in this (fresh) process; returns {"peak_gb", "seconds"}."""
    forward_backward(method, *make_inputs(256, device))  # libraries' first-use memory (BLAS, Triton)
    image, text, scale = make_inputs(batch, device)
    if device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(method, image, text, scale)  # warm-up at this size and the memory figure
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - held
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward_backward(method, image, text, scale)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = sorted(times)[1]
    else:
        held = reset_peak_rss()
        times, cpu_times = [], []
        for _ in range(3 if batch <= 4096 else 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            forward_backward(method, image, text, scale)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        peak = peak_rss() - held
        seconds, cpu_seconds = min(times), min(cpu_times)
        return {"peak_gb": peak / 1e9, "seconds": seconds, "cpu_seconds": cpu_seconds}
    return {"peak_gb": peak / 1e9, "seconds": seconds, "cpu_seconds": float("nan")}


def run_case_in_subprocess(method, batch, device):
    command = [sys.executable, os.path.abspath(__file__), f"--case={method}:{batch}:{device}",
               f"--threads={torch.get_num_threads()}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench case {method} B={batch} {device} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv):
    options = {"batches": ",".join(map(str, BATCHES)), "methods": "",
               "devices": "cpu,cuda" if torch.cuda.is_available() else "cpu",
               "threads": str(torch.get_num_threads()), "case": ""}
    for arg in argv:
        name, _, value = arg.lstrip("-").partition("=")
        if name not in options:
            raise SystemExit(f"unknown option {arg}; the options are " + " ".join(f"--{n}=" for n in options))
        options[name] = value
    return options


def dry_run_check(argv):
    """For bench/gpu_check.py --dry-run: the options parse and name known methods; nothing is run."""
    options = parse_args(argv)
    methods = options["methods"].split(",") if options["methods"] else METHODS
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; the methods are {METHODS}")
    batches = [int(b) for b in options["batches"].split(",")]
    return f"parses; B = {batches} x {len(methods)} methods (b = 256: {[m for m in methods if 'b=256' in m]})"


def skip_reason(method, batch, device, limit_gb, methods_asked):
    estimate = estimated_peak_gb(method, batch)
    if estimate > limit_gb:
        return f"skipped (needs ~{estimate:.0f} GB)"
    per_rank = "/" in method or method.endswith("b=256")
    if device == "cpu" and not methods_asked and not per_rank and batch > CPU_FULL_BATCH_MAX:
        return "skipped (CPU time; --methods=" + method + " runs it)"
    if device == "cpu" and not methods_asked and method.endswith("b=256") and batch > CPU_LOCAL_256_MAX:
        return "skipped (a GPU case; --methods=" + method + " runs it on CPU)"
    return None


def main():
    options = parse_args(sys.argv[1:])
    torch.set_num_threads(int(options["threads"]))
    if options["case"]:  # child process: one case, one JSON line
        method, batch, device = options["case"].split(":")
        print(json.dumps(run_case(method, int(batch), device)))
        return

    batches = [int(b) for b in options["batches"].split(",")]
    methods = options["methods"].split(",") if options["methods"] else METHODS
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; the methods are {METHODS}")
    devices = options["devices"].split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        print("no GPU visible: GPU figures not measured")
        devices.remove("cuda")
    for device in devices:
        if device == "cuda":
            limit_gb = 0.9 * torch.cuda.mem_get_info()[0] / 1e9
            machine = torch.cuda.get_device_name()
        else:
            limit_gb = CPU_LIMIT_GB
            machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {options['threads']}"
        print(f"\n## {device}: {machine}; d = {DIM}, fp32, logit scale {LOGIT_SCALE}\n")
        print("| B | method | peak memory (GB) | time fwd+bwd (s) | CPU time fwd+bwd (s) |")
        print("|---|---|---|---|---|")
        for batch in batches:
            for method in methods:
                reason = skip_reason(method, batch, device, limit_gb, bool(options["methods"]))
                if reason:
                    row = (batch, method, reason, "-", "-")
                else:
                    result = run_case_in_subprocess(method, batch, device)
                    row = (batch, method, f"{result['peak_gb']:.3f}", f"{result['seconds']:.2f}",
                           f"{result['cpu_seconds']:.2f}")
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    print("\nran: python bench/contrastive_loss.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
