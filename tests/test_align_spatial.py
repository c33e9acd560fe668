"""align_spatial.py: the two distillation losses (paper Appendix B.3.1, Eq. 2 and 3), the frozen teacher and
its layer, the oracle mask source, the exported PE-Spatial tower, and a short run. Tiny random-weight cores."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import align_spatial  # noqa: E402
import pe_model  # noqa: E402


def tiny_config(**changes):
    config = align_spatial.SpatialConfig(resolution=48, batch_size=8, num_scenes=16, max_steps=2, prompt_grid=8,
                                         eval=False, log_every=1)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def models(checkpoint, **changes):
    cfg = tiny_config(**changes)
    teacher, student = align_spatial.build_teacher_and_student(
        checkpoint, cfg, pe_model.checkpoint_config(checkpoint)["vision_cfg"])
    return cfg, teacher, student


def test_correspondence_loss_is_zero_at_the_target_and_positive_otherwise():
    torch.manual_seed(0)
    tokens = torch.randn(2, 10, 6)
    target = align_spatial.pairwise_cosine(tokens)
    assert align_spatial.correspondence_loss(tokens, target).item() == pytest.approx(0.0, abs=1e-12)
    assert align_spatial.correspondence_loss(tokens * 3.0, target).item() == pytest.approx(0.0, abs=1e-12)
    moved = tokens.clone()
    moved[0, 3] = torch.randn(6)
    loss = align_spatial.correspondence_loss(moved, target)
    assert loss.item() > 1e-4
    # Eq. 3 is the mean of squared differences over the N x N pairs
    difference = align_spatial.pairwise_cosine(moved) - target
    assert loss.item() == pytest.approx(difference.square().sum().item() / (2 * 10 * 10), rel=1e-5)


def test_temperature_target_is_one_within_a_mask_and_near_zero_across():
    # three tokens: two under the same masks, one under other masks (features: logits under 4 prompts)
    features = torch.tensor([[[10.0, 10, -10, -10], [10, 10, -10, -10], [-10, -10, 10, -10]]])
    target = align_spatial.correspondence_target(features, temperature=20.0)
    assert target[0, 0, 1].item() == pytest.approx(1.0)
    assert target[0, 0, 2].item() < 1e-8
    assert torch.allclose(align_spatial.correspondence_target(features, 0.0), align_spatial.pairwise_cosine(features))


def test_self_distillation_loss_is_per_token_cosine():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)
    assert align_spatial.self_distillation_loss(2.5 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert align_spatial.self_distillation_loss(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)
    assert align_spatial.self_distillation_loss(torch.randn(2, 5, 8), teacher).item() > 0.1


def exact_mask_logits(instance_maps, prompt_grid):
    """The oracle per prompt, as a SAM-like mask source would answer: (B, H, W) -> (B, M, H, W) logits."""
    rows, cols = align_spatial.prompt_points(*instance_maps.shape[-2:], prompt_grid)
    region = instance_maps[:, rows, cols]  # (B, M): the region id under each prompt
    inside = instance_maps[:, None, :, :] == region[:, :, None, None]
    return (inside.float() * 2 - 1) * align_spatial.EXACT_LOGIT


def test_exact_mask_tokens_answer_each_prompt_with_the_region_under_it():
    instance_map = torch.zeros(1, 16, 16, dtype=torch.long)
    instance_map[0, :8, :8] = 1  # object 1 in the top-left quarter
    tokens = align_spatial.exact_mask_tokens(instance_map, 2, 2, 2, 8)  # prompts at (4,4) (4,12) (12,4) (12,12)
    assert tokens.shape == (1, 4, 4)  # (B, patches, prompts)
    assert torch.equal(tokens[0, :, 0] > 0, torch.tensor([True, False, False, False]))  # object 1: patch 0
    assert torch.equal(tokens[0, :, 3] > 0, torch.tensor([False, True, True, True]))  # background
    # the per-region fast path gives the same token features as pooling the per-prompt logits
    torch.manual_seed(0)
    maps = torch.randint(0, 4, (3, 20, 20))
    slow = align_spatial.mask_logit_tokens(exact_mask_logits(maps, 4), (20, 20), 8)
    fast = align_spatial.exact_mask_tokens(maps, 4, 2, 2, 8)
    assert torch.allclose(slow, fast, atol=1e-5)


def test_mask_source_logits_of_another_size_are_resized_to_the_token_grid():
    for size in (8, 128):  # a quarter and four times a 32 px image's resolution
        logits = torch.zeros(1, 1, size, size)
        logits[..., : size // 2, :] = 5.0  # the top half of the image
        tokens = align_spatial.mask_logit_tokens(logits, (32, 32), 8)  # 4x4 patches of 8 px
        assert tokens.shape == (1, 16, 1)
        assert torch.allclose(tokens[0, :4, 0], torch.full((4,), 5.0))  # the top row of patches
        assert torch.allclose(tokens[0, -4:, 0], torch.zeros(4))  # the bottom row


def test_masked_blocks_cover_the_ratio_and_embed_as_zero_pixels(core_checkpoint):
    cfg, teacher, student = models(core_checkpoint)
    generator = torch.Generator().manual_seed(0)
    token_mask = align_spatial.block_mask(2, 6, 6, 0.75, 2, generator)
    assert token_mask.float().mean().item() == pytest.approx(7 / 9)  # round(0.75 * 9) of 9 2x2 blocks
    assert torch.equal(token_mask[:, ::2, ::2], token_mask[:, 1::2, 1::2])  # whole 2x2 blocks
    # the student's patch_mask gives exactly the tokens of the image with the masked patches' pixels zeroed
    images = torch.randn(2, 3, 48, 48)
    pixels = token_mask.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (2, 48, 48)
    zeroed = images * (~pixels)[:, None].float()
    patches = student.conv1(zeroed).flatten(2).transpose(1, 2)  # (2, 36, W)
    assert torch.all(patches[token_mask.flatten(1)] == 0) and torch.all(patches[~token_mask.flatten(1)] != 0)
    student.eval()
    with torch.no_grad():
        assert torch.equal(student(images, patch_mask=token_mask.flatten(1)), student(zeroed))


def test_student_starts_from_the_core_as_a_spatial_tower(core_checkpoint):
    cfg, teacher, student = models(core_checkpoint, ls_init_value=0.1)
    keys = student.state_dict().keys()
    assert not any(k.startswith(("ln_post", "attn_pool", "proj")) for k in keys)
    assert "transformer.resblocks.0.ls_1.gamma" in keys and student.image_size == 48
    core = pe_model.load_model(core_checkpoint).visual
    assert torch.equal(student.transformer.resblocks[1].mlp.c_fc.weight, core.transformer.resblocks[1].mlp.c_fc.weight)
    # without LayerScale or drop path the student computes exactly the core's last-layer tokens at 48 px
    cfg, teacher, plain = models(core_checkpoint, ls_init_value=None, drop_path=0.0)
    image = torch.randn(2, 3, 48, 48)
    assert torch.allclose(plain.eval()(image), core.forward_features(image), atol=1e-5)


def test_default_teacher_layer_is_the_papers_41_of_50_scaled():
    assert align_spatial.default_teacher_layer(50) == 40  # B.3.1: "layer 40 when written with indexing from 0"
    assert [align_spatial.default_teacher_layer(n) for n in (3, 6, 8, 12, 24)] == [1, 4, 6, 9, 19]


def test_layer_distillation_target_comes_from_the_named_layer(core_checkpoint):
    cfg, teacher, _ = models(core_checkpoint)
    images = torch.randn(2, 3, 48, 48)
    mask_features = torch.randn(2, 36, 5)
    for layer in (0, 1):
        # a student that IS the core cut after block `layer` matches that layer's target exactly
        cut = pe_model.VisionTransformer(**pe_model.headless_config(pe_model.checkpoint_config(core_checkpoint)["vision_cfg"]))
        pe_model.load_checkpoint(cut, core_checkpoint, drop_head=True)
        cut.truncate(layer)
        losses = align_spatial.alignment_losses(cut, teacher, images, mask_features, cfg, teacher_layer=layer)
        assert losses["core"].item() == pytest.approx(0.0, abs=1e-6)
        other = align_spatial.alignment_losses(cut, teacher, images, mask_features, cfg, teacher_layer=2)
        assert other["core"].item() > 1e-3


def test_short_run_lowers_both_losses_and_keeps_the_teacher_frozen(core_checkpoint, tmp_path):
    # LayerScale 0.1 (PE-Spatial-G's set-up) starts the student away from the core, so both losses have room
    # to fall; without it the student starts as the core, where L_core is already near its floor
    cfg = tiny_config(max_steps=30, lr=3e-3, num_scenes=24, out_dir=str(tmp_path), ls_init_value=0.1)
    teacher0, student0 = models(core_checkpoint, ls_init_value=0.1)[1:]
    before = {k: v.clone() for k, v in teacher0.state_dict().items()}
    # held-out scenes, no masking, eval mode: the losses before and after training
    images, maps = align_spatial.render_scenes(8, 48, seed=12345)
    mask_features = align_spatial.exact_mask_tokens(maps.long(), cfg.prompt_grid, 6, 6, 8)
    layer = align_spatial.default_teacher_layer(3)
    with torch.no_grad():
        start = align_spatial.alignment_losses(student0.eval(), teacher0, images, mask_features, cfg, layer)
    student, teacher, teacher_layer, history = align_spatial.train(cfg, core_checkpoint)
    assert teacher_layer == layer and len(history) == 30
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        end = align_spatial.alignment_losses(student.eval(), teacher, images, mask_features, cfg, layer)
    assert end["core"] < 0.9 * start["core"], (start, end)
    assert end["loc"] < 0.9 * start["loc"], (start, end)


def test_exported_tower_loads_strict_into_pe_model(core_checkpoint, tmp_path):
    cfg, teacher, student = models(core_checkpoint)
    path = str(tmp_path / "spatial.pt")
    pe_model.export_tower(student.eval(), path, step=0, teacher_layer=1, metrics={})  # as main() exports it
    tower = pe_model.load_model(path)  # strict: raises on any missing, unexpected or wrongly-shaped key
    assert isinstance(tower, pe_model.VisionTransformer) and tower.pool_type == "none" and tower.output_dim is None
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["vision_cfg"]["use_ln_post"] is False
    fresh = pe_model.VisionTransformer(**blob["config"]["vision_cfg"])
    pe_model.load_checkpoint(fresh, blob["model"], strict=True)
    image = torch.randn(1, 3, 48, 48)
    assert torch.allclose(tower.eval()(image), student(image), atol=1e-6)


# evaluate.py kept small: the layer-wise run also probes classification and tracking
SMALL_EVAL = ("--eval_options=--num_classes=2 --num_val=1 --num_probe_train=1 --num_track_videos=1 "
              "--track_frames=2")


def test_command_line_run_writes_the_tower_and_prints_the_probe_table(core_checkpoint, tmp_path, capsys):
    """--eval runs evaluate.py --layerwise on the core and the aligned tower (separate processes, the exact
    commands printed) and builds dense_probes.json and the table from its results.json."""
    align_spatial.main([f"--checkpoint={core_checkpoint}", f"--out_dir={tmp_path}", "--max_steps=2", "--batch_size=4",
                        "--num_scenes=8", "--resolution=48", "--eval_scenes=8", "--eval_size=48", SMALL_EVAL])
    printed = capsys.readouterr().out
    assert "| segmentation: mIoU" in printed and "| depth: RMSE" in printed
    commands = [line for line in printed.splitlines() if line.startswith("$ ") and "evaluate.py --layerwise" in line]
    assert len(commands) == 2 and all("--num_scenes=8 --dense_size=48" in line for line in commands)
    assert f"--checkpoint={tmp_path / 'spatial.pt'}" in commands[1]
    tower = pe_model.load_model(str(tmp_path / "spatial.pt"))
    assert isinstance(tower, pe_model.VisionTransformer) and tower.image_size == 48
    probes = torch.load(str(tmp_path / "spatial.pt"), weights_only=True)["metrics"]["dense_probes"]
    assert set(probes) == {"core", "spatial"} and len(probes["core"]["depth"]["per_layer"]) == 3
    with open(tmp_path / "dense_probes.json") as f:
        assert json.load(f) == probes


def test_eval_is_skipped_with_a_message_without_evaluate_py(core_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(align_spatial, "EVALUATE", str(tmp_path / "evaluate.py"))  # a copy of the stage alone
    align_spatial.main([f"--checkpoint={core_checkpoint}", f"--out_dir={tmp_path}", "--max_steps=1", "--batch_size=4",
                        "--num_scenes=4", "--resolution=48"])
    assert "no dense probes" in capsys.readouterr().out
    assert (tmp_path / "spatial.pt").exists() and not (tmp_path / "dense_probes.json").exists()


def test_a_mask_source_plugs_in_as_module_function(core_checkpoint, tmp_path, monkeypatch):
    # a stand-in for a SAM 2.1 wrapper: images in, mask logits for M prompts out (here 3 masks at half size)
    (tmp_path / "fake_sam.py").write_text(
        "import torch\n"
        "calls = []\n"
        "def make_source():\n"
        "    def source(images):\n"
        "        calls.append(tuple(images.shape))\n"
        "        return torch.stack([images[:, 0], -images[:, 1], images[:, 2]], 1)[..., ::2, ::2]\n"
        "    return source\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(mask_source="fake_sam:make_source", out_dir=str(tmp_path))
    student, teacher, layer, history = align_spatial.train(cfg, core_checkpoint)
    import fake_sam

    assert fake_sam.calls == [(8, 3, 48, 48)] * 2 and len(history) == 2
    with pytest.raises(SystemExit, match="module:function"):
        align_spatial.train(tiny_config(mask_source="fake_sam", out_dir=str(tmp_path)), core_checkpoint)


def test_resumed_alignment_reproduces_the_uninterrupted_run(core_checkpoint, tmp_path):
    """Killed after step 3 of 6 (its step-3 checkpoint left behind), --resume continues with the same data
    (16 scenes in batches of 8: the run crosses two epochs), the same student masks and the same drop-path
    draws, and ends with the same weights."""
    options = dict(max_steps=6, checkpoint_every=3, num_scenes=16, lr=3e-3)
    full_cfg = tiny_config(out_dir=str(tmp_path / "full"), **options)
    full_student, _, _, full_history = align_spatial.train(full_cfg, core_checkpoint)
    left_behind = tmp_path / "full" / "spatial_step_000003.pt"
    assert left_behind.exists()
    os.makedirs(tmp_path / "resumed")
    os.link(left_behind, tmp_path / "resumed" / left_behind.name)
    torch.manual_seed(1234)  # another process state: the checkpoint must restore what matters
    resumed_cfg = tiny_config(out_dir=str(tmp_path / "resumed"), resume=True, **options)
    resumed_student, _, _, resumed_history = align_spatial.train(resumed_cfg, core_checkpoint)
    assert [r["step"] for r in resumed_history] == list(range(1, 7))  # the first 3 come from the checkpoint
    for full, resumed in zip(full_history, resumed_history):
        assert resumed["core"] == pytest.approx(full["core"], rel=1e-6)
        assert resumed["loc"] == pytest.approx(full["loc"], rel=1e-6)
    for key, value in full_student.state_dict().items():
        torch.testing.assert_close(resumed_student.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_two_process_alignment_resumes_exactly(core_checkpoint, tmp_path):
    """torchrun with 2 gloo processes, killed after step 2 of 4: each rank resumes its own data position and
    mask generator (rank 1's is the second row of the saved stack) and the final tower is the uninterrupted
    run's."""
    import shutil
    import subprocess
    import sys

    def run(out_dir, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(ROOT, "align_spatial.py"), f"--checkpoint={core_checkpoint}", f"--out_dir={out_dir}",
                   "--max_steps=4", "--checkpoint_every=2", "--resolution=48", "--batch_size=8", "--num_scenes=16",
                   "--prompt_grid=8", "--eval=false", *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(os.path.join(out_dir, "spatial.pt"), weights_only=True)

    full = run(str(tmp_path / "full"))
    os.makedirs(tmp_path / "resumed")
    shutil.copy(tmp_path / "full" / "spatial_step_000002.pt", tmp_path / "resumed")
    resumed = run(str(tmp_path / "resumed"), "--resume")
    assert resumed["metrics"]["last_losses"] == pytest.approx(full["metrics"]["last_losses"], rel=1e-5)
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, atol=1e-5, rtol=1e-4, msg=key)
