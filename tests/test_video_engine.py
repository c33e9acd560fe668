"""video_engine.py: frame sampling through the engine on files of known length (longer and shorter than T),
bad videos skipped and counted, resuming without recaptioning, human-refined captions merged, the extractive
summariser, every shard read back by data.TarShards, a short finetuning lowering the video-text loss and its
exact resume, the captioner / summariser plug-ins (module:function), and evaluate.py run as a separate process
(skipped without it). A small random-weight PE-Core-Nano8-64 checkpoint stands in for train_clip.py's.

Run: python -m pytest -q tests/test_video_engine.py
"""

import dataclasses
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import pe_model  # noqa: E402
import video_engine  # noqa: E402
from kernels.contrastive_loss import contrastive_loss  # noqa: E402

NUM_FRAMES = 4  # frames per video in these tests (the engine's default is the paper's 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when other jobs share the cores
    (OpenMP's waiting threads then spin against them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return pe_model.build_model("PE-Core-Nano8-64").eval()


class CountingCaptioner:
    """A stand-in captioner: the mean grey level of the frames, and how often it was called."""

    name = "counting"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, frames):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        return f"{'a frame' if len(frames) == 1 else 'a clip'} of grey {int(frames.float().mean()) // 32}"


def first_caption(frame_captions, video_caption, metadata):
    return video_caption


def grey_video(path, num_frames, step=12):
    """Frame i is a flat grey of level step * i + 8: the sampled index can be read back from the pixels."""
    frames = [np.full((16, 16, 3), step * i + 8, dtype=np.uint8) for i in range(num_frames)]
    data.write_video(path, frames, fps=8)
    return path


def read_shards(shard_dir, num_frames=NUM_FRAMES, image_size=64):
    """Every sample of the engine's shards as (frames (T, 3, S, S), caption, key, record): frames and caption through
    data.TarShards' video mode (what the finetuning reads), the record from the sample's .json file."""
    shards = data.TarShards(shard_dir, image_size=image_size, media="video", num_frames=num_frames, rank=0,
                            world_size=1)
    records = {}
    for shard in shards.shards:
        with tarfile.open(shard) as tar:
            records.update({member.name[: -len(".json")]: json.load(tar.extractfile(member))
                            for member in tar.getmembers() if member.name.endswith(".json")})
    return [(frames, caption, key, records[key]) for frames, caption, key in shards], shards.bad


def video_text_loss(model, videos, tokens):
    """The CLIP loss of videos (B, T, 3, S, S) against their captions' tokens (B, L), as the finetuning computes it."""
    features, text, logit_scale = model(videos.flatten(0, 1), tokens)
    return contrastive_loss(video_engine.pool_videos(features, len(videos), videos.shape[1]), text, logit_scale)


def config(tmp_path, **overrides):
    cfg = video_engine.VideoEngineConfig(out_dir=str(tmp_path / "out"), num_frames=NUM_FRAMES, shard_size=2)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


@pytest.mark.parametrize("total", [20, 3])
def test_frame_sampling_indices_and_counts(tmp_path, total):
    path = grey_video(str(tmp_path / "clip.mp4"), total)
    seen = []

    def recording_captioner(frames):
        seen.append(frames)
        return "x"

    video_engine.caption_videos([("clip", path)], str(tmp_path / "records"), recording_captioner,
                                data.BadSamples("test"), NUM_FRAMES, progress=False)
    record = video_engine.read_record(str(tmp_path / "records"), "clip")
    expected = [int(i * total / NUM_FRAMES) for i in range(NUM_FRAMES)]  # 3 frames: [0, 0, 1, 2]
    assert record["frame_indices"] == expected
    assert len(record["frame_captions"]) == NUM_FRAMES
    clip = seen[-1]  # the clip call gets every sampled frame
    assert clip.shape == (NUM_FRAMES, 16, 16, 3) and clip.dtype == torch.uint8
    decoded = [round((float(frame.float().mean()) - 8) / 12) for frame in clip]
    assert decoded == expected


def test_corrupt_and_empty_videos_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    grey_video(str(folder / "good1.mp4"), 6)
    grey_video(str(folder / "good2.mp4"), 6)
    (folder / "corrupt.mp4").write_bytes(os.urandom(3000))
    (folder / "empty.mp4").write_bytes(b"")
    cfg = config(tmp_path, videos=str(folder))
    result = video_engine.run_engine(cfg, None, captioner=CountingCaptioner(), summarizer=first_caption,
                                     progress=False)
    assert result["bad"].counts == {"bad_video": 2}
    assert sorted(result["bad"].keys["bad_video"]) == sorted([str(folder / "corrupt.mp4"), str(folder / "empty.mp4")])
    assert result["videos"] == 4 and result["captioned"] == 2
    samples, bad = read_shards(os.path.join(cfg.out_dir, "shards"), NUM_FRAMES, 64)
    assert sorted(key for _, _, key, _ in samples) == ["good1", "good2"] and bad.total() == 0


def test_engine_resumes_without_recaptioning_finished_videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(4):
        grey_video(str(folder / f"v{i}.mp4"), 5, step=10 + 5 * i)
    cfg = config(tmp_path, videos=str(folder))
    calls_per_video = NUM_FRAMES + 1  # every frame, then the clip
    crashing = CountingCaptioner(fail_after=2 * calls_per_video + 1)  # dies inside the third video
    with pytest.raises(KeyboardInterrupt):
        video_engine.run_engine(cfg, None, captioner=crashing, summarizer=first_caption, progress=False)
    resumed = CountingCaptioner()
    result = video_engine.run_engine(cfg, None, captioner=resumed, summarizer=first_caption, progress=False)
    assert resumed.calls == 2 * calls_per_video and result["captioned"] == 2
    again = CountingCaptioner()
    video_engine.run_engine(cfg, None, captioner=again, summarizer=first_caption, progress=False)
    assert again.calls == 0
    os.remove(os.path.join(cfg.out_dir, "records", "v1.json"))  # a lost record is redone
    grey_video(str(folder / "v2.mp4"), 7, step=3)  # a replaced file is recaptioned
    redo = CountingCaptioner()
    video_engine.run_engine(cfg, None, captioner=redo, summarizer=first_caption, progress=False)
    assert redo.calls == 2 * calls_per_video


def test_refined_captions_are_merged_and_win(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    grey_video(str(folder / "a.mp4"), 4)
    grey_video(str(folder / "b.mp4"), 4)
    annotations = tmp_path / "pvd.jsonl"
    annotations.write_text(json.dumps({"video_id": "a", "refined_caption": "a grey square fading in",
                                       "metadata": {"category": "shapes"}}) + "\n"
                           + json.dumps({"video_id": "zzz", "refined_caption": "not in the folder"}) + "\n")
    cfg = config(tmp_path, videos=str(folder), annotations=str(annotations))
    result = video_engine.run_engine(cfg, None, captioner=CountingCaptioner(), summarizer=first_caption,
                                     progress=False)
    records = os.path.join(cfg.out_dir, "records")
    a, b = video_engine.read_record(records, "a"), video_engine.read_record(records, "b")
    assert (a["caption"], a["caption_source"], a["metadata"]) == ("a grey square fading in", "human",
                                                                  {"category": "shapes"})
    assert b["caption"] == b["video_caption"] and b["caption_source"] == "first_caption"
    assert result["bad"].counts == {"annotation_without_video": 1}
    annotations.write_text('{"video_id": "a"}\n')
    with pytest.raises(SystemExit, match=r"pvd.jsonl:1: field 'refined_caption'"):
        video_engine.run_engine(cfg, None, captioner=CountingCaptioner(), summarizer=first_caption,
                                progress=False)


def bag_of_words(texts):
    """A transparent text embedder for the summariser: normalised word counts over a fixed vocabulary."""
    vocabulary = "a an of video emoji dog cat face moving left zooming in".split()
    counts = torch.tensor([[text.rstrip(".").split().count(word) for word in vocabulary] for text in texts],
                          dtype=torch.float32)
    return torch.nn.functional.normalize(counts, dim=-1)


def test_extractive_summary_keeps_the_caption_consistent_across_frames():
    dog, cat = "an emoji of a dog face.", "an emoji of a cat face."
    summarize = video_engine.ExtractiveSummarizer(bag_of_words, reference_captions=[dog, cat])
    # the consensus of the frames wins over a clip caption that only one frame supports
    assert summarize([dog, dog, cat, dog], cat, {}) == dog
    assert summarize([cat, dog, dog, dog], "a video of a cat face zooming in.", {}) == dog
    # a clip caption naming what the frames agree on is kept: it adds the motion
    assert summarize([dog, dog, dog], "a video of a dog face moving left.", {}) == "a video of a dog face moving left."
    # unanimous frames, a clip caption naming something else: the references show the disagreement
    assert summarize([dog, dog, dog], "a video of a cat face moving left.", {}) == dog


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, model):
    """The default engine (retrieval captioner, extractive summariser, embedded videos with simulated
    refined captions) on 6 small composed videos, once for the tests below."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    cfg = config(tmp_path, num_videos=6, video_length=8, video_size=32, video_classes=3,
                 embedded_refined_fraction=0.5)
    result = video_engine.run_engine(cfg, model, progress=False)
    return cfg, result


def test_every_shard_written_reads_back(embedded_run):
    cfg, result = embedded_run
    assert len(result["shards"]) == 3  # 6 videos, 2 per shard
    samples, bad = read_shards(os.path.join(cfg.out_dir, "shards"), NUM_FRAMES, 64)
    assert bad.total() == 0
    keys = sorted(os.path.splitext(name)[0] for name in os.listdir(os.path.join(cfg.out_dir, "records")))
    assert sorted(key for _, _, key, _ in samples) == keys
    sources = set()
    for frames, caption, key, record in samples:
        assert frames.shape == (NUM_FRAMES, 3, 64, 64)
        assert caption == record["caption"] and record["key"] == key
        assert len(record["frame_captions"]) == NUM_FRAMES and record["video_caption"]
        sources.add(record["caption_source"])
    assert sources == {"human", "extractive"}  # refined captions for some, summaries for the others


def test_short_finetuning_lowers_the_video_text_loss(embedded_run, model, tmp_path):
    cfg, _ = embedded_run
    shard_dir = os.path.join(cfg.out_dir, "shards")
    samples, _ = read_shards(shard_dir, NUM_FRAMES, 64)
    videos = torch.stack([frames for frames, _, _, _ in samples])  # (6, T, 3, 64, 64)
    tokens = pe_model.tokenize([caption for _, caption, _, _ in samples])
    start = pe_model.build_model(pe_model.get_config(model))
    start.load_state_dict(model.state_dict())
    with torch.no_grad():
        before = video_text_loss(start, videos, tokens).item()
    tune = dataclasses.replace(cfg, out_dir=str(tmp_path), steps=5, lr=3e-3, warmup_steps=1, video_batch_size=6,
                               image_batch_size=2)
    result = video_engine.finetune(tune, start, shard_dir, progress=False)
    assert len(result["losses"]) == 5
    tuned = pe_model.load_model(result["path"]).eval()
    with torch.no_grad():
        after = video_text_loss(tuned, videos, tokens).item()
    assert after < before - 0.1, (before, after)


def test_resumed_finetuning_reproduces_the_uninterrupted_run(embedded_run, model, tmp_path):
    """Killed after step 2 of 4 (its step-2 checkpoint left behind), --resume continues both data streams
    where they were (the videos cross an epoch: 3 batches of 2 per epoch) and ends with the same weights."""
    cfg, _ = embedded_run
    shard_dir = os.path.join(cfg.out_dir, "shards")

    def start():
        copy = pe_model.build_model(pe_model.get_config(model))
        copy.load_state_dict(model.state_dict())
        return copy

    options = dict(steps=4, checkpoint_every=2, lr=3e-3, warmup_steps=1, video_batch_size=2, image_batch_size=2)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = video_engine.finetune(dataclasses.replace(cfg, out_dir=str(full_dir), **options), start(), shard_dir,
                                 progress=False)
    step_checkpoint = full_dir / "video_finetune_step_000002.pt"
    assert step_checkpoint.exists() and len(full["losses"]) == 4
    os.makedirs(resumed_dir)
    os.link(step_checkpoint, resumed_dir / step_checkpoint.name)
    torch.manual_seed(1234)  # another process state: the checkpoint must restore what matters
    resumed = video_engine.finetune(dataclasses.replace(cfg, out_dir=str(resumed_dir), resume=True, **options),
                                    start(), shard_dir, progress=False)
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)
    full_weights, resumed_weights = (torch.load(path, weights_only=True)["model"]
                                     for path in (full["path"], resumed["path"]))
    for key, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, atol=1e-6, rtol=0, msg=key)


def test_captioner_and_summarizer_plugins_load_module_function(tmp_path, monkeypatch):
    """--captioner=MODULE:FUNCTION: FUNCTION(--captioner_checkpoint, device) makes the captioner, whose name the
    records keep; a --captioner_checkpoint alone means align_lang's plug-in; a bad spec stops with the option."""
    (tmp_path / "tiny_plugin.py").write_text(
        "def make_captioner(checkpoint, device):\n"
        "    def captioner(frames):\n"
        "        return f'{len(frames)} frames'\n"
        "    captioner.name = f'tiny:{checkpoint}:{device}'\n"
        "    return captioner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "videos"
    folder.mkdir()
    grey_video(str(folder / "a.mp4"), 6)
    cfg = config(tmp_path, videos=str(folder), captioner="tiny_plugin:make_captioner", captioner_checkpoint="vlm.pt")
    video_engine.run_engine(cfg, None, summarizer=first_caption, progress=False)  # no vocabulary needed
    record = video_engine.read_record(os.path.join(cfg.out_dir, "records"), "a")
    assert record["captioner"] == "tiny:vlm.pt:cpu"
    assert record["frame_captions"] == ["1 frames"] * NUM_FRAMES and record["caption"] == f"{NUM_FRAMES} frames"
    with pytest.raises(SystemExit, match=r"--summarizer=tiny_plugin:missing: cannot load"):
        video_engine.load_component("tiny_plugin:missing", "", "summarizer", "cpu")
    specs = []
    monkeypatch.setattr(video_engine.training, "load_plugin",
                        lambda spec, option: specs.append(spec) or (lambda checkpoint, device: checkpoint))
    assert video_engine.load_component("", "vlm.pt", "captioner", "cpu") == "vlm.pt"
    assert video_engine.load_component("", "lm.pt", "summarizer", "cpu") == "lm.pt"
    assert video_engine.load_component("", "", "captioner", "cpu") is None  # the built-in default
    assert specs == ["align_lang:make_captioner", "align_lang:make_summarizer"]


FAKE_EVALUATE = """
import json, os, sys
args = dict(arg[2:].partition("=")[::2] for arg in sys.argv[1:])
os.makedirs(args["out_dir"], exist_ok=True)
result = {"top1": float(len(args["checkpoint"])), "argv": sys.argv[1:], "world_size": os.environ["WORLD_SIZE"]}
found = {"checkpoints": [{"video_zero_shot": result}]} if "multi" in args["checkpoint"] else {"video_zero_shot": result}
with open(os.path.join(args["out_dir"], "results.json"), "w") as f:
    json.dump(found, f)
sys.exit(3 if "broken" in args["checkpoint"] else 0)
"""


def test_video_zero_shot_runs_evaluate_py_as_a_process_or_is_skipped(tmp_path, capsys, monkeypatch):
    """Stages report, evaluate.py evaluates: one `evaluate.py --video_zero_shot --checkpoint=X --out_dir=DIR`
    process per checkpoint (printed, outside torchrun's process group), its results.json read back (one
    checkpoint's, or several side by side); a failed run gives None; no evaluate.py: skipped with a message."""
    script, out_dir = tmp_path / "evaluate.py", str(tmp_path / "eval")
    assert video_engine.evaluate_video_zero_shot([("a.pt", "")], out_dir, script=str(script)) is None
    assert "video zero-shot skipped: no " in capsys.readouterr().out
    script.write_text(FAKE_EVALUATE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    results = video_engine.evaluate_video_zero_shot([("a.pt", "PE-Core-B16-224"), ("multi.pt", ""), ("broken.pt", "")],
                                                    out_dir, script=str(script))
    assert [r and r["top1"] for r in results] == [4.0, 8.0, None]
    assert results[0]["argv"] == ["--video_zero_shot", "--checkpoint=a.pt", f"--out_dir={out_dir}",
                                  "--model=PE-Core-B16-224"] and results[0]["world_size"] == "1"
    printed = capsys.readouterr().out
    assert f"evaluate.py --video_zero_shot --checkpoint=multi.pt --out_dir={out_dir}" in printed
    assert "video zero-shot of broken.pt: evaluate.py failed" in printed


def test_the_command_line_engine_runs_with_device_auto(tmp_path, model, capsys):
    """--device=auto (what training.RULES allows) means the default device, as in align_lang.py and evaluate.py:
    `python video_engine.py --device=auto ...` runs the engine instead of failing on torch.device("auto")."""
    checkpoint = str(tmp_path / "core.pt")
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, checkpoint)
    video_engine.main([f"--checkpoint={checkpoint}", "--device=auto", f"--out_dir={tmp_path / 'out'}",
                       "--num_videos=2", "--video_length=4", "--video_size=32", "--video_classes=2",
                       f"--num_frames={NUM_FRAMES}", "--skip_finetune"])
    assert "engine: 2 videos, 2 captioned now" in capsys.readouterr().out
