"""One command for the day a CUDA GPU is lent: the CUDA tests, both kernel benchmarks, 20 steps of
train_clip.py (bf16 autocast, both Triton kernels) and a 1-process torchrun NCCL run, within 8 minutes;
prints one markdown table (status, seconds, the figure) for bench/RESULTS.md, then each step's output.

    python bench/gpu_check.py             # on a machine with one CUDA GPU
    python bench/gpu_check.py --dry-run   # anywhere: checks that every command parses, runs none
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
OUT = os.path.join(tempfile.gettempdir(), "pe_gpu_check")
TRAIN_ARGS = ["--max_steps=20", "--eval_every=0", "--checkpoint_every=0"]
# (name, command, timeout in seconds): 480 s in all
STEPS = [
    ("CUDA tests", [PY, "-m", "pytest", "-q", "-rs", "tests/test_rope_attention.py", "tests/test_contrastive_loss.py",
                    "-k", "cuda"], 150),
    # fused vs rotate-then-SDPA eager, torch.compile'd rotation + SDPA, and each SDPA backend held in turn
    ("fused RoPE attention vs fair baselines (bf16)", [PY, "bench/rope_attention.py"], 130),
    # full batch, open_clip local loss and this loss's rank share at b = B/8 and at b = 256 pairs per GPU
    ("contrastive loss vs naive / local, b=B/8 and b=256 (fp32)", [PY, "bench/contrastive_loss.py",
                                                                   "--devices=cuda", "--batches=16384,65536"], 90),
    ("train_clip.py, 20 steps, bf16, both kernels", [PY, "train_clip.py", *TRAIN_ARGS, f"--out_dir={OUT}/clip"], 55),
    ("torchrun, 1 process, NCCL", [PY, "-m", "torch.distributed.run", "--nproc_per_node", "1", "train_clip.py",
                                   *TRAIN_ARGS, f"--out_dir={OUT}/torchrun"], 55),
]


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3].replace("/", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() is behind `if __name__ == "__main__"`
    return module


def dry_run(command):
    """Checks that `command` parses without running it: pytest collects its selection, the scripts compile
    and parse their options (the benchmarks' dry_run_check also builds the list of what they would time)."""
    if command[1:3] == ["-m", "pytest"]:
        done = subprocess.run([*command, "--collect-only"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0 or " collected" not in done.stdout:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        return done.stdout.strip().splitlines()[-1]
    if command[1:3] == ["-m", "torch.distributed.run"]:
        if importlib.util.find_spec("torch.distributed.run") is None:
            raise RuntimeError("torch.distributed.run is missing")
        command = [PY] + command[5:]
    script, args = os.path.join(REPO, command[1]), command[2:]
    module = load(script)
    if hasattr(module, "dry_run_check"):  # the benchmarks: options, and what the GPU run would measure
        return module.dry_run_check(args)
    if hasattr(module, "make_config"):
        module.make_config(args)
    elif hasattr(module, "parse_args"):
        module.parse_args(args)
    return "parses"


def figure(name, output):
    """The step's headline figure: images/s of train_clip's metrics, or the test summary line."""
    if name.startswith(("train_clip", "torchrun")):
        path = os.path.join(OUT, "clip" if name.startswith("train") else "torchrun", "metrics.jsonl")
        with open(path) as f:
            records = [json.loads(line) for line in f if '"images_per_s"' in line]
        return f"{sorted(r['images_per_s'] for r in records[1:])[len(records[1:]) // 2]:.0f} images/s"
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:80] if lines else ""


def main():
    dry = "--dry-run" in sys.argv[1:]
    rows, outputs = [], []
    if not dry:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; run with --dry-run to check the commands")
        shutil.rmtree(OUT, ignore_errors=True)
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name, command, timeout in STEPS:
        start = time.time()
        try:
            if dry:
                status, result = "ok", dry_run(command)
            else:
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
                outputs.append((name, done.stdout[-6000:] + done.stderr[-3000:]))
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
                result = figure(name, done.stdout) if done.returncode == 0 else ""
        except Exception as error:  # a timeout or a command that does not parse: say so, go on
            status, result = "failed", f"{type(error).__name__}: {str(error)[:150]}"
        rows.append((name, " ".join(c if c != PY else "python" for c in command), status, time.time() - start,
                     result))
    print("\n| check | command | status | seconds | result |\n|---|---|---|---|---|")
    for name, command, status, seconds, result in rows:
        print(f"| {name} | `{command}` | {status} | {seconds:.0f} | {result} |")
    for name, output in outputs:
        print(f"\n## {name}\n\n{output}")
    sys.exit(0 if all(row[2] == "ok" for row in rows) else 1)


if __name__ == "__main__":
    main()
