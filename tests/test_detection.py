"""evaluate.py's detection probe (box AP on hand-computed cases, the CenterNet-style targets and decoding, COCO
instances) and --feature_maps (the principal-component colours on a case with a known answer, the PNG)."""

import json
import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import pe_model  # noqa: E402


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(-1, 4)


def test_box_ap_is_one_for_perfect_boxes_whatever_the_scores():
    truths = [boxes([0, 0, 10, 10], [20, 20, 40, 30]), boxes([5, 5, 9, 9])]
    detections = [(truths[0].clone(), torch.tensor([0.2, 0.9])), (truths[1].clone(), torch.tensor([0.5]))]
    assert evaluate.box_ap(detections, truths) == pytest.approx(1.0)
    assert evaluate.box_ap([(boxes(), torch.zeros(0)), (boxes(), torch.zeros(0))], truths) == 0.0  # none found


def test_box_ap_with_one_of_two_boxes_at_iou_exactly_six_tenths():
    truths = [boxes([0, 0, 10, 10], [20, 0, 30, 10])]
    # the first found exactly (ranked first); the second at IoU 60/100: a hit at 0.50, 0.55, 0.60 only
    detections = [(boxes([0, 0, 10, 10], [20, 0, 30, 6]), torch.tensor([0.9, 0.8]))]
    assert evaluate.box_iou(detections[0][0][1:], truths[0][1:]).item() == 0.6
    # 3 thresholds at AP 1; 7 where recall stops at 1/2 with precision 1: 51 of the 101 recall points
    assert evaluate.box_ap(detections, truths) == pytest.approx((3 + 7 * 51 / 101) / 10)


def test_box_ap_counts_a_duplicate_ranked_between_two_hits():
    truths = [boxes([0, 0, 10, 10], [20, 0, 30, 10])]
    detections = [(boxes([0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10]), torch.tensor([0.9, 0.8, 0.7]))]
    # precision 1 at recall 1/2 (51 points), then 2/3 up to recall 1 (50 points), at every threshold
    assert evaluate.box_ap(detections, truths) == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert evaluate.box_ap(detections, truths) == pytest.approx(0.8350, abs=1e-4)


def test_mask_boxes_are_pixel_edges():
    masks = torch.zeros(2, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 0, 0] = True
    assert evaluate.mask_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 0, 1, 1]]


def test_targets_decode_back_to_the_boxes():
    size, grid = (64, 64), (8, 8)  # 8 px patches; both centres on a patch centre
    truth = boxes([4, 4, 20, 20], [32, 28, 56, 60])
    heat, box, near = evaluate.detection_targets(truth, grid, size)
    assert heat[1, 1] == heat[5, 5] == 1.0 and near.sum() == 18  # two disjoint 3x3 neighbourhoods
    assert box[1, 2].tolist() == pytest.approx([-1.0, 0.0, 0.6931, 0.6931], abs=1e-4)  # centre a patch left
    found, scores = evaluate.decode_boxes(heat, box, size)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True) and scores[:2].tolist() == [1.0, 1.0]
    torch.testing.assert_close(found[:2].sort(dim=0).values, truth.sort(dim=0).values)
    assert evaluate.box_ap([(found, scores)], [truth]) == pytest.approx(1.0)


def test_the_head_reads_boxes_from_features_that_encode_them_and_not_from_noise():
    generator = torch.Generator().manual_seed(0)
    size, grid, truths = (64, 64), (8, 8), []
    for _ in range(40):  # 1-2 boxes per image, 12-24 px sides, one in the top left, one in the bottom right
        count = 1 + int(torch.randint(0, 2, (), generator=generator))
        corner = torch.tensor([[0.0, 0.0], [36.0, 36.0]])[:count] + 4 * torch.rand(count, 2, generator=generator)
        truths.append(torch.cat([corner, corner + 12 + 12 * torch.rand(count, 2, generator=generator)], dim=1))
    targets = [evaluate.detection_targets(t, grid, size) for t in truths]
    # features: the heat target, the box target on the patches near a centre (else 0), and noise
    noise = [0.01 * torch.randn(*grid, 3, generator=generator) for _ in targets]
    features = torch.stack([torch.cat([h[..., None], b * n[..., None], e], dim=-1)
                            for (h, b, n), e in zip(targets, noise)])
    ap = evaluate.detection_probe(features[:30], truths[:30], features[30:], truths[30:], size)
    assert ap > 90.0
    noise = torch.randn_like(features)
    assert evaluate.detection_probe(noise[:30], truths[:30], noise[30:], truths[30:], size) < 20.0


def test_coco_instances_scale_boxes_and_skip_crowds_and_bad_entries(tmp_path):
    Image.new("RGB", (40, 20), (200, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("not an image")
    annotations = [{"image_id": 1, "bbox": [4, 2, 20, 10], "iscrowd": 0},
                   {"image_id": 1, "bbox": [0, 0, 40, 20], "iscrowd": 1}, {"image_id": 1, "bbox": [0, 0, 0, 5]}]
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}], "annotations": annotations}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    images, found, skipped = evaluate.coco_instances(str(tmp_path / "instances.json"), str(tmp_path), 32)
    assert images.shape == (1, 3, 32, 32) and skipped == "2 crowd or empty boxes, 1 unreadable images"
    assert found[0].tolist() == [pytest.approx([3.2, 3.2, 19.2, 19.2])]  # x by 32/40, y by 32/20
    for bad in ({}, {"images": [{"id": 1}], "annotations": []}, {**coco, "annotations": ["junk"]},
                {**coco, "annotations": [{"image_id": 9, "bbox": [0, 0, 5, 5]}]}):  # an unknown image too
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match="--coco_instances=.*bad.json: not a COCO instances JSON"):
            evaluate.coco_instances(str(tmp_path / "bad.json"), str(tmp_path), 32)


def tiny_checkpoint(tmp_path):
    config = pe_model.model_config("PE-Core-Nano8-64")
    config["vision_cfg"].update(width=32, layers=3, heads=2, output_dim=32, image_size=32)
    config["text_cfg"].update(width=32, layers=1, heads=2, output_dim=32)
    torch.manual_seed(0)
    model = pe_model.build_model(config).eval()
    path = str(tmp_path / "tiny.pt")
    pe_model.save_checkpoint({"model": model.state_dict(), "config": pe_model.get_config(model)}, path)
    return path


def test_detection_probe_and_feature_maps_end_to_end_on_a_tiny_model(tmp_path):
    os.makedirs(tmp_path / "mine")
    Image.new("RGB", (50, 40), (0, 90, 200)).save(tmp_path / "mine" / "blue.png")
    (tmp_path / "mine" / "notes.txt").write_text("not an image")
    out = tmp_path / "eval"
    results = evaluate.main([f"--checkpoint={tiny_checkpoint(tmp_path)}", f"--out_dir={out}", "--feature_maps",
                             "--layerwise", "--num_classes=4", "--num_val=2", "--num_probe_train=3",
                             "--num_scenes=8", "--num_track_videos=1", "--track_frames=3", "--dense_size=32",
                             "--batch_size=16", f"--images={tmp_path / 'mine'}"])
    detection = results["layerwise"]["tasks"]["detection"]
    assert len(detection["per_layer"]) == 3 and all(0.0 <= s <= 100.0 for s in detection["per_layer"])
    assert detection["best_layer"] in (0, 1, 2) and detection["last"] == detection["per_layer"][-1]
    maps = results["feature_maps"]
    assert (maps["images"], maps["skipped_bad"], maps["file"]) == (5, 1, "feature_maps.png")
    assert Image.open(out / "feature_maps.png").size == (96 * (1 + 3), 20 + 96 * 5)  # image + 3 layers, 5 rows
    markdown = (out / "results.md").read_text()
    assert "(feature_maps.png)" in markdown and "| detection |" in markdown


def test_pca_colours_follow_the_principal_components_with_fixed_signs():
    # 8 patches, three orthogonal +-1 patterns of variance 9, 4 and 1 on channels 3 (negated), 0 and 4
    s0 = torch.tensor([1., 1, 1, 1, -1, -1, -1, -1])
    s1 = torch.tensor([1., 1, -1, -1, 1, 1, -1, -1])
    s2 = torch.tensor([1., -1, 1, -1, 1, -1, 1, -1])
    tokens = torch.zeros(8, 6)
    tokens[:, 3], tokens[:, 0], tokens[:, 4] = -3 * s0, 2 * s1, s2
    rgb = evaluate.pca_rgb((tokens + 5).view(2, 2, 2, 6))  # an offset: the mean is removed
    assert rgb.shape == (2, 2, 2, 3) and rgb.dtype == torch.uint8
    # component 1 is -e3 flipped to +e3 (largest loading positive): red is high where -3 * s0 is, i.e. s0 = -1
    expected = torch.stack([(s0 < 0), (s1 > 0), (s2 > 0)], dim=1).byte() * 255
    assert torch.equal(rgb.view(8, 3), expected)
