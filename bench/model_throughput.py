"""Forward-pass throughput of PE vision towers (random weights): images per second, float32, batch 8.

    python bench/model_throughput.py                                  # CPU, the issue's two models
    python bench/model_throughput.py --models PE-Core-L14-336 --device cuda --dtype bfloat16

Prints a table and writes bench/model_throughput.json. Median over timed repeats after warm-up.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pe_model  # noqa: E402


def time_forward(visual, batch, device, dtype, warmup, repeats):
    images = torch.randn(batch, 3, visual.image_size, visual.image_size, device=device, dtype=dtype)
    timings = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            visual(images)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["PE-Core-T16-384", "PE-Core-B16-224"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        visual = pe_model.VisionTransformer.from_config(name).to(args.device, dtype).eval()
        seconds = time_forward(visual, args.batch, args.device, dtype, args.warmup, args.repeats)
        rows.append({"model": name, "image_size": visual.image_size, "batch": args.batch, "dtype": args.dtype,
                     "device": args.device, "seconds_per_batch": round(seconds, 4),
                     "images_per_second": round(args.batch / seconds, 2)})
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print("| model | res | batch | dtype | device | s/batch | images/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['dtype']} | {r['device']} | "
              f"{r['seconds_per_batch']} | {r['images_per_second']} |")
    print(f"machine: {machine}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_throughput.json")
    with open(out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
