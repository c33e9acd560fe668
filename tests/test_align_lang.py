"""Tests of align_lang.py (language alignment): the Llama decoder (causal mask, RoPE, Meta's checkpoint format),
the answer-only loss, the stages' frozen parts, the PE-Lang tower export and a short training run.
Tiny configs throughout. Run: python -m pytest -q tests/test_align_lang.py"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import align_lang
import pe_model

def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49408, multiple_of=16)
    return align_lang.Llama(align_lang.LlamaArgs(**{**args, **overrides}))


@pytest.fixture(scope="module")
def tokenizer():
    return align_lang.ClipTokenizer()


def tiny_vlm(core_checkpoint, layers=2, seed=0, vocab_size=49408):
    state, vision_cfg = align_lang.read_core_checkpoint(core_checkpoint)
    vision = align_lang.build_vision_tower(state, vision_cfg, layers)
    lm = tiny_llama(seed, vocab_size=vocab_size)
    return align_lang.VLM(vision, align_lang.MLPProjector(vision.width, lm.args.dim, 2), lm)


def tiny_pool(num_images=6, seed=0):
    """Single-emoji records over random images: enough for the question generator."""
    generator = torch.Generator().manual_seed(seed)
    names = ["dog face", "red apple", "sheep"]
    records = [{"type": "single", "names": [names[i % 3]], "colour": None, "caption": f"an emoji of {names[i % 3]}"}
               for i in range(num_images)]
    return {"images": torch.randn(num_images, 3, 32, 32, generator=generator), "records": records,
            "class_names": names}


def test_decoder_output_ignores_later_tokens():
    """Causal mask + RoPE: changing tokens from position 6 on leaves the logits of positions 0..5 unchanged
    (and changes the later ones), with grouped-query attention."""
    lm = tiny_llama(vocab_size=100).eval()
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 17) % 100
    with torch.no_grad():
        before, after = lm(tokens), lm(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=1e-6)
    assert (before[:, 6:] - after[:, 6:]).abs().max() > 1e-3


def test_rope_scores_depend_on_relative_position_only():
    """Llama RoPE: q.k after rotation depends on (m - n) only: shifting every position by 5 keeps the scores,
    while the rotation does change them (it is not the identity)."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 16, generator=generator), torch.randn(1, 2, 6, 16, generator=generator)
    angles = align_lang.llama_rope_angles(11, 16, theta=10000.0)  # positions 0..10
    rotate = align_lang.rope_apply
    scores = rotate(q, angles[:6]) @ rotate(k, angles[:6]).transpose(-1, -2)
    shifted = rotate(q, angles[5:]) @ rotate(k, angles[5:]).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, rtol=1e-5, atol=1e-5)
    assert (scores - q @ k.transpose(-1, -2)).abs().max() > 1e-2


def test_loss_ignores_prompt_tokens(core_checkpoint, tokenizer):
    """encode_example puts targets on the answer (and EOS) only; answer_loss is the cross-entropy over exactly
    those positions, and differs from the loss over every next token."""
    ids, targets, cut = align_lang.encode_example(tokenizer, "what is in the image?", "dog face", 64)
    prompt_length = 1 + len(tokenizer.encode("what is in the image?"))
    assert not cut and len(ids) == len(targets)
    assert targets[: prompt_length - 1] == [-100] * (prompt_length - 1) and targets[-1] == -100
    assert targets[prompt_length - 1 : -1] == ids[prompt_length:]  # next token at each answer position

    vlm = tiny_vlm(core_checkpoint).eval()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    input_ids, targets = torch.tensor([ids]), torch.tensor([targets])
    with torch.no_grad():
        loss = align_lang.answer_loss(vlm, input_ids, targets, vlm.encode_images(images))
        logits = vlm(images, input_ids)[0]  # (L, vocab)
    keep = targets[0] != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[0][keep]), rtol=1e-5, atol=1e-5)
    every_next = F.cross_entropy(logits[:-1], input_ids[0, 1:])
    assert abs(loss.item() - every_next.item()) > 1e-3


def test_compact_vocabulary_round_trips_known_words():
    """A from-scratch LM's vocabulary: the CLIP ids of its texts, renumbered after pad/begin/end/unknown."""
    vocab = align_lang.build_vocab(["is there a dog face?", "yes", "no"])
    tokenizer = align_lang.ClipTokenizer(vocab)
    assert vocab[:4] == [0, 49406, 49407, -1] and tokenizer.vocab_size == len(vocab) < 20
    ids = tokenizer.encode("is there a dog face?")
    assert min(ids) >= 4 and tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id]) == "is there a dog face ?"
    clip_id = {word: pe_model.get_tokenizer().encode(word)[0] for word in ("a", "face")}
    assert tokenizer.encode("a cat face") == [tokenizer.to_lm[clip_id["a"]], tokenizer.unk_id,
                                              tokenizer.to_lm[clip_id["face"]]]  # "cat" is unknown


def test_stage1_leaves_vision_and_lm_unchanged(core_checkpoint):
    pool = tiny_pool()
    vocab = align_lang.build_vocab(align_lang.pool_texts(pool))
    vlm = tiny_vlm(core_checkpoint, vocab_size=len(vocab))
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    cfg = align_lang.LangConfig(batch_size=4, warmup_steps=1, max_text_tokens=48)
    align_lang.train_stage(vlm, pool, cfg, 1, 3, 1e-2, align_lang.ClipTokenizer(vocab), torch.device("cpu"))
    after = vlm.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith("projector."), f"{key}: changed={changed} in stage 1"


def test_llama_checkpoint_round_trip(tmp_path):
    """save_llama writes Meta's layout (params.json + consolidated.00.pth with Meta's key names); load_llama
    reads it back exactly; a checkpoint without output.weight loads with tied embeddings."""
    lm = tiny_llama(seed=3, use_scaled_rope=True, rope_scaling_factor=32.0).eval()
    align_lang.save_llama(lm, str(tmp_path))
    with open(tmp_path / "params.json") as f:
        params = json.load(f)
    assert params == {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 49408,
                      "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "rope_scaling_factor": 32.0}
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{name}.weight" for i in range(2)
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                     "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm")}
    assert set(state) == expected
    loaded = align_lang.load_llama(str(tmp_path)).eval()
    assert loaded.args == lm.args
    for key, value in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tokens = torch.randint(0, 49408, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), lm(tokens))

    del state["output.weight"]  # Llama 3.2 1B/3B tie their embeddings
    torch.save(state, tmp_path / "consolidated.00.pth")
    tied = align_lang.load_llama(str(tmp_path))
    assert torch.equal(tied.output.weight, lm.tok_embeddings.weight)
    params["moe_experts"] = 8
    with open(tmp_path / "params.json", "w") as f:
        json.dump(params, f)
    with pytest.raises(ValueError, match="moe_experts"):
        align_lang.load_llama(str(tmp_path))


def test_vision_tower_is_loaded_strictly_except_new_layerscale(core_checkpoint):
    """The stage-2 tower: the first N core blocks with new LayerScale gammas at 0.1, every other weight the
    core's; a core checkpoint that lacks any other key is refused."""
    state, vision_cfg = align_lang.read_core_checkpoint(core_checkpoint)
    tower = align_lang.build_vision_tower(state, vision_cfg, 2, ls_init_value=0.1, drop_path=0.1)
    own = tower.state_dict()
    gammas = [k for k in own if k.endswith(".gamma")]
    assert len(gammas) == 4 and all(torch.all(own[k] == 0.1) for k in gammas)
    assert all(torch.equal(own[k], state[k]) for k in own if k not in gammas)
    assert not any(k.startswith(("ln_post", "attn_pool", "proj", "transformer.resblocks.2.")) for k in own)
    broken = {k: v for k, v in state.items() if k != "transformer.resblocks.1.attn.in_proj_weight"}
    with pytest.raises(pe_model.CheckpointMismatchError, match="in_proj_weight"):
        align_lang.build_vision_tower(broken, vision_cfg, 2, ls_init_value=0.1)


def test_exported_pe_lang_tower_loads_strict_into_pe_model(core_checkpoint, tmp_path):
    vlm = tiny_vlm(core_checkpoint)
    align_lang.add_layerscale(vlm, 0.1, 0.1)
    with torch.no_grad():  # as if stage 2 had trained the gammas
        for name, param in vlm.vision.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.05, 0.5)
    path = str(tmp_path / "pe_lang_tower.pt")
    pe_model.export_tower(vlm.vision, path)  # as main() exports the aligned tower
    blob = torch.load(path, weights_only=True)
    tower = pe_model.build_model(blob["config"])
    pe_model.load_checkpoint(tower, blob["model"], strict=True)  # raises on any missing / unexpected key
    config = blob["config"]["vision_cfg"]
    assert (config["layers"], config["ls_init_value"], config["pool_type"], config["output_dim"],
            config["use_ln_post"]) == (2, 0.1, "none", None, False)
    rebuilt = pe_model.load_model(path).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(images), vlm.vision.eval().forward_features(images))
    assert os.path.isfile(str(tmp_path / "pe_lang_tower.json"))


def test_short_run_lowers_the_loss_and_answers(core_checkpoint, tmp_path):
    """A few stage-2 steps on a JSONL set whose answer is always "yes" lower the loss, greedy decoding then
    answers "yes", and vqa_accuracy on a saved checkpoint scores it (skipping and counting a bad line)."""
    from PIL import Image

    lines = []
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "is there an emoji?", "answer": "yes"}))
    (tmp_path / "qa.jsonl").write_text("\n".join(lines + ['{"image": "missing.png"}']) + "\n")
    pool = align_lang.jsonl_pool(str(tmp_path / "qa.jsonl"), 32)
    assert len(pool["records"]) == 4 and pool["bad"].total() == 1

    vocab = align_lang.build_vocab(align_lang.pool_texts(pool))
    tokenizer = align_lang.ClipTokenizer(vocab)
    vlm = tiny_vlm(core_checkpoint, vocab_size=len(vocab))
    cfg = align_lang.LangConfig(batch_size=4, warmup_steps=2, max_new_tokens=4)
    align_lang.add_layerscale(vlm, 0.1, 0.1)
    losses = align_lang.train_stage(vlm, pool, cfg, 2, 25, 1e-2, tokenizer, torch.device("cpu"))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    answers = align_lang.generate(vlm, tokenizer, pool["images"][:2], ["is there an emoji?"] * 2, 4)
    assert answers == ["yes", "yes"]

    path = str(tmp_path / "vlm.pt")
    align_lang.save_vlm(vlm, path, cfg, {}, vocab)
    result = align_lang.vqa_accuracy(path, jsonl=str(tmp_path / "qa.jsonl"))
    assert result["accuracy"] == 1.0 and result["num_questions"] == 4


def test_embedded_questions_ask_about_classes_the_core_was_trained_on():
    """The QA classes are spread over the core's training classes (class_pool, resolved from its checkpoint's
    train_config by main()), so a frozen tower has seen what it is asked about."""
    import data

    cfg = align_lang.LangConfig(num_classes=4, class_pool=100, val_images_per_class=1, val_scenes=2,
                                val_colour_images=2)
    pool = align_lang.embedded_pool(cfg, "val", 32)
    core_classes = [name for _, name in data.emoji_classes(100)]
    assert pool["class_names"] == [core_classes[25 * k] for k in range(4)]
    assert all(name in core_classes for record in pool["records"] for name in record["names"])


def write_llama3_tokenizer(path, merges=(b"he", b"ll", b"hell", b"hello", b" w", b"lo")):
    """A tokenizer.model in Llama 3's format ("base64(bytes) rank" per line): the 256 bytes, then `merges`."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + list(merges)
    with open(path, "wb") as f:
        for rank, token in enumerate(tokens):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return len(tokens)


def test_llama3_tokenizer_merges_by_rank_and_round_trips(tmp_path):
    path = str(tmp_path / "tokenizer.model")
    num_bpe = write_llama3_tokenizer(path)
    tokenizer = align_lang.Llama3Tokenizer(path)
    # "hello": he (256) first, then ll (257) before lo (261), then hell (258), then hello (259)
    assert tokenizer.encode("hello") == [259]
    assert tokenizer.encode("hello world!") == [259, 260, *b"orld", *b"!"]
    text = "héllo wörld 🐶, it's 1234"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == num_bpe + 256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (num_bpe, num_bpe + 1, num_bpe + 4)
    assert tokenizer.decode([tokenizer.bos_id, 259, tokenizer.eos_id]) == "hello"  # specials are dropped
    (tmp_path / "bad.model").write_bytes(b"aGk= 0\nnot base64 at all\n")
    with pytest.raises(ValueError, match="bad.model:2"):
        align_lang.Llama3Tokenizer(str(tmp_path / "bad.model"))


def test_a_llama_folder_with_its_tokenizer_trains_and_reloads(core_checkpoint, tmp_path):
    """--llama_dir with Meta's three files (params.json, consolidated.00.pth, tokenizer.model): the stages run
    on it, and load_vlm finds the same tokenizer again through the saved folder."""
    llama_dir = tmp_path / "llama"
    os.makedirs(llama_dir)
    vocab_size = write_llama3_tokenizer(str(llama_dir / "tokenizer.model")) + 256
    align_lang.save_llama(tiny_llama(vocab_size=vocab_size), str(llama_dir))
    out_dir = tmp_path / "out"
    align_lang.main([f"--checkpoint={core_checkpoint}", f"--llama_dir={llama_dir}", f"--out_dir={out_dir}",
                     "--num_classes=4", "--train_images_per_class=2", "--val_images_per_class=1", "--train_scenes=4",
                     "--val_scenes=2", "--train_colour_images=4", "--val_colour_images=2", "--stage1_steps=2",
                     "--stage2_steps=2", "--batch_size=4", "--warmup_steps=1", "--max_new_tokens=3"])
    vlm = align_lang.load_vlm(str(out_dir / "vlm.pt"))
    assert isinstance(vlm.tokenizer, align_lang.Llama3Tokenizer) and vlm.lm.args.vocab_size == vocab_size
    assert json.load(open(out_dir / "metrics.json"))["stage2"]["num_questions"] > 0
    assert "| stage 2 |" in (out_dir / "metrics.md").read_text()  # the readable table beside the JSON


def test_video_engine_plugins_caption_and_summarise(core_checkpoint, tmp_path):
    """The paper's set-up (§2.2): a language-aligned model captions the frames and clips and an LM summarises
    (video_engine.py's --captioner=align_lang:make_captioner / --summarizer=align_lang:make_summarizer). A VLM
    with a compact vocabulary (what align_lang.py trains from scratch) must caption with its own tokenizer."""
    state, vision_cfg = align_lang.read_core_checkpoint(core_checkpoint)
    vision = align_lang.build_vision_tower(state, vision_cfg, 2)
    vocab = align_lang.build_vocab(["describe the image.", "an emoji of a turtle.", "a video of a turtle moving left."])
    torch.manual_seed(0)
    lm = align_lang.Llama(align_lang.LlamaArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=len(vocab),
                                               multiple_of=16))
    vlm = align_lang.VLM(vision, align_lang.MLPProjector(vision.width, lm.args.dim, 2), lm)
    path = str(tmp_path / "vlm.pt")
    align_lang.save_vlm(vlm, path, align_lang.LangConfig(max_new_tokens=4), {}, vocab)
    frames = torch.from_numpy(np.full((4, 40, 40, 3), 120, np.uint8))
    captioner = align_lang.make_captioner(path, "cpu")
    assert isinstance(captioner(frames[:1]), str) and isinstance(captioner(frames), str)
    summarizer = align_lang.make_summarizer(path, "cpu")
    assert isinstance(summarizer(["an emoji of a turtle."], "a video of a turtle moving left.", {"fps": 8}), str)
    assert captioner.name == summarizer.name == f"align_lang:{os.path.abspath(path)}"
    sheet = align_lang.contact_sheet(torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 8, 8, 3).clone())
    assert sheet.shape == (1, 8, 8, 3)  # 4 frames on a 2x2 grid, shrunk back to one frame's size
