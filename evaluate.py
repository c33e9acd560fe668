"""
evaluate.py: the evaluations of the Perception Encoder paper (Bolya et al. 2025, arXiv 2504.13181) for one
checkpoint or several side by side, around the layer-wise analysis of §3 ("the best visual embeddings are not
at the output of the network").

    python evaluate.py --all                                          # the newest train_clip.py checkpoint
    python evaluate.py --all --checkpoint=PE-Core-B16-224.pt --model=PE-Core-B16-224   # an official .pt
    python evaluate.py --all --checkpoint=out/clip/final.pt,out/video/video_finetune.pt   # core vs video core
    python evaluate.py --layerwise --checkpoint=out/clip/final.pt,out/spatial/spatial.pt  # core vs PE-Spatial
    python evaluate.py --zero_shot --imagenet_dir=imagenet/val --class_names=imagenet_names.json
    python evaluate.py --vqa --vqa_checkpoint=out/lang/vlm.pt        # --vqa_plugin=align_lang:vqa_accuracy

Tasks (--all, or any of the flags; none = all), on small embedded data (data.py) or the public layouts:
--zero_shot (top-1 / top-5, pe_model.zero_shot_classifier's prompt ensemble, scored as clip_benchmark does);
--robustness (zero-shot on shifted val copies standing in for ImageNet-v2/-R/-Sketch/-A and ObjectNet, and their
mean, the paper's robustness average); --retrieval (image<->text recall@1/5/10, COCO captions);
--video_zero_shot (§2.2: a video is the mean of its 8 uniformly sampled frames' embeddings); --layerwise (§3:
frozen probes on every block's tokens, 0-based as the official layer_idx, before ln_post: classification,
segmentation mIoU, depth RMSE, tracking J by label propagation as DINO / DAVIS, --tracking alone); --vqa (§4,
by the --vqa_plugin function). Every EvalConfig field is a --field=value option. --checkpoint=A,B evaluates
each (--model=NAME for all, or NAME_A,NAME_B); a vision-only tower (PE-Spatial, PE-Lang) skips the text tasks.
A train_clip.py checkpoint sets the class count, resolution and seed to its run's (zero-shot scores its held-out
split). Writes into --out_dir: results.json (a key per task plus meta; several checkpoints: {"checkpoints": [one
such dict each], "meta"}), results.md (the tables; several checkpoints: first a table per task with a column per
checkpoint), layerwise.png (every probe against the layer) and layerwise_tasks.png (a panel per probe), or
layerwise_k.png / layerwise_tasks_k.png for the k-th of several checkpoints.
"""

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
from training import (RULES as TRAINING_RULES, checkpoint_train_config, final_resolution, fmt, load_plugin,
                      markdown_table, parse_config, positive, resolve_checkpoint, write_json)

TASKS = ("zero_shot", "robustness", "retrieval", "video_zero_shot", "layerwise", "tracking", "vqa")


@dataclass
class EvalConfig:
    checkpoint: str = ""  # ours or official .pt file(s), comma-separated; "" = the newest train_clip.py wrote
    model: str = ""  # official name: needed for official .pt files (PE-Core-B16-224); one, or one per checkpoint
    random_init: bool = False  # evaluate an untrained --model (a baseline); no checkpoint read
    out_dir: str = "out/eval"  # results.json, results.md and the plots go here
    # which evaluations (none given = all)
    all: bool = False
    zero_shot: bool = False
    robustness: bool = False
    retrieval: bool = False
    video_zero_shot: bool = False
    layerwise: bool = False  # all four probes per layer (fills the tracking key too)
    tracking: bool = False  # the tracking probe per layer alone
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
    # probes
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
    kinetics_dir: str = ""  # Kinetics-style class folders of videos (data.VideoFolder)
    ade20k_dir: str = ""  # ADE20K: images/{training,validation} + annotations/{training,validation}; 0 ignored
    nyu_dir: str = ""  # NYU-style rgb/depth pairs (data.DepthPairs); train/ and test/ subfolders if present
    davis_dir: str = ""  # DAVIS: JPEGImages/480p/<seq> + Annotations/480p/<seq>
    max_images: int = 0  # cap on the images / videos / sequences read from a public set (0 = all)
    # language alignment: the stage that owns the VLM provides its accuracy as a plug-in
    vqa_checkpoint: str = ""  # a checkpoint align_lang.py wrote
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
    """Fill the 0 = automatic fields from a train_clip.py checkpoint's train_config (its class count, last-stage
    resolution and seed give back its held-out split); else 100 classes at the model's pretraining size."""
    trained = checkpoint_train_config(checkpoint_path) if checkpoint_path else {}
    trained = trained if trained.get("data") == "emoji" else {}
    if not cfg.num_classes:
        cfg.num_classes = data.trained_class_count(trained)
    if not cfg.image_size:
        cfg.image_size = final_resolution(trained, vision_tower(model).image_size)
    if trained and cfg.seed == 0:
        cfg.seed = int(trained.get("seed", 0))
    return cfg


def vision_tower(model):
    return model.visual if isinstance(model, pe_model.CLIP) else model


def iterate_batches(dataset, batch_size, desc, indices=None):
    """Lists of the good items, batch_size at a time (a None item is a bad sample the dataset counted)."""
    batch = []
    for index in tqdm(range(len(dataset)) if indices is None else indices, desc=desc, leave=False):
        item = dataset[index]
        if item is not None:
            batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def first_indices(dataset, max_items):
    return range(min(len(dataset), max_items) if max_items else len(dataset))


@torch.no_grad()
def encode_image_dataset(model, dataset, batch_size=64, device="cpu", desc="images", indices=None, video=False):
    """(image, caption, label) items -> (L2-normalised image embeddings (N, D), labels (N,), captions [N]); video:
    (clip, ...) items, a clip's embedding the mean of its L2-normalised frame embeddings (§2.2), renormalised."""
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
    """{"top1": %, "top5": %} of L2-normalised image features (N, D) under a zero-shot classifier (C, D):
    logits = 100 * image_features @ classifier.T; a hit when the label is among the k highest (k capped at C)."""
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
    """The unshifted val set, encoded once per checkpoint (zero-shot, robustness and embedded retrieval share
    it): (class names, indices, description, classifier or None, (embeddings, labels, captions))."""
    image_size = cfg.image_size or vision_tower(model).image_size
    dataset, class_names, indices, description = classification_set(cfg, image_size)
    if classifier and ("classifier", tuple(class_names)) not in cache:
        cache["classifier", tuple(class_names)] = pe_model.zero_shot_classifier(
            model, class_names, data.ZERO_SHOT_TEMPLATES, batch_size=4 * cfg.batch_size, device=device).cpu()
    key = ("clean", cfg.imagenet_dir, image_size, len(indices))
    if key not in cache:
        cache[key] = encode_image_dataset(model, dataset, cfg.batch_size, device, "val images", indices)
    return class_names, indices, description, cache.get(("classifier", tuple(class_names))), cache[key]


def run_zero_shot(model, cfg, device, cache):
    class_names, indices, description, classifier, (features, labels, _) = clean_val(model, cfg, device, cache)
    return {**zero_shot_accuracy(features, classifier, labels), "images": len(labels),
            "skipped_bad": len(indices) - len(labels), "classes": len(class_names),
            "templates": len(data.ZERO_SHOT_TEMPLATES), "data": description}


# Robustness ----------------------------------------------------------------------------------------------
# Shifted val copies stand in for ImageNet-v2/-R/-Sketch/-A and ObjectNet, the paper's robustness average's sets.


def _rand(generator, low=0.0, high=1.0):
    return low + (high - low) * torch.rand((), generator=generator).item()


def shift_image(name, image, generator):
    """A PIL image under the distribution shift `name`, deterministic given the torch.Generator."""
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
        side = _rand(generator, 0.4, 0.6)
        box_w, box_h = round(side * image.width), round(side * image.height)
        x0, y0 = round(_rand(generator) * (image.width - box_w)), round(_rand(generator) * (image.height - box_h))
        grey = round(_rand(generator, 64, 192))
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=(grey, grey, grey))
        return image
    # rotation, ObjectNet-like unusual viewpoints: 45-135 degrees either way, grey corners
    angle = _rand(generator, 45, 135) * (1 if _rand(generator) < 0.5 else -1)
    return image.rotate(angle, resample=Image.BILINEAR, fillcolor=(128, 128, 128))


SHIFTS = {name: partial(shift_image, name) for name in ("sketch", "posterize", "blur", "noise", "occlusion",
                                                        "rotation")}


def shifted_transform(shift, size, image, generator=None):
    """A dataset transform as partial(shifted_transform, shift, size): the shift, then the preprocessing."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return pe_model.preprocess_image(shift(image, generator), size)


def run_robustness(model, cfg, device, cache):
    image_size = cfg.image_size or vision_tower(model).image_size
    _, indices, description, classifier, (features, labels, _) = clean_val(model, cfg, device, cache)
    clean, sets, notes = zero_shot_accuracy(features, classifier, labels), {}, {}
    for name, shift in SHIFTS.items():
        shifted = classification_set(cfg, image_size, transform=partial(shifted_transform, shift, image_size))[0]
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
    """Recall@k both ways: {"image_to_text": {"R@1": %, ...}, "text_to_image": {...}}. similarity and relevant
    (N_images, N_texts); a query is found at k when ANY of its matches is among its k most similar items;
    queries without a match are left out."""
    out = {}
    for name, scores, matches in (("image_to_text", similarity, relevant), ("text_to_image", similarity.T, relevant.T)):
        ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (Q, kmax)
        hits = matches.gather(1, ranked)  # (Q, kmax): is the r-th ranked item a match
        answerable = matches.any(dim=1)
        out[name] = {f"R@{k}": 100.0 * hits[answerable, :k].any(dim=1).float().mean().item() for k in ks}
    return out


def caption_relevance(captions_per_image):
    """[[captions of image 0], ...] -> (flat caption list, relevant (N_images, N_captions) bool)."""
    texts, owner = [], []
    for index, captions in enumerate(captions_per_image):
        texts += captions
        owner += [index] * len(captions)
    relevant = torch.arange(len(captions_per_image))[:, None] == torch.tensor(owner, dtype=torch.long)[None, :]
    return texts, relevant


@torch.no_grad()
def run_retrieval(model, cfg, device, cache):
    image_size = cfg.image_size or vision_tower(model).image_size
    if cfg.coco_json:
        if not cfg.coco_images:
            raise SystemExit("--coco_json needs --coco_images=FOLDER (the folder its file_name entries are in)")
        dataset = data.CocoCaptions(cfg.coco_json, cfg.coco_images, image_size=image_size, train=False)
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
        unique = sorted({(caption, int(label)) for caption, label in zip(captions, labels)})
        texts = [caption for caption, _ in unique]
        relevant = labels[:, None] == torch.tensor([label for _, label in unique])[None, :]
        description, skipped = f"embedded val captions: {len(labels)} images, class-level matches", 0
    step = 4 * cfg.batch_size
    text_features = torch.cat([model.encode_text(pe_model.tokenize(texts[s:s + step], model.context_length).to(device),
                                                 normalize=True).float().cpu()
                               for s in tqdm(range(0, len(texts), step), desc="retrieval texts", leave=False)])
    return {**recall_at_k(image_features @ text_features.T, relevant), "images": image_features.shape[0],
            "texts": len(texts), "skipped_bad": skipped, "data": description}


# Video zero-shot classification (§2.2) -------------------------------------------------------------------
# A video's embedding is the mean of its frames' embeddings.

VIDEO_TEMPLATES = tuple(data.ZERO_SHOT_TEMPLATES) + ("a video of {a}.", "a clip of {a}")


@torch.no_grad()
def run_video_zero_shot(model, cfg, device, cache):
    image_size = cfg.image_size or vision_tower(model).image_size
    if cfg.kinetics_dir:
        dataset = data.VideoFolder(cfg.kinetics_dir, cfg.num_frames, image_size=image_size,
                                   class_names=cfg.class_names or None)
        indices, class_names = first_indices(dataset, cfg.max_images), dataset.class_names
        description = f"video class folders {cfg.kinetics_dir}"
    else:
        size = image_size + image_size % 2  # yuv420p needs an even frame size
        folder = os.path.join(cfg.out_dir, "embedded_videos")
        # the subjects are spread over the classes the core was trained on (cfg.num_classes, from its checkpoint)
        items = data.make_embedded_videos(folder, cfg.num_videos, cfg.video_frames, size, cfg.seed,
                                          num_classes=cfg.num_video_classes, class_pool=cfg.num_classes)
        dataset = data.VideoList(items, cfg.num_frames, image_size=image_size, label_key="class_id")
        class_names = [name for _, name in data.embedded_video_classes(cfg.num_video_classes, cfg.num_classes)]
        indices = range(len(dataset))
        description = (f"embedded: {cfg.num_videos} composed videos ({cfg.video_frames} frames, .mp4 in {folder}), "
                       f"{cfg.num_video_classes} emoji classes of the {cfg.num_classes} classification classes")
    classifier = pe_model.zero_shot_classifier(model, class_names, VIDEO_TEMPLATES, device=device).cpu()
    features, labels, _ = encode_image_dataset(model, dataset, max(1, cfg.batch_size // cfg.num_frames), device,
                                               description, indices, video=True)
    return {**zero_shot_accuracy(features, classifier, labels), "videos": len(labels),
            "skipped_bad": len(indices) - len(labels), "classes": len(class_names), "frames_per_video": cfg.num_frames,
            "data": description}


# Layer-wise frozen features (§3) -------------------------------------------------------------------------
# One forward_all_layers pass per image gives every block's tokens.


@torch.no_grad()
def layer_features(visual, images, batch_size=32, pooling=None, layers=None, device="cpu", desc="layer features"):
    """Frozen features of the kept layers (0-based block indices, default all) from ONE forward pass per image
    (N, 3, H, W), taken before ln_post as the official forward_features(layer_idx=i): per layer a float32 CPU
    tensor, the patch-token grid (N, gh, gw, W) with pooling None, their mean or the class token (N, W)."""
    layers = list(range(visual.layers)) if layers is None else list(layers)
    if pooling == "cls" and not visual.use_cls_token:
        raise ValueError("pooling='cls': this tower has no class token; use pooling='mean'")
    if pooling not in (None, "mean", "cls"):
        raise ValueError(f"pooling must be None, 'mean' or 'cls', not {pooling!r}")
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


def dense_resolution(visual, image_size=0, min_grid=16):
    """image_size (default the model's) raised to min_grid patches a side: a coarser grid caps a dense score
    whatever the features (PE too evaluates dense tasks above its pretraining resolution)."""
    return max(image_size or visual.image_size, min_grid * visual.patch_size)


# Linear probes -------------------------------------------------------------------------------------------
# On standardised features, deterministic. Classification and depth: ridge regression,
# W = (X^T X + lambda I)^-1 X^T Y from one eigendecomposition of X^T X (one product per lambda), lambda picked
# on a held-out 20% of the training set. Segmentation: a softmax probe (fit_softmax_probe).

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # lambda as a multiple of the sample count


def _ridge_solutions(x, y, l2_values, chunk=16384):
    """Centred standardised features x (n, d), targets y (n, k) -> [(weight (d, k), bias (k,))] per lambda."""
    mean_y = y.double().mean(dim=0)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start:start + chunk].double(), y[start:start + chunk].double() - mean_y
        gram += xc.T @ xc
        cross += xc.T @ yc
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    rotated = eigenvectors.T @ cross  # (d, k)
    # centred features: the bias is the target mean
    return [(eigenvectors @ (rotated / (eigenvalues.clamp_min(0) + l2)[:, None]), mean_y) for l2 in l2_values]


def fit_linear_probe(features, targets, select="mse", l2_grid=L2_GRID, holdout=0.2, seed=0):
    """Ridge regression from features (n, d) to targets (n, k) (one-hot or soft class scores, or values).
    select: how the held-out split picks lambda, "mse" or "accuracy" (argmax of prediction vs target).
    Returns (weight (d, k), bias (k,)) acting on the raw features: predictions = features @ weight + bias."""
    features, targets = features.float(), targets.float()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    standardised = (features - mean) / std
    n = len(features)
    held = int(n * holdout) if n >= 10 else 0
    best_l2 = 1e-2
    if held:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        fit, check = order[held:], order[:held]
        fit_mean = standardised[fit].mean(dim=0)
        errors = []
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
    """Multinomial logistic regression (n, d) -> (n, k) soft class targets: cross-entropy + l2 |W|^2 by
    full-batch Nesterov gradient descent from zero with step 1 / L (the softmax Hessian is at most 1/2 X^T X / n),
    so deterministic and untuned; max_samples seeded rows. Returns (weight, bias) on the raw features. Used for
    segmentation: with most pixels background, least-squares scores rarely rank an object class first."""
    features, targets = features.float(), targets.float()
    if len(features) > max_samples:
        keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_samples]
        features, targets = features[keep], targets[keep]
    n = len(features)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    inputs = torch.cat([(features - mean) / std, torch.ones(n, 1)], dim=1)  # (n, d + 1): the bias as a column
    decay = torch.cat([torch.ones(inputs.shape[1] - 1, 1), torch.zeros(1, 1)])  # no weight decay on the bias
    lipschitz = 0.5 * torch.linalg.eigvalsh(inputs.T @ inputs / n)[-1].item() + 2 * l2
    weight = torch.zeros(inputs.shape[1], targets.shape[1])
    lookahead, momentum = weight, 1.0
    for _ in range(steps):
        # gradient of the mean cross-entropy: X^T (softmax(X W) - Y) / n, plus the weight decay
        gradient = inputs.T @ (torch.softmax(inputs @ lookahead, dim=1) - targets) / n + 2 * l2 * decay * lookahead
        updated = lookahead - gradient / lipschitz
        next_momentum = (1 + math.sqrt(1 + 4 * momentum ** 2)) / 2
        lookahead = updated + (momentum - 1) / next_momentum * (updated - weight)
        weight, momentum = updated, next_momentum
    weight, bias = weight[:-1], weight[-1]
    return weight / std[:, None], bias - (mean / std) @ weight


def classification_probe(train_features, train_labels, test_features, test_labels, num_classes):
    """Top-1 accuracy (%) of a linear probe (ridge on one-hot targets) trained on (N, d) pooled features."""
    targets = F.one_hot(train_labels.long(), num_classes).float()
    weight, bias = fit_linear_probe(train_features, targets, select="accuracy")
    predictions = (test_features.float() @ weight + bias).argmax(dim=1)
    return 100.0 * (predictions == test_labels).float().mean().item()


def _patch_index(shape, grid):
    """Pixel maps of shape (N, H, W) -> the (image, patch) slot of each pixel (N, H*W), pixel (y, x) falling in
    patch (y * gh // H, x * gw // W), and each patch's pixel count (gh*gw,)."""
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
    valid = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        valid &= flat != ignore_index
    slots = patch_index * num_classes + flat.clamp(0, num_classes - 1)
    counts = torch.bincount(slots[valid], minlength=len(labels) * len(pixels) * num_classes).float()
    counts = counts.view(len(labels), *grid, num_classes)
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
    """Patch predictions (N, gh, gw, K) -> pixel predictions (N, K, H, W), bilinear (align_corners=False)."""
    return F.interpolate(patch_values.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """Counts (target class, predicted class); targets ignore_index or outside [0, num_classes) left out."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    pred = pred.clamp(0, num_classes - 1)
    counts = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def miou_from_confusion(confusion, ignore_index=None):
    """Mean IoU (%) over classes present in the target or the prediction (IoU = TP / (TP + FP + FN));
    classes absent from both are left out of the mean, as the ADE20K benchmark does."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    present = union > 0
    if ignore_index is not None and 0 <= ignore_index < len(present):
        present[ignore_index] = False
    return 100.0 * (true_positive[present] / union[present]).mean().item() if present.any() else float("nan")


def segmentation_probe(train_grids, train_labels, test_grids, test_labels, num_classes, ignore_index=None,
                       chunk=8):
    """mIoU (%) of a softmax probe on patch tokens (N, gh, gw, W) trained on per-patch class fractions, its test
    logits upsampled bilinearly to pixels and scored against the full-resolution class maps (N, H, W)."""
    grid = train_grids.shape[1:3]
    targets, valid = patch_targets(train_labels, grid, num_classes, ignore_index)
    keep = valid.flatten() > 0
    weight, bias = fit_softmax_probe(train_grids.flatten(0, 2)[keep], targets.flatten(0, 2)[keep])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(test_grids), chunk):
        logits = test_grids[start:start + chunk].float() @ weight + bias  # (n, gh, gw, K)
        pred = upsample_patches(logits, test_labels.shape[-2:]).argmax(dim=1)  # (n, H, W)
        confusion += confusion_matrix(pred, test_labels[start:start + chunk], num_classes, ignore_index)
    return miou_from_confusion(confusion, ignore_index)


def depth_probe(train_grids, train_depth, test_grids, test_depth, train_valid=None, test_valid=None, chunk=8):
    """RMSE over the valid pixels of a ridge probe on patch tokens, trained on each patch's mean depth, its
    test predictions upsampled bilinearly to pixels."""
    grid = train_grids.shape[1:3]
    targets, valid = patch_means(train_depth, grid, train_valid)
    keep = valid.flatten() > 0
    weight, bias = fit_linear_probe(train_grids.flatten(0, 2)[keep], targets.flatten()[keep, None], select="mse")
    squared, count = 0.0, 0
    for start in range(0, len(test_grids), chunk):
        pred = test_grids[start:start + chunk].float() @ weight + bias  # (n, gh, gw, 1)
        pred = upsample_patches(pred, test_depth.shape[-2:])[:, 0]  # (n, H, W)
        target = test_depth[start:start + chunk]
        mask = test_valid[start:start + chunk] if test_valid is not None else torch.ones_like(target, dtype=torch.bool)
        squared += (pred.double() - target.double()).pow(2)[mask].sum().item()
        count += int(mask.sum())
    return math.sqrt(squared / max(count, 1))


# Tracking by label propagation (the DINO / PE DAVIS protocol) --------------------------------------------
# A patch's labels: the softmax-weighted vote of its top-k most similar patches (cosine) within `radius` in the
# first frame (its given mask) and the `context` previous frames (their soft labels); upsampled to pixels, argmax.


def propagate_labels(features, first_labels, num_labels, topk=5, temperature=0.1, context=7, radius=12):
    """features (T, gh, gw, C): per-frame patch features; first_labels (H, W) long, frame 0's annotation
    (0 = background, 1..num_labels-1 objects). Returns (T, H, W) long: frame 0 as given, frames 1.. propagated."""
    frames, grid_h, grid_w, channels = features.shape
    size = first_labels.shape
    patches = F.normalize(features.reshape(frames, grid_h * grid_w, channels).float(), dim=-1)  # (T, P, C)
    soft = [patch_targets(first_labels[None], (grid_h, grid_w), num_labels)[0][0].reshape(-1, num_labels)]
    rows, cols = torch.arange(grid_h).repeat_interleave(grid_w), torch.arange(grid_w).repeat(grid_h)
    near = torch.ones(grid_h * grid_w, grid_h * grid_w, dtype=torch.bool)
    if radius:
        near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    predictions = [first_labels.long()]
    for t in range(1, frames):
        sources = [0] + list(range(max(1, t - context), t))
        affinity = patches[t] @ patches[sources].reshape(-1, channels).T  # (P, len(sources) * P)
        affinity = affinity.masked_fill(~near.repeat(1, len(sources)), float("-inf"))
        values, index = affinity.topk(min(topk, affinity.shape[1]), dim=1)  # (P, k)
        weights = torch.softmax(values / temperature, dim=1)
        source_labels = torch.cat([soft[s] for s in sources])  # (len(sources) * P, K)
        labels = (weights[..., None] * source_labels[index]).sum(dim=1)  # (P, K)
        soft.append(labels)
        pixels = upsample_patches(labels.reshape(1, grid_h, grid_w, num_labels), size)[0]  # (K, H, W)
        predictions.append(pixels.argmax(dim=0))
    return torch.stack(predictions)


def track_iou(pred, target, num_labels, skip_first=True):
    """J (%): per object the mean IoU over frames (1 when both masks are empty, as the DAVIS toolkit), averaged
    over objects; unannotated frames (all -1) and, with skip_first, the given first frame left out."""
    start = 1 if skip_first else 0
    frames = [t for t in range(start, len(target)) if (target[t] >= 0).any()]
    scores = []
    for label in range(1, num_labels):
        masks = [(pred[t] == label, target[t] == label) for t in frames]
        per_frame = [(p & g).sum().item() / (p | g).sum().item() if (p | g).any() else 1.0 for p, g in masks]
        if per_frame:
            scores.append(sum(per_frame) / len(per_frame))
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")


# The layer-wise analysis ---------------------------------------------------------------------------------
# Each probe per layer, on embedded data (exact masks and depth) or a public layout.


def stack_dataset(dataset, indices, desc, keys):
    """Stack the fields of a dataset's good items: keys = the tuple positions / dict keys to keep."""
    columns = {key: [] for key in keys}
    for batch in iterate_batches(dataset, 64, desc, indices):
        for item in batch:
            for key in keys:
                columns[key].append(torch.as_tensor(item[key]))
    if not columns[keys[0]]:
        raise SystemExit(f"{desc}: no readable items")
    return [torch.stack(columns[key]) for key in keys]


def dense_splits(cfg, size, task, public):
    """{"train": fields, "test": fields}: the `public` ADE20K (segmentation) or NYU-style (depth) folder, split
    3/4-1/4 without a test set; or (public "") composed scenes for both probes, seeds disjoint from training's."""
    if not public:
        num_test, splits = max(1, cfg.num_scenes // 4), {}
        for split, count in (("train", cfg.num_scenes - num_test), ("test", num_test)):
            scenes = data.ComposedScenes(count, size, seed=f"evaluate-{split}-{cfg.seed}")
            images, semantic, depth = stack_dataset(scenes, range(count), f"composed scenes ({split})",
                                                    ("image", "semantic", "depth"))
            splits[split] = {"images": images, "semantic": semantic, "depth": depth, "valid": None}
        return splits
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
    return {split: dict(zip(names, stack_dataset(dataset, part, f"{task} set ({split})", range(len(names)))))
            for split, (dataset, part) in zip(("train", "test"), parts)}


def dense_probe_set(visual, cfg, size, layers, device, cache, task):
    """(train fields, test fields, their patch-token grids per layer) of a dense probe, once per checkpoint."""
    public = {"segmentation": cfg.ade20k_dir, "depth": cfg.nyu_dir}[task]
    key = ("dense", public and task, size, tuple(layers))
    if key not in cache:
        splits = dense_splits(cfg, size, task, public)
        features = {split: layer_features(visual, splits[split]["images"], max(1, cfg.batch_size // 2), None, layers,
                                          device, f"layer features ({task} {split})") for split in ("train", "test")}
        cache[key] = splits["train"], splits["test"], features
    return cache[key]


def per_layer(layers, desc, score):
    return [score(i) for i in tqdm(range(len(layers)), desc=f"{desc} probe per layer", leave=False)]


def probe_classification(visual, cfg, layers, dense_size, device, cache):
    """(top-1 per layer, metric, higher is better, data), as every probe_*: a ridge probe on pooled tokens of
    --imagenet_dir (even items train, odd test) or of the embedded train renderings against held-out val."""
    image_size, batch = cfg.image_size or visual.image_size, max(1, cfg.batch_size // 2)
    dataset, class_names, indices, description = classification_set(cfg, image_size)  # the test set
    if cfg.imagenet_dir:
        parts, description = ((dataset, indices[0::2]), (dataset, indices[1::2])), description + ", even/odd split"
    else:
        train_set = data.EmojiImageText("train", cfg.num_classes, cfg.num_probe_train, image_size, seed=cfg.seed)
        parts = ((train_set, range(len(train_set))), (dataset, indices))
        description = (f"embedded: {cfg.num_classes} classes, {cfg.num_probe_train} train renderings / "
                       f"{cfg.num_val} held-out val renderings per class")
    num_classes = len(class_names)
    (train_x, train_y), (test_x, test_y) = [stack_dataset(dataset, indices, f"probe images ({split})", (0, 2))
                                            for (dataset, indices), split in zip(parts, ("train", "test"))]
    train_f, test_f = [layer_features(visual, x, batch, cfg.pooling, layers, device, "layer features (probe)")
                       for x in (train_x, test_x)]
    scores = per_layer(layers, "classification",
                       lambda i: classification_probe(train_f[i], train_y, test_f[i], test_y, num_classes))
    return scores, f"top-1 % (linear probe, {cfg.pooling} pooling)", True, description


def probe_segmentation(visual, cfg, layers, size, device, cache):
    """mIoU per layer of the softmax probe on patch tokens."""
    train, test, features = dense_probe_set(visual, cfg, size, layers, device, cache, "segmentation")
    if cfg.ade20k_dir:
        num_classes, ignore_index = int(max(train["semantic"].max(), test["semantic"].max())) + 1, 0
        description = f"ADE20K {cfg.ade20k_dir} (label 0 'other' ignored)"
    else:
        num_classes, ignore_index = data.DENSE_NUM_CLASSES + 1, None
        description = (f"composed scenes: {len(train['images'])} train / {len(test['images'])} test, "
                       f"{data.DENSE_NUM_CLASSES} emoji classes + background")
    scores = per_layer(layers, "segmentation", lambda i: segmentation_probe(
        features["train"][i], train["semantic"], features["test"][i], test["semantic"], num_classes, ignore_index))
    return scores, "mIoU % (linear softmax probe)", True, description


def probe_depth(visual, cfg, layers, size, device, cache):
    """RMSE per layer of the ridge depth probe on patch tokens."""
    train, test, features = dense_probe_set(visual, cfg, size, layers, device, cache, "depth")
    description = (f"NYU-style depth {cfg.nyu_dir} (metres)" if cfg.nyu_dir else f"composed scenes: depth = 1 / "
                   f"object scale (canvas units; background wall at {1 / data.SCENE_MIN_SCALE:.2f})")
    scores = per_layer(layers, "depth", lambda i: depth_probe(features["train"][i], train["depth"], features["test"][i],
                                                              test["depth"], train["valid"], test["valid"]))
    return scores, "RMSE (linear probe, lower is better)", False, description


def probe_tracking(visual, cfg, layers, size, device, cache):
    """J per layer of label propagation from the first masks: DAVIS, or composed videos with exact masks."""
    videos = []  # (frames (T, 3, S, S), masks (T, S, S) long with -1 = not annotated, labels incl. background)
    if cfg.davis_dir:
        davis = data.DavisFolder(cfg.davis_dir, size=size)
        for index in tqdm(first_indices(davis, cfg.max_images), desc="DAVIS sequences", leave=False):
            item = davis[index]
            if item is None or not (item["masks"][0] >= 0).any():
                continue  # unreadable (counted in davis.bad) or no first-frame annotation to propagate
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
        features = layer_features(visual, frames, max(1, cfg.batch_size // 2), None, layers, device,
                                  "layer features (video)")
        for slot in range(len(layers)):
            pred = propagate_labels(features[slot], masks[0].clamp_min(0), num_labels, cfg.track_topk,
                                    cfg.track_temperature, cfg.track_context, cfg.track_radius)
            per_video[slot].append(track_iou(pred, masks, num_labels))
    scores = [sum(v for v in s if not math.isnan(v)) / max(1, sum(not math.isnan(v) for v in s)) for s in per_video]
    metric = (f"J % (label propagation: top-{cfg.track_topk}, temperature {cfg.track_temperature}, "
              f"first + {cfg.track_context} previous frames, radius {cfg.track_radius} patches)")
    return scores, metric, True, description


PROBES = {"classification": probe_classification, "segmentation": probe_segmentation, "depth": probe_depth,
          "tracking": probe_tracking}


def summarize_layers(layers, scores, metric, higher_is_better, description):
    """A probe's per-layer scores -> its results entry (best layer, last layer's score beside it)."""
    finite = [i for i, s in enumerate(scores) if not math.isnan(s)]
    best = (max if higher_is_better else min)(finite, key=lambda i: scores[i]) if finite else len(scores) - 1
    return {"metric": metric, "higher_is_better": higher_is_better, "layers": layers, "per_layer": scores,
            "best_layer": layers[best], "best": scores[best], "last_layer": layers[-1], "last": scores[-1],
            "data": description}


def run_layerwise(model, cfg, device, cache, probes=tuple(PROBES)):
    """Every probe on every layer (every k-th, and the last): {"layers", "tasks": {probe: entry}, ...}."""
    visual = vision_tower(model)
    layers = sorted({*range(0, visual.layers, max(1, cfg.layer_stride)), visual.layers - 1})  # and the last
    image_size = cfg.image_size or visual.image_size
    dense_size = cfg.dense_size or dense_resolution(visual, image_size)
    tasks, seconds = {}, {}
    for probe in probes:
        started = time.time()
        tasks[probe] = summarize_layers(layers, *PROBES[probe](visual, cfg, layers, dense_size, device, cache))
        seconds[probe] = round(time.time() - started, 1)
    return {"num_layers": visual.layers, "layers": layers,
            "layer_index": "0-based block index (official layer_idx): layer i = the output of block i, before ln_post",
            "probe": "linear probes on standardised features: closed-form ridge (classification, depth; lambda "
                     "picked on a held-out 20% of the training set), softmax by full-batch gradient descent "
                     "(segmentation); dense predictions upsampled bilinearly from patches to pixels",
            "image_size": image_size, "dense_size": dense_size, "tasks": tasks, "seconds": seconds}


# VQA (language alignment, §4) ----------------------------------------------------------------------------
# The stage that owns the VLM provides the accuracy function as a plug-in.


def run_vqa(cfg, device="cpu"):
    if not cfg.vqa_checkpoint:
        return {"skipped": "no --vqa_checkpoint given (python align_lang.py writes one)"}
    vqa_accuracy = load_plugin(cfg.vqa_plugin, "vqa_plugin")
    result = vqa_accuracy(cfg.vqa_checkpoint, batch_size=cfg.batch_size, device=str(device))
    return {**result, "checkpoint": cfg.vqa_checkpoint}


# Plots ---------------------------------------------------------------------------------------------------
# Drawn with Pillow (no plotting library): a line per probe, score against layer, best layer ringed.

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill="black", align=(0.0, 0.0)):
    """Text at xy, shifted by align = (fraction of its width, of its height): (0.5, 0) centres it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - align[0] * (right - left), xy[1] - align[1] * (bottom - top)), text, fill=fill, font=font)


def draw_panel(draw, box, x_values, series, title, y_label, y_range=None):
    """A line plot in box (left, top, right, bottom) of series {name: (ys, colour, best index or None)}."""
    small, (left, top, right, bottom) = _font(12), box
    plot_l, plot_t, plot_r, plot_b = left + 62, top + 30, right - 14, bottom - 44
    values = [v for ys, _, _ in series.values() for v in ys if not math.isnan(v)]
    low, high = y_range or (min(values, default=0.0), max(values, default=1.0))
    if not y_range:
        pad = 0.08 * (high - low) if high > low else 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / 5
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    ticks = [t * step for t in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1)]
    decimals = next(d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6 or d == 6)
    x_low, x_span = min(x_values), max(max(x_values) - min(x_values), 1)

    def to_px(x, y):
        return (plot_l + (x - x_low) / x_span * (plot_r - plot_l),
                plot_b - (y - low) / (high - low) * (plot_b - plot_t))

    _text(draw, ((left + right) / 2, top + 4), title, _font(15), align=(0.5, 0))
    for tick in ticks:  # horizontal grid and y tick labels
        y = to_px(x_low, tick)[1]
        draw.line([(plot_l, y), (plot_r, y)], fill=(225, 225, 225))
        _text(draw, (plot_l - 8, y - 2), f"{tick:.{decimals}f}", small, align=(1, 0.5))
    every = max(1, math.ceil(len(x_values) / 12))
    for x in x_values[::every] + ([x_values[-1]] if (len(x_values) - 1) % every else []):
        px = to_px(x, low)[0]
        draw.line([(px, plot_b), (px, plot_b + 5)], fill="black")
        _text(draw, (px, plot_b + 7), str(x), small, align=(0.5, 0))
    draw.line([(plot_l, plot_t), (plot_l, plot_b), (plot_r, plot_b)], fill="black", width=1)
    _text(draw, ((plot_l + plot_r) / 2, plot_b + 24), "layer (0-based block index)", small, align=(0.5, 0))
    _text(draw, (left + 4, top + 8), y_label, small, fill=(90, 90, 90))
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


def plot_layerwise(path, tasks, title="Frozen features per layer"):
    """All probes in one plot, normalised (1 = the probe's best layer); the legend gives the raw scores."""
    image = Image.new("RGB", (1000, 560), "white")
    draw = ImageDraw.Draw(image)
    series = {name: (normalised_scores(entry), COLOURS[k % len(COLOURS)], entry["layers"].index(entry["best_layer"]))
              for k, (name, entry) in enumerate(tasks.items())}
    draw_panel(draw, (0, 0, 700, 560), next(iter(tasks.values()))["layers"], series, title,
               "normalised score (1 = best layer)", y_range=(-0.05, 1.05))
    font, small, grey = _font(14), _font(12), (60, 60, 60)
    for k, (name, entry) in enumerate(tasks.items()):
        y = 60 + 84 * k
        draw.line([(712, y + 9), (742, y + 9)], fill=COLOURS[k % len(COLOURS)], width=3)
        draw.ellipse([722, y + 4, 732, y + 14], outline="black", width=2)
        _text(draw, (750, y), name, font)
        _text(draw, (750, y + 20), f"best: layer {entry['best_layer']} = {entry['best']:.3g}", small, grey)
        _text(draw, (750, y + 36), f"last: layer {entry['last_layer']} = {entry['last']:.3g}", small, grey)
        _text(draw, (750, y + 52), entry["metric"].split(" (")[0], small, (110, 110, 110))
    _text(draw, (712, 64 + 84 * len(tasks)), "ring = best layer", small, (90, 90, 90))
    image.save(path)
    return path


def plot_layerwise_tasks(path, tasks):
    """One panel per probe with its raw scores against layer, the best layer ringed."""
    columns = 2 if len(tasks) > 1 else 1
    image = Image.new("RGB", (520 * columns, 340 * math.ceil(len(tasks) / columns)), "white")
    draw = ImageDraw.Draw(image)
    for k, (name, entry) in enumerate(tasks.items()):
        left, top = 520 * (k % columns), 340 * (k // columns)
        series = {name: (entry["per_layer"], COLOURS[k % len(COLOURS)], entry["layers"].index(entry["best_layer"]))}
        title = f"{name}: best layer {entry['best_layer']}, last {entry['last_layer']}"
        draw_panel(draw, (left, top, left + 520, top + 340), entry["layers"], series, title,
                   entry["metric"].split(" (")[0])
    image.save(path)
    return path


# Reports -------------------------------------------------------------------------------------------------
# results.md is paragraphs and training.markdown_table tables, a section per task.

TITLES = {"zero_shot": "Zero-shot classification", "robustness": "Robustness (zero-shot on shifted val sets)",
          "retrieval": "Retrieval", "video_zero_shot": "Video zero-shot classification",
          "layerwise": "Layer-wise frozen probes", "tracking": "Tracking (label propagation)", "vqa": "VQA"}


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
        rows = [["clean val", entry["clean"]["top1"], entry["clean"]["top5"]]]
        rows += [[name, s["top1"], s["top5"]] for name, s in entry["shifts"].items()]
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
        average = entry["robustness_average"]
        return [("robustness average top-1 %", average["top1"]), ("robustness average top-5 %", average["top5"]),
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
    sections = [results_markdown(results, f"_{k + 1}", level=2) for k, results in enumerate(runs)]
    return "\n\n".join(blocks + sections)


def write_results(runs, meta, out_dir):
    """results.json, results.md and each checkpoint's layer-wise plots into out_dir (see the docstring); paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    several = len(runs) > 1
    write_json(paths[0], {"checkpoints": runs, "meta": meta} if several else runs[0])
    with open(paths[1], "w") as f:
        f.write(comparison_markdown(runs, meta) if several else results_markdown(runs[0]))
    for k, results in enumerate(runs):
        tasks, suffix = (results.get("layerwise") or {}).get("tasks"), f"_{k + 1}" if several else ""
        if tasks:
            paths.append(plot_layerwise(os.path.join(out_dir, f"layerwise{suffix}.png"), tasks))
            paths.append(plot_layerwise_tasks(os.path.join(out_dir, f"layerwise_tasks{suffix}.png"), tasks))
    return paths


# Running -------------------------------------------------------------------------------------------------


def evaluate_checkpoint(cfg, selected, device, command, vqa):
    """One checkpoint's results: {task: entry, ..., "meta"}. vqa: the VQA entry, computed once for all."""
    started = time.time()
    model, description, checkpoint_path = load_eval_model(cfg)
    resolve_defaults(cfg, model, checkpoint_path)
    model.to(device)
    print(f"evaluating {description} on {device} at {cfg.image_size} px: {', '.join(selected)}")
    cache, results = {}, {}  # cache: the zero-shot classifier, the clean val embeddings, the scenes' features
    runners = {"zero_shot": run_zero_shot, "robustness": run_robustness, "retrieval": run_retrieval,
               "video_zero_shot": run_video_zero_shot}
    for task in selected:
        task_started = time.time()
        if task in runners:
            results[task] = (runners[task](model, cfg, device, cache) if isinstance(model, pe_model.CLIP) else
                             {"skipped": "a vision-only tower (no text tower): zero-shot tasks need a CLIP checkpoint"})
        elif task == "layerwise":
            results["layerwise"] = run_layerwise(model, cfg, device, cache)
        elif task == "tracking":
            tracking = (results.get("layerwise") or {}).get("tasks", {}).get("tracking")  # computed once
            tracking = tracking or run_layerwise(model, cfg, device, cache, ("tracking",))["tasks"]["tracking"]
            results["tracking"] = dict(tracking)
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
    selected = [task for task in TASKS if getattr(cfg, task) or cfg.all]
    selected = selected or list(TASKS)
    if cfg.pooling not in ("mean", "cls"):
        raise SystemExit(f"--pooling={cfg.pooling}: expected mean or cls")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    for field in ("imagenet_dir", "class_names", "coco_json", "coco_images", "kinetics_dir", "ade20k_dir", "nyu_dir",
                  "davis_dir", "vqa_checkpoint"):  # before minutes of work, not after
        if getattr(cfg, field) and not os.path.exists(getattr(cfg, field)):
            raise SystemExit(f"--{field}={getattr(cfg, field)}: no such file or folder")
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
    for checkpoint, model in zip(checkpoints, models * len(checkpoints) if len(models) == 1 else models):
        results, vqa = evaluate_checkpoint(replace(cfg, checkpoint=checkpoint, model=model), selected, device,
                                           command, vqa)
        runs.append(results)
    meta = {"models": [results["meta"]["model"] for results in runs], "device": str(device),
            "seconds": round(time.time() - started, 1), "command": command}
    paths = write_results(runs, meta, cfg.out_dir)
    print(f"wrote {', '.join(paths)} ({meta['seconds']:.0f} s)")
    return {"checkpoints": runs, "meta": meta} if len(runs) > 1 else runs[0]


if __name__ == "__main__":
    main()
