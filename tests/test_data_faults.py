"""data.py against damaged and unusual input, as users' data and machines produce it: a shard set with every kind
of damage read over two epochs (exact keys, exact distinct counts per reason), caption files and COCO JSON,
16-bit and EXIF-rotated images, large images. Small files written to tmp_path."""

import gzip
import io
import json
import logging
import os
import struct
import sys
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402


def image_bytes(colour=(200, 40, 40), size=(24, 16), fmt="JPEG", mode="RGB", **save):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_claiming(width, height):
    """A 1x1 PNG whose header claims width x height (what Pillow checks before decoding)."""
    raw = bytearray(image_bytes((1, 2, 3), (1, 1), "PNG"))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def tar_bytes(files, compress=False):
    """files: [(name, bytes)] or [(name, None, link target)] in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload, *link in files:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link[0]
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(buffer.getvalue()) if compress else buffer.getvalue()


def member_offsets(raw):
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {member.name: (member.offset, member.offset_data) for member in tar.getmembers()}


def pair(key, image=None, caption=None):
    return [(f"{key}.jpg", image if image is not None else image_bytes()), (f"{key}.txt", caption or key.encode())]


def build_shards(root):
    """The damaged shard set -> (pattern, the keys it must yield, the distinct bad samples it must count)."""
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    sixteen = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(sixteen, format="PNG")
    cmyk = image_bytes((0, 200, 200, 0), mode="CMYK")
    mixed = (pair("good0") + pair("cmyk", cmyk) + [("palette.png", buffer.getvalue()), ("palette.txt", b"palette")]
             + [("grey16.png", sixteen.getvalue()), ("grey16.txt", b"16 bit")]
             + pair("truncated", image_bytes()[:80]) + pair("zero", b"") + pair("random", os.urandom(500))
             + [("bomb.png", png_claiming(20000, 20000)), ("bomb.txt", b"bomb")]
             + [("huge.png", png_claiming(12000, 12000)), ("huge.txt", b"huge")]
             + [("nocaption.jpg", image_bytes())] + [("noimage.txt", b"alone")]
             + pair("latin", caption="caf\xe9".encode("latin-1"))
             + [("alias.jpg", None, "good0.jpg")] + pair("good1"))
    (root / "s00.tar").write_bytes(tar_bytes(mixed))
    cut = tar_bytes(pair("a0") + pair("a1") + pair("a2"))
    (root / "s01.tar").write_bytes(cut[: member_offsets(cut)["a2.jpg"][1] + 10])  # inside a2.jpg's data
    boundary = tar_bytes(pair("b0") + pair("b1") + pair("b2"))
    (root / "s02.tar").write_bytes(boundary[: member_offsets(boundary)["b2.jpg"][0]])  # before b2's header
    (root / "s03.tar").write_bytes(tar_bytes([("u0.jpg", image_bytes()), ("u1.jpg", image_bytes()),
                                              ("u0.txt", b"u0"), ("u1.txt", b"u1")]))  # tar cf x.tar *.jpg *.txt
    (root / "s04.tar").write_bytes(b"")
    # s05.tar: missing
    (root / "s06.tar").write_bytes(os.urandom(3000))
    (root / "s07.tar").write_bytes(tar_bytes(pair("gz0") + pair("gz1"), compress=True))
    (root / "s08.tar").write_bytes(tar_bytes([]))
    keys = ["good0", "cmyk", "palette", "grey16", "good1", "a0", "a1", "b0", "b1", "gz0", "gz1"]
    bad = {"bad_image": {f"s00.tar/{k}" for k in ("truncated", "zero", "random", "bomb", "huge")},
           "missing_caption": {"s00.tar/nocaption", "s03.tar/u0", "s03.tar/u1"},
           "missing_image": {"s00.tar/noimage", "s03.tar/u0", "s03.tar/u1"},
           "bad_caption": {"s00.tar/latin"}, "not_a_file": {"s00.tar/alias.jpg"},
           "malformed_tar": {"s01.tar", "s02.tar", "s06.tar"}, "empty_shard": {"s04.tar", "s08.tar"},
           "missing_shard": {"s05.tar"}}
    return str(root / "s{00..08}.tar"), sorted(keys), bad


def test_damaged_shards_over_two_epochs_keep_every_good_sample_and_count_each_bad_one_once(tmp_path, caplog):
    pattern, keys, bad = build_shards(tmp_path)
    dataset = data.TarShards(pattern, image_size=8, shuffle_buffer=3)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        with caplog.at_level(logging.WARNING, logger="data"):
            caplog.clear()
            items = list(dataset)
        assert sorted(key for _, _, key in items) == keys
        assert all(image.shape == (3, 8, 8) and torch.isfinite(image).all() for image, _, _ in items)
        assert sum("not adjacent" in record.getMessage() for record in caplog.records) == 1  # once per shard
    assert {reason: set(found) for reason, found in dataset.bad.seen.items()} == bad
    assert dataset.bad.counts == {reason: len(found) for reason, found in bad.items()}
    total = sum(len(found) for found in bad.values())
    assert dataset.bad.per_epoch() == {0: total, 1: total} and dataset.bad.total() == total
    assert f"skipped {total} distinct bad samples (epoch 0 {total}, epoch 1 {total})" in dataset.bad.report()
    grey = next(image for image, _, key in items if key == "grey16")
    assert torch.allclose(grey, torch.full_like(grey, round(40000 / 257) / 255 * 2 - 1), atol=1e-6)  # not white


def test_bad_sample_reports_are_distinct_across_workers_and_epochs_and_reset_per_run(tmp_path):
    pattern, keys, bad = build_shards(tmp_path)
    report_dir = str(tmp_path / "bad_samples")
    total = sum(len(found) for found in bad.values())

    def run(epochs):
        dataset = data.TarShards(pattern, image_size=8, bad_report_dir=report_dir)
        for epoch in epochs:
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
            assert sorted(key for _, _, key in loader) == keys
        return data.BadSamples.collect(report_dir)

    first = run(range(2))  # each epoch deals the shards to the workers anew: the same samples, other workers
    assert first.counts == {reason: len(found) for reason, found in bad.items()}
    assert first.per_epoch() == {0: total, 1: total}
    resumed = run([1, 2])  # a resumed run continues its counts: epoch 1 again counts once
    assert resumed.total() == total and resumed.per_epoch() == {0: total, 1: total, 2: total}
    data.BadSamples.reset(report_dir)  # a fresh run into the same folder
    assert data.BadSamples.collect(report_dir).total() == 0
    assert run([0]).per_epoch() == {0: total}


def test_caption_files_with_a_bom_latin_1_text_and_captions_that_are_not_text(tmp_path):
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "a.png")
    (tmp_path / "bom.csv").write_bytes("path,caption\r\na.png,a grey square\r\n".encode("utf-8-sig"))
    dataset = data.CaptionFile(str(tmp_path / "bom.csv"), image_size=8)
    assert len(dataset) == 1 and dataset[0][1] == "a grey square"
    (tmp_path / "latin.csv").write_bytes("path,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv:2: not UTF-8"):
        data.CaptionFile(str(tmp_path / "latin.csv"))
    rows = [{"path": "a.png", "caption": "fine"}, {"path": "a.png", "caption": 5}, {"path": "a.png", "caption": ["a"]},
            {"path": "a.png"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = data.CaptionFile(str(tmp_path / "rows.jsonl"), image_size=8)
    assert len(dataset) == 1 and dataset.bad.counts == {"bad_caption": 2, "missing_caption": 1}
    assert dataset.bad.keys["bad_caption"] == ["rows.jsonl:2", "rows.jsonl:3"]


def test_coco_json_cut_off_or_with_captions_that_are_not_text(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    coco = {"images": [{"id": 1, "file_name": "1.png"}],
            "annotations": [{"id": 0, "image_id": 1, "caption": "ok"}, {"id": 1, "image_id": 1, "caption": 7},
                            {"id": 2, "image_id": 1, "caption": ["x"]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    dataset = data.CocoCaptions(str(tmp_path / "coco.json"), str(tmp_path), image_size=8)
    assert dataset.captions == [["ok"]] and dataset.bad.counts == {"bad_caption": 2}
    (tmp_path / "cut.json").write_text(json.dumps(coco)[:40])
    with pytest.raises(ValueError, match=r"cut\.json: not valid JSON"):
        data.CocoCaptions(str(tmp_path / "cut.json"), str(tmp_path))


def test_16_bit_png_is_scaled_and_exif_orientation_is_applied(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 30000]], np.uint16).repeat(2, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    grey = np.asarray(data.load_image(buffer.getvalue()))
    assert grey.shape == (2, 4, 3) and grey[0, :, 0].tolist() == [0, 100, 255, round(30000 / 257)]
    left_red = np.zeros((16, 32, 3), np.uint8)
    left_red[:, :16, 0] = 255
    left_red[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise, as a phone held upright writes it
    buffer = io.BytesIO()
    Image.fromarray(left_red).save(buffer, format="JPEG", exif=exif, quality=95)
    upright = np.asarray(data.load_image(buffer.getvalue())).astype(int)
    assert upright.shape == (32, 16, 3)  # portrait, as shown
    assert upright[:12, :, 0].mean() > 200 and upright[-12:, :, 2].mean() > 200  # the left half is now on top


def test_large_images_decode_at_the_size_training_needs_or_are_refused(tmp_path):
    photo = image_bytes((10, 120, 200), (2048, 1536), quality=50)
    side = data._decode_side(data.make_train_transform(64))
    assert side == 227  # 64 / sqrt(0.08): the smallest random crop still gets 64 pixels across
    assert data.load_image(photo, side).size == (512, 384)  # JPEG decoded at 1/4 scale, shorter side >= 227
    assert data.load_image(photo, data._decode_side(data.make_eval_transform(64))).size == (256, 192)
    assert data.load_image(photo).size == (2048, 1536)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        data.load_image(png_claiming(12000, 12000))  # refused from its header, before any decoding
    dataset = data.TarShards(str(tmp_path / "big.tar"), image_size=16)
    (tmp_path / "big.tar").write_bytes(tar_bytes(pair("photo", photo) + [("huge.png", png_claiming(12000, 12000)),
                                                                        ("huge.txt", b"huge")]))
    assert [key for _, _, key in dataset] == ["photo"] and dataset.bad.counts == {"bad_image": 1}
