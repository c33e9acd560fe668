"""bench/ablation.py: the nine cumulative steps differ exactly by their one change (parsed the way train_clip.py
parses them), and a results.json collects into the ablation.json row schema. No training."""

import dataclasses
import importlib.util
import json
import os
import shlex

import pytest

import train_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "bench", "ablation.py"))
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

# The TrainConfig fields each step of §2.1 changes, written out independently of ablation.STEPS
EXPECTED_CHANGES = {
    2: {"resolution_stages"},
    3: {"global_batch"},
    4: {"optimizer", "lr", "betas", "weight_decay"},
    5: {"resolution_stages"},
    6: {"use_rope2d"},
    7: {"pool_type"},
    8: {"crop_scale", "brightness", "saturation", "hflip_prob"},
    9: {"mask_fraction"},
}


def parsed(step, seed=0, run_dir="/tmp/run"):
    argv = ablation.train_argv(ablation.step_options(step), seed, run_dir, 300, 100)
    assert argv[:2] == ["python", "train_clip.py"]
    return train_clip.make_config(argv[2:])


def test_each_step_is_the_previous_plus_exactly_its_change():
    configs = {step: dataclasses.asdict(parsed(step)) for step in range(1, 10)}
    for step in range(2, 10):
        changed = {k for k, v in configs[step].items() if v != configs[step - 1][k]}
        assert changed == EXPECTED_CHANGES[step], step


def test_the_steps_scale_the_paper_recipe():
    vanilla, full = parsed(1), parsed(9)
    assert (vanilla.optimizer, vanilla.use_rope2d, vanilla.pool_type, vanilla.mask_fraction) == ("adamw", False, "tok", 0)
    assert vanilla.resolution_stages == ("1:48",) and vanilla.global_batch == 64
    assert full.lr == 4 * vanilla.lr and full.global_batch == 2 * vanilla.global_batch
    # step 2: the same steps (and samples) split over rising resolutions ending at the baseline's
    stages = train_clip.parse_stages(parsed(2).resolution_stages)
    assert [r for _, r in stages] == [24, 32, 48] and parsed(2).max_steps == vanilla.max_steps
    # step 5: one more, higher final stage (1.5x, the paper's 224 -> 336), the paper's 10:8:4:2 split
    stages = train_clip.parse_stages(parsed(5).resolution_stages)
    assert [r for _, r in stages] == [24, 32, 48, 72]
    assert [round(24 * f) for f, _ in stages] == [10, 8, 4, 2]
    # the full recipe is train_clip.py's pe preset but for the schedule
    pe = dataclasses.asdict(train_clip.make_config([]))
    differ = {k for k, v in dataclasses.asdict(full).items() if v != pe[k]}
    assert differ == {"preset", "resolution_stages", "max_steps", "seed", "out_dir", "checkpoint_every",
                      "eval_every"} - ({"seed"} if full.seed == pe["seed"] else set())


def test_runs_differ_only_in_seed_and_folder():
    a, b = parsed(4, seed=0, run_dir="/tmp/a"), parsed(4, seed=2, run_dir="/tmp/b")
    changed = {k for k, v in dataclasses.asdict(a).items() if v != getattr(b, k)}
    assert changed == {"seed", "out_dir"} and b.out_dir == "/tmp/b/train"


def test_unknown_step_is_one_clear_error():
    with pytest.raises(SystemExit, match="--steps: 10"):
        ablation.step_options(10)


FAKE_RESULTS = {
    "zero_shot": {"top1": 12.5, "top5": 40.0},
    "robustness": {"clean": {"top1": 12.5, "top5": 40.0},
                   "shifts": {"sketch": {"top1": 1.0, "top5": 5.0}, "blur": {"top1": 9.0, "top5": 30.0}},
                   "robustness_average": {"top1": 5.0, "top5": 17.5}},
    "layerwise": {"tasks": {
        "classification": {"best_layer": 3, "best": 11.0, "last": 10.0, "per_layer": [1, 2, 3, 11.0, 10.0]},
        "depth": {"best_layer": 4, "best": 1.2, "last": 1.2, "higher_is_better": False},
        "detection": {"best_layer": 2, "best": 20.0, "last": None}}},
    "tracking": {"best_layer": 0},
    "meta": {},
}


def test_collect_row_has_the_issue_schema(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(FAKE_RESULTS))
    train_cmd = shlex.join(ablation.train_argv(ablation.step_options(9), 1, "/tmp/r", 300, 100))
    row = ablation.collect_row(9, "mask regularization", 1, train_cmd, "python evaluate.py --all", json.loads(path.read_text()))
    assert set(row) == {"step", "name", "seed", "train_command", "eval_command", "zero_shot_top1", "robustness",
                        "robustness_avg", "layerwise"}
    assert (row["step"], row["seed"], row["zero_shot_top1"], row["robustness_avg"]) == (9, 1, 12.5, 5.0)
    assert row["robustness"] == {"clean": 12.5, "sketch": 1.0, "blur": 9.0}
    assert row["layerwise"] == {"classification": {"best_layer": 3, "best": 11.0, "last": 10.0},
                                "depth": {"best_layer": 4, "best": 1.2, "last": 1.2},
                                "detection": {"best_layer": 2, "best": 20.0, "last": None}}
    assert ablation.avg_with_clean(row) == pytest.approx((12.5 + 1.0 + 9.0) / 3)
    # the report: two seeds of step 9 and one of step 1 give mean +- std and the deltas beside Tab. 26
    other = {**row, "seed": 2, "zero_shot_top1": 14.5, "seconds": {"train": 180.0, "eval": 60.0}}
    first = {**row, "step": 1, "name": "vanilla CLIP", "seed": 1, "zero_shot_top1": 10.0,
             "seconds": {"train": 120.0, "eval": 60.0}}
    report = ablation.markdown_report([first, row, other])  # `row` has no seconds.json: left out of the times
    assert "| 9 | mask regularization | 1,2 | 13.5 ± 1.4 | +3.5 |" in report
    assert "| 78.9 | – | 75.3 | – | 2.0 | 1.0 |" in report and "| 81.3 | +2.4 | 80.9 | +5.6 | 3.0 | 1.2 |" in report
    assert "all 3 runs (train + evaluate, as recorded when they ran): 7.0 min" in report
    assert "detection best layer" in report and "| 3,3 |" in report


def test_deep_report_tables_every_probe_per_layer():
    row = {"seed": 0, "train_command": "python train_clip.py --model=PE-Core-NanoDeep8-64", "eval_command": "e"}
    report = ablation.deep_report([row, {**row, "seed": 1}], [FAKE_RESULTS, FAKE_RESULTS])
    assert "**classification** (): best seed 0: layer 3 (11.00, last 10.00)" in report
    assert "| 3 | 11.00 | 11.00 |" in report
    assert "**detection**: no per-layer scores" in report and "**depth**: no per-layer scores" in report


def test_run_one_resumes_a_failed_evaluation_without_retraining_and_keeps_the_recorded_times(tmp_path):
    run_dir = tmp_path / "run"
    trained, fail_once = tmp_path / "trained.txt", tmp_path / "fail_once"
    train = ["python", "-c", f"import os; os.makedirs({str(run_dir / 'train')!r}, exist_ok=True); "
             f"open({str(run_dir / 'train' / 'final.pt')!r}, 'w').write('x'); open({str(trained)!r}, 'a').write('.')"]
    evaluate = ["python", "-c", f"import os, sys, json; p = {str(fail_once)!r}\n"
                f"if os.path.exists(p): os.remove(p); sys.exit(3)\n"
                f"os.makedirs({str(run_dir / 'eval')!r}, exist_ok=True); "
                f"json.dump({{'zero_shot': {{'top1': 5.0}}}}, open({str(run_dir / 'eval' / 'results.json')!r}, 'w'))"]
    fail_once.write_text("")
    with pytest.raises(SystemExit, match="failed \\(3\\)"):
        ablation.run_one(str(run_dir), train, evaluate)
    assert set(json.loads((run_dir / "seconds.json").read_text())) == {"train"}  # the training's time is kept
    results, seconds, spent = ablation.run_one(str(run_dir), train, evaluate)
    assert results == {"zero_shot": {"top1": 5.0}} and trained.read_text() == "."  # trained once
    assert set(seconds) == {"train", "eval"} and spent == pytest.approx(seconds["eval"])
    again = ablation.run_one(str(run_dir), train, evaluate)  # done: collected, nothing run
    assert again == (results, seconds, 0.0) and trained.read_text() == "."
