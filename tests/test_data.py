"""data.py: the embedded emoji set, augmentation, collate, tar/CSV/JSONL/COCO/folder readers with bad data,
composed dense labels, and video writing/reading with PyAV. Small files written to tmp_path; seeds fixed."""

import csv
import io
import json
import os
import re
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import pe_model  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# Helpers


def jpeg_bytes(colour, size=(24, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bytes(colour, size=(24, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, files):
    """files: [(member name, bytes)] in order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def good_shard(path, first_key, count):
    files = []
    for k in range(first_key, first_key + count):
        files += [(f"{k:06d}.jpg", jpeg_bytes((k * 7 % 256, 80, 160))), (f"{k:06d}.txt", f"caption {k}".encode()),
                  (f"{k:06d}.json", json.dumps({"k": k}).encode())]
    write_tar(path, files)
    return [f"{k:06d}" for k in range(first_key, first_key + count)]


def coloured_frames(count, size=(48, 64)):
    """Frame i is a flat colour encoding i (red = 12 i mod 252), with a blue marker in the top-left corner."""
    frames = []
    for i in range(count):
        frame = np.zeros((*size, 3), np.uint8)
        frame[..., 0] = (12 * i) % 252
        frame[..., 1] = 255 - (12 * i) % 252
        frame[:8, :4, 2] = 255
        frames.append(frame)
    return frames


def write_video_with(path, frames, timestamps=None, rotation=0, gop=None):
    """An .mp4 written with PyAV directly, with what data.write_video does not offer: per-frame timestamps in
    seconds (a variable frame rate), display rotation metadata (degrees counter-clockwise), a keyframe interval."""
    import av
    from fractions import Fraction

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = round((timestamps[i] if timestamps else i / 8) * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def frame_ids(video):
    """Decode the colour code of each frame of a (T, H, W, 3) video (away from the marker)."""
    return [int(round(float(frame[16:, 8:, 0].float().mean()) / 12)) for frame in video]


# ---------------------------------------------------------------------------------------------------------
# 1. Embedded default


def test_emoji_classes_are_named_single_glyphs_and_subset_is_deterministic():
    all_classes = data.emoji_classes()
    assert len(all_classes) > 1000
    subset = data.emoji_classes(30, seed=0)
    assert subset == data.emoji_classes(30, seed=0)
    assert subset != data.emoji_classes(30, seed=1)
    assert len({name for _, name in subset}) == 30
    for glyph, name in subset:
        assert len(glyph) == 1 and name == name.lower() and name
        assert (glyph, name) in all_classes
    assert ("\U0001F436", "dog face") in all_classes
    # spread over topics: the subset spans most of the code-point range
    points = sorted(ord(glyph) for glyph, _ in subset)
    all_points = sorted(ord(glyph) for glyph, _ in all_classes)
    assert points[0] < all_points[len(all_points) // 10] and points[-1] > all_points[-len(all_points) // 10]


def test_render_glyph_draws_the_emoji_and_noto_errors_clearly():
    image = data.render_glyph("\U0001F436", 48)
    assert image.mode == "RGBA" and image.size == (48, 48)
    alpha = np.asarray(image.getchannel("A"))
    assert (alpha > 0).mean() > 0.3  # the dog face fills much of the square
    rgb = np.asarray(image.convert("RGB"))[alpha > 200]
    assert rgb.std(axis=0).max() > 20  # in colour, not a flat mask
    if not data.noto_available():
        with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
            data.render_glyph("\U0001F436", 48, style="noto")


@pytest.mark.skipif(not data.noto_available(),
                    reason="Debian fonts-noto-color-emoji not installed (.ci/run installs it)")
def test_noto_design_draws_the_same_classes_differently_and_names_the_ones_it_lacks():
    noto = data.EmojiImageText("val", num_classes=100, images_per_class=2, canvas_size=48, style="noto")
    openmoji = data.EmojiImageText("val", num_classes=100, images_per_class=2, canvas_size=48)
    assert noto.class_names == openmoji.class_names and 0 < len(noto.missing_classes) < 10
    assert len(noto.present_indices()) == 2 * (100 - len(noto.missing_classes))
    assert not set(i % 100 for i in noto.present_indices()) & set(noto.missing_classes)
    label = next(c for c in range(100) if c not in noto.missing_classes)
    image, caption, got = noto[label]
    assert got == label and noto.class_names[label] in caption
    assert (image - openmoji[label][0]).abs().mean() > 0.01  # same background and placement, another drawing
    missing = noto.missing_classes[0]
    with pytest.raises(ValueError, match=re.escape(noto.class_names[missing])):
        noto[missing]


def test_embedded_items_deterministic_labels_and_captions_consistent():
    train = data.EmojiImageText("train", num_classes=10, images_per_class=3, canvas_size=32, seed=0)
    again = data.EmojiImageText("train", num_classes=10, images_per_class=3, canvas_size=32, seed=0)
    assert len(train) == 30 and train.class_names == again.class_names
    for index in (0, 7, 29):
        image, caption, label = train[index]
        image2, caption2, label2 = again[index]
        assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
        assert torch.equal(image, image2) and caption == caption2 and label == label2
        assert label == index % 10 and train.class_names[label] in caption
    assert not torch.equal(train[0][0], train[10][0])  # same class, another rendering


def test_train_and_val_renderings_differ_and_val_ignores_epoch():
    kwargs = dict(num_classes=10, images_per_class=2, canvas_size=32, seed=0)
    train, val = data.EmojiImageText("train", **kwargs), data.EmojiImageText("val", **kwargs)
    assert train.class_names == val.class_names
    for index in range(len(train)):
        assert train[index][2] == val[index][2]
        assert not torch.equal(train[index][0], val[index][0])
    first_train, first_val = train[3][0], val[3][0]
    train.set_epoch(1)
    val.set_epoch(1)
    assert not torch.equal(train[3][0], first_train)  # a fresh rendering every epoch
    assert torch.equal(val[3][0], first_val)  # held-out renderings stay fixed


def test_embedded_batches_identical_with_any_number_of_workers():
    dataset = data.EmojiImageText("train", num_classes=8, images_per_class=2, canvas_size=32, seed=3,
                                  transform=data.make_train_transform(32, data.AugmentConfig()))
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers,
                                             collate_fn=data.collate_image_text)
        batches.append(list(loader))
    for (images0, tokens0), (images2, tokens2) in zip(*batches):
        assert torch.equal(images0, images2) and torch.equal(tokens0, tokens2)


# ---------------------------------------------------------------------------------------------------------
# 2. Augmentation


def test_augmentation_shape_range_and_determinism():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    cfg = data.AugmentConfig()
    out = data.train_augment(image, 24, data.item_generator(1), cfg)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, data.train_augment(image, 24, data.item_generator(1), cfg))
    assert not torch.equal(out, data.train_augment(image, 24, data.item_generator(2), cfg))


def test_augmentation_off_is_official_preprocessing_and_flip_flips():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    off = data.AugmentConfig(crop_scale=(1.0, 1.0), brightness=0.0, saturation=0.0, hflip_prob=0.0)
    expected = pe_model.preprocess_image(image, 20)
    assert torch.equal(data.train_augment(image, 20, data.item_generator(0), off), expected)
    flip = data.AugmentConfig(crop_scale=(1.0, 1.0), brightness=0.0, saturation=0.0, hflip_prob=1.0)
    assert torch.allclose(data.train_augment(image, 20, data.item_generator(0), flip), expected.flip(-1))


def test_crop_box_respects_scale_and_ratio():
    generator = data.item_generator(5)
    for _ in range(50):
        left, top, right, bottom = data.random_resized_crop_box(200, 100, (0.25, 0.5), (0.75, 1.333), generator)
        width, height = right - left, bottom - top
        assert 0 <= left and right <= 200 and 0 <= top and bottom <= 100
        assert 0.23 <= width * height / 20000 <= 0.52 and 0.7 <= width / height <= 1.4


# ---------------------------------------------------------------------------------------------------------
# 3. Collate


def test_collate_triples_and_drops_none():
    batch = [(torch.zeros(3, 8, 8), "a dog face", 2), None, (torch.ones(3, 8, 8), "an apple", 5)]
    images, tokens = data.collate_image_text(batch)
    assert images.shape == (2, 3, 8, 8) and tokens.shape == (2, 32) and tokens.dtype == torch.long
    assert torch.equal(tokens, pe_model.tokenize(["a dog face", "an apple"], 32))
    _, _, labels = data.collate_image_text(batch, context_length=16, return_labels=True)
    assert labels.tolist() == [2, 5]
    assert data.collate_image_text([None, None]) is None


# ---------------------------------------------------------------------------------------------------------
# 4. Readers


def test_expand_braces():
    assert data.expand_braces("data/{00000..00003}.tar") == [f"data/{i:05d}.tar" for i in range(4)]
    assert data.expand_braces("s{8..11}.tar") == ["s8.tar", "s9.tar", "s10.tar", "s11.tar"]
    assert data.expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert data.expand_braces("x{a,{1..2}}y") == ["xay", "x1y", "x2y"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        data.expand_braces("data/{0..3.tar")


def test_tar_shards_skip_and_count_bad_samples(tmp_path):
    good = good_shard(tmp_path / "shard-0.tar", 0, 4)
    files = [("000100.jpg", jpeg_bytes((1, 2, 3))), ("000100.txt", b"ok 100"),
             ("000101.jpg", jpeg_bytes((9, 9, 9))[:60]), ("000101.txt", b"corrupt image"),  # truncated JPEG
             ("000102.jpg", jpeg_bytes((5, 5, 5))),  # no caption
             ("000103.png", png_bytes((7, 7, 7))), ("000103.txt", b"ok 103")]
    write_tar(tmp_path / "shard-1.tar", files)
    good += ["000100", "000103"]
    good_shard(tmp_path / "shard-2.tar", 200, 3)
    whole = (tmp_path / "shard-2.tar").read_bytes()
    (tmp_path / "shard-2.tar").write_bytes(whole[: len(whole) // 3])  # malformed: cut short
    (tmp_path / "shard-3.tar").write_bytes(b"")  # empty
    dataset = data.TarShards(str(tmp_path / "shard-{0..3}.tar"), image_size=16)
    items = list(dataset)
    keys = [key for _, _, key in items]
    for image, caption, key in items:
        assert image.shape == (3, 16, 16) and caption
    # every good sample once; of the cut shard every sample whose files lie wholly before the cut (here the cut
    # falls in the padding after 000201's last file), not the one it split
    assert len(keys) == len(set(keys)) and set(good) <= set(keys)
    assert set(keys) - set(good) == {"000200", "000201"}
    bad = dataset.bad
    assert bad.counts == {"bad_image": 1, "missing_caption": 1, "malformed_tar": 1, "empty_shard": 1}
    assert bad.keys["bad_image"] == ["shard-1.tar/000101"] and bad.keys["missing_caption"] == ["shard-1.tar/000102"]
    assert bad.keys["malformed_tar"][0].startswith("shard-2.tar") and bad.keys["empty_shard"] == ["shard-3.tar"]
    report = bad.report()
    assert "000101" in report and "000102" in report and "shard-2.tar" in report and "shard-3.tar" in report


def test_tar_shards_split_across_ranks_and_workers_without_duplicates(tmp_path):
    expected = []
    for s in range(6):
        expected += good_shard(tmp_path / f"{s:05d}.tar", 100 * s, 3)
    pattern = str(tmp_path / "{00000..00005}.tar")
    seen = []
    for rank in range(2):
        dataset = data.TarShards(pattern, image_size=8, rank=rank, world_size=2, seed=1, epoch=4)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        seen += [key for _, _, key in loader]
    assert sorted(seen) == sorted(expected)  # full coverage, nothing twice
    reader_shards = [data.TarShards(pattern, rank=r, world_size=2).reader_shards(worker_id=w, num_workers=2)
                     for r in range(2) for w in range(2)]
    assert sorted(sum(reader_shards, [])) == sorted(data.expand_braces(pattern))


def test_tar_shards_shuffle_buffer_is_deterministic_and_complete(tmp_path):
    keys = good_shard(tmp_path / "0.tar", 0, 12)
    make = lambda: data.TarShards(str(tmp_path / "0.tar"), image_size=8, shuffle_buffer=5, seed=2)
    order = [key for _, _, key in make()]
    assert sorted(order) == keys and order != keys
    assert order == [key for _, _, key in make()]
    assert [key for _, _, key in data.TarShards(str(tmp_path / "0.tar"), image_size=8)] == keys  # no buffer: in order


def test_caption_file_csv_and_jsonl(tmp_path):
    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "red.png")
    Image.new("RGB", (20, 10), (10, 10, 200)).save(tmp_path / "blue.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows([["red.png", "a red square"], ["blue.jpg", "a blue square"], ["broken.jpg", "broken"],
                          ["red.png", ""]])
    dataset = data.CaptionFile(str(tmp_path / "captions.csv"), image_size=8)
    assert len(dataset) == 3 and dataset.bad.counts == {"missing_caption": 1}
    image, caption, path = dataset[0]
    assert image.shape == (3, 8, 8) and caption == "a red square" and path == "red.png"
    assert image[0].mean() > 0.5 and image[2].mean() < -0.5
    assert dataset[2] is None and dataset.bad.counts["bad_image"] == 1
    images, tokens = data.collate_image_text([dataset[i] for i in range(3)])
    assert images.shape[0] == 2
    lines = [json.dumps({"path": "blue.jpg", "caption": "a blue square"}), "{not json", json.dumps({"path": "red.png"})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = data.CaptionFile(str(tmp_path / "captions.jsonl"), image_size=8)
    assert len(jsonl) == 1 and jsonl[0][1] == "a blue square"
    assert jsonl.bad.counts == {"malformed_row": 1, "missing_caption": 1}
    (tmp_path / "bad_header.csv").write_text("file,text\nred.png,x\n")
    with pytest.raises(ValueError, match="bad_header.csv.*path,caption"):
        data.CaptionFile(str(tmp_path / "bad_header.csv"))


def test_coco_captions_one_item_per_image_and_caption_per_epoch(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.new("RGB", (16, 16), (40, 90, 140)).save(tmp_path / name)
    captions = [f"caption {i}" for i in range(5)]
    annotations = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                              {"id": 3, "file_name": "3.jpg"}],
                   "annotations": [{"id": i, "image_id": 1, "caption": c} for i, c in enumerate(captions)]
                   + [{"id": 10, "image_id": 2, "caption": "only one"}, {"id": 11, "image_id": 99, "caption": "x"}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    dataset = data.CocoCaptions(str(tmp_path / "captions.json"), str(tmp_path), image_size=8, seed=0)
    assert len(dataset) == 2 and dataset.captions[0] == captions and dataset.image_ids == [1, 2]
    assert dataset.bad.counts == {"unknown_image_id": 1, "missing_caption": 1}
    picks = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        picks.append(dataset[0][1])
        assert dataset[0][1] == picks[-1]  # one caption per (epoch, item)
    assert set(picks) <= set(captions) and len(set(picks)) > 1
    evaluation = data.CocoCaptions(str(tmp_path / "captions.json"), str(tmp_path), image_size=8, train=False)
    assert evaluation[0][1] == captions[0]


def test_class_folder(tmp_path):
    for folder, colour in (("golden_retriever", (200, 160, 60)), ("tabby_cat", (90, 90, 90))):
        os.makedirs(tmp_path / folder)
        for i in range(2):
            Image.new("RGB", (12, 12), colour).save(tmp_path / folder / f"{i}.jpg")
    (tmp_path / "tabby_cat" / "2.jpg").write_bytes(b"\xff\xd8 broken")
    dataset = data.ClassFolder(str(tmp_path), image_size=8)
    assert dataset.class_names == ["golden retriever", "tabby cat"] and len(dataset) == 5
    image, caption, label = dataset[0]
    assert label == 0 and "golden retriever" in caption and image.shape == (3, 8, 8)
    assert dataset[4] is None and dataset.bad.counts == {"bad_image": 1}


def test_bad_samples_merge_collect_and_report(tmp_path):
    first = data.BadSamples("x", max_keys=2, report_dir=str(tmp_path))
    for key in ("a", "b", "c"):
        first.add("bad_image", key)
    second = data.BadSamples("x", max_keys=2, report_dir=str(tmp_path))
    second.add("missing_caption", "d")
    merged = data.BadSamples.collect(str(tmp_path), "x", max_keys=2)
    assert merged.counts == {"bad_image": 3, "missing_caption": 1} and merged.keys["bad_image"] == ["a", "b"]
    assert "bad_image 3" in merged.report() and "missing_caption 1" in merged.report()
    assert data.BadSamples().report().endswith("no bad samples")


# ---------------------------------------------------------------------------------------------------------
# 5. Composed dense labels


def test_composed_scene_masks_semantic_and_depth_consistent():
    for seed in range(4):
        scene = data.compose_scene(seed, size=64, num_objects=(3, 5))
        masks, semantic, depth, labels = scene["instance_masks"], scene["semantic"], scene["depth"], scene["labels"]
        assert scene["image"].size == (64, 64) and masks.dtype == torch.bool
        assert masks.shape[0] == labels.shape[0] >= 1 and masks.shape[1:] == (64, 64)
        assert (masks.sum(0) <= 1).all()  # instances do not overlap
        assert torch.equal(masks.any(0), semantic > 0)  # and cover exactly the labelled pixels
        for k in range(len(labels)):
            assert masks[k].any()
            assert (semantic[masks[k]] == labels[k] + 1).all()
            assert torch.allclose(depth[masks[k]], scene["object_depths"][k].expand(int(masks[k].sum())))
        # pasted later = nearer: depths strictly decrease in paste order; the background is farthest
        assert (scene["object_depths"][1:] < scene["object_depths"][:-1]).all()
        assert (depth[semantic == 0] > scene["object_depths"].max()).all()
    first, again = (data.compose_scene(2, size=64, num_objects=(3, 5)) for _ in range(2))
    assert np.array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    assert torch.equal(first["depth"], again["depth"]) and torch.equal(first["semantic"], again["semantic"])
    assert not torch.equal(first["semantic"], data.compose_scene(3, size=64, num_objects=(3, 5))["semantic"])


def test_composed_scene_image_matches_masks():
    """The pixels of an instance are the emoji's, not the background's: masks are pasted with binary alpha."""
    scene = data.compose_scene(7, size=64, num_objects=(2, 2))
    image = np.asarray(scene["image"]).astype(int)
    background = data.random_background(64, data.item_generator("scene", 7))
    inside = scene["semantic"].numpy() > 0
    changed = np.abs(image - np.asarray(background).astype(int)).sum(-1) > 0
    assert changed[~inside].sum() == 0  # nothing outside the masks was touched


def test_composed_scenes_dataset():
    dataset = data.ComposedScenes(num_scenes=3, size=32, seed=1, num_classes=6)
    items = [dataset[i] for i in range(3)]
    images, semantic = torch.stack([item["image"] for item in items]), torch.stack([item["semantic"] for item in items])
    assert images.shape == (3, 3, 32, 32) and semantic.shape == (3, 32, 32)
    assert semantic.max() <= 6 and len(dataset.class_names) == 6
    assert all(item["instance_masks"].shape[0] == item["labels"].shape[0] for item in items)


def test_composed_video_motion_and_masks():
    def centroid_and_area(mask):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        return xs.float().mean().item(), ys.float().mean().item(), len(xs)

    right = data.compose_video(0, num_frames=6, size=64, motion="moving right", num_distractors=(0, 0))
    assert len(right["frames"]) == 6 and right["masks"].shape == (6, 64, 64)
    assert "moving right" in right["caption"] and right["names"][0] in right["caption"]
    xs = [centroid_and_area(right["masks"][t] == 1)[0] for t in range(6)]
    assert all(b > a for a, b in zip(xs, xs[1:]))
    zoom = data.compose_video(1, num_frames=5, size=64, motion="zooming in", num_distractors=(0, 0))
    areas = [centroid_and_area(zoom["masks"][t] == 1)[2] for t in range(5)]
    assert all(b > a for a, b in zip(areas, areas[1:]))
    busy = data.compose_video(2, num_frames=4, size=64, num_distractors=(2, 2))
    assert busy["labels"].shape == (3,) and busy["masks"].max() <= 3 and busy["motion"] in data.MOTIONS


# ---------------------------------------------------------------------------------------------------------
# 6. Video


@pytest.mark.parametrize("extension", [".mp4", ".webm"])
def test_write_then_read_video_samples_uniform_indices(tmp_path, extension):
    path = str(tmp_path / f"twenty{extension}")
    data.write_video(path, coloured_frames(20), fps=8)
    video, indices = data.read_video(path, num_frames=8, return_indices=True)
    assert video.shape == (8, 48, 64, 3) and video.dtype == torch.uint8
    assert indices == [0, 2, 5, 7, 10, 12, 15, 17] == pe_model.sample_frame_indices(20, 8)
    assert frame_ids(video) == indices


def test_read_video_shorter_than_t_repeats_frames(tmp_path):
    path = str(tmp_path / "five.mp4")
    data.write_video(path, coloured_frames(5))
    assert frame_ids(data.read_video(path, num_frames=8)) == [0, 0, 1, 1, 2, 3, 3, 4]


def test_read_video_variable_frame_rate_samples_by_frame_not_time(tmp_path):
    path = str(tmp_path / "vfr.mp4")
    times = [0.0, 0.1, 0.15, 0.5, 0.55, 0.6, 1.2, 1.3, 1.31, 2.0]
    write_video_with(path, coloured_frames(10), timestamps=times)
    assert frame_ids(data.read_video(path, num_frames=5)) == [0, 2, 4, 6, 8]
    assert frame_ids(data.read_video(path, num_frames=20)) == [i // 2 for i in range(20)]  # 10 frames counted


class CountingContainer:
    """Wraps a PyAV container and counts the frames its decode() yields."""

    decoded = 0

    def __init__(self, container):
        self._container = container

    def __getattr__(self, name):
        return getattr(self._container, name)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            CountingContainer.decoded += 1
            yield frame


def test_read_video_seeks_rather_than_decoding_everything(tmp_path, monkeypatch):
    path = str(tmp_path / "long.mp4")
    write_video_with(path, coloured_frames(21) * 6, gop=10)  # 126 frames, colour code repeats every 21
    import av

    with av.open(path) as container:
        assert sum(packet.is_keyframe for packet in container.demux(video=0)) > 10

    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: CountingContainer(real_open(*args, **kwargs)))
    video, indices = data.read_video(path, num_frames=8, return_indices=True)
    assert frame_ids(video) == [i % 21 for i in indices]
    assert CountingContainer.decoded <= 8 * 10  # at most a GOP per wanted frame, not all 126


def test_read_video_applies_rotation(tmp_path):
    rotated = str(tmp_path / "rotated.mp4")
    write_video_with(rotated, coloured_frames(3), rotation=90)  # display: 90 degrees counter-clockwise
    upright = data.read_video(rotated, num_frames=1)[0]
    assert upright.shape == (64, 48, 3)
    assert upright[-4:, :8, 2].float().mean() > 200 and upright[:4, :8, 2].float().mean() < 50  # marker moved


def test_unreadable_videos_raise_video_error_naming_the_file(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4000))
    data.write_video(str(tmp_path / "whole.webm"), coloured_frames(20))
    whole = (tmp_path / "whole.webm").read_bytes()
    (tmp_path / "truncated.webm").write_bytes(whole[: len(whole) // 2])
    for name in ("zero.mp4", "corrupt.mp4", "truncated.webm"):
        with pytest.raises(data.VideoError, match=name):
            data.read_video(str(tmp_path / name), num_frames=4)


def test_video_folder_skips_and_counts_bad_videos(tmp_path):
    for folder in ("waving", "jumping"):
        os.makedirs(tmp_path / folder)
        data.write_video(str(tmp_path / folder / "good.mp4"), coloured_frames(6, size=(16, 16)))
    (tmp_path / "waving" / "zero.mp4").write_bytes(b"")
    (tmp_path / "jumping" / "corrupt.mp4").write_bytes(os.urandom(3000))
    dataset = data.VideoFolder(str(tmp_path), num_frames=4, image_size=8)
    assert dataset.class_names == ["jumping", "waving"] and len(dataset) == 4
    items = [dataset[i] for i in range(len(dataset))]
    good = [item for item in items if item is not None]
    assert len(good) == 2 and good[0][0].shape == (4, 3, 8, 8) and "jumping" in good[0][1]
    assert dataset.bad.counts == {"bad_video": 2}
    assert sorted(dataset.bad.keys["bad_video"]) == ["jumping/corrupt.mp4", "waving/zero.mp4"]
    videos, tokens, labels = data.collate_image_text(items, return_labels=True)
    assert videos.shape == (2, 4, 3, 8, 8) and labels.tolist() == [0, 1]


def test_embedded_videos_are_real_files_with_labels(tmp_path):
    items = data.make_embedded_videos(str(tmp_path), num_videos=3, num_frames=4, size=32, seed=0, num_classes=2)
    assert [label["motion"] for _, label, _ in items] == list(data.MOTIONS[:3])
    for path, label, caption in items:
        assert os.path.getsize(path) > 0 and label["class_name"] in caption and label["motion"] in caption
        assert data.read_video(path, num_frames=4).shape == (4, 32, 32, 3)
    stamp = os.path.getmtime(items[0][0])
    assert data.make_embedded_videos(str(tmp_path), num_videos=3, num_frames=4, size=32, seed=0, num_classes=2) == items
    assert os.path.getmtime(items[0][0]) == stamp  # kept, not re-encoded
    clips = data.VideoList(items, num_frames=4, image_size=16, label_key="motion_id")
    clip, caption, label = clips[2]
    assert clip.shape == (4, 3, 16, 16) and label == 2


def test_embedded_video_subjects_are_classes_the_core_was_trained_on(tmp_path):
    pool = data.emoji_classes(100)  # train_clip.py's default classes
    subjects = data.embedded_video_classes(10, class_pool=100)
    assert subjects == [pool[10 * k] for k in range(10)]  # spread evenly over the pool (and its topics)
    items = data.make_embedded_videos(str(tmp_path), num_videos=16, num_frames=2, size=16, num_classes=2,
                                      class_pool=100)
    assert {label["class_name"] for _, label, _ in items} == {pool[0][1], pool[50][1]}
    assert data.embedded_video_classes(10, class_pool=5) == data.emoji_classes(10)  # a pool too small for 10
    with pytest.raises(ValueError, match="pool of 5"):
        data.emoji_class_subset(10, pool=5)


def test_tar_shards_read_video_samples(tmp_path):
    data.write_video(str(tmp_path / "clip.mp4"), coloured_frames(8, size=(16, 16)))
    write_tar(tmp_path / "v.tar", [("a.mp4", (tmp_path / "clip.mp4").read_bytes()), ("a.txt", b"a clip"),
                                   ("a.json", b'{"frames": 8}'), ("b.mp4", b"garbage"), ("b.txt", b"bad clip")])
    dataset = data.TarShards(str(tmp_path / "v.tar"), media="video", num_frames=4, image_size=8)
    items = list(dataset)
    assert len(items) == 1 and items[0][0].shape == (4, 3, 8, 8) and items[0][2] == "a"
    assert dataset.bad.counts == {"bad_video": 1}


# ---------------------------------------------------------------------------------------------------------
# Public dense layouts


def test_public_dense_layouts(tmp_path):
    ade = tmp_path / "ade"
    os.makedirs(ade / "images" / "validation")
    os.makedirs(ade / "annotations" / "validation")
    Image.new("RGB", (20, 10), (1, 2, 3)).save(ade / "images" / "validation" / "a.jpg")
    mask = np.zeros((10, 20), np.uint8)
    mask[:, 10:] = 7
    Image.fromarray(mask).save(ade / "annotations" / "validation" / "a.png")
    Image.new("RGB", (20, 10)).save(ade / "images" / "validation" / "unlabelled.jpg")
    segmentation = data.SegmentationFolder(str(ade), split="validation", image_size=8)
    image, labels = segmentation[0]
    assert len(segmentation) == 1 and segmentation.bad.counts == {"missing_mask": 1}
    assert image.shape == (3, 8, 8) and labels[:, :4].eq(0).all() and labels[:, 4:].eq(7).all()

    nyu = tmp_path / "nyu"
    os.makedirs(nyu / "rgb")
    os.makedirs(nyu / "depth")
    Image.new("RGB", (16, 16)).save(nyu / "rgb" / "0.png")
    Image.fromarray(np.full((16, 16), 2500, np.uint16)).save(nyu / "depth" / "0.png")
    depth_pairs = data.DepthPairs(str(nyu), image_size=8)
    _, depth, valid = depth_pairs[0]
    assert depth.shape == (8, 8) and torch.allclose(depth, torch.full((8, 8), 2.5)) and valid.all()

    davis = tmp_path / "davis"
    os.makedirs(davis / "JPEGImages" / "480p" / "bear")
    os.makedirs(davis / "Annotations" / "480p" / "bear")
    for t in range(3):
        Image.new("RGB", (16, 12), (t * 50, 0, 0)).save(davis / "JPEGImages" / "480p" / "bear" / f"{t:05d}.jpg")
    ids = np.zeros((12, 16), np.uint8)
    ids[4:8, 4:8] = 2  # object 2 in a 4x4 square
    palette_mask = Image.frombytes("P", (16, 12), ids.tobytes())
    palette_mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)  # DAVIS-style indexed colours
    palette_mask.save(davis / "Annotations" / "480p" / "bear" / "00000.png")
    sequence = data.DavisFolder(str(davis))[0]
    assert sequence["name"] == "bear" and sequence["frames"].shape == (3, 3, 12, 16)
    assert sequence["masks"][0].max() == 2 and (sequence["masks"][1] == -1).all() and sequence["num_objects"] == 2


def test_epoch_stream_resumes_exactly_and_passes_over_bad_batches():
    def make_loader(epoch, skip):  # epoch e: batches [e*10 + i]; batch 2 of every epoch is bad (None)
        return [None if i == 2 else epoch * 10 + i for i in range(skip, 4)], True

    stream = data.epochs(lambda epoch: None, make_loader, (0, 0))
    whole = [next(stream) for _ in range(7)]
    assert [b for b, _ in whole] == [0, 1, 3, 10, 11, 13, 20]
    assert [p for _, p in whole][:4] == [(0, 1), (0, 2), (0, 4), (1, 1)]
    resumed = data.epochs(lambda epoch: None, make_loader, whole[3][1])
    assert [next(resumed) for _ in range(3)] == whole[4:7]
    with pytest.raises(SystemExit, match="no usable sample"):
        next(data.epochs(lambda epoch: None, lambda e, s: ([None, None], True), (0, 0), name="shards"))
