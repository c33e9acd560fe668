"""evaluate.py: each metric and probe on hand-built cases with known answers, the plots and result files, and
`--all` end to end on a tiny random model."""

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import pe_model  # noqa: E402


def tiny_config(image_size=32, layers=3):
    config = pe_model.model_config("PE-Core-Nano8-64")
    config["vision_cfg"].update(width=32, layers=layers, heads=2, output_dim=32, image_size=image_size)
    config["text_cfg"].update(width=32, layers=1, heads=2, output_dim=32)
    return config


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return pe_model.build_model(tiny_config()).eval()


# ---------------------------------------------------------------------------------------------------------
# Zero-shot and retrieval


def test_recall_at_k_on_a_known_similarity_matrix():
    texts, relevant = evaluate.caption_relevance([["a", "b"], ["c", "d"], ["e", "f"]])  # 2 captions per image
    assert texts == ["a", "b", "c", "d", "e", "f"]
    similarity = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: own caption first
        [0.0, 0.0, 0.1, 0.2, 0.9, 0.8],  # image 1: own captions 3rd and 4th
        [0.5, 0.4, 0.3, 0.15, 0.1, 0.05],  # image 2: own captions 5th and 6th
    ])
    recall = evaluate.recall_at_k(similarity, relevant, ks=(1, 3, 5, 10))
    assert recall["image_to_text"] == pytest.approx({"R@1": 100 / 3, "R@3": 200 / 3, "R@5": 100.0, "R@10": 100.0})
    # text -> image: captions 0 and 3 find their image first; captions 2 and 5 second or third, 1 and 4 second
    assert recall["text_to_image"]["R@1"] == pytest.approx(100 * 2 / 6)
    assert recall["text_to_image"]["R@3"] == pytest.approx(100.0)


def test_zero_shot_accuracy_is_perfect_for_class_embeddings_and_counts_top5():
    torch.manual_seed(0)
    classifier = F.normalize(torch.randn(6, 16), dim=1)  # (C, D), as pe_model.zero_shot_classifier
    features = classifier.clone()  # each image is exactly its class embedding
    labels = torch.arange(6)
    assert evaluate.zero_shot_accuracy(features, classifier, labels) == {"top1": 100.0, "top5": 100.0}
    shifted = evaluate.zero_shot_accuracy(features, classifier, (labels + 1) % 6)
    assert shifted["top1"] == 0.0 and shifted["top5"] > 0.0


def test_zero_shot_classifier_is_the_renormalised_mean_of_normalised_template_embeddings():
    # the classifier evaluate.py scores with (pe_model's, shared with train_clip.py)
    model = tiny_model()
    names, templates = ["dog face", "red apple"], ("a drawing of {a}", "{name} icon", "a photo of a {}.")
    classifier = pe_model.zero_shot_classifier(model, names, templates)
    assert classifier.shape == (2, 32)
    for c, name in enumerate(names):
        prompts = [pe_model.format_prompt(t, name) for t in templates]
        assert prompts[0] == ("a drawing of a dog face" if c == 0 else "a drawing of a red apple")
        with torch.no_grad():
            embeddings = model.encode_text(pe_model.tokenize(prompts), normalize=True)
        torch.testing.assert_close(classifier[c], F.normalize(embeddings.mean(0), dim=0), atol=1e-5, rtol=1e-5)


def test_coco_retrieval_keeps_every_caption_of_an_image(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png"})
    annotations = [{"id": 5 * i + j, "image_id": 10 + i, "caption": f"image {i} caption {j}"}
                   for i in range(3) for j in range(5)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    cfg = evaluate.EvalConfig(coco_json=str(tmp_path / "captions.json"), coco_images=str(tmp_path), image_size=32)
    result = evaluate.run_retrieval(tiny_model(), cfg, "cpu", {})
    assert (result["images"], result["texts"], result["skipped_bad"]) == (3, 15, 0)
    assert result["image_to_text"]["R@5"] >= result["image_to_text"]["R@1"]
    assert result["text_to_image"]["R@10"] == 100.0  # 3 images: any ranking holds every match in the top 10


# ---------------------------------------------------------------------------------------------------------
# Probes


def test_classification_probe_is_perfect_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(10, 32, generator=generator)
    labels = torch.arange(300) % 10
    features = means[labels] + 0.1 * torch.randn(300, 32, generator=generator)
    accuracy = evaluate.classification_probe(features[:200], labels[:200], features[200:], labels[200:], 10)
    assert accuracy == 100.0


def test_classification_probe_on_random_labels_stays_near_chance():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1000, 32, generator=generator)
    labels = torch.randint(0, 10, (1000,), generator=generator)
    accuracy = evaluate.classification_probe(features[:600], labels[:600], features[600:], labels[600:], 10)
    assert 4.0 < accuracy < 17.0  # chance is 10%; 400 test samples


def miou(pred, target, num_classes, ignore_index=None):
    return evaluate.miou_from_confusion(evaluate.confusion_matrix(pred, target, num_classes, ignore_index), ignore_index)


def test_miou_on_crafted_maps():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    # class 0: 3 right, 1 missed -> 3/4; class 1: 4 right, 1 false alarm -> 4/5
    assert miou(pred, target, 2) == pytest.approx(100 * (0.75 + 0.8) / 2)
    assert miou(pred, target, 3) == pytest.approx(100 * (0.75 + 0.8) / 2)  # absent class left out
    wrong_class = torch.tensor([[2, 0, 1, 1], [0, 0, 1, 1]])  # a class that is not there counts as IoU 0
    assert miou(wrong_class, target, 3) == pytest.approx(100 * (0.75 + 1.0 + 0.0) / 3)
    ignored = torch.tensor([[0, 255, 1, 1], [0, 0, 1, 1]])  # the wrong pixel is not scored
    assert miou(pred, ignored, 2, ignore_index=255) == pytest.approx(100.0)


def test_depth_probe_rmse_counts_only_valid_pixels():
    # features that give the depth exactly except at one pixel per image, which is left out of the RMSE
    features, _, depth = dense_case(30)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[:, 0, 0] = False
    corrupted = depth.clone()
    corrupted[:, 0, 0] += 100.0
    exact = evaluate.depth_probe(features[:20], depth[:20], features[20:], depth[20:])
    assert evaluate.depth_probe(features[:20], depth[:20], features[20:], corrupted[20:], test_valid=valid[20:]) == \
        pytest.approx(exact, abs=0.01)
    assert evaluate.depth_probe(features[:20], depth[:20], features[20:], corrupted[20:]) > 1.0


def test_patch_targets_are_class_fractions_per_patch():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 255, 255], [2, 2, 255, 0]]])  # (1, 4, 4)
    fractions, valid = evaluate.patch_targets(labels, (2, 2), 3, ignore_index=255)
    torch.testing.assert_close(fractions[0, 0, 0], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(fractions[0, 1, 1], torch.tensor([1.0, 0.0, 0.0]))  # only its valid pixel
    torch.testing.assert_close(valid[0], torch.tensor([[1.0, 1.0], [1.0, 0.25]]))


def dense_case(n, grid=4, pixels_per_patch=4, seed=0):
    """Images whose patch features encode the patch's class (one-hot) and mean depth; patch-aligned labels,
    depth a random linear ramp per image."""
    generator = torch.Generator().manual_seed(seed)
    size = grid * pixels_per_patch
    classes = torch.randint(0, 3, (n, grid, grid), generator=generator)
    semantic = classes.repeat_interleave(pixels_per_patch, 1).repeat_interleave(pixels_per_patch, 2)
    x = (torch.arange(size) + 0.5) / size
    slope, offset = torch.rand(n, 1, 1, generator=generator), torch.rand(n, 1, 1, generator=generator)
    depth = (offset + slope * x[None, None, :]).expand(n, size, size).contiguous()
    depth_means, _ = evaluate.patch_means(depth, (grid, grid))
    features = torch.cat([F.one_hot(classes, 3).float(), depth_means[..., None],
                          0.01 * torch.randn(n, grid, grid, 4, generator=generator)], dim=-1)
    return features, semantic, depth


def test_dense_probes_read_linear_features_and_fail_on_noise():
    features, semantic, depth = dense_case(60)
    miou = evaluate.segmentation_probe(features[:40], semantic[:40], features[40:], semantic[40:], 3)
    error = evaluate.depth_probe(features[:40], depth[:40], features[40:], depth[40:])
    assert miou > 80.0  # not 100: bilinear upsampling blurs the corners where classes meet
    assert error < 0.02  # a linear ramp survives patch averaging and bilinear upsampling (up to the borders)
    noise = torch.randn_like(features)
    assert evaluate.segmentation_probe(noise[:40], semantic[:40], noise[40:], semantic[40:], 3) < 50.0
    assert evaluate.depth_probe(noise[:40], depth[:40], noise[40:], depth[40:]) > 0.1


# ---------------------------------------------------------------------------------------------------------
# Tracking


def moving_square_video(frames=5, grid=8, side=3, seed=0):
    """An object of side x side patches moving one patch right per frame over a uniform background. Each part
    of the object has its own feature vector, constant over time; background patches share one vector."""
    generator = torch.Generator().manual_seed(seed)
    parts = torch.randn(side * side, 16, generator=generator)
    background = torch.randn(16, generator=generator)
    noise = 0.01 * torch.randn(frames, grid, grid, 16, generator=generator)
    features = background.repeat(frames, grid, grid, 1) + noise
    masks = torch.zeros(frames, grid, grid, dtype=torch.long)
    for t in range(frames):
        features[t, 2:2 + side, t:t + side] = parts.view(side, side, 16)
        masks[t, 2:2 + side, t:t + side] = 1
    return features, masks


def test_label_propagation_follows_a_trackable_object():
    features, masks = moving_square_video()
    pred = evaluate.propagate_labels(features, masks[0], 2)  # labels at patch resolution: no upsampling blur
    assert torch.equal(pred, masks)
    assert evaluate.track_iou(pred, masks, 2) == 100.0
    shuffled = features[:, torch.randperm(8)][:, :, torch.randperm(8)]  # features no longer move with the object
    assert evaluate.track_iou(evaluate.propagate_labels(shuffled, masks[0], 2), masks, 2) < 50.0


def test_track_iou_counts_empty_frames_and_skips_unannotated_ones():
    target = torch.tensor([[[1, 0]], [[1, 0]], [[0, 0]], [[-1, -1]]])  # frame 3 not annotated
    pred = torch.tensor([[[1, 0]], [[1, 1]], [[0, 0]], [[1, 1]]])
    # frame 1: IoU 1/2; frame 2: object absent in both -> 1; frame 0 given, frame 3 unannotated
    assert evaluate.track_iou(pred, target, 2) == pytest.approx(100 * 0.75)


# ---------------------------------------------------------------------------------------------------------
# Features, shifts, plots, the whole run


def test_layer_features_one_pass_equals_forward_features_per_layer():
    visual = tiny_model().visual
    images = torch.randn(3, 3, 32, 32)
    grids = evaluate.layer_features(visual, images, batch_size=2)
    means = evaluate.layer_features(visual, images, batch_size=2, pooling="mean", layers=[1])
    with torch.no_grad():
        for i in range(visual.layers):
            expected = visual.forward_features(images, layer_idx=i, strip_cls_token=True)  # (3, 16, 32)
            torch.testing.assert_close(grids[i], expected.unflatten(1, (4, 4)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(means[0], visual.forward_features(images, layer_idx=1, strip_cls_token=True).mean(1),
                                   atol=1e-5, rtol=1e-5)


def test_distribution_shifts_change_the_image_deterministically():
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    image.paste((20, 20, 220), (8, 8, 24, 24))
    for name, shift in evaluate.SHIFTS.items():
        first = shift(image, torch.Generator().manual_seed(3))
        second = shift(image, torch.Generator().manual_seed(3))
        assert first.size == image.size and first.mode == "RGB", name
        assert first.tobytes() == second.tobytes(), name
        assert first.tobytes() != image.tobytes(), name


def layerwise_tasks():
    layers = [0, 1, 2, 3]
    return {"classification": evaluate.summarize_layers(layers, [20.0, 45.0, 40.0, 30.0], "top-1 %", True, "x"),
            "depth": evaluate.summarize_layers(layers, [1.2, 0.8, 0.9, 1.1], "RMSE", False, "x")}


def test_summaries_name_the_best_and_last_layer():
    tasks = layerwise_tasks()
    assert (tasks["classification"]["best_layer"], tasks["classification"]["last"]) == (1, 30.0)
    assert (tasks["depth"]["best_layer"], tasks["depth"]["best"]) == (1, 0.8)  # lower RMSE is better
    assert evaluate.normalised_scores(tasks["depth"]) == pytest.approx([0.0, 1.0, 0.75, 0.25])


def test_plots_are_written_with_a_line_per_probe(tmp_path):
    tasks = layerwise_tasks()
    path, tasks_path = evaluate.plot_layerwise(str(tmp_path), "", tasks)
    assert (path, tasks_path) == (str(tmp_path / "layerwise.png"), str(tmp_path / "layerwise_tasks.png"))
    image = Image.open(path).convert("RGB")
    assert image.size == (1000, 560)
    colours = {colour for _, colour in image.getcolors(image.width * image.height)}
    assert evaluate.COLOURS[0] in colours and evaluate.COLOURS[1] in colours  # one line colour per probe
    assert Image.open(tmp_path / "layerwise_tasks.png").size == (1040, 340)


def test_all_runs_end_to_end_on_a_tiny_model(tmp_path):
    model = tiny_model()
    checkpoint = str(tmp_path / "tiny.pt")
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, checkpoint)
    out = tmp_path / "eval"
    results = evaluate.main([
        "--all", f"--checkpoint={checkpoint}", f"--out_dir={out}", "--num_classes=4", "--num_val=2",
        "--num_probe_train=3", "--num_videos=4", "--num_video_classes=2", "--video_frames=4", "--num_frames=4",
        "--num_scenes=8", "--num_track_videos=1", "--track_frames=3", "--dense_size=32", "--batch_size=16"])
    written = json.loads((out / "results.json").read_text())  # strict JSON (NaN written as null)
    assert set(evaluate.TASKS) <= set(written)
    assert written["zero_shot"]["images"] == 8 and 0.0 <= written["zero_shot"]["top1"] <= 100.0
    assert set(written["robustness"]["shifts"]) >= set(evaluate.SHIFTS)
    assert written["retrieval"]["images"] == 8 and "R@10" in written["retrieval"]["text_to_image"]
    assert written["video_zero_shot"]["videos"] == 4
    tasks = written["layerwise"]["tasks"]
    assert set(tasks) == {"classification", "segmentation", "depth", "tracking", "detection"}
    assert all(len(t["per_layer"]) == 3 and t["best_layer"] in (0, 1, 2) for t in tasks.values())
    assert written["tracking"]["per_layer"] == tasks["tracking"]["per_layer"]
    assert "skipped" in written["vqa"]
    assert results["zero_shot"]["top1"] == written["zero_shot"]["top1"]
    markdown = (out / "results.md").read_text()
    assert "robustness average" in markdown and "| probe | metric | best layer |" in markdown
    assert (out / "layerwise.png").exists() and (out / "layerwise_tasks.png").exists()
    assert (out / "feature_maps.png").exists() and "(feature_maps.png)" in markdown


def write_public_layouts(root):
    """Tiny ImageNet-, Kinetics-, ADE20K-, NYU- and DAVIS-style folders of coloured squares."""
    import numpy as np
    import data

    def square(colour, offset):
        image = np.full((32, 32, 3), 40, np.uint8)
        image[offset:offset + 12, offset:offset + 12] = colour
        return image

    colours = {"red_ball": (220, 30, 30), "blue_box": (30, 30, 220)}
    for c, (name, colour) in enumerate(colours.items()):
        for i in range(2):
            os.makedirs(root / "imagenet" / name, exist_ok=True)
            Image.fromarray(square(colour, 4 + 8 * i)).save(root / "imagenet" / name / f"{i}.png")
            data.write_video(str(root / "kinetics" / name / f"{i}.mp4"), [square(colour, 2 + 3 * t) for t in range(4)])
    for split in ("training", "validation"):
        for i in range(3):
            os.makedirs(root / "ade" / "images" / split, exist_ok=True)
            os.makedirs(root / "ade" / "annotations" / split, exist_ok=True)
            Image.fromarray(square((200, 200, 0), 4 * i)).save(root / "ade" / "images" / split / f"{i}.jpg")
            labels = np.ones((32, 32), np.uint8)  # 1 = the backdrop class, 2 = the square, 0 = ignored border
            labels[4 * i:4 * i + 12, 4 * i:4 * i + 12] = 2
            labels[:, :2] = 0
            Image.fromarray(labels).save(root / "ade" / "annotations" / split / f"{i}.png")
    for i in range(4):
        os.makedirs(root / "nyu" / "rgb", exist_ok=True)
        os.makedirs(root / "nyu" / "depth", exist_ok=True)
        Image.fromarray(square((0, 200, 0), 3 * i)).save(root / "nyu" / "rgb" / f"{i}.png")
        np.save(root / "nyu" / "depth" / f"{i}.npy", np.full((32, 32), 1.0 + i, np.float32))
    for t in range(3):
        for folder in ("JPEGImages", "Annotations"):
            os.makedirs(root / "davis" / folder / "480p" / "seq", exist_ok=True)
        frame = Image.fromarray(square((250, 250, 250), 4 + 4 * t))
        frame.save(root / "davis" / "JPEGImages" / "480p" / "seq" / f"{t:05d}.jpg")
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + 4 * t:16 + 4 * t, 4 + 4 * t:16 + 4 * t] = 1
        Image.fromarray(mask, "L").save(root / "davis" / "Annotations" / "480p" / "seq" / f"{t:05d}.png")


def test_public_layouts_replace_the_embedded_data(tmp_path):
    write_public_layouts(tmp_path)
    model = tiny_model()
    checkpoint = str(tmp_path / "tiny.pt")
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, checkpoint)
    results = evaluate.main([
        "--zero_shot", "--video_zero_shot", "--layerwise", f"--checkpoint={checkpoint}",
        f"--out_dir={tmp_path / 'out'}",
        f"--imagenet_dir={tmp_path / 'imagenet'}", f"--kinetics_dir={tmp_path / 'kinetics'}", "--num_frames=4",
        f"--ade20k_dir={tmp_path / 'ade'}", f"--nyu_dir={tmp_path / 'nyu'}", f"--davis_dir={tmp_path / 'davis'}",
        "--dense_size=32"])
    assert results["zero_shot"]["images"] == 4 and results["zero_shot"]["classes"] == 2
    assert results["video_zero_shot"]["videos"] == 4
    tasks = results["layerwise"]["tasks"]
    assert "class folders" in tasks["classification"]["data"] and "ADE20K" in tasks["segmentation"]["data"]
    assert "NYU" in tasks["depth"]["data"] and "DAVIS" in tasks["tracking"]["data"]
    assert all(0.0 <= s <= 100.0 for s in tasks["segmentation"]["per_layer"] + tasks["tracking"]["per_layer"])
    assert all(s >= 0.0 for s in tasks["depth"]["per_layer"])


def test_defaults_follow_the_checkpoints_training_run(tmp_path):
    model = tiny_model()
    path = str(tmp_path / "trained.pt")
    train_config = {"data": "emoji", "num_classes": 7, "resolution_stages": ["0.5:32", "0.5:48"], "seed": 3}
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model),
                              "train_config": train_config}, path)
    cfg = evaluate.resolve_defaults(evaluate.EvalConfig(), model, path)
    assert (cfg.num_classes, cfg.image_size, cfg.seed) == (7, 48, 3)  # its classes, final stage, held-out split
    explicit = evaluate.resolve_defaults(evaluate.EvalConfig(num_classes=5, image_size=40), model, path)
    assert (explicit.num_classes, explicit.image_size) == (5, 40)
    plain = evaluate.resolve_defaults(evaluate.EvalConfig(), model, None)  # no training run: 100 classes, model size
    assert (plain.num_classes, plain.image_size, plain.seed) == (100, 32, 0)
    assert evaluate.dense_resolution(model.visual, 48) == 128  # raised to 16 patches of 8 px


def test_random_init_without_a_model_name_says_what_is_missing():
    with pytest.raises(SystemExit, match="--model"):
        evaluate.main(["--random_init", "--zero_shot"])


def test_a_missing_data_folder_is_named_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--kinetics_dir=.*nowhere: must be an existing file or folder"):
        evaluate.main(["--video_zero_shot", "--model=PE-Core-Nano8-64", "--random_init",
                       f"--kinetics_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "results.json").exists()


def test_vqa_is_a_plugin_loaded_only_when_it_runs_and_reports_its_numbers(tmp_path, monkeypatch):
    assert "skipped" in evaluate.run_vqa(evaluate.EvalConfig(vqa_plugin="no_such_module:f"))  # not loaded
    (tmp_path / "fake_vlm.py").write_text(
        "calls = []\n"
        "def vqa_accuracy(checkpoint_path, split='val', jsonl=None, max_samples=None, batch_size=64, device='cpu'):\n"
        "    calls.append((checkpoint_path, batch_size, device))\n"
        "    return {'accuracy': 0.5, 'num_questions': 4, 'per_kind': {'colour': 0.25}, 'examples': [\"q -> 'a'\"]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = evaluate.run_vqa(evaluate.EvalConfig(vqa_checkpoint="vlm.pt", vqa_plugin="fake_vlm:vqa_accuracy"))
    import fake_vlm

    assert fake_vlm.calls == [("vlm.pt", 64, "cpu")] and result["accuracy"] == 0.5
    markdown = evaluate.results_markdown({"vqa": result})
    assert "| colour | 0.250 |" in markdown and "- q -> 'a'" in markdown
    with pytest.raises(SystemExit, match="module:function"):
        evaluate.run_vqa(evaluate.EvalConfig(vqa_checkpoint="vlm.pt", vqa_plugin="fake_vlm"))


def test_several_checkpoints_are_evaluated_in_order_and_compared_side_by_side(tmp_path):
    paths = []
    for seed in (0, 1):  # two tiny CLIP checkpoints, and a vision-only tower (no text: zero-shot skipped)
        model = tiny_model(seed)
        paths.append(str(tmp_path / f"clip{seed}.pt"))
        pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, paths[-1])
    pe_model.export_tower(tiny_model(2).visual, str(tmp_path / "tower.pt"))
    paths.append(str(tmp_path / "tower.pt"))
    out = tmp_path / "eval"
    results = evaluate.main(["--zero_shot", "--layerwise", f"--checkpoint={','.join(paths)}", f"--out_dir={out}",
                             "--num_classes=4", "--num_val=2", "--num_probe_train=3", "--num_scenes=8",
                             "--num_track_videos=1", "--track_frames=3", "--dense_size=32", "--batch_size=16"])
    written = json.loads((out / "results.json").read_text())
    assert [run["meta"]["model"] for run in written["checkpoints"]] == paths == written["meta"]["models"]
    assert results["checkpoints"][0]["zero_shot"]["top1"] == written["checkpoints"][0]["zero_shot"]["top1"]
    assert "top1" in written["checkpoints"][1]["zero_shot"] and "skipped" in written["checkpoints"][2]["zero_shot"]
    assert all(set(run["layerwise"]["tasks"]) == {"classification", "segmentation", "depth", "tracking", "detection"}
               for run in written["checkpoints"])
    markdown = (out / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("|  | 1: "))
    assert header == "|  | " + " | ".join(f"{k + 1}: {path}" for k, path in enumerate(paths)) + " |"
    top1 = next(line for line in markdown.splitlines() if line.startswith("| top-1 % |"))
    assert top1.count("|") == 5 and top1.endswith("| skipped |")  # a column per checkpoint
    assert "| segmentation best layer |" in markdown
    assert markdown.index(f"## Evaluation: {paths[1]}") < markdown.index(f"## Evaluation: {paths[2]}")  # sections
    for k in (1, 2, 3):
        assert (out / f"layerwise_{k}.png").exists() and (out / f"layerwise_tasks_{k}.png").exists()
        assert f"(layerwise_{k}.png)" in markdown
    assert not (out / "layerwise.png").exists()
    with pytest.raises(SystemExit, match="one per checkpoint"):
        evaluate.main([f"--checkpoint={paths[0]},{paths[1]}", "--model=" + ",".join(["PE-Core-Nano8-64"] * 3),
                      "--zero_shot"])
