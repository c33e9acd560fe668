"""Training throughput of train_clip.py on CPU: images per second of full optimizer steps (forward, global
contrastive loss, mask regularization, backward, LAMB/AdamW update), vanilla recipe vs the PE recipe.

    python bench/train_throughput.py                        # default model (Nano8-64) and PE-Core-T16 at 224
    python bench/train_throughput.py --end_to_end           # also the real `train()` loop with the emoji data

Model steps run on synthetic batches (random pixels, random captions) at each resolution stage of the
preset; a recipe's images/s is the batch over the fraction-weighted mean step time of its stages (its
progressive schedule). The T16 model trains at 224 (vanilla) or on the paper's 98/154/224 ladder rounded to
the 16-pixel patch, plus the final 336 stage (PE). --end_to_end times `train_clip.train` itself (data
rendering and loading included, single process) for the default presets. Median over timed repeats after
warm-up. Prints a markdown table and writes bench/train_throughput.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pe_model  # noqa: E402
import train_clip  # noqa: E402
import training  # noqa: E402

T16_STAGES = {"vanilla": ("1:224",), "pe": ("0.3:96", "0.3:160", "0.3:224", "0.1:336")}


def time_steps(cfg, batch, warmup, repeats):
    """Median seconds of one training step at each stage resolution of cfg: {resolution: seconds}."""
    torch.manual_seed(0)
    model = train_clip.build_clip(cfg.model, cfg.use_rope2d, cfg.pool_type)
    train_forward = train_clip.TrainingForward(model)
    optimizer = training.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    patch = model.visual.patch_size
    tokens = torch.randint(1, 49406, (batch, model.context_length))
    tokens[:, 0], tokens[:, -1] = pe_model.SOT_TOKEN_ID, pe_model.EOT_TOKEN_ID
    seconds = {}
    for _, resolution in train_clip.parse_stages(cfg.resolution_stages):
        images = torch.randn(batch, 3, resolution, resolution)
        timings = []
        for step in range(warmup + repeats):
            start = time.perf_counter()
            masking = None
            if cfg.mask_fraction > 0 and cfg.mask_ratio > 0:
                masking = train_clip.sample_masks(batch, resolution // patch, cfg.mask_fraction, cfg.mask_ratio,
                                                  step, 0)
            train_clip.contrastive_step(train_forward, optimizer, images, tokens, masking, cfg.mask_weight)
            if step >= warmup:
                timings.append(time.perf_counter() - start)
        seconds[resolution] = statistics.median(timings)
    return seconds


def end_to_end(preset, steps):
    """Images/s of train_clip.train for `steps` steps of a preset (default model and data), after its first
    step (start-up excluded)."""
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = train_clip.make_config([f"--preset={preset}", f"--out_dir={out_dir}", f"--max_steps={steps}",
                                      "--eval_every=0", "--checkpoint_every=0"])
        train_clip.train(cfg)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if '"loss"' in line]
    return cfg.global_batch / statistics.median(cfg.global_batch / r["images_per_s"] for r in records[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32, help="synthetic batch per step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end_to_end", action="store_true")
    parser.add_argument("--end_to_end_steps", type=int, default=40)
    args = parser.parse_args()
    rows = []
    for model, label in (("PE-Core-Nano8-64", "default (Nano8-64)"), ("PE-Core-T16-384", "PE-Core-T16 @224")):
        for preset in ("vanilla", "pe"):
            cfg = train_clip.make_config([f"--preset={preset}", f"--model={model}"])
            if model == "PE-Core-T16-384":
                cfg.resolution_stages = T16_STAGES[preset]
            seconds = time_steps(cfg, args.batch, args.warmup, args.repeats)
            stages = train_clip.parse_stages(cfg.resolution_stages)
            mean_step = sum(fraction * seconds[resolution] for fraction, resolution in stages)
            rows.append({"model": label, "preset": preset, "stages": ",".join(cfg.resolution_stages),
                         "optimizer": cfg.optimizer, "batch": args.batch,
                         "step_seconds": {str(r): round(s, 4) for r, s in seconds.items()},
                         "images_per_second": round(args.batch / mean_step, 1)})
    if args.end_to_end:
        for preset in ("vanilla", "pe"):
            rows.append({"model": "default (Nano8-64), train() with emoji data", "preset": preset,
                         "stages": ",".join(train_clip.make_config([f"--preset={preset}"]).resolution_stages),
                         "images_per_second": round(end_to_end(preset, args.end_to_end_steps), 1)})
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
