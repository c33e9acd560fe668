"""Issue 15 items 2 and 7: impossible options stop at start with one line naming the field, in every stage; a
resume passes over a damaged newest checkpoint (named), refuses another model's (both configs named), removes a
killed write's temporary file and drops a cut last line of metrics.jsonl."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import align_lang  # noqa: E402
import align_spatial  # noqa: E402
import train_clip  # noqa: E402
import training  # noqa: E402
import video_engine  # noqa: E402
from test_train_clip import TINY  # noqa: E402  (the tiny CLIP of the training tests)

# Each flag of issue 15 item 2 that used to hang, trace or pass silently, and the words its one line must hold
BAD_TRAIN_FLAGS = [
    ("--global_batch=-8", "--global_batch=-8: must be an integer >= 2"),
    ("--global_batch=0", "--global_batch=0: must be an integer >= 2"),
    ("--global_batch=1", "--global_batch=1: must be an integer >= 2"),
    ("--max_steps=-5", "--max_steps=-5: must be an integer >= 1"),
    ("--checkpoint_every=-1", "--checkpoint_every=-1: must be an integer >= 0"),
    ("--lr=-1", "--lr=-1.0: must be a number > 0"),
    ("--lr=nan", "--lr=nan: must be a number > 0"),
    ("--num_workers=-1", "--num_workers=-1: must be an integer >= 0"),
    ("--weight_decay=-0.1", "--weight_decay=-0.1: must be a finite number >= 0"),
    ("--model=NotAModel", "--model=NotAModel: must be an official name (PE-Core-T16-384"),
    ("--train_data=shards/{000..009.tar", "--train_data=shards/{000..009.tar: must be a path or a brace pattern"),
    ("--warmup_fraction=2", "--warmup_fraction=2.0: must be a fraction of max_steps in [0, 1)"),
    ("--mask_ratio=1", "--mask_ratio=1.0: must be in [0, 1)"),
    ("--data=parquet", "--data=parquet: must be emoji, tar, captions or coco"),
    ("--resolution_stages=0.5:32", "the fractions must sum to 1"),
    ("--betas=0.9", "--betas=0.9: must be two numbers in [0, 1)"),
]


@pytest.mark.parametrize("flag,message", BAD_TRAIN_FLAGS)
def test_an_impossible_train_clip_option_stops_at_start_naming_the_field(flag, message, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_clip.main([flag, f"--out_dir={tmp_path}"])
    assert message in str(stop.value) and "\n" not in str(stop.value)
    assert os.listdir(tmp_path) == []  # stopped before anything was written


@pytest.mark.parametrize("stage,flag,message", [
    (video_engine, "--num_videos=0", "--num_videos=0: must be an integer >= 1"),
    (video_engine, "--device=gpu", "--device=gpu: must be auto, cpu, cuda or cuda:N"),
    (align_lang, "--lm_heads=0", "--lm_heads=0: must be an integer >= 1"),
    (align_lang, "--stage2_steps=-1", "--stage2_steps=-1: must be an integer >= 0"),
    (align_spatial, "--mask_temperature=0", "--mask_temperature=0.0: must be a number > 0"),
    (align_spatial, "--log_every=0", "--log_every=0: must be an integer >= 1"),
    (align_spatial, "--drop_path=1.5", "--drop_path=1.5: must be in [0, 1]"),
])
def test_every_stage_checks_its_config_at_start(stage, flag, message, tmp_path):
    with pytest.raises(SystemExit, match=None) as stop:
        stage.main([flag, f"--out_dir={tmp_path}", f"--checkpoint={tmp_path}/none.pt"])
    assert message in str(stop.value)


def test_a_bad_flag_on_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_clip.py"), "--global_batch=-8",
                             f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["--global_batch=-8: must be an integer >= 2 (a contrastive "
                                                  "loss needs at least one negative)"]


def _args(tmp_path, out_dir, **overrides):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY))
    options = dict(model=model, out_dir=out_dir, max_steps=4, global_batch=8, num_classes=4, images_per_class=4,
                   resolution_stages="0.5:16,0.5:32", eval_every=0, checkpoint_every=2, keep_checkpoints=3,
                   num_workers=0)
    options.update(overrides)
    return [f"--{k}={v}" for k, v in options.items()]


def test_resume_passes_over_a_damaged_newest_checkpoint_and_cleans_a_killed_write(tmp_path, capsys):
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full = train_clip.train(train_clip.make_config(_args(tmp_path, full_dir, max_steps=6)))
    # what a damaged disk leaves of that run: step 2, step 4 overwritten with random bytes, final.pt cut in
    # half, the temporary file of a write a kill interrupted, and metrics.jsonl cut mid-record
    os.makedirs(cut_dir)
    for step, name in enumerate(("step_000002.pt", "step_000004.pt", "final.pt")):
        shutil.copy(os.path.join(full_dir, name), cut_dir)
        os.utime(os.path.join(cut_dir, name), (step + 1, step + 1))  # final.pt the newest
    newest = os.path.join(cut_dir, "final.pt")
    payload = open(newest, "rb").read()
    open(newest, "wb").write(payload[: len(payload) // 2])
    open(os.path.join(cut_dir, "step_000004.pt"), "r+b").write(os.urandom(4096))
    open(os.path.join(cut_dir, ".final.pt.tmp4242"), "wb").write(b"half a checkpoint")
    lines = open(os.path.join(full_dir, "metrics.jsonl")).readlines()
    open(os.path.join(cut_dir, "metrics.jsonl"), "w").write("".join(lines[:5]) + lines[5][:9])
    capsys.readouterr()
    resumed = train_clip.train(train_clip.make_config(_args(tmp_path, cut_dir, max_steps=6, resume=True)))
    out = capsys.readouterr().out
    assert f"removed {cut_dir}/.final.pt.tmp4242" in out
    assert f"{cut_dir}/step_000004.pt: cannot be read" in out and f"{newest}: cannot be read" in out
    assert "weights_only" not in out  # torch's advice to unpickle an untrusted file is not passed on
    assert "metrics.jsonl line 6 is not a whole JSON record" in out
    # it continued from step 2, the newest readable one: the last 4 steps are the uninterrupted run's
    assert len(resumed["losses"]) == 4 and resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-5)
    assert not any(name.startswith(".") for name in os.listdir(cut_dir))
    with open(os.path.join(cut_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_into_another_model_size_names_both_configs(tmp_path):
    out_dir = str(tmp_path / "run")
    train_clip.train(train_clip.make_config(_args(tmp_path, out_dir, max_steps=2)))
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps(dict(TINY, vision_cfg=dict(TINY["vision_cfg"], width=48))))
    with pytest.raises(SystemExit, match=r"a checkpoint of another model: vision_cfg.width=32 \(this run: 48\)"):
        train_clip.train(train_clip.make_config(_args(tmp_path, out_dir, max_steps=4, resume=True, model=wider)))


def test_a_checkpoint_that_is_not_a_training_checkpoint_is_named(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save({"weights": 1}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt: not a resumable training checkpoint"):
        training.load_training_checkpoint(str(tmp_path / "odd.pt"), model, model)
