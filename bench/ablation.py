"""
bench/ablation.py: the nine-step recipe ablation of PE core (Bolya et al. 2025, §2.1, Fig. 2; raw numbers in
App. C.1 Tab. 26) at CPU scale, and the layer analysis of §3 (Figs. 9-10: best intermediate layer against the
last) on the same nine checkpoints.

Step k's train_clip.py command is step k-1's plus the options of one change; every (step, seed) run is one
`python train_clip.py ...` and one `python evaluate.py --all ...` subprocess, both printed and stored as a reader
can copy them (run from the repository root). The script only runs and collects them:

    python bench/ablation.py                              # 9 steps x 3 seeds (~100 min on 2 idle cores)
    python bench/ablation.py --steps=1,9 --seeds=1        # the quick form: vanilla and the full recipe, one seed
    python bench/ablation.py --dry_run                    # print the 2 x 27 commands only
    python bench/ablation.py --deep --seeds=0,1           # the deeper core, full recipe, its layer-wise curves

Resumable: a run whose evaluation results.json is present (with the same commands) is collected, not redone; a
run whose training finished is only evaluated; an interrupted training continues from its newest checkpoint
(--resume); a run folder written by different commands is deleted and redone. Writes, into --report_dir
(default bench/): ablation.json (one row per step and seed: step, name, seed, train_command, eval_command,
zero_shot_top1, robustness {set: top-1, "clean" included}, robustness_avg (evaluate.py's mean over the shifts,
without the clean set), layerwise {probe: {best_layer, best, last}} for every probe evaluate.py reports),
ablation.png (left: zero-shot and robustness per step with the seeds' spread; right: best-layer and last-layer
score per step and probe, the best layer's index marked) and ablation.md (mean +- std over seeds, per-step
deltas, beside Tab. 26; the robustness average with the clean set too, the paper's "Avg6" way). --deep writes
ablation_deep.json / ablation_deep.md (per-layer tables) and copies evaluate.py's layer-wise plot.

The CPU analogue (the model is PE-Core-Nano8-64: patch 8, native 64 px; data: the embedded emoji set):
- One --max_steps for every step, as in the paper: step 3 doubles the batch *and* the samples seen (12B -> 24B
  at 32K -> 64K), so the number of optimizer steps stays the same; the base batch is the vanilla preset's 64.
- Resolution: the vanilla runs train at 48 px (6x6 tokens) and step 5 ends at 72 px (9x9), the paper's
  224 -> 336 ratio of 1.5. Training the baseline at the native 64 px and ending at 96 would cost ~1.5x per step
  and leave fewer steps in the budget. Step 2's thirds at 24 / 32 / 48 px are the paper's 98 / 154 / 224
  (7 / 11 / 16 tokens a side, scaled by 6/16 and rounded to the patch: 3 / 4 / 6); step 5 splits the steps
  10 : 8 : 4 : 2 over 24 / 32 / 48 / 72 px as the paper's 10B / 8B / 4B / 2B samples at 98 / 154 / 224 / 336.
- At this scale progressive resolution saves far less than the paper's half: the text tower and the per-image
  overheads do not shrink with the image, so a 24 px step costs about a third of a 64 px one, not a seventh. So
  step 2 is cheaper (about three quarters of step 1) and step 3, doubling the batch, spends more than the saved
  compute (steps 3-9 cost ~1.5-1.6x step 1, the paper's 1.1x). Step 5 costs about 5% more than step 4 (the
  paper's 1.1 -> 1.2 ZFLOPs).
- Learning rates are the paper's absolute values, AdamW 5e-4 -> LAMB 2e-3 (its 4x), rather than the vanilla
  preset's 1e-3 times 4: 2e-3 is also the project's tuned LAMB rate, and 3.5e-3 and up lost accuracy or
  collapsed (bench/RESULTS.md). Step 4 also switches AdamW's OpenCLIP betas (0.9, 0.98) and weight decay 0.2
  to Tab. 18's LAMB values (0.9, 0.95) and 0.05: they belong to the optimizer change.
- Step 8 (tuned augmentation) changes crop scale (0.9, 1) -> (0.08, 1), brightness and saturation jitter
  0 -> 0.32 and horizontal flip 0 -> 0.5 (Tab. 18). The aspect-ratio range of the crop is (3/4, 4/3) in every
  step: train_clip.py has no switch for it, and OpenCLIP's vanilla crop uses the same range.
- Steps 6, 7, 9 are train_clip.py's switches as they are (RoPE besides the absolute embedding, attention pooling
  over all tokens with the class token kept, mask regularization of 1/16 of the batch at ratio 0.4).
- Step 9 is train_clip.py's pe preset except the schedule length and the resolution ladder.
- Robustness: evaluate.py's shifted copies of the held-out renderings stand in for the ImageNet variants; the
  paper's Avg6 includes the clean set (IN-val), our robustness_avg does not, ablation.md shows both.
"""

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from anywhere
import training  # noqa: E402  (parse_config, write_json, fmt: the shared machinery; no stage is imported)


@dataclass
class AblationConfig:
    steps: typing.Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # which of the nine steps to run
    seeds: typing.Tuple[int, ...] = (0, 1, 2)  # the seeds of every step (--seeds=1: seed 1 alone)
    max_steps: int = 300  # optimizer steps of every run (9 x 3 runs in ~100 min on 2 idle cores, bench/RESULTS.md)
    checkpoint_every: int = 100  # an interrupted run resumes from here
    out_dir: str = "out/ablation"  # the runs' folders: step{k}_seed{s}/train, .../eval
    report_dir: str = "bench"  # ablation.json, ablation.png, ablation.md (ablation_deep.* with --deep)
    dry_run: bool = False  # print the commands only
    deep: bool = False  # instead of the ablation: the deeper core with the full recipe (train_clip.py's defaults)
    deep_model: str = "PE-Core-NanoDeep8-64"
    deep_max_steps: int = 1200  # about 25 min with its 12-layer evaluation on 2 idle cores (bench/RESULTS.md)


# ---------------------------------------------------------------------------------------------------------
# The nine steps: (name, the train_clip.py options this step changes), cumulative. Step 1 is the vanilla preset
# at the scaled baseline resolution and the paper's AdamW learning rate.

BASE = {"preset": "vanilla", "lr": 5e-4, "resolution_stages": ("1:48",)}
STEPS = [
    ("vanilla CLIP", {}),
    ("progressive resolution", {"resolution_stages": ("0.3333:24", "0.3333:32", "0.3334:48")}),
    ("batch 2x", {"global_batch": 128}),
    ("LAMB, lr 4x", {"optimizer": "lamb", "lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.05}),
    ("final high-res stage", {"resolution_stages": ("0.4167:24", "0.3333:32", "0.1667:48", "0.0833:72")}),
    ("2D RoPE", {"use_rope2d": True}),
    ("attention pooling", {"pool_type": "attn"}),
    ("tuned augmentation", {"crop_scale": (0.08, 1.0), "brightness": 0.32, "saturation": 0.32, "hflip_prob": 0.5}),
    ("mask regularization", {"mask_fraction": 0.0625}),
]

# Tab. 26 (pe_paper_method.md §1.3): step -> (IN-val, robustness Avg6 incl. IN-val, ZFLOPs)
PAPER = {1: (78.9, 75.3, 1.0), 2: (78.9, 75.1, 0.5), 3: (79.5, 76.2, 1.1), 4: (79.9, 76.9, 1.1),
         5: (80.4, 78.3, 1.2), 6: (80.7, 79.2, 1.2), 7: (81.0, 80.1, 1.2), 8: (81.1, 80.8, 1.2),
         9: (81.3, 80.9, 1.2)}


def step_options(step):
    """The train_clip.py options (field -> value) of step 1..9: BASE plus the changes of steps 1..step."""
    if not 1 <= step <= len(STEPS):
        raise SystemExit(f"--steps: {step} is not a step of the ablation (1-{len(STEPS)})")
    options = dict(BASE)
    for _, changes in STEPS[:step]:
        options.update(changes)
    return options


def option_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(option_text, value))
    return repr(value) if isinstance(value, float) else str(value)


def train_argv(options, seed, run_dir, max_steps, checkpoint_every):
    """The train_clip.py command of one run (a list: python, script, --options)."""
    extra = {"max_steps": max_steps, "seed": seed, "out_dir": os.path.join(run_dir, "train"),
             "checkpoint_every": checkpoint_every, "eval_every": 0}  # evaluate.py measures zero-shot
    return ["python", "train_clip.py"] + [f"--{k}={option_text(v)}" for k, v in {**options, **extra}.items()]


def eval_argv(run_dir):
    return ["python", "evaluate.py", "--all", f"--checkpoint={os.path.join(run_dir, 'train', 'final.pt')}",
            f"--out_dir={os.path.join(run_dir, 'eval')}"]


# ---------------------------------------------------------------------------------------------------------
# Running: resumable, one folder per run


def run_logged(argv, log_path):
    """Run argv from the repository root (python = this interpreter), stdout/stderr into log_path; a failure
    stops the ablation with the command and the log's tail."""
    started = time.time()
    with open(log_path, "a") as log:
        code = subprocess.run([sys.executable] + argv[1:], cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"failed ({code}): {shlex.join(argv)}\n{tail}(log: {log_path})")
    return time.time() - started


def run_one(run_dir, train_cmd, eval_cmd):
    """Train and evaluate one run unless done. Returns (results dict, {"train": s, "eval": s} as seconds.json
    records them over every invocation that worked on this run, seconds spent in this one)."""
    results_path = os.path.join(run_dir, "eval", "results.json")
    commands_path = os.path.join(run_dir, "commands.json")
    seconds_path = os.path.join(run_dir, "seconds.json")
    commands = {"train": shlex.join(train_cmd), "eval": shlex.join(eval_cmd)}
    if os.path.exists(commands_path):
        with open(commands_path) as f:
            if json.load(f) != commands:  # another budget or recipe: its checkpoints must not be resumed
                shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    training.write_json(commands_path, commands)
    try:
        with open(seconds_path) as f:
            seconds = json.load(f)
    except (OSError, ValueError):
        seconds = {}
    spent = 0.0
    if not os.path.exists(results_path):
        parts = [("eval", eval_cmd, "eval.log")]
        if not os.path.exists(os.path.join(run_dir, "train", "final.pt")):
            resume = ["--resume"] if training.latest_checkpoint(os.path.join(run_dir, "train")) else []
            parts.insert(0, ("train", train_cmd + resume, "train.log"))
        for part, argv, log in parts:  # a resumed part adds to the time recorded before the interruption
            now = run_logged(argv, os.path.join(run_dir, log))
            seconds[part] = seconds.get(part, 0.0) + now
            spent += now
            training.write_json(seconds_path, seconds)
    try:
        with open(results_path) as f:
            return json.load(f), seconds, spent
    except ValueError as error:
        raise SystemExit(f"{results_path}: not valid JSON ({error}); delete it to redo the evaluation") from None


def top1(entry):
    return None if entry is None else entry.get("top1")


def collect_row(step, name, seed, train_command, eval_command, results):
    """One ablation.json row from an evaluate.py --all results.json (one checkpoint). Every layer-wise probe
    present is reported, so a probe evaluate.py adds appears without a change here."""
    robustness = results.get("robustness") or {}
    sets = {"clean": top1(robustness.get("clean")),
            **{k: top1(v) for k, v in (robustness.get("shifts") or {}).items()}}
    tasks = (results.get("layerwise") or {}).get("tasks") or {}
    return {"step": step, "name": name, "seed": seed, "train_command": train_command, "eval_command": eval_command,
            "zero_shot_top1": top1(results.get("zero_shot")), "robustness": sets,
            "robustness_avg": top1(robustness.get("robustness_average")),
            "layerwise": {probe: {"best_layer": e.get("best_layer"), "best": e.get("best"), "last": e.get("last")}
                          for probe, e in tasks.items()}}


# ---------------------------------------------------------------------------------------------------------
# Reports


def avg_with_clean(row):
    values = [v for v in row["robustness"].values() if v is not None]
    return sum(values) / len(values) if values else None


def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values, digits=1):
    mean, std = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def delta(values, previous, digits=1):
    now, before = mean_std(values)[0], mean_std(previous)[0] if previous is not None else None
    return "–" if now is None or before is None else f"{now - before:+.{digits}f}"


def by_step(rows):
    steps = sorted({r["step"] for r in rows})
    return [(s, [r for r in rows if r["step"] == s]) for s in steps]


def markdown_report(rows):
    """The tables of ablation.md: the headline figures beside Tab. 26, then the layer-wise probes."""
    grouped = by_step(rows)
    metrics = (("zero-shot top-1 %", lambda r: r["zero_shot_top1"]), ("robustness avg (shifts) %",
               lambda r: r["robustness_avg"]), ("avg incl. clean %", avg_with_clean))
    header = ["step", "change", "seeds"] + [h for m, _ in metrics for h in (m, "Δ")] + \
             ["paper IN-val", "Δ", "paper Avg6", "Δ", "train min", "paper ZFLOPs"]
    lines, previous, previous_step = [], None, None
    for step, group in grouped:
        cells = [str(step), group[0]["name"], ",".join(str(r["seed"]) for r in group)]
        for _, get in metrics:
            values = [get(r) for r in group]
            cells += [cell(values), delta(values, None if previous is None else [get(r) for r in previous])]
        paper, before = PAPER[step], PAPER.get(previous_step)
        cells += [f"{paper[0]:.1f}", f"{paper[0] - before[0]:+.1f}" if before else "–",
                  f"{paper[1]:.1f}", f"{paper[1] - before[1]:+.1f}" if before else "–",
                  cell([(r.get("seconds") or {}).get("train", math.nan) / 60 for r in group]), f"{paper[2]:.1f}"]
        lines.append(cells)
        previous, previous_step = group, step
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |"
                                                                              for c in lines]
    probes = list(dict.fromkeys(p for r in rows for p in r["layerwise"]))
    layer_header = ["step"] + [f"{p} {h}" for p in probes for h in ("best layer", "best", "last")]
    layer_rows = []
    for step, group in grouped:
        cells = [str(step)]
        for p in probes:
            entries = [r["layerwise"].get(p) or {} for r in group]
            cells += [",".join(training.fmt(e.get("best_layer")) for e in entries),
                      cell([e.get("best") for e in entries], 2), cell([e.get("last") for e in entries], 2)]
        layer_rows.append(cells)
    layers = ["| " + " | ".join(layer_header) + " |", "|" + "---|" * len(layer_header)] + \
             ["| " + " | ".join(c) + " |" for c in layer_rows]
    total = sum(sum((r.get("seconds") or {}).values()) for r in rows)
    note = ("Mean ± std over seeds; Δ against the previous step shown; train min: the training's wall time per "
            f"run. Wall time of all {len(rows)} runs (train + evaluate, as recorded when they ran): "
            f"{total / 60:.1f} min.")
    return "\n".join(["### Recipe ablation (§2.1, Tab. 26)", "", note, "", *table, "",
                      "### Layer-wise probes per step (Figs. 9-10): best layer (per seed), its score, the last layer's",
                      "", *layers, ""])


def plot(rows, path):
    """Left: zero-shot and robustness per step (mean line, seeds as dots). Right: per probe, the best layer's
    and the last layer's score per step (mean), the best layer's index written at each point."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench/ablation.py: the plot needs matplotlib: pip install matplotlib") from None
    grouped = by_step(rows)
    steps = [s for s, _ in grouped]
    probes = list(dict.fromkeys(p for r in rows for p in r["layerwise"]))
    fig = plt.figure(figsize=(12, max(4.5, 2.2 * len(probes))))
    grid = fig.add_gridspec(max(1, len(probes)), 2)
    left = fig.add_subplot(grid[:, 0])
    for label, get in (("zero-shot top-1", lambda r: r["zero_shot_top1"]),
                       ("robustness avg (shifts)", lambda r: r["robustness_avg"]),
                       ("robustness avg incl. clean", avg_with_clean)):
        means = [mean_std([get(r) for r in g])[0] for _, g in grouped]
        line, = left.plot(steps, [float("nan") if m is None else m for m in means], marker="o", label=label)
        for s, g in grouped:
            values = [get(r) for r in g if get(r) is not None]
            left.scatter([s] * len(values), values, color=line.get_color(), alpha=0.35, s=12)
    left.set_xticks(steps, [f"{s}\n{STEPS[s - 1][0]}" for s in steps], fontsize=7, rotation=45, ha="right")
    left.set_ylabel("top-1 %")
    left.set_title("Recipe ablation (mean over seeds; dots: seeds)")
    left.legend(fontsize=8)
    for k, probe in enumerate(probes):
        axis = fig.add_subplot(grid[k, 1])
        for key, style in (("best", "-o"), ("last", "--s")):
            means = [mean_std([(r["layerwise"].get(probe) or {}).get(key) for r in g])[0] for _, g in grouped]
            axis.plot(steps, [float("nan") if m is None else m for m in means], style, label=f"{key} layer")
            if key == "best":
                for s, g, m in zip(steps, [g for _, g in grouped], means):
                    layers = [(r["layerwise"].get(probe) or {}).get("best_layer") for r in g]
                    if m is not None:
                        axis.annotate(",".join(map(str, layers)), (s, m), fontsize=7, xytext=(0, 4),
                                      textcoords="offset points", ha="center")
        axis.set_title(probe, fontsize=9)
        axis.set_xticks(steps)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------


def deep_report(rows, results):
    """ablation_deep.md: per probe, the per-layer scores of each seed, and where each peaks."""
    lines = ["### Deeper core: layer-wise probes", ""]
    for row in rows:
        lines.append(f"seed {row['seed']}: `{row['train_command']}` then `{row['eval_command']}`")
    for probe in dict.fromkeys(p for r in results for p in (r.get("layerwise") or {}).get("tasks", {})):
        entries = [((r.get("layerwise") or {}).get("tasks") or {}).get(probe) for r in results]
        first = next((e for e in entries if e and e.get("per_layer")), None)
        if first is None:
            lines += ["", f"**{probe}**: no per-layer scores in results.json"]
            continue
        layers = first.get("layers") or list(range(len(first["per_layer"])))
        header = ["layer"] + [f"seed {row['seed']}" for row in rows]
        table = [[layer] + [e["per_layer"][i] if e and e.get("per_layer") else None for e in entries]
                 for i, layer in enumerate(layers)]
        best = ", ".join(f"seed {row['seed']}: layer {e['best_layer']} ({training.fmt(e['best'], 2)}, last "
                         f"{training.fmt(e['last'], 2)})" for row, e in zip(rows, entries) if e)
        lines += ["", f"**{probe}** ({first.get('metric', '')}): best {best}", "",
                  training.markdown_table(header, table, 2)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = training.parse_config(AblationConfig(), argv)
    if cfg.deep:
        plan = [(0, f"deep core ({cfg.deep_model}, full recipe)", seed, os.path.join(cfg.out_dir, f"deep_seed{seed}"),
                 {"model": cfg.deep_model}, cfg.deep_max_steps) for seed in cfg.seeds]
    else:
        plan = [(step, STEPS[step - 1][0], seed, os.path.join(cfg.out_dir, f"step{step}_seed{seed}"),
                 step_options(step), cfg.max_steps) for step in cfg.steps for seed in cfg.seeds]
    runs = [(step, name, seed, run_dir, train_argv(options, seed, run_dir, budget, cfg.checkpoint_every),
             eval_argv(run_dir)) for step, name, seed, run_dir, options, budget in plan]
    if cfg.dry_run:
        for step, name, seed, _, train_cmd, eval_cmd in runs:
            print(f"# {f'step {step}: ' if step else ''}{name}, seed {seed}\n{shlex.join(train_cmd)}\n"
                  f"{shlex.join(eval_cmd)}")
        return runs
    rows, all_results, spent = [], [], 0.0
    for step, name, seed, run_dir, train_cmd, eval_cmd in tqdm(runs, desc="ablation runs", dynamic_ncols=True):
        results, seconds, now = run_one(run_dir, train_cmd, eval_cmd)
        spent += now
        rows.append({**collect_row(step, name, seed, shlex.join(train_cmd), shlex.join(eval_cmd), results),
                     "seconds": seconds})
        all_results.append(results)
        tqdm.write(f"step {step} seed {seed}: zero-shot {training.fmt(rows[-1]['zero_shot_top1'])}, robustness "
                   f"{training.fmt(rows[-1]['robustness_avg'])} ({now:.0f} s)")
    os.makedirs(cfg.report_dir, exist_ok=True)
    prefix = os.path.join(cfg.report_dir, "ablation_deep" if cfg.deep else "ablation")
    training.write_json(prefix + ".json", rows)
    paths = [prefix + ".json", prefix + ".md"]
    with open(prefix + ".md", "w") as f:
        f.write(deep_report(rows, all_results) if cfg.deep else markdown_report(rows))
    if cfg.deep:
        plot_path = os.path.join(runs[0][3], "eval", "layerwise_tasks.png")
        if os.path.exists(plot_path):
            paths.append(shutil.copy(plot_path, prefix + "_layerwise.png"))
    else:
        paths.append(plot(rows, prefix + ".png"))
    print(f"wrote {', '.join(paths)}; {spent / 60:.1f} min of runs in this invocation")
    return rows


if __name__ == "__main__":
    main()
