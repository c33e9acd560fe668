"""The checkpoint layouts users hold PE weights in (official, timm's vit_pe_*, open_clip's PE-Core-*), safetensors,
the Hugging Face hub (offline, from a local cache), and torch.export. Against the real timm / open_clip where they
import (test-only extras, installed by .ci/run with --no-deps); without them the exact round trips below carry
the check, with the timm key names taken from timm 1.0.31."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pe_model  # noqa: E402

# timm 1.0.31's vit_pe_core_tiny_patch16_384(depth=1).state_dict(): key -> shape
TIMM_TINY_DEPTH1 = {
    "cls_token": (1, 1, 192), "pos_embed": (1, 577, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
    "norm_pre.weight": (192,), "norm_pre.bias": (192,), "blocks.0.norm1.weight": (192,), "blocks.0.norm1.bias": (192,),
    "blocks.0.attn.qkv.weight": (576, 192), "blocks.0.attn.qkv.bias": (576,), "blocks.0.attn.proj.weight": (192, 192),
    "blocks.0.attn.proj.bias": (192,), "blocks.0.norm2.weight": (192,), "blocks.0.norm2.bias": (192,),
    "blocks.0.mlp.fc1.weight": (768, 192), "blocks.0.mlp.fc1.bias": (768,), "blocks.0.mlp.fc2.weight": (192, 768),
    "blocks.0.mlp.fc2.bias": (192,), "norm.weight": (192,), "norm.bias": (192,), "attn_pool.latent": (1, 1, 192),
    "attn_pool.q.weight": (192, 192), "attn_pool.q.bias": (192,), "attn_pool.kv.weight": (384, 192),
    "attn_pool.kv.bias": (384,), "attn_pool.proj.weight": (192, 192), "attn_pool.proj.bias": (192,),
    "attn_pool.norm.weight": (192,), "attn_pool.norm.bias": (192,), "attn_pool.mlp.fc1.weight": (768, 192),
    "attn_pool.mlp.fc1.bias": (768,), "attn_pool.mlp.fc2.weight": (192, 768), "attn_pool.mlp.fc2.bias": (192,),
    "head.weight": (512, 192), "head.bias": (512,),
}


def small(name, layers=1):
    """A released config at small depth (widths, heads, grid and head as released)."""
    config = pe_model.model_config(name)
    config["vision_cfg"]["layers"] = layers
    if "text_cfg" in config:
        config["text_cfg"].update(layers=layers, vocab_size=512)  # a small vocabulary keeps G's text tower light
    return config


def randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # LayerScale, biases and zero-initialised weights differ too
    return model.eval()


def library(module):
    """The module, or a skip with the reason it does not import (timm and open_clip import torchvision, whose
    PyPI build does not load beside the CPU torch on some machines)."""
    try:
        return __import__(module)
    except Exception as error:  # ImportError, or torchvision's RuntimeError ("operator torchvision::nms ...")
        pytest.skip(f"{module} does not import here: {type(error).__name__}: {str(error).splitlines()[0][:150]}")


def test_the_timm_layout_has_timm_key_names_and_shapes():
    model = pe_model.build_model(small("PE-Core-T16-384"))
    timm_state = pe_model.convert_state_dict(model.state_dict(), to="timm")
    assert {k: tuple(v.shape) for k, v in timm_state.items()} == TIMM_TINY_DEPTH1
    assert not timm_state["head.bias"].any()
    open_clip_state = pe_model.convert_state_dict(model.state_dict(), to="open_clip")
    text_keys = {k for k in model.state_dict() if not k.startswith("visual.")}
    assert set(open_clip_state) == {f"visual.trunk.{k}" for k in TIMM_TINY_DEPTH1} | \
        {f"text.{k}" for k in text_keys - {"logit_scale"}} | {"logit_scale"}
    assert [pe_model.detect_layout(s) for s in (model.state_dict(), timm_state, open_clip_state)] == \
        ["official", "timm", "open_clip"]


@pytest.mark.parametrize("name", [n for n in pe_model.VISION_CONFIGS if "Nano" not in n and "Micro" not in n])
def test_official_timm_official_and_official_open_clip_official_are_exact(name):
    state = pe_model.build_model(small(name)).state_dict()
    for layout in ("timm", "open_clip"):
        converted = pe_model.convert_state_dict(state, to=layout)
        assert pe_model.detect_layout(converted) == layout
        back = pe_model.convert_state_dict(converted)
        if layout == "timm":  # a vision tower only: a CLIP's gives its `visual.` part
            expected = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")} or state
        else:  # open_clip holds a tower alone as a CLIP's `visual.trunk.`
            expected = state if "visual.conv1.weight" in state else {f"visual.{k}": v for k, v in state.items()}
        assert set(back) == set(expected), layout
        assert all(torch.equal(back[k], v) for k, v in expected.items()), layout


def test_every_layout_loads_strict_and_a_mismatch_names_the_layout():
    model = randomised(pe_model.build_model(small("PE-Core-T16-384", layers=2)))
    image, text = torch.randn(1, 3, 64, 64), pe_model.tokenize(["a cat"], 32).clamp(max=511)
    for layout in ("official", "timm", "open_clip"):
        fresh = pe_model.build_model(small("PE-Core-T16-384", layers=2)).eval()
        pe_model.load_checkpoint(fresh, pe_model.convert_state_dict(model.state_dict(), to=layout))
        with torch.no_grad():
            assert torch.equal(fresh.encode_image(image), model.encode_image(image)), layout
            if layout != "timm":  # a timm file is a vision tower: it loads the CLIP's vision tower only
                assert torch.equal(fresh.encode_text(text), model.encode_text(text)), layout
    timm_state = pe_model.convert_state_dict(model.state_dict(), to="timm")
    timm_state["head.bias"] = torch.ones(512)  # a head bias the official projection cannot hold
    with pytest.raises(pe_model.CheckpointMismatchError, match=r"\(timm layout\).*\n.*unexpected keys \(1\): head.bias"):
        pe_model.load_checkpoint(pe_model.VisionTransformer(**small("PE-Core-T16-384", 2)["vision_cfg"]), timm_state)


def test_safetensors_files_round_trip_with_their_config(tmp_path):
    library("safetensors")
    model = randomised(pe_model.build_model(small("PE-Spatial-T16-512", layers=2)))
    path = str(tmp_path / "tower.safetensors")
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, path)
    rebuilt = pe_model.load_model(path).eval()  # the config rides in the safetensors metadata
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
    timm_path = str(tmp_path / "model.safetensors")  # a timm-layout file with no config: name the model
    pe_model.save_checkpoint(pe_model.convert_state_dict(model.state_dict(), to="timm"), timm_path)
    tower = pe_model.VisionTransformer(**small("PE-Spatial-T16-512", 2)["vision_cfg"])
    pe_model.load_checkpoint(tower, timm_path)
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("timm_name, name", [("vit_pe_core_tiny_patch16_384", "PE-Core-T16-384"),
                                             ("vit_pe_spatial_tiny_patch16_512", "PE-Spatial-T16-512")])
def test_a_real_timm_model_loads_strict_and_matches(tmp_path, timm_name, name):
    timm = library("timm")
    library("safetensors")
    theirs = randomised(timm.create_model(timm_name, pretrained=False, depth=2))
    if "core" in timm_name:
        theirs.head.bias.data.zero_()
    path = str(tmp_path / "model.safetensors")
    pe_model.save_checkpoint(theirs.state_dict(), path)
    ours = pe_model.VisionTransformer(**small(name, layers=2)["vision_cfg"])
    pe_model.load_checkpoint(ours, path)
    image = torch.randn(2, 3, ours.image_size, ours.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_features(image, norm=True), theirs.forward_features(image),
                                   atol=1e-5, rtol=1e-5)
        if ours.pool_type != "none":
            torch.testing.assert_close(ours(image), theirs(image), atol=1e-5, rtol=1e-5)
        again = timm.create_model(timm_name, pretrained=False, depth=2).eval()
        again.load_state_dict(pe_model.convert_state_dict(ours.state_dict(), to="timm"), strict=True)
        assert torch.equal(again(image), theirs(image))


def test_a_real_open_clip_model_loads_strict_and_matches(tmp_path):
    open_clip = library("open_clip")
    theirs = randomised(open_clip.create_model("PE-Core-T-16-384", pretrained=None))
    theirs.visual.trunk.head.bias.data.zero_()
    path = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save(theirs.state_dict(), path)
    ours = pe_model.load_model(path, "PE-Core-T16-384").eval()
    image, texts = torch.randn(2, 3, 384, 384), ["a photo of a cat", "<end_of_text> and more"]
    assert torch.equal(open_clip.get_tokenizer("PE-Core-T-16-384")(texts), pe_model.tokenize(texts, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(image), theirs.encode_image(image), atol=1e-5, rtol=1e-5)
        tokens = pe_model.tokenize(texts, 32)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), atol=1e-5, rtol=1e-5)
    theirs.load_state_dict(pe_model.convert_state_dict(ours.state_dict(), to="open_clip"), strict=True)


HUB_SCRIPT = """
import os, sys, torch
from dataclasses import replace
sys.path.insert(0, {root!r})
import pe_model, training
name = "PE-Core-T16-384"
pe_model.VISION_CONFIGS[name] = replace(pe_model.VISION_CONFIGS[name], layers=1)  # the test file's depth
pe_model.TEXT_CONFIGS[name] = replace(pe_model.TEXT_CONFIGS[name], layers=1)
expected = torch.load({weights!r}, weights_only=True)
for model in (pe_model.from_pretrained(name), pe_model.from_pretrained("facebook/" + name + "/" + name + ".pt"),
              pe_model.load_model(training.resolve_checkpoint("hf:facebook/" + name)),
              pe_model.load_model(training.resolve_checkpoint(name))):
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
print("ok", training.resolve_checkpoint(name))
"""


def test_the_hub_loads_official_names_offline_from_a_local_cache(tmp_path, monkeypatch):
    library("huggingface_hub")
    name, revision = "PE-Core-T16-384", "0123456789abcdef0123456789abcdef01234567"
    model = randomised(pe_model.CLIP(replace(pe_model.VISION_CONFIGS[name], layers=1),
                                     replace(pe_model.TEXT_CONFIGS[name], layers=1)))
    repo = tmp_path / "hf" / "hub" / f"models--facebook--{name}"  # as huggingface_hub lays out its cache
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.save(model.state_dict(), repo / "snapshots" / revision / f"{name}.pt")  # official files: bare, no config
    # HF_HOME and HF_HUB_OFFLINE are read when huggingface_hub is imported: a fresh interpreter sees them
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    script = HUB_SCRIPT.format(root=ROOT, weights=str(repo / "snapshots" / revision / f"{name}.pt"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok") and f"snapshots/{revision}/{name}.pt" in result.stdout
    # in this process: an explicit cache_dir, no network allowed
    path = pe_model.hub_download(name, cache_dir=str(tmp_path / "hf" / "hub"), local_files_only=True)
    assert path.endswith(f"{revision}/{name}.pt") and pe_model.official_name(path) == name


def test_without_huggingface_hub_one_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r"^this needs huggingface_hub: pip install huggingface_hub$"):
        pe_model.from_pretrained("PE-Core-T16-384")


TINY = {"patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "output_dim": 16, "image_size": 32,
        "use_cls_token": True}


def test_the_vision_tower_exports_with_a_dynamic_batch():
    tower = randomised(pe_model.VisionTransformer(**TINY))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(tower, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for size in (1, 5):
            image = torch.randn(size, 3, 32, 32)
            torch.testing.assert_close(program.module()(image), tower(image), atol=1e-6, rtol=1e-6)


def test_the_vision_tower_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    tower = randomised(pe_model.VisionTransformer(**TINY))
    image = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "tower.onnx")
    torch.onnx.export(tower, (image,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    onnxruntime = pytest.importorskip("onnxruntime", reason="checking the ONNX outputs needs onnxruntime")
    session = onnxruntime.InferenceSession(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), tower(image), atol=1e-5, rtol=1e-5)
