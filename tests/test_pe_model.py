"""pe_model.py against the official implementation's outputs (tests/fixtures, see its README), plus loading,
tokenizer, preprocessing and config checks."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pe_model  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MODEL_FIXTURES = ["core_cls_ls", "core_nocls_nols", "spatial_nocls_ls", "spatial_cls_nols"]


def load_fixture(name):
    return torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)


def fixture_model(blob):
    model = pe_model.build_model(blob["config"])
    pe_model.load_checkpoint(model, blob["state_dict"])
    return model.eval()


def debug_tensors(visual, image):
    grid = [image.shape[-2] // visual.patch_size, image.shape[-1] // visual.patch_size]
    pre_blocks, angles = visual.embed(image)
    return {"patch_tokens": visual.conv1(image).flatten(2).transpose(1, 2),
            "pos_embed_used": visual.interpolated_posemb(*grid), "pre_blocks": pre_blocks,
            "rope_angles": angles, "grid": grid}


def our_outputs(model, inputs):
    """The fixture's `outputs` dict, recomputed with our model through the calls its README names."""
    visual = model.visual if isinstance(model, pe_model.CLIP) else model
    image, layers = inputs["image"], visual.layers
    out = {
        "tokens": visual.forward_features(image),
        "tokens_norm": visual.forward_features(image, norm=True),
        "tokens_norm_strip_cls": visual.forward_features(image, norm=True, strip_cls_token=True),
        "intermediate": {i: visual.forward_features(image, layer_idx=i) for i in range(layers)},
        "intermediate_negative": {-2: visual.forward_features(image, layer_idx=-2)},
        "intermediate_norm_strip_cls": {0: visual.forward_features(image, layer_idx=0, norm=True,
                                                                     strip_cls_token=True)},
        "forward_layer0": visual(image, layer_idx=0),
        "debug": debug_tensors(visual, image),
    }
    for suffix in ("res2", "nonsquare"):
        x = inputs[f"image_{suffix}"]
        out[f"image_forward_{suffix}"] = visual(x)
        out[f"tokens_{suffix}"] = visual.forward_features(x)
        out[f"intermediate_{suffix}"] = {0: visual.forward_features(x, layer_idx=0)}
        out[f"debug_{suffix}"] = debug_tensors(visual, x)
    if not isinstance(model, pe_model.CLIP):
        out["image_features"] = visual(image)
        return out
    text, video = inputs["text"], inputs["video"]
    image_features, text_features, logit_scale_exp = model(image, text)
    out.update({
        "image_features": image_features, "text_features": text_features, "logit_scale_exp": logit_scale_exp,
        "logit_scale": model.logit_scale, "logits_per_image": logit_scale_exp * image_features @ text_features.T,
        "image_embeds": model.encode_image(image), "text_embeds": model.encode_text(text),
        "text_tokens_final": model.encode_text_tokens(text), "text_eot_index": text.argmax(-1),
        "text_embeds_short": model.encode_text(inputs["text_short"]),
        "text_features_short": model.encode_text(inputs["text_short"], normalize=True),
        "video_embeds": model.encode_video(video), "video_embeds_framenorm": model.encode_video(video, normalize=True),
        "image_features_res2": model.encode_image(inputs["image_res2"], normalize=True),
        "image_features_nonsquare": model.encode_image(inputs["image_nonsquare"], normalize=True),
    })
    return out


def assert_same(ours, theirs, path):
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} vs fixture {sorted(theirs)}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, torch.Tensor):
        assert ours.shape == theirs.shape, f"{path}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{path}: {m}")
    else:
        assert list(ours) == list(theirs), f"{path}: {ours} vs {theirs}"


@pytest.mark.parametrize("name", MODEL_FIXTURES)
@torch.no_grad()
def test_every_fixture_tensor_matches_the_official_implementation(name):
    blob = load_fixture(name)
    model = fixture_model(blob)
    # every output key is recomputed, so a fixture tensor can never go unchecked
    assert_same(our_outputs(model, blob["inputs"]), blob["outputs"], name)


@pytest.mark.parametrize("name", ["core_cls_ls", "spatial_nocls_ls"])
@torch.no_grad()
def test_all_layers_in_one_pass_equal_the_per_layer_calls(name):
    blob = load_fixture(name)
    visual = fixture_model(blob)
    visual = visual.visual if isinstance(visual, pe_model.CLIP) else visual
    for image in (blob["inputs"]["image"], blob["inputs"]["image_nonsquare"]):
        for norm, strip in ((False, False), (True, True)):
            every_layer = visual.forward_all_layers(image, norm=norm, strip_cls_token=strip)
            assert len(every_layer) == visual.layers
            for i, tokens in enumerate(every_layer):
                expected = visual.forward_features(image, layer_idx=i, norm=norm, strip_cls_token=strip)
                torch.testing.assert_close(tokens, expected, atol=0, rtol=0)


def test_tokenizer_ids_are_identical_to_the_official_tokenizer():
    reference = torch.load(os.path.join(FIXTURES, "tokenizer.pt"), weights_only=True)["tokenizer"]
    tokenizer = pe_model.get_tokenizer()
    assert tokenizer.vocab_size == reference["vocab_size"]
    for text, ids, decoded in zip(reference["texts"], reference["encode"], reference["decode_roundtrip"]):
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == decoded
    assert torch.equal(pe_model.tokenize(reference["texts"], 32), reference["ids_ctx32"])
    assert torch.equal(pe_model.tokenize(reference["texts"], 72), reference["ids_ctx72"])
    long_row = pe_model.tokenize(reference["texts"], 32)[8]
    assert long_row[0] == pe_model.SOT_TOKEN_ID and long_row[-1] == pe_model.EOT_TOKEN_ID


@pytest.mark.parametrize("text, ids", [  # ids of the official (open_clip 3.3.0) tokenizer
    ("<end_of_text>", [49406, 49407, 49407]),
    ("<start_of_text>a cat", [49406, 49406, 320, 2368, 49407]),
    ("a <END_OF_TEXT> b", [49406, 320, 49407, 321, 49407]),
    ("<|endoftext|>", [49406, 27, 347, 40786, 4160, 91, 285, 49407]),  # OpenAI's names are plain text here
    ("<|startoftext|>dog", [49406, 27, 347, 993, 6659, 4160, 91, 285, 1929, 49407]),
])
def test_special_token_strings_encode_as_the_official_tokenizer(text, ids):
    assert pe_model.tokenize([text], 32)[0, : len(ids)].tolist() == ids
    assert pe_model.tokenize([text], 32)[0, len(ids):].eq(0).all()


# --- loading ------------------------------------------------------------------------------------------------


def test_a_checkpoint_saved_by_our_model_loads_back_strict(tmp_path):
    blob = load_fixture("core_cls_ls")
    model = fixture_model(blob)
    path = tmp_path / "model.pt"
    pe_model.save_checkpoint(model.state_dict(), path)
    assert set(model.state_dict()) == set(blob["state_dict"])  # official keys, nothing more or less
    fresh = pe_model.build_model(blob["config"])
    pe_model.load_checkpoint(fresh, str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # our training checkpoints keep the config, so they rebuild without a name
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, tmp_path / "ours.pt")
    rebuilt = pe_model.load_model(str(tmp_path / "ours.pt")).eval()
    image = blob["inputs"]["image"]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(image), model.encode_image(image))


@pytest.mark.parametrize("problem", ["wrong_shape", "missing", "extra"])
def test_a_mismatching_checkpoint_fails_with_one_error_naming_the_keys(problem):
    blob = load_fixture("core_cls_ls")
    state_dict = dict(blob["state_dict"])
    if problem == "wrong_shape":
        state_dict["visual.proj"] = torch.zeros(64, 16)
        expected = r"wrong shape keys \(1\): visual\.proj: checkpoint \(64, 16\) vs model \(64, 32\)"
    elif problem == "missing":
        del state_dict["visual.ln_post.weight"]
        expected = r"missing keys \(1\): visual\.ln_post\.weight"
    else:
        state_dict["visual.extra_head.weight"] = torch.zeros(3)
        expected = r"unexpected keys \(1\): visual\.extra_head\.weight"
    model = pe_model.build_model(blob["config"])
    with pytest.raises(pe_model.CheckpointMismatchError, match=expected):
        pe_model.load_checkpoint(model, state_dict)


def test_official_wrappers_and_a_full_clip_checkpoint_load_into_a_vision_tower():
    blob = load_fixture("core_cls_ls")
    wrapped = {"state_dict": {"module." + k: v for k, v in blob["state_dict"].items()}}
    visual = pe_model.VisionTransformer(**blob["config"]["vision_cfg"])
    pe_model.load_checkpoint(visual, wrapped)
    with torch.no_grad():
        torch.testing.assert_close(visual.eval()(blob["inputs"]["image"]), blob["outputs"]["image_embeds"],
                                   atol=1e-5, rtol=1e-5)
    clip = pe_model.build_model(blob["config"])
    pe_model.load_checkpoint(clip, {"weights": blob["state_dict"]})


def test_truncated_and_headless_towers_load_from_a_core_checkpoint_only_when_asked():
    blob = load_fixture("core_cls_ls")
    cfg = dict(blob["config"]["vision_cfg"], layers=2, pool_type="none", output_dim=None, use_ln_post=False)
    tower = pe_model.VisionTransformer(**cfg)
    with pytest.raises(pe_model.CheckpointMismatchError, match="truncate=True"):
        pe_model.load_checkpoint(tower, blob["state_dict"])
    with pytest.raises(pe_model.CheckpointMismatchError, match="drop_head=True"):
        pe_model.load_checkpoint(tower, blob["state_dict"], truncate=True)
    pe_model.load_checkpoint(tower, blob["state_dict"], truncate=True, drop_head=True)
    with torch.no_grad():
        torch.testing.assert_close(tower.eval().forward_features(blob["inputs"]["image"]),
                                   blob["outputs"]["intermediate"][1], atol=1e-5, rtol=1e-5)


def test_unreadable_checkpoint_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    model = pe_model.build_model(load_fixture("spatial_cls_nols")["config"])
    with pytest.raises(ValueError, match="broken.pt"):
        pe_model.load_checkpoint(model, str(bad))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        pe_model.load_checkpoint(model, str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match="broken.pt: cannot be read as a torch checkpoint"):
        pe_model.load_model(str(bad))
    import training
    assert training.checkpoint_train_config(str(bad)) == {}


def test_save_checkpoint_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "ckpt.pt"
    with pytest.raises(Exception):
        pe_model.save_checkpoint({"not picklable": lambda: None}, target)
    assert list(tmp_path.iterdir()) == []
    pe_model.save_checkpoint({"x": torch.ones(2)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# --- configs --------------------------------------------------------------------------------------------------

# vision parameter counts from the official model table (the official README), in millions
OFFICIAL_VISION_PARAMS = {
    "PE-Core-T16-384": 6.1, "PE-Core-S16-384": 23.8, "PE-Core-B16-224": 93.7, "PE-Core-L14-336": 317,
    "PE-Core-G14-448": 1882, "PE-Lang-L14-448": 291, "PE-Lang-G14-448": 1741, "PE-Spatial-T16-512": 5.7,
    "PE-Spatial-S16-512": 22.0, "PE-Spatial-B16-512": 86.4, "PE-Spatial-L14-448": 304, "PE-Spatial-G14-448": 1852,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_VISION_PARAMS))
def test_every_released_config_has_the_official_size(name):
    with torch.device("meta"):  # no memory: G alone has 1.9B vision parameters
        model = pe_model.build_model(name)
    visual = model.visual if isinstance(model, pe_model.CLIP) else model
    millions = sum(p.numel() for p in visual.parameters()) / 1e6
    assert abs(millions - OFFICIAL_VISION_PARAMS[name]) / OFFICIAL_VISION_PARAMS[name] < 0.01, millions
    assert isinstance(model, pe_model.CLIP) == name.startswith("PE-Core")


def test_g_text_tower_uses_a_72_token_context():
    with torch.device("meta"):
        model = pe_model.build_model("PE-Core-G14-448")
    assert model.context_length == 72 and not model.visual.use_cls_token
    assert model.visual.transformer.resblocks[0].mlp.c_fc.out_features == 8960


def test_small_default_configs_run_end_to_end():
    model = pe_model.build_model("PE-Core-Nano8-64").eval()
    image, text = torch.randn(2, 3, 64, 64), pe_model.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        image_features, text_features, scale = model(image, text)
        video = model.encode_video(torch.randn(2, 3, 3, 64, 64))
    assert image_features.shape == text_features.shape == video.shape == (2, 128)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'PE-Core-X'"):
        pe_model.build_model("PE-Core-X")


# --- preprocessing ---------------------------------------------------------------------------------------------


def test_preprocess_squashes_to_the_size_and_maps_to_minus_one_one():
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 128))
    x = pe_model.preprocess_image(image, 16)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    cropped = pe_model.preprocess_image(image, (8, 12), center_crop=True)
    assert cropped.shape == (3, 8, 12)


def test_uniform_frame_sampling():
    assert pe_model.sample_frame_indices(80, 8) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert pe_model.sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short video: frames repeat
    with pytest.raises(ValueError):
        pe_model.sample_frame_indices(0, 8)


# --- project ---------------------------------------------------------------------------------------------------


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    test_line = next(line for line in readme.splitlines() if line.rstrip().endswith("# tests"))
    command = test_line.split("#")[0].strip()
    ci_lines = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")) if line.strip()]
    assert ci_lines[-1] == command
