"""
evaluate.py: the evaluations of the Perception Encoder paper (Bolya et al. 2025, arXiv 2504.13181) for one
checkpoint or several side by side, around the layer-wise analysis of §3 ("the best visual embeddings are not
at the output of the network").

    python evaluate.py --all                                          # the newest train_clip.py checkpoint
    python evaluate.py --all --checkpoint=PE-Core-B16-224.pt --model=PE-Core-B16-224   # an official .pt
    python evaluate.py --layerwise --checkpoint=out/clip/final.pt,out/spatial/spatial.pt  # core vs PE-Spatial
    python evaluate.py --vqa --vqa_checkpoint=out/lang/vlm.pt        # --vqa_plugin=align_lang:vqa_accuracy

Tasks (--all or any of these; none = all), on small embedded data (data.py) or public layouts: zero-shot top-1 /
top-5 (scored as clip_benchmark), robustness (shifted val copies standing in for ImageNet-v2/-R/-Sketch/-A and
ObjectNet), retrieval, video zero-shot (§2.2), the layer-wise probes of §3 (classification, segmentation, depth,
tracking, detection box AP), feature maps (each layer's patch tokens on 3 principal components) and VQA (§4, a
plug-in). --checkpoint=A,B evaluates each (--model=NAME for all, or one each); a vision-only tower skips the text
tasks; a train_clip.py checkpoint sets the class count, resolution and seed (its held-out split). Writes into
--out_dir results.json, results.md, layerwise.png, layerwise_tasks.png and feature_maps.png (_k for the k-th of
several checkpoints, beside a side-by-side table per task).
"""

import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from tqdm import tqdm

import data
import pe_model
from training import (RULES as TRAINING_RULES, checkpoint_train_config, fmt, load_plugin,
                      markdown_table, parse_config, positive, resolve_checkpoint, write_json)

TASKS = ("zero_shot", "robustness", "retrieval", "video_zero_shot", "layerwise", "tracking", "feature_maps", "vqa")


@dataclass
class EvalConfig:
    checkpoint: str = ""  # ours or official .pt file(s), comma-separated; "" = the newest train_clip.py wrote
    model: str = ""  # official name: needed for official .pt files (PE-Core-B16-224); one, or one per checkpoint
    random_init: bool = False  # evaluate an untrained --model (a baseline); no checkpoint read
    out_dir: str = "out/eval"  # results.json, results.md and the plots go here
    all: bool = False  # every evaluation (as when none is given)
    zero_shot: bool = False
    robustness: bool = False
    retrieval: bool = False
    video_zero_shot: bool = False
    layerwise: bool = False  # all five probes per layer (fills the tracking key too)
    tracking: bool = False  # the tracking probe per layer alone
    feature_maps: bool = False  # a few composed scenes (and --images) per layer as principal-component RGB
    vqa: bool = False
    # embedded default data (data.py); sizes kept small for a CPU
    num_classes: int = 0  # emoji classes; 0 = the checkpoint's training classes (its train_config), else 100
    num_val: int = 10  # held-out val renderings per class: zero-shot, robustness, retrieval, probe test set
    num_probe_train: int = 10  # train renderings per class for the classification probe
    num_retrieval: int = 1000  # images for embedded retrieval (the first val images; all classes)
    num_videos: int = 80  # composed videos for video zero-shot (8 motions x num_video_classes)
    num_video_classes: int = 10
    video_frames: int = 16  # frames per composed video file
    num_frames: int = 8  # frames sampled uniformly per video (§2.2: 8)
    num_scenes: int = 400  # composed scenes for the dense probes: 3/4 train, 1/4 test
    num_track_videos: int = 16  # composed videos for the tracking probe
    track_frames: int = 12  # frames per tracking video
    image_size: int = 0  # classification / zero-shot / video resolution; 0 = the checkpoint's last training one
    dense_size: int = 0  # resolution of the dense probes and tracking; 0 = the model's, at least 16 patches a side
    pooling: str = "mean"  # classification probe input: "mean" of patch tokens or "cls" (class token)
    layer_stride: int = 1  # probe every k-th layer (the last always); > 1 for deep models on a CPU
    track_topk: int = 5  # label propagation (DINO's DAVIS defaults): neighbours kept per target patch
    track_temperature: float = 0.1  # softmax temperature on cosine affinities
    track_context: int = 7  # previous frames in the context (plus the first frame)
    track_radius: int = 12  # neighbourhood in patches around the target patch (0 = whole frame)
    # public layouts (replace the embedded default of the evaluations that use them)
    imagenet_dir: str = ""  # ImageNet-style class folders (data.ClassFolder): zero-shot, robustness, probe
    class_names: str = ""  # readable names for --imagenet_dir / --kinetics_dir folders (JSON or txt)
    coco_json: str = ""  # COCO-captions JSON (captions_val2017.json / the Karpathy 5k test split) ...
    coco_images: str = ""  # ... and its image folder
    coco_instances: str = ""  # COCO instances JSON (instances_val2017.json) of --coco_images: the detection probe
    images: str = ""  # a folder of images drawn beside the composed scenes by --feature_maps
    kinetics_dir: str = ""  # Kinetics-style class folders of videos (data.VideoFolder)
    ade20k_dir: str = ""  # ADE20K: images/{training,validation} + annotations/{training,validation}; 0 ignored
    nyu_dir: str = ""  # NYU-style rgb/depth pairs (data.DepthPairs); train/ and test/ subfolders if present
    davis_dir: str = ""  # DAVIS: JPEGImages/480p/<seq> + Annotations/480p/<seq>
    max_images: int = 0  # cap on the images / videos / sequences read from a public set (0 = all)
    vqa_checkpoint: str = ""  # a checkpoint align_lang.py wrote; the stage owning the VLM scores it, a plug-in:
    vqa_plugin: str = "align_lang:vqa_accuracy"  # module:function(checkpoint_path, batch_size=, device=) -> dict
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu


RULES = {  # besides training.RULES, checked at start (one line names the field)
    "model": (lambda v: all(TRAINING_RULES["model"][0](name) for name in v.split(",")),
              "official names or JSON config files, one or one per checkpoint"),
    "pooling": (lambda v: v in ("mean", "cls"), "mean or cls"),
    **positive("layer_stride", "num_val", "num_frames", "video_frames", "track_frames", "track_topk"),
    "track_temperature": (lambda v: v > 0, "a number > 0"),
    **dict.fromkeys(("imagenet_dir", "class_names", "coco_json", "coco_images", "coco_instances", "kinetics_dir",
                     "ade20k_dir", "nyu_dir", "davis_dir", "images", "vqa_checkpoint"),  # before minutes of work
                    (lambda v: not v or os.path.exists(v), "an existing file or folder")),
}


# Models and batching -------------------------------------------------------------------------------------
def load_eval_model(cfg):
    """(model in eval mode, a line describing it, checkpoint path or None): a CLIP model or a vision tower."""
    if cfg.random_init:
        if not cfg.model:
            raise SystemExit("--random_init needs --model=NAME (e.g. --model=PE-Core-Nano8-64)")
        torch.manual_seed(cfg.seed)
        return pe_model.build_model(cfg.model).eval(), f"{cfg.model}, random weights (seed {cfg.seed})", None
    path = resolve_checkpoint(cfg.checkpoint or None)
    try:
        model = pe_model.load_model(path, cfg.model or None)
    except ValueError as error:  # CheckpointMismatchError is a ValueError
        raise SystemExit(f"--checkpoint={path}: {error}") from None
    return model.eval(), f"{path}" + (f" ({cfg.model})" if cfg.model else ""), path


def resolve_defaults(cfg, model, checkpoint_path):
    """The 0 = automatic fields from a train_clip.py run (classes, last resolution, seed: its held-out split)."""
    trained = checkpoint_train_config(checkpoint_path) if checkpoint_path else {}
    trained = trained if trained.get("data") == "emoji" else {}
    if not cfg.num_classes:
        cfg.num_classes = data.trained_class_count(trained)
    if not cfg.image_size:
        cfg.image_size = data.trained_resolution(trained, getattr(model, "visual", model).image_size)
    if trained and cfg.seed == 0:
        cfg.seed = int(trained.get("seed", 0))
    return cfg


def iterate_batches(dataset, batch_size, desc, indices):
    """Lists of the good items, batch_size at a time (a None item is a bad sample the dataset counted)."""
    good = (item for item in map(dataset.__getitem__, tqdm(indices, desc=desc, leave=False)) if item is not None)
    while batch := list(itertools.islice(good, batch_size)):
        yield batch


def first_indices(dataset, max_items):
    return range(min(len(dataset), max_items) if max_items else len(dataset))


@torch.no_grad()
def encode_image_dataset(model, dataset, batch_size, device, desc, indices, video=False):
    """(image or clip, caption, label) items -> (L2-normalised embeddings (N, D), labels, captions); a clip's: §2.2."""
    features, labels, captions = [], [], []
    for batch in iterate_batches(dataset, batch_size, desc, indices):
        media = torch.stack([item[0] for item in batch]).to(device)  # (B, 3, H, W) or (B, T, 3, H, W)
        embeddings = (model.encode_video if video else model.encode_image)(media, normalize=True).float()
        features.append((F.normalize(embeddings, dim=-1) if video else embeddings).cpu())
        captions += [item[1] for item in batch]
        labels += [int(item[2]) for item in batch]
    if not features:
        raise SystemExit(f"{desc}: no readable {'videos' if video else 'images'}")
    return torch.cat(features), torch.tensor(labels), captions


# Zero-shot classification, scored as the official benchmark (clip_benchmark) does ------------------------
def zero_shot_accuracy(image_features, classifier, labels, ks=(1, 5)):
    """{"top1": %, "top5": %} of L2-normalised image features (N, D) under a zero-shot classifier (C, D)."""
    logits = 100.0 * image_features @ classifier.T
    hits = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == labels[:, None]  # (N, kmax)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def classification_set(cfg, image_size, transform=None, style="openmoji"):
    """(dataset, class names, indices, description): --imagenet_dir's class folders or the embedded val set."""
    if cfg.imagenet_dir:
        dataset = data.ClassFolder(cfg.imagenet_dir, transform=transform, image_size=image_size,
                                   class_names=cfg.class_names or None)
        return dataset, dataset.class_names, first_indices(dataset, cfg.max_images), f"class folders {cfg.imagenet_dir}"
    dataset = data.EmojiImageText("val", cfg.num_classes, cfg.num_val, canvas_size=image_size, seed=cfg.seed,
                                  style=style, transform=transform)
    description = f"embedded val ({style}): {cfg.num_classes} emoji classes x {cfg.num_val} held-out renderings"
    return dataset, dataset.class_names, range(len(dataset)), description


def clean_val(model, cfg, device, cache, classifier=True):
    """The val set, encoded once: (class names, indices, description, classifier, (features, labels, captions))."""
    dataset, class_names, indices, description = classification_set(cfg, cfg.image_size)
    if classifier and ("classifier", tuple(class_names)) not in cache:
        cache["classifier", tuple(class_names)] = pe_model.zero_shot_classifier(
            model, class_names, data.ZERO_SHOT_TEMPLATES, batch_size=4 * cfg.batch_size, device=device).cpu()
    key = ("clean", cfg.imagenet_dir, cfg.image_size, len(indices))
    if key not in cache:
        cache[key] = encode_image_dataset(model, dataset, cfg.batch_size, device, "val images", indices)
    return class_names, indices, description, cache.get(("classifier", tuple(class_names))), cache[key]


def run_zero_shot(model, cfg, device, cache):
    class_names, indices, description, classifier, (features, labels, _) = clean_val(model, cfg, device, cache)
    return {**zero_shot_accuracy(features, classifier, labels), "images": len(labels),
            "skipped_bad": len(indices) - len(labels), "classes": len(class_names),
            "templates": len(data.ZERO_SHOT_TEMPLATES), "data": description}


# Robustness ----------------------------------------------------------------------------------------------
def shift_image(name, image, generator):
    """A PIL image under the distribution shift `name`, deterministic given the torch.Generator."""
    rand = lambda low=0.0, high=1.0: low + (high - low) * torch.rand((), generator=generator).item()  # noqa: E731
    if name == "sketch":  # ImageNet-Sketch-like: a grey edge map, dark lines on white, colour and texture gone
        return ImageOps.invert(ImageOps.autocontrast(image.convert("L").filter(ImageFilter.FIND_EDGES))).convert("RGB")
    image = image.convert("RGB")  # a copy
    if name == "posterize":  # ImageNet-Rendition-like: flat colours, 2 bits per channel
        return ImageOps.posterize(image, 2)
    if name == "blur":  # defocus: a Gaussian blur with a radius of 3% of the image side
        return image.filter(ImageFilter.GaussianBlur(radius=0.03 * max(image.size)))
    if name == "noise":  # sensor noise: additive Gaussian noise, sigma 25% of the range
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()
        pixels = pixels + 0.25 * 255 * torch.randn(pixels.shape, generator=generator)
        return Image.frombytes("RGB", image.size, pixels.clamp(0, 255).round().to(torch.uint8).numpy().tobytes())
    if name == "occlusion":  # ObjectNet / ImageNet-A-like clutter: a grey box over 16-36% of the image
        side = rand(0.4, 0.6)
        box_w, box_h = round(side * image.width), round(side * image.height)
        x0, y0 = round(rand() * (image.width - box_w)), round(rand() * (image.height - box_h))
        grey = round(rand(64, 192))
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=(grey, grey, grey))
        return image
    # rotation, ObjectNet-like unusual viewpoints: 45-135 degrees either way, grey corners
    angle = rand(45, 135) * (1 if rand() < 0.5 else -1)
    return image.rotate(angle, resample=Image.BILINEAR, fillcolor=(128, 128, 128))


SHIFTS = {name: partial(shift_image, name) for name in "sketch posterize blur noise occlusion rotation".split()}


def run_robustness(model, cfg, device, cache):
    _, indices, description, classifier, (features, labels, _) = clean_val(model, cfg, device, cache)
    clean, sets, notes, image_size = zero_shot_accuracy(features, classifier, labels), {}, {}, cfg.image_size
    for name, shift in SHIFTS.items():
        def transform(image, generator=None):  # the shift, then the preprocessing
            return pe_model.preprocess_image(shift(image, generator or torch.Generator().manual_seed(0)), image_size)
        shifted = classification_set(cfg, image_size, transform=transform)[0]
        features, labels, _ = encode_image_dataset(model, shifted, cfg.batch_size, device, f"shift: {name}", indices)
        sets[name] = zero_shot_accuracy(features, classifier, labels)
    if cfg.imagenet_dir:
        notes["noto"] = "embedded data only"
    elif not data.noto_available():
        notes["noto"] = f"skipped: {data.NOTO_FONT} not installed (Debian fonts-noto-color-emoji)"
    else:
        # another design of the same emoji (as ImageNet-R renders ImageNet classes), among all the classes
        noto = classification_set(cfg, image_size, style="noto")[0]
        noto_indices = noto.present_indices()
        features, labels, _ = encode_image_dataset(model, noto, cfg.batch_size, device, "shift: noto", noto_indices)
        sets["noto"] = zero_shot_accuracy(features, classifier, labels)
        if noto.missing_classes:
            missing = ", ".join(noto.class_names[c] for c in noto.missing_classes)
            notes["noto"] = (f"{len(noto_indices)} images: the Noto font lacks {len(noto.missing_classes)} of the "
                             f"{cfg.num_classes} classes ({missing})")
    average = {k: sum(s[k] for s in sets.values()) / len(sets) for k in ("top1", "top5")}
    return {"clean": clean, "shifts": sets, "robustness_average": average, "notes": notes,
            "images_per_set": len(indices), "data": description}


# Retrieval -----------------------------------------------------------------------------------------------
def recall_at_k(similarity, relevant, ks=(1, 5, 10)):
    """Recall@k both ways ({"image_to_text": {"R@1": %, ...}, ...}) of similarity and relevant (N_images, N_texts):
    found at k when ANY match is among the k most similar; queries without a match are left out."""
    out = {}
    for name, scores, matches in (("image_to_text", similarity, relevant), ("text_to_image", similarity.T, relevant.T)):
        ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (Q, kmax)
        hits = matches.gather(1, ranked)  # (Q, kmax): is the r-th ranked item a match
        answerable = matches.any(dim=1)
        out[name] = {f"R@{k}": 100.0 * hits[answerable, :k].any(dim=1).float().mean().item() for k in ks}
    return out


def caption_relevance(captions_per_image):
    """[[captions of image 0], ...] -> (flat caption list, relevant (N_images, N_captions) bool)."""
    texts = [caption for captions in captions_per_image for caption in captions]
    owner = [index for index, captions in enumerate(captions_per_image) for _ in captions]
    relevant = torch.arange(len(captions_per_image))[:, None] == torch.tensor(owner, dtype=torch.long)[None, :]
    return texts, relevant


@torch.no_grad()
def run_retrieval(model, cfg, device, cache):
    if cfg.coco_json:
        if not cfg.coco_images:
            raise SystemExit("--coco_json needs --coco_images=FOLDER (the folder its file_name entries are in)")
        dataset = data.CocoCaptions(cfg.coco_json, cfg.coco_images, image_size=cfg.image_size, train=False)
        indices = first_indices(dataset, cfg.max_images)
        captions_of = dict(zip(dataset.image_ids, dataset.captions))  # items are (image, first caption, image_id)
        image_features, image_ids, _ = encode_image_dataset(model, dataset, cfg.batch_size, device,
                                                            f"retrieval images ({cfg.coco_images})", indices)
        texts, relevant = caption_relevance([captions_of[int(i)] for i in image_ids])
        description, skipped = f"COCO captions {cfg.coco_json}", len(indices) - len(image_ids)
    else:
        *_, (image_features, labels, captions) = clean_val(model, cfg, device, cache, classifier=False)
        count = min(len(labels), cfg.num_retrieval)  # the first val images cover every class
        image_features, labels, captions = image_features[:count], labels[:count], captions[:count]
        # a caption names only the class: every caption of the image's class is a match; identical strings once
        texts, classes = zip(*sorted({(caption, int(label)) for caption, label in zip(captions, labels)}))
        relevant = labels[:, None] == torch.tensor(classes)[None, :]
        description, skipped = f"embedded val captions: {len(labels)} images, class-level matches", 0
    step = 4 * cfg.batch_size
    text_features = torch.cat([model.encode_text(pe_model.tokenize(texts[s:s + step], model.context_length).to(device),
                                                 normalize=True).float().cpu()
                               for s in tqdm(range(0, len(texts), step), desc="retrieval texts", leave=False)])
    return {**recall_at_k(image_features @ text_features.T, relevant), "images": image_features.shape[0],
            "texts": len(texts), "skipped_bad": skipped, "data": description}


# Video zero-shot classification (§2.2) -------------------------------------------------------------------
def run_video_zero_shot(model, cfg, device, cache):
    image_size = cfg.image_size
    if cfg.kinetics_dir:
        dataset = data.VideoFolder(cfg.kinetics_dir, num_frames=cfg.num_frames, image_size=image_size,
                                   class_names=cfg.class_names or None)
        indices, class_names = first_indices(dataset, cfg.max_images), dataset.class_names
        description = f"video class folders {cfg.kinetics_dir}"
    else:
        size, folder = image_size + image_size % 2, os.path.join(cfg.out_dir, "embedded_videos")  # yuv420p: even
        # the subjects are spread over the classes the core was trained on (cfg.num_classes, from its checkpoint)
        items = data.make_embedded_videos(folder, cfg.num_videos, cfg.video_frames, size, cfg.seed,
                                          num_classes=cfg.num_video_classes, class_pool=cfg.num_classes)
        dataset = data.VideoList(items, cfg.num_frames, image_size=image_size, label_key="class_id")
        class_names = [name for _, name in data.embedded_video_classes(cfg.num_video_classes, cfg.num_classes)]
        indices = range(len(dataset))
        description = (f"embedded: {cfg.num_videos} composed videos ({cfg.video_frames} frames, .mp4 in {folder}), "
                       f"{cfg.num_video_classes} emoji classes of the {cfg.num_classes} classification classes")
    templates = (*data.ZERO_SHOT_TEMPLATES, "a video of {a}.", "a clip of {a}")
    classifier = pe_model.zero_shot_classifier(model, class_names, templates, device=device).cpu()
    features, labels, _ = encode_image_dataset(model, dataset, max(1, cfg.batch_size // cfg.num_frames), device,
                                               description, indices, video=True)
    return {**zero_shot_accuracy(features, classifier, labels), "videos": len(labels),
            "skipped_bad": len(indices) - len(labels), "classes": len(class_names), "frames_per_video": cfg.num_frames,
            "data": description}


# Layer-wise frozen features (§3) -------------------------------------------------------------------------
@torch.no_grad()
def layer_features(visual, images, batch_size=32, pooling=None, layers=None, device="cpu", desc="layer features"):
    """Per kept layer (0-based, default all), from ONE pass of images (N, 3, H, W), before ln_post as the official
    forward_features(layer_idx=i): the patch-token grid (N, gh, gw, W) (pooling None), their mean or the cls (N, W)."""
    layers = list(range(visual.layers)) if layers is None else list(layers)
    if pooling not in (None, "mean", "cls") or (pooling == "cls" and not visual.use_cls_token):
        raise ValueError(f"pooling={pooling!r}: None, 'mean' or 'cls' (the latter needs a class token)")
    grid_h, grid_w = images.shape[-2] // visual.patch_size, images.shape[-1] // visual.patch_size
    outputs = [[] for _ in layers]
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        every_layer = visual.forward_all_layers(images[start:start + batch_size].to(device))  # L x (B, N, W)
        for slot, layer in enumerate(layers):
            tokens = every_layer[layer].float()
            patches = tokens[:, 1:] if visual.use_cls_token else tokens  # (B, gh*gw, W)
            pooled = (tokens[:, 0] if pooling == "cls" else patches.mean(dim=1) if pooling == "mean" else
                      patches.unflatten(1, (grid_h, grid_w)))  # (B, W) or (B, gh, gw, W)
            outputs[slot].append(pooled.cpu())
    return [torch.cat(chunks) for chunks in outputs]


def probed_layers(visual, cfg):
    return sorted({*range(0, visual.layers, max(1, cfg.layer_stride)), visual.layers - 1})  # and the last


def dense_resolution(visual, image_size=0, min_grid=16):
    """image_size (default the model's) raised to min_grid patches a side: a coarser grid caps any dense score."""
    return max(image_size or visual.image_size, min_grid * visual.patch_size)


# Linear probes on standardised features: ridge (one eigendecomposition for all lambdas), softmax ---------
def _ridge_solutions(x, y, l2_values, chunk=16384):
    """Centred standardised features x (n, d), targets y (n, k) -> [(weight (d, k), bias (k,))] per lambda."""
    mean_y = y.double().mean(dim=0)
    gram, cross = (torch.zeros(x.shape[1], k, dtype=torch.float64) for k in (x.shape[1], y.shape[1]))
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start:start + chunk].double(), y[start:start + chunk].double() - mean_y
        gram += xc.T @ xc
        cross += xc.T @ yc
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    rotated = eigenvectors.T @ cross  # (d, k)
    # centred features: the bias is the target mean
    return [(eigenvectors @ (rotated / (eigenvalues.clamp_min(0) + l2)[:, None]), mean_y) for l2 in l2_values]


def fit_linear_probe(features, targets, select="mse", l2_grid=(1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0), holdout=0.2):
    """Ridge regression features (n, d) -> targets (n, k), lambda (x n) picked on the held-out split by "mse" or
    "accuracy" (argmax vs target): (weight (d, k), bias (k,)) on the raw features."""
    features, targets = features.float(), targets.float()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    standardised = (features - mean) / std
    n, best_l2 = len(features), 1e-2
    held = int(n * holdout) if n >= 10 else 0
    if held:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        fit, check = order[held:], order[:held]
        fit_mean, errors = standardised[fit].mean(dim=0), []
        for weight, bias in _ridge_solutions(standardised[fit] - fit_mean, targets[fit],
                                             [g * len(fit) for g in l2_grid]):
            predictions = (standardised[check].double() - fit_mean.double()) @ weight + bias
            errors.append(-(predictions.argmax(dim=1) == targets[check].argmax(dim=1)).double().mean().item()
                          if select == "accuracy" else (predictions - targets[check].double()).pow(2).mean().item())
        best_l2 = l2_grid[min(range(len(errors)), key=errors.__getitem__)]  # first of equals: least shrinkage
    weight, bias = _ridge_solutions(standardised, targets, [best_l2 * n])[0]
    # ((x - mean) / std) @ weight + bias  ==  x @ (weight / std) + (bias - (mean / std) @ weight)
    mean, std = mean.double(), std.double()
    return (weight / std[:, None]).float(), (bias - (mean / std) @ weight).float()


def fit_softmax_probe(features, targets, l2=1e-4, steps=150, max_samples=20000, seed=0):
    """Softmax regression (n, d) -> (n, k) soft targets + l2 |W|^2 by Nesterov descent, step 1 / L (the Hessian is
    <= X^T X / 2n), on max_samples rows (segmentation: least squares rarely ranks an object above background)."""
    features, targets = features.float(), targets.float()
    if len(features) > max_samples:
        keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_samples]
        features, targets = features[keep], targets[keep]
    n, mean, std = len(features), features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    inputs = torch.cat([(features - mean) / std, torch.ones(n, 1)], dim=1)  # (n, d + 1): the bias as a column
    decay = torch.cat([torch.ones(inputs.shape[1] - 1, 1), torch.zeros(1, 1)])  # no weight decay on the bias
    lipschitz = 0.5 * torch.linalg.eigvalsh(inputs.T @ inputs / n)[-1].item() + 2 * l2
    weight = lookahead = torch.zeros(inputs.shape[1], targets.shape[1])
    momentum = 1.0
    for _ in range(steps):
        # gradient of the mean cross-entropy: X^T (softmax(X W) - Y) / n, plus the weight decay
        gradient = inputs.T @ (torch.softmax(inputs @ lookahead, dim=1) - targets) / n + 2 * l2 * decay * lookahead
        updated = lookahead - gradient / lipschitz
        next_momentum = (1 + math.sqrt(1 + 4 * momentum ** 2)) / 2
        lookahead = updated + (momentum - 1) / next_momentum * (updated - weight)
        weight, momentum = updated, next_momentum
    return weight[:-1] / std[:, None], weight[-1] - (mean / std) @ weight[:-1]


def classification_probe(train_features, train_labels, test_features, test_labels, num_classes):
    targets = F.one_hot(train_labels.long(), num_classes).float()
    weight, bias = fit_linear_probe(train_features, targets, select="accuracy")
    predictions = (test_features.float() @ weight + bias).argmax(dim=1)
    return 100.0 * (predictions == test_labels).float().mean().item()


def _patch_index(shape, grid):
    """Pixel maps (N, H, W) -> each pixel's (image, patch) slot (N, H*W), and each patch's pixel count (gh*gw,)."""
    n, height, width = shape
    rows, cols = torch.arange(height) * grid[0] // height, torch.arange(width) * grid[1] // width
    patch_of_pixel = (rows[:, None] * grid[1] + cols[None, :]).flatten()
    pixels = torch.bincount(patch_of_pixel, minlength=grid[0] * grid[1])
    return torch.arange(n)[:, None] * (grid[0] * grid[1]) + patch_of_pixel, pixels


def patch_targets(labels, grid, num_classes, ignore_index=None):
    """Pixel class maps (N, H, W) -> each class's fraction of a patch's valid pixels (N, gh, gw, num_classes)
    and the valid fraction (N, gh, gw); ignore_index and labels outside [0, num_classes) are not valid."""
    patch_index, pixels = _patch_index(labels.shape, grid)
    flat = labels.reshape(len(labels), -1).long()
    valid = (flat >= 0) & (flat < num_classes) & (flat != (-1 if ignore_index is None else ignore_index))
    slots = patch_index * num_classes + flat.clamp(0, num_classes - 1)
    counts = torch.bincount(slots[valid], minlength=len(labels) * len(pixels) * num_classes).float().view(
        len(labels), *grid, num_classes)
    totals = counts.sum(dim=-1)
    return counts / totals.clamp_min(1)[..., None], totals / pixels.float().view(*grid)


def patch_means(values, grid, valid=None):
    """The mean of a pixel map (N, H, W) over each patch's valid pixels (N, gh, gw), and their fraction."""
    patch_index, pixels = _patch_index(values.shape, grid)
    slots, size, shape = patch_index.flatten(), len(values) * len(pixels), (len(values), *grid)
    valid = torch.ones(len(slots), dtype=torch.bool) if valid is None else valid.flatten()
    sums = torch.bincount(slots[valid], weights=values.reshape(-1)[valid].double(), minlength=size)
    counts = torch.bincount(slots[valid], minlength=size).double()
    means = (sums / counts.clamp_min(1)).float().view(shape)
    return means, (counts / pixels.double().repeat(len(values))).float().view(shape)


def upsample_patches(patch_values, size):
    return F.interpolate(patch_values.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """Counts (target class, predicted class); targets ignore_index or outside [0, num_classes) left out."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes) & (target != (-1 if ignore_index is None else ignore_index))
    pred = pred.clamp(0, num_classes - 1)
    return torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(num_classes, -1)


def miou_from_confusion(confusion, ignore_index=None):
    """Mean IoU (%) over classes present in target or prediction (absent from both: left out, as ADE20K)."""
    confusion, true_positive = confusion.double(), confusion.double().diag()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    present = union > 0
    if ignore_index is not None and 0 <= ignore_index < len(present):
        present[ignore_index] = False
    return 100.0 * (true_positive[present] / union[present]).mean().item() if present.any() else float("nan")


def segmentation_probe(train_grids, train_labels, test_grids, test_labels, num_classes, ignore_index=None, chunk=8):
    """mIoU (%) of a softmax probe on patch tokens (N, gh, gw, W) (patch class fractions), upsampled to pixels."""
    targets, valid = patch_targets(train_labels, train_grids.shape[1:3], num_classes, ignore_index)
    keep = valid.flatten() > 0
    weight, bias = fit_softmax_probe(train_grids.flatten(0, 2)[keep], targets.flatten(0, 2)[keep])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(test_grids), chunk):
        logits = upsample_patches(test_grids[start:start + chunk].float() @ weight + bias, test_labels.shape[-2:])
        confusion += confusion_matrix(logits.argmax(dim=1), test_labels[start:start + chunk], num_classes, ignore_index)
    return miou_from_confusion(confusion, ignore_index)


def depth_probe(train_grids, train_depth, test_grids, test_depth, train_valid=None, test_valid=None, chunk=8):
    """RMSE over the valid pixels of a ridge probe on patch tokens (patch mean depths), upsampled to pixels."""
    targets, valid = patch_means(train_depth, train_grids.shape[1:3], train_valid)
    keep = valid.flatten() > 0
    weight, bias = fit_linear_probe(train_grids.flatten(0, 2)[keep], targets.flatten()[keep, None], select="mse")
    squared, count = 0.0, 0
    for start in range(0, len(test_grids), chunk):
        pred = upsample_patches(test_grids[start:start + chunk].float() @ weight + bias, test_depth.shape[-2:])[:, 0]
        target = test_depth[start:start + chunk]
        mask = test_valid[start:start + chunk] if test_valid is not None else torch.ones_like(target, dtype=torch.bool)
        squared += (pred.double() - target.double()).pow(2)[mask].sum().item()
        count += int(mask.sum())
    return math.sqrt(squared / max(count, 1))


# Tracking by label propagation (the DINO / PE DAVIS protocol) --------------------------------------------
def propagate_labels(features, first_labels, num_labels, topk=5, temperature=0.1, context=7, radius=12):
    """Patch features (T, gh, gw, C), frame 0's labels (H, W) -> (T, H, W): a patch's soft labels are the softmax
    vote of its top-k cosine neighbours within `radius` in frame 0 and the `context` previous frames."""
    (frames, grid_h, grid_w, channels), size = features.shape, first_labels.shape
    patches = F.normalize(features.reshape(frames, grid_h * grid_w, channels).float(), dim=-1)  # (T, P, C)
    soft = [patch_targets(first_labels[None], (grid_h, grid_w), num_labels)[0][0].reshape(-1, num_labels)]
    rows, cols = torch.arange(grid_h).repeat_interleave(grid_w), torch.arange(grid_w).repeat(grid_h)
    near = (((rows[:, None] - rows[None, :]).abs() <= (radius or grid_h))  # radius 0: the whole frame
            & ((cols[:, None] - cols[None, :]).abs() <= (radius or grid_w)))
    predictions = [first_labels.long()]
    for t in range(1, frames):
        sources = [0] + list(range(max(1, t - context), t))
        affinity = patches[t] @ patches[sources].reshape(-1, channels).T  # (P, len(sources) * P)
        affinity = affinity.masked_fill(~near.repeat(1, len(sources)), float("-inf"))
        values, index = affinity.topk(min(topk, affinity.shape[1]), dim=1)  # (P, k)
        weights = torch.softmax(values / temperature, dim=1)
        labels = (weights[..., None] * torch.cat([soft[s] for s in sources])[index]).sum(dim=1)  # (P, K)
        soft.append(labels)
        predictions.append(upsample_patches(labels.reshape(1, grid_h, grid_w, num_labels), size)[0].argmax(dim=0))
    return torch.stack(predictions)


def track_iou(pred, target, num_labels, skip_first=True):
    """J (%): per object the mean IoU over frames (1 when both masks are empty, as the DAVIS toolkit), averaged
    over objects; unannotated frames (all -1) and, with skip_first, the given first frame left out."""
    frames = [t for t in range(int(skip_first), len(target)) if (target[t] >= 0).any()]
    scores = []
    for label in range(1, num_labels):
        masks = [(pred[t] == label, target[t] == label) for t in frames]
        per_frame = [(p & g).sum().item() / (p | g).sum().item() if (p | g).any() else 1.0 for p, g in masks]
        if per_frame:
            scores.append(sum(per_frame) / len(per_frame))
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")


# Detection as Figs. 9-10 (box AP): ridge probes for a CenterNet head (Zhou et al. 2019, "Objects as Points") --
def box_iou(a, b):
    """IoU (M, K) of boxes (M, 4) and (K, 4) as (x0, y0, x1, y1), in float64 (so that 60 / 100 meets 0.6)."""
    a, b = a.double().view(-1, 4), b.double().view(-1, 4)
    sides = torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])
    inter, area_a, area_b = sides.clamp_min(0).prod(-1), *[(x[:, 2:] - x[:, :2]).clamp_min(0).prod(-1) for x in (a, b)]
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-12)


def box_ap(detections, truths, thresholds=tuple(round(0.5 + 0.05 * k, 2) for k in range(10))):  # 0.50:0.05:0.95
    """Class-agnostic COCO AP (a fraction) of [(boxes (M, 4), scores (M,))] per image vs true boxes [(K, 4)]: best
    score first, each takes the free truth of highest IoU >= t; precision envelope at 101 recalls; mean over t."""
    total, recalls, aps = sum(len(truth) for truth in truths), torch.arange(101, dtype=torch.float64) / 100, []
    ious = [box_iou(boxes, truth).tolist() for (boxes, _), truth in zip(detections, truths)]
    ranked = sorted((-float(s), i, d) for i, (_, scores) in enumerate(detections) for d, s in enumerate(scores))
    for threshold in thresholds:
        taken, hits = [set() for _ in truths], []
        for _, i, d in ranked:
            free = [k for k, iou in enumerate(ious[i][d]) if k not in taken[i] and iou >= threshold]
            taken[i].update([max(free, key=ious[i][d].__getitem__)] if free else [])
            hits.append(bool(free))
        true_positives = torch.tensor(hits, dtype=torch.float64).cumsum(0)
        envelope = (true_positives / torch.arange(1, len(hits) + 1)).flip(0).cummax(0).values.flip(0)  # precision
        aps.append(F.pad(envelope, (0, 1))[torch.searchsorted(true_positives / max(total, 1), recalls)].mean().item())
    return sum(aps) / len(aps) if total else float("nan")


def mask_boxes(masks):
    """Instance masks (K, H, W) -> boxes (K, 4) on pixel edges (x1 = last column + 1); argmax finds the first."""
    cols, rows = masks.any(dim=1).float(), masks.any(dim=2).float()  # (K, W), (K, H)
    return torch.stack([cols.argmax(1), rows.argmax(1), cols.shape[1] - cols.flip(1).argmax(1),
                        rows.shape[1] - rows.flip(1).argmax(1)], dim=1).float()


def detection_targets(boxes, grid, size):
    """Boxes (K, 4) in pixels of size (H, W) -> heat (gh, gw), the max of Gaussians (sigma 1/6 of the shorter side),
    and on the 3x3 around each centre's patch (near) box (gh, gw, 4): centre offset, log width, height (patches)."""
    if not len(boxes):
        return torch.zeros(grid), torch.zeros(*grid, 4), torch.zeros(grid, dtype=torch.bool)
    boxes = boxes.double().view(-1, 4) * torch.tensor([grid[1] / size[1], grid[0] / size[0]] * 2).double()
    centres, sides = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-3)
    cells = torch.stack(torch.meshgrid(torch.arange(grid[1]), torch.arange(grid[0]), indexing="xy"), dim=-1)
    cells = cells.view(-1, 1, 2).double()  # (P, 1, 2): each patch's corner (x, y), row by row
    offsets = centres[None] - (cells + 0.5)  # (P, K, 2)
    distance = offsets.pow(2).sum(dim=-1)
    heat = torch.exp(-distance / (2 * (sides.min(dim=1).values / 6).clamp_min(0.5) ** 2)).amax(dim=1)
    near = (cells - centres.floor()[None]).abs().amax(dim=-1) <= 1  # (P, K)
    owner = distance.masked_fill(~near, math.inf).argmin(dim=1)
    box = torch.cat([offsets[torch.arange(len(cells)), owner], sides[owner].log()], dim=1)
    return heat.float().view(grid), box.float().view(*grid, 4), near.any(dim=1).view(grid)


def decode_boxes(heat, box, size, max_detections=100, nms_iou=0.5):
    """Heat (gh, gw), box (gh, gw, 4) -> (boxes (M, 4) in pixels of size (H, W), scores): 3x3 peaks, top 100, NMS."""
    grid, flat = heat.shape, heat.flatten()
    peaks = (heat == F.max_pool2d(heat[None, None], 3, stride=1, padding=1)[0, 0]).flatten().nonzero()[:, 0]
    peaks = peaks[flat[peaks].argsort(descending=True, stable=True)[:max_detections]]
    box = box.flatten(0, 1)[peaks].double()
    centres = torch.stack([peaks % grid[1], peaks // grid[1]], dim=1) + 0.5 + box[:, :2]
    half = box[:, 2:].clamp(max=math.log(4 * max(grid))).exp() / 2
    scale = torch.tensor([size[1] / grid[1], size[0] / grid[0]] * 2)  # patches -> pixels
    boxes, keep = torch.cat([centres - half, centres + half], dim=1) * scale, []
    for k, overlaps in enumerate(box_iou(boxes, boxes).tolist()):  # greedy NMS, best score first
        keep += [k] if all(overlaps[j] <= nms_iou for j in keep) else []
    return boxes[keep].float(), flat[peaks[keep]]


def detection_probe(train_grids, train_boxes, test_grids, test_boxes, size):
    """Box AP (%) of the ridge head on patch tokens (N, gh, gw, W), true boxes [(K, 4)] per image of size (H, W)."""
    heat, box, near = map(torch.stack, zip(*(detection_targets(b, train_grids.shape[1:3], size) for b in train_boxes)))
    tokens, near = train_grids.flatten(0, 2), near.flatten()
    heat_weight, heat_bias = fit_linear_probe(tokens, heat.flatten()[:, None], select="mse")
    box_weight, box_bias = fit_linear_probe(tokens[near], box.flatten(0, 2)[near], select="mse")
    detections = [decode_boxes((grid @ heat_weight + heat_bias)[..., 0], grid @ box_weight + box_bias, size)
                  for grid in test_grids.float()]
    return 100.0 * box_ap(detections, test_boxes)


def coco_instances(path, image_root, size, max_images=0):
    """COCO instances JSON ("images": id, file_name; "annotations": image_id, bbox [x, y, w, h], iscrowd) ->
    (images (N, 3, size, size) squashed as preprocess_image, their boxes [(K, 4)] scaled with them, skipped)."""
    try:
        with open(path) as f:
            coco = json.load(f)
        boxes = {image["id"]: (image["file_name"], []) for image in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = map(float, a["bbox"])
            if not a.get("iscrowd") and min(w, h) > 0:  # crowd regions and empty boxes: skipped, counted
                boxes[a["image_id"]][1].append([x, y, x + w, y + h])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--coco_instances={path}: not a COCO instances JSON ({error!r})") from None
    images, image_boxes, unreadable = [], [], 0
    for file_name, rows in list(boxes.values())[:max_images or None]:
        try:
            with Image.open(os.path.join(image_root, file_name)) as image:
                images.append(pe_model.preprocess_image(image, size))
                scale = torch.tensor([size / image.width, size / image.height] * 2)
                image_boxes.append(torch.tensor(rows).view(-1, 4) * scale)
        except OSError:
            unreadable += 1
    if not images:
        raise SystemExit(f"--coco_instances={path}: no readable image in --coco_images={image_root}")
    skipped = len(coco["annotations"]) - sum(len(rows) for _, rows in boxes.values())
    return torch.stack(images), image_boxes, f"{skipped} crowd or empty boxes, {unreadable} unreadable images"


# The layer-wise analysis ---------------------------------------------------------------------------------
def stack_dataset(dataset, indices, desc, keys):
    """Stack the fields of a dataset's good items: keys = the tuple positions / dict keys to keep."""
    items = [item for batch in iterate_batches(dataset, 64, desc, indices) for item in batch]
    if not items:
        raise SystemExit(f"{desc}: no readable items")
    columns = [[torch.as_tensor(item[key]) for item in items] for key in keys]
    return [torch.stack(c) if len({t.shape for t in c}) == 1 else c for c in columns]  # ragged: a list


def dense_probe_set(visual, cfg, size, layers, device, cache, task):
    """(train, test fields, their patch-token grids per layer), once: ADE20K, NYU, COCO or composed scenes (all)."""
    public = {"segmentation": cfg.ade20k_dir, "depth": cfg.nyu_dir, "detection": cfg.coco_instances}[task]
    key = ("dense", public and task, size, tuple(layers))
    if key in cache:
        return cache[key]
    splits, num_test = {}, max(1, cfg.num_scenes // 4)
    if not public:  # seeds disjoint from training's
        for split, count in (("train", cfg.num_scenes - num_test), ("test", num_test)):
            scenes = data.ComposedScenes(count, size, seed=f"evaluate-{split}-{cfg.seed}")
            images, semantic, depth, masks = stack_dataset(scenes, range(count), f"composed scenes ({split})",
                                                           ("image", "semantic", "depth", "instance_masks"))
            splits[split] = {"images": images, "semantic": semantic, "depth": depth, "valid": None,
                             "boxes": [mask_boxes(m) for m in masks]}
    elif task == "detection":
        images, boxes, skipped = coco_instances(public, cfg.coco_images, size, cfg.max_images)
        cut = len(images) - max(1, len(images) // 4)
        splits = {"train": {"images": images[:cut], "boxes": boxes[:cut], "skipped": skipped},
                  "test": {"images": images[cut:], "boxes": boxes[cut:]}}
    else:
        names = ("images", "semantic") if task == "segmentation" else ("images", "depth", "valid")
        if task == "segmentation":
            sets = [data.SegmentationFolder(public, split, size) for split in ("training", "validation")]
        elif all(os.path.isdir(os.path.join(public, split)) for split in ("train", "test")):
            sets = [data.DepthPairs(os.path.join(public, split), size) for split in ("train", "test")]
        else:
            sets = [data.DepthPairs(public, size), None]
        indices = list(first_indices(sets[0], cfg.max_images))
        cut = len(indices) - max(1, len(indices) // 4)
        parts = ([(sets[0], indices), (sets[1], first_indices(sets[1], cfg.max_images))] if sets[1] is not None else
                 [(sets[0], indices[:cut]), (sets[0], indices[cut:])])
        splits = {split: dict(zip(names, stack_dataset(dataset, part, f"{task} set ({split})", range(len(names)))))
                  for split, (dataset, part) in zip(("train", "test"), parts)}
    features = {split: layer_features(visual, splits[split]["images"], max(1, cfg.batch_size // 2), None, layers,
                                      device, f"layer features ({task} {split})") for split in ("train", "test")}
    cache[key] = splits["train"], splits["test"], features
    return cache[key]


def probe_classification(visual, cfg, layers, dense_size, device, cache):
    """(top-1 per layer, metric, higher is better, data), as every probe_*: ridge on pooled tokens."""
    image_size, batch = cfg.image_size or visual.image_size, max(1, cfg.batch_size // 2)
    dataset, class_names, indices, description = classification_set(cfg, image_size)  # the test set
    if cfg.imagenet_dir:
        parts, description = ((dataset, indices[0::2]), (dataset, indices[1::2])), description + ", even/odd split"
    else:
        train_set = data.EmojiImageText("train", cfg.num_classes, cfg.num_probe_train, image_size, seed=cfg.seed)
        parts = ((train_set, range(len(train_set))), (dataset, indices))
        description = (f"embedded: {cfg.num_classes} classes, {cfg.num_probe_train} train renderings / "
                       f"{cfg.num_val} held-out val renderings per class")
    (train_x, train_y), (test_x, test_y) = [stack_dataset(dataset, indices, f"probe images ({split})", (0, 2))
                                            for (dataset, indices), split in zip(parts, ("train", "test"))]
    train_f, test_f = [layer_features(visual, x, batch, cfg.pooling, layers, device, "layer features (probe)")
                       for x in (train_x, test_x)]
    scores = [classification_probe(train_f[i], train_y, test_f[i], test_y, len(class_names))
              for i in tqdm(range(len(layers)), desc="classification probe per layer", leave=False)]
    return scores, f"top-1 % (linear probe, {cfg.pooling} pooling)", True, description


def probe_dense(task, visual, cfg, layers, size, device, cache):
    """Per layer on patch tokens: segmentation mIoU (softmax probe), depth RMSE or detection box AP (ridge)."""
    train, test, features = dense_probe_set(visual, cfg, size, layers, device, cache, task)
    counts = f"{len(train['images'])} train / {len(test['images'])} test"
    if task == "segmentation":  # extra: classes, ignore_index (ADE20K's label 0)
        probe, field, metric, higher_is_better = segmentation_probe, "semantic", "mIoU % (linear softmax probe)", True
        extra = ((int(max(train["semantic"].max(), test["semantic"].max())) + 1, 0) if cfg.ade20k_dir else
                 (data.DENSE_NUM_CLASSES + 1, None))
        description = (f"ADE20K {cfg.ade20k_dir} (label 0 'other' ignored)" if cfg.ade20k_dir else
                       f"composed scenes: {counts}, {data.DENSE_NUM_CLASSES} emoji classes + background")
    elif task == "depth":
        probe, field, metric, higher_is_better = depth_probe, "depth", "RMSE (linear probe, lower is better)", False
        extra = (train["valid"], test["valid"])
        description = (f"NYU-style depth {cfg.nyu_dir} (metres)" if cfg.nyu_dir else f"composed scenes: depth = 1 / "
                       f"object scale (canvas units; background wall at {1 / data.SCENE_MIN_SCALE:.2f})")
    else:
        probe, field, higher_is_better, extra = detection_probe, "boxes", True, ((size, size),)
        metric = "box AP % (class-agnostic, IoU 0.50:0.95, CenterNet head)"
        description = (f"COCO instances {cfg.coco_instances}: {counts} images (skipped: {train['skipped']})"
                       if cfg.coco_instances else f"composed scenes: {counts}, boxes of their instance masks")
    scores = [probe(features["train"][i], train[field], features["test"][i], test[field], *extra)
              for i in tqdm(range(len(layers)), desc=f"{task} probe per layer", leave=False)]
    return scores, metric, higher_is_better, description


def probe_tracking(visual, cfg, layers, size, device, cache):
    """J per layer of label propagation from the first masks: DAVIS, or composed videos with exact masks."""
    videos = []  # (frames (T, 3, S, S), masks (T, S, S) long with -1 = not annotated, labels incl. background)
    if cfg.davis_dir:
        davis = data.DavisFolder(cfg.davis_dir, size=size)
        for [item] in iterate_batches(davis, 1, "DAVIS sequences", first_indices(davis, cfg.max_images)):
            if (item["masks"][0] >= 0).any():  # else no first-frame annotation to propagate
                masks = item["masks"].masked_fill(item["masks"] == 255, -1)  # DAVIS void pixels: not scored
                videos.append((item["frames"], masks, int(masks[0].max()) + 1))
        description = f"DAVIS {cfg.davis_dir} ({len(videos)} sequences, resized to {size}x{size})"
    else:
        for index in tqdm(range(cfg.num_track_videos), desc="composed videos", leave=False):
            video = data.compose_video(f"evaluate-track-{cfg.seed}-{index}", cfg.track_frames, size)
            frames = torch.stack([pe_model.preprocess_image(frame, size) for frame in video["frames"]])
            videos.append((frames, video["masks"], len(video["labels"]) + 1))
        description = f"composed videos: {cfg.num_track_videos} x {cfg.track_frames} frames (moving emoji, exact masks)"
    per_video = [[] for _ in layers]
    for frames, masks, num_labels in tqdm(videos, desc="tracking videos", leave=False):
        features = layer_features(visual, frames, max(1, cfg.batch_size // 2), None, layers, device, "video features")
        for slot in range(len(layers)):
            pred = propagate_labels(features[slot], masks[0].clamp_min(0), num_labels, cfg.track_topk,
                                    cfg.track_temperature, cfg.track_context, cfg.track_radius)
            per_video[slot].append(track_iou(pred, masks, num_labels))
    scores = [sum(v for v in s if not math.isnan(v)) / max(1, sum(not math.isnan(v) for v in s)) for s in per_video]
    metric = (f"J % (label propagation: top-{cfg.track_topk}, temperature {cfg.track_temperature}, "
              f"first + {cfg.track_context} previous frames, radius {cfg.track_radius} patches)")
    return scores, metric, True, description


PROBES = {"classification": probe_classification, "segmentation": partial(probe_dense, "segmentation"),
          "depth": partial(probe_dense, "depth"), "tracking": probe_tracking,
          "detection": partial(probe_dense, "detection")}


def summarize_layers(layers, scores, metric, higher_is_better, description):
    """A probe's per-layer scores -> its results entry (best layer, last layer's score beside it)."""
    finite = [i for i, s in enumerate(scores) if not math.isnan(s)]
    best = (max if higher_is_better else min)(finite, key=lambda i: scores[i]) if finite else len(scores) - 1
    return {"metric": metric, "higher_is_better": higher_is_better, "layers": layers, "per_layer": scores,
            "best_layer": layers[best], "best": scores[best], "last_layer": layers[-1], "last": scores[-1],
            "data": description}


def run_layerwise(model, cfg, device, cache, probes=tuple(PROBES)):
    """Every probe on every layer (every k-th, and the last): {"layers", "tasks": {probe: entry}, ...}."""
    visual = getattr(model, "visual", model)
    layers, image_size = probed_layers(visual, cfg), cfg.image_size or visual.image_size
    dense_size = cfg.dense_size or dense_resolution(visual, image_size)
    tasks, seconds = {}, {}
    for probe in probes:
        started = time.time()
        tasks[probe] = summarize_layers(layers, *PROBES[probe](visual, cfg, layers, dense_size, device, cache))
        seconds[probe] = round(time.time() - started, 1)
    return {"num_layers": visual.layers, "layers": layers,
            "layer_index": "0-based block index (official layer_idx): layer i = the output of block i, before ln_post",
            "probe": "linear probes on standardised features: closed-form ridge (classification, depth, detection; "
                     "lambda picked on a held-out 20% of the training set), softmax by full-batch gradient descent "
                     "(segmentation); dense predictions upsampled bilinearly from patches to pixels",
            "image_size": image_size, "dense_size": dense_size, "tasks": tasks, "seconds": seconds}


# VQA (language alignment, §4) ----------------------------------------------------------------------------
def run_vqa(cfg, device="cpu"):
    if not cfg.vqa_checkpoint:
        return {"skipped": "no --vqa_checkpoint given (python align_lang.py writes one)"}
    vqa = load_plugin(cfg.vqa_plugin, "vqa_plugin")
    return {**vqa(cfg.vqa_checkpoint, batch_size=cfg.batch_size, device=str(device)), "checkpoint": cfg.vqa_checkpoint}


# Plots, drawn with Pillow (no plotting library): a line per probe against the layer, best layer ringed -----
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def _text(draw, xy, text, size, fill="black", align=(0.0, 0.0)):
    """Text of `size` px at xy, shifted by align = (fraction of its width, of its height): (0.5, 0) centres it."""
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - align[0] * (right - left), xy[1] - align[1] * (bottom - top)), text, fill=fill, font=font)


def draw_panel(draw, box, x_values, series, title, y_label, y_range=None):
    """A line plot in box (left, top, right, bottom) of series {name: (ys, colour, best index or None)}."""
    left, top, right, bottom = box
    plot_l, plot_t, plot_r, plot_b = left + 62, top + 30, right - 14, bottom - 44
    values = [v for ys, _, _ in series.values() for v in ys if not math.isnan(v)]
    low, high = y_range or (min(values, default=0.0), max(values, default=1.0))
    pad = 0.0 if y_range else 0.08 * (high - low) if high > low else 0.5
    low, high = low - pad, high + pad
    step = 10 ** math.floor(math.log10((high - low) / 5))  # a round tick step giving about 5 ticks
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= (high - low) / 5)
    ticks = [t * step for t in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1)]
    decimals = next(d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6 or d == 6)
    x_low, x_span = min(x_values), max(max(x_values) - min(x_values), 1)
    to_px = lambda x, y: (plot_l + (x - x_low) / x_span * (plot_r - plot_l),  # noqa: E731
                          plot_b - (y - low) / (high - low) * (plot_b - plot_t))
    _text(draw, ((left + right) / 2, top + 4), title, 15, align=(0.5, 0))
    for tick in ticks:  # horizontal grid and y tick labels
        y = to_px(x_low, tick)[1]
        draw.line([(plot_l, y), (plot_r, y)], fill=(225, 225, 225))
        _text(draw, (plot_l - 8, y - 2), f"{tick:.{decimals}f}", 12, align=(1, 0.5))
    every = max(1, math.ceil(len(x_values) / 12))
    for x in x_values[::every] + ([x_values[-1]] if (len(x_values) - 1) % every else []):
        px = to_px(x, low)[0]
        draw.line([(px, plot_b), (px, plot_b + 5)], fill="black")
        _text(draw, (px, plot_b + 7), str(x), 12, align=(0.5, 0))
    draw.line([(plot_l, plot_t), (plot_l, plot_b), (plot_r, plot_b)], fill="black", width=1)
    _text(draw, ((plot_l + plot_r) / 2, plot_b + 24), "layer (0-based block index)", 12, align=(0.5, 0))
    _text(draw, (left + 4, top + 8), y_label, 12, fill=(90, 90, 90))
    for ys, colour, best in series.values():
        points = [to_px(x, y) for x, y in zip(x_values, ys) if not math.isnan(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3, joint="curve")
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        if best is not None and not math.isnan(ys[best]):
            px, py = to_px(x_values[best], ys[best])
            draw.ellipse([px - 8, py - 8, px + 8, py + 8], outline="black", width=2)


def normalised_scores(entry):
    """A probe's per-layer scores mapped to [0, 1], 1 = its best layer (RMSE inverted)."""
    scores = [s if entry["higher_is_better"] else -s for s in entry["per_layer"]]
    finite = [s for s in scores if not math.isnan(s)]
    low, high = min(finite, default=0.0), max(finite, default=1.0)
    return [float("nan") if math.isnan(s) else (1.0 if high == low else (s - low) / (high - low)) for s in scores]


def plot_layerwise(out_dir, suffix, tasks):
    """layerwise{suffix}.png, every probe normalised (1 = its best layer) with a legend of the raw scores, and
    layerwise_tasks{suffix}.png, a panel per probe with its raw scores: their paths."""
    paths = [os.path.join(out_dir, f"layerwise{suffix}.png"), os.path.join(out_dir, f"layerwise_tasks{suffix}.png")]
    draw = ImageDraw.Draw(image := Image.new("RGB", (1000, 560), "white"))
    series = {name: (normalised_scores(entry), COLOURS[k % len(COLOURS)], entry["layers"].index(entry["best_layer"]))
              for k, (name, entry) in enumerate(tasks.items())}
    draw_panel(draw, (0, 0, 700, 560), next(iter(tasks.values()))["layers"], series, "Frozen features per layer",
               "normalised score (1 = best layer)", y_range=(-0.05, 1.05))
    for k, (name, entry) in enumerate(tasks.items()):
        y = 60 + 84 * k
        draw.line([(712, y + 9), (742, y + 9)], fill=COLOURS[k % len(COLOURS)], width=3)
        draw.ellipse([722, y + 4, 732, y + 14], outline="black", width=2)
        _text(draw, (750, y), name, 14)
        _text(draw, (750, y + 20), f"best: layer {entry['best_layer']} = {entry['best']:.3g}", 12, (60, 60, 60))
        _text(draw, (750, y + 36), f"last: layer {entry['last_layer']} = {entry['last']:.3g}", 12, (60, 60, 60))
        _text(draw, (750, y + 52), entry["metric"].split(" (")[0], 12, (110, 110, 110))
    _text(draw, (712, 64 + 84 * len(tasks)), "ring = best layer", 12, (90, 90, 90))
    image.save(paths[0])
    columns = 2 if len(tasks) > 1 else 1
    draw = ImageDraw.Draw(image := Image.new("RGB", (520 * columns, 340 * math.ceil(len(tasks) / columns)), "white"))
    for k, (name, entry) in enumerate(tasks.items()):
        left, top = 520 * (k % columns), 340 * (k // columns)
        series = {name: (entry["per_layer"], COLOURS[k % len(COLOURS)], entry["layers"].index(entry["best_layer"]))}
        title = f"{name}: best layer {entry['best_layer']}, last {entry['last_layer']}"
        draw_panel(draw, (left, top, left + 520, top + 340), entry["layers"], series, title,
                   entry["metric"].split(" (")[0])
    image.save(paths[1])
    return paths


# Feature maps: where spatial structure lives ------------------------------------------------------------
def pca_rgb(grids):
    """Patch tokens (N, gh, gw, W) -> (N, gh, gw, 3) uint8: on the first 3 principal components over the batch
    (signs: the largest loading positive), each min-max scaled to 0-255."""
    centred = grids.flatten(0, 2).double() - grids.flatten(0, 2).double().mean(dim=0)
    components = torch.linalg.svd(centred, full_matrices=False)[2][:3]  # (<= 3, W)
    components = components * components.gather(1, components.abs().argmax(dim=1, keepdim=True)).sign()
    projected = F.pad(centred @ components.T, (0, 3 - len(components)))  # fewer than 3 channels: black
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    return ((projected - low) / (high - low).clamp_min(1e-12) * 255).round().byte().view(*grids.shape[:3], 3)


@torch.no_grad()
def run_feature_maps(model, cfg, device, path, count=4, tile=96):
    """`count` composed scenes and --images (the first --max_images) at the dense resolution: a PNG at path, a row
    per image, the image then its patch tokens' pca_rgb colours per probed layer."""
    visual = getattr(model, "visual", model)
    size, layers = cfg.dense_size or dense_resolution(visual, cfg.image_size), probed_layers(visual, cfg)
    scenes = data.ComposedScenes(count, size, seed=f"evaluate-maps-{cfg.seed}")
    images, bad = [scenes[k]["image"] for k in range(count)], 0
    for name in sorted(os.listdir(cfg.images))[:cfg.max_images or None] if cfg.images else []:
        try:
            with Image.open(os.path.join(cfg.images, name)) as image:
                images.append(pe_model.preprocess_image(image, size))
        except OSError:  # not an image
            bad += 1
    grids = layer_features(visual, torch.stack(images), max(1, cfg.batch_size // 2), None, layers, device, "maps")
    cells = [F.interpolate(torch.stack(images).add(1).mul(127.5), (tile, tile), mode="bilinear", antialias=True)]
    cells += [F.interpolate(pca_rgb(grid).permute(0, 3, 1, 2).float(), (tile, tile), mode="nearest") for grid in grids]
    rows = torch.cat(cells, dim=3).round().clamp(0, 255).byte()  # (N, 3, tile, tile * (1 + layers)): image, maps
    canvas = Image.new("RGB", (tile * len(cells), 20 + tile * len(images)), "white")
    canvas.paste(Image.fromarray(torch.cat(list(rows), dim=1).permute(1, 2, 0).numpy()), (0, 20))
    for column, label in enumerate(["image"] + [f"layer {layer}" for layer in layers]):
        _text(ImageDraw.Draw(canvas), (tile * column + tile / 2, 3), label, 12, align=(0.5, 0))
    canvas.save(path)
    return {"file": os.path.basename(path), "images": len(images), "skipped_bad": bad, "layers": layers,
            "image_size": size, "data": f"{count} composed scenes" + f" and {cfg.images}" * bool(cfg.images)}


# Reports -------------------------------------------------------------------------------------------------
TITLES = {"zero_shot": "Zero-shot classification", "robustness": "Robustness (zero-shot on shifted val sets)",
          "retrieval": "Retrieval", "video_zero_shot": "Video zero-shot classification", "vqa": "VQA",
          "layerwise": "Layer-wise frozen probes", "tracking": "Tracking (label propagation)",
          "feature_maps": "Feature maps (patch tokens on their first three principal components)"}


def task_report(task, entry, suffix=""):
    """The paragraphs and tables of a task's section of results.md (suffix: that of its plots' file names)."""
    if "skipped" in entry:
        return [f"Skipped: {entry['skipped']}"]
    if task in ("zero_shot", "video_zero_shot"):
        what = (f"{entry['templates']}-template ensemble; {entry['images']} images" if task == "zero_shot" else
                f"{entry['frames_per_video']} frames per video, frame embeddings averaged; {entry['videos']} videos")
        return [f"{entry['data']}; {what} ({entry['skipped_bad']} unreadable skipped).",
                markdown_table(["top-1 %", "top-5 %"], [[entry["top1"], entry["top5"]]])]
    if task == "robustness":
        rows = [[name, s["top1"], s["top5"]] for name, s in {"clean val": entry["clean"], **entry["shifts"]}.items()]
        rows += [["**robustness average**"] + [f"**{fmt(entry['robustness_average'][k])}**" for k in ("top1", "top5")]]
        notes = [f"- {name}: {note}" for name, note in entry["notes"].items()]
        return [f"{entry['data']}; {entry['images_per_set']} images per set.",
                markdown_table(["set", "top-1 %", "top-5 %"], rows)] + (["\n".join(notes)] if notes else [])
    if task == "retrieval":
        rows = [[d.replace("_", " ")] + [entry[d][k] for k in ("R@1", "R@5", "R@10")]
                for d in ("image_to_text", "text_to_image")]
        return [f"{entry['data']}; {entry['images']} images, {entry['texts']} texts.",
                markdown_table(["direction", "R@1", "R@5", "R@10"], rows)]
    if task == "layerwise":
        tasks = entry["tasks"]
        summary = [[name] + [t[k] for k in ("metric", "best_layer", "best", "last_layer", "last")]
                   for name, t in tasks.items()]
        per_layer = [[layer] + [f"**{fmt(t['per_layer'][slot], 2)}**" if layer == t["best_layer"] else
                                t["per_layer"][slot] for t in tasks.values()]
                     for slot, layer in enumerate(entry["layers"])]
        return [f"{entry['num_layers']} layers; {entry['layer_index']}. {entry['probe']}.",
                markdown_table(["probe", "metric", "best layer", "best", "last layer", "last"], summary, 2),
                "Per layer:", markdown_table(["layer", *tasks], per_layer, 2),
                "Data: " + "; ".join(f"{name}: {t['data']}" for name, t in tasks.items()) + ".",
                f"![score per layer](layerwise{suffix}.png)", f"![each probe per layer](layerwise_tasks{suffix}.png)"]
    if task == "feature_maps":
        return [f"{entry['data']} at {entry['image_size']} px ({entry['skipped_bad']} unreadable skipped); a column "
                "per layer: its patch tokens on their first 3 principal components as RGB.", f"![]({entry['file']})"]
    if task == "tracking":
        return [f"{entry['data']}. J: best layer {entry['best_layer']} = {fmt(entry['best'])}, last layer "
                f"{entry['last_layer']} = {fmt(entry['last'])}."]
    scalars = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}  # VQA: the plug-in's own keys
    blocks = [markdown_table(list(scalars), [list(scalars.values())], 3)]
    for key, value in entry.items():
        if isinstance(value, dict):
            blocks += [f"{key}:", markdown_table(["", ""], [list(item) for item in value.items()], 3)]
        elif isinstance(value, list):
            blocks += [f"{key}:", "\n".join(f"- {item}" for item in value)]
    return blocks


def headline(task, entry):
    """[(label, value)]: the figures of a task that its summary line and the comparison table show."""
    if "skipped" in entry:
        return []
    if task in ("zero_shot", "video_zero_shot"):
        return [("top-1 %", entry["top1"]), ("top-5 %", entry["top5"])]
    if task == "robustness":
        return [(f"robustness average top-{k[-1]} %", entry["robustness_average"][k]) for k in ("top1", "top5")] + [
            ("clean top-1 %", entry["clean"]["top1"])]
    if task == "retrieval":
        return [("image->text R@1", entry["image_to_text"]["R@1"]), ("text->image R@1", entry["text_to_image"]["R@1"])]
    if task == "layerwise":
        return [row for name, t in entry["tasks"].items() for row in headline(name, t)]
    if "per_layer" in entry:  # a probe, or the tracking task
        return [(f"{task} {key.replace('_', ' ')}", entry[key]) for key in ("best_layer", "best", "last")]
    return [(k, v) for k, v in entry.items() if k != "seconds" and not isinstance(v, (dict, list))]


def results_markdown(results, suffix="", level=1):
    """One checkpoint's results.md, or its section one heading level down in a comparison."""
    meta, head = results.get("meta", {}), "#" * level
    blocks = [f"{head} Evaluation: {meta.get('model', '')}",
              f"Device {meta.get('device', '')}; wall time {meta.get('seconds', 0):.0f} s; written by "
              f"`{meta.get('command', 'python evaluate.py')}`."]
    for task in TASKS:
        if results.get(task) is not None and (task != "layerwise" or results[task].get("tasks")):
            blocks += [f"{head}# {TITLES[task]}"] + task_report(task, results[task], suffix)
    return "\n\n".join(blocks) + "\n"


def comparison_markdown(runs, meta):
    """Several checkpoints: a table per task, a column per checkpoint, then each checkpoint's own section."""
    blocks = [f"# Evaluation: {len(runs)} checkpoints",
              f"Device {meta['device']}; wall time {meta['seconds']:.0f} s; written by `{meta['command']}`."]
    header = [""] + [f"{k + 1}: {results['meta']['model']}" for k, results in enumerate(runs)]
    for task in TASKS:
        entries = [results.get(task) for results in runs]
        if any(entry is not None for entry in entries):
            figures = [dict(headline(task, entry)) if entry else {} for entry in entries]
            missing = ["not run" if e is None else "skipped" if "skipped" in e else None for e in entries]
            labels = list(dict.fromkeys(label for f in figures for label in f))
            rows = [[label] + [f.get(label, m) for f, m in zip(figures, missing)] for label in labels]
            blocks += [f"## {TITLES[task]}", markdown_table(header, rows or [["", *missing]], 2)]
    return "\n\n".join(blocks + [results_markdown(results, f"_{k + 1}", level=2) for k, results in enumerate(runs)])


def write_results(runs, meta, out_dir):
    """results.json, results.md and each checkpoint's layer-wise plots into out_dir (see the docstring); paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths, several = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")], len(runs) > 1
    write_json(paths[0], {"checkpoints": runs, "meta": meta} if several else runs[0])
    with open(paths[1], "w") as f:
        f.write(comparison_markdown(runs, meta) if several else results_markdown(runs[0]))
    for k, results in enumerate(runs):
        if (results.get("layerwise") or {}).get("tasks"):
            paths += plot_layerwise(out_dir, f"_{k + 1}" if several else "", results["layerwise"]["tasks"])
    return paths


# Running -------------------------------------------------------------------------------------------------
def evaluate_checkpoint(cfg, selected, device, command, vqa, suffix=""):
    """One checkpoint's results: {task: entry, ..., "meta"}. vqa: the VQA entry, computed once for all."""
    started, (model, description, checkpoint_path) = time.time(), load_eval_model(cfg)
    resolve_defaults(cfg, model.to(device), checkpoint_path)
    print(f"evaluating {description} on {device} at {cfg.image_size} px: {', '.join(selected)}")
    cache, results = {}, {}  # cache: the zero-shot classifier, the clean val embeddings, the scenes' features
    runners = {"zero_shot": run_zero_shot, "robustness": run_robustness, "retrieval": run_retrieval,
               "video_zero_shot": run_video_zero_shot}
    for task in selected:
        task_started = time.time()
        if task in runners:
            results[task] = (runners[task](model, cfg, device, cache) if isinstance(model, pe_model.CLIP) else
                             {"skipped": "a vision-only tower (no text tower): zero-shot tasks need a CLIP checkpoint"})
        elif task in ("layerwise", "tracking"):  # tracking alone, or the layer-wise run's (computed once)
            entry = results.get("layerwise") or run_layerwise(model, cfg, device, cache, PROBES if task == "layerwise"
                                                              else ("tracking",))
            results[task] = entry if task == "layerwise" else dict(entry["tasks"]["tracking"])
        elif task == "feature_maps":  # the PNG beside results.md
            os.makedirs(cfg.out_dir, exist_ok=True)
            results[task] = run_feature_maps(model, cfg, device, os.path.join(cfg.out_dir, f"feature_maps{suffix}.png"))
        elif task == "vqa":
            vqa = vqa or run_vqa(cfg, device)
            results["vqa"] = dict(vqa)
        results[task]["seconds"] = round(time.time() - task_started, 1)
        figures = ", ".join(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}"
                            for label, value in headline(task, results[task]))
        print(f"  {task}: {figures or 'skipped (' + results[task].get('skipped', '') + ')'}")
    results["meta"] = {"model": description, "config": asdict(cfg), "device": str(device),
                       "seconds": round(time.time() - started, 1), "command": command}
    return results, vqa


def main(argv=None):
    cfg = parse_config(EvalConfig(), argv, RULES)
    selected = [task for task in TASKS if getattr(cfg, task) or cfg.all] or list(TASKS)
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    models = cfg.model.split(",") if cfg.model else [""]  # --model=NAME for every checkpoint, or one each
    checkpoints = [""] * len(models) if cfg.random_init else [c for c in cfg.checkpoint.split(",") if c] or [""]
    if len(models) not in (1, len(checkpoints)):
        raise SystemExit(f"--model={cfg.model}: give one name, or one per checkpoint ({len(checkpoints)})")
    for checkpoint in filter(None, checkpoints):
        resolve_checkpoint(checkpoint)
    if "vqa" in selected and cfg.vqa_checkpoint:
        load_plugin(cfg.vqa_plugin, "vqa_plugin")
    started, runs, vqa = time.time(), [], None
    command = "python evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if cfg.coco_instances and not cfg.coco_images:
        raise SystemExit("--coco_instances needs --coco_images=FOLDER (the folder its file_name entries are in)")
    for k, (checkpoint, model) in enumerate(zip(checkpoints, models if len(models) > 1 else models * len(checkpoints))):
        results, vqa = evaluate_checkpoint(replace(cfg, checkpoint=checkpoint, model=model), selected, device,
                                           command, vqa, f"_{k + 1}" if len(checkpoints) > 1 else "")
        runs.append(results)
    meta = {"models": [results["meta"]["model"] for results in runs], "device": str(device),
            "seconds": round(time.time() - started, 1), "command": command}
    print(f"wrote {', '.join(write_results(runs, meta, cfg.out_dir))} ({meta['seconds']:.0f} s)")
    return {"checkpoints": runs, "meta": meta} if len(runs) > 1 else runs[0]


if __name__ == "__main__":
    main()
