"""Training throughput of train_clip.py on CPU: images per second of its real training loop (data rendering and
loading, forward, global contrastive loss, mask regularization, backward, LAMB/AdamW update), vanilla recipe
vs the PE recipe.

    python bench/train_throughput.py                        # default model (Nano8-64) and PE-Core-T16 at 224
    python bench/train_throughput.py --end_to_end           # also whole default-preset runs, stages as configured

Each stage resolution of a preset runs as its own `python train_clip.py --resolution_stages=1:R` process (a
stage only reads train_clip's command line, never imports it); the step time is the median over the steps
after the warm-up, read from its metrics.jsonl. A recipe's images/s is the batch over the fraction-weighted
mean step time of its stages (its progressive schedule). The T16 model trains at 224 (vanilla) or on the
paper's 98/154/224 ladder rounded to the 16-pixel patch, plus the final 336 stage (PE). Prints a markdown
table and writes bench/train_throughput.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import subprocess
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STAGES = {"vanilla": ("1:64",), "pe": ("0.4:32", "0.3:40", "0.2:48", "0.1:64")}  # train_clip's presets

T16_STAGES = {"vanilla": ("1:224",), "pe": ("0.3:96", "0.3:160", "0.3:224", "0.1:336")}


def run(args, steps, batch):
    """Seconds per step of `python train_clip.py ARGS` (global batch `batch`) over `steps` steps, the median
    after the first."""
    with tempfile.TemporaryDirectory() as out_dir:
        subprocess.run([sys.executable, os.path.join(REPO, "train_clip.py"), *args, f"--out_dir={out_dir}",
                        f"--max_steps={steps}", "--eval_every=0", "--checkpoint_every=0"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if '"loss"' in line]
    return statistics.median(batch / r["images_per_s"] for r in records[1:])


def stages_of(preset, model):
    return T16_STAGES[preset] if model == "PE-Core-T16-384" else DEFAULT_STAGES[preset]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32, help="global batch per step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end_to_end", action="store_true")
    parser.add_argument("--end_to_end_steps", type=int, default=40)
    args = parser.parse_args()
    rows = []
    for model, label in (("PE-Core-Nano8-64", "default (Nano8-64)"), ("PE-Core-T16-384", "PE-Core-T16 @224")):
        for preset in ("vanilla", "pe"):
            stages = [(float(f), int(r)) for f, r in (s.split(":") for s in stages_of(preset, model))]
            seconds = {r: run([f"--preset={preset}", f"--model={model}", f"--global_batch={args.batch}",
                               f"--resolution_stages=1:{r}"], args.warmup + args.repeats, args.batch) for _, r in stages}
            mean_step = sum(fraction * seconds[resolution] for fraction, resolution in stages)
            rows.append({"model": label, "preset": preset, "stages": ",".join(stages_of(preset, model)),
                         "batch": args.batch,
                         "step_seconds": {str(r): round(s, 4) for r, s in seconds.items()},
                         "images_per_second": round(args.batch / mean_step, 1)})
    if args.end_to_end:
        for preset, batch in (("vanilla", 64), ("pe", 128)):
            seconds = run([f"--preset={preset}", f"--global_batch={batch}"], args.end_to_end_steps, batch)
            rows.append({"model": "default (Nano8-64), train() with emoji data", "preset": preset,
                         "stages": ",".join(DEFAULT_STAGES[preset]), "images_per_second": round(batch / seconds, 1)})
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    print("| model | recipe | resolution stages | s/step per stage | images/s |\n|---|---|---|---|---|")
    for r in rows:
        per_stage = ", ".join(f"{k}px {v}" for k, v in r.get("step_seconds", {}).items()) or "-"
        print(f"| {r['model']} | {r['preset']} | {r['stages']} | {per_stage} | {r['images_per_second']} |")
    print(f"machine: {machine}")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
