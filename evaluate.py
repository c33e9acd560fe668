"""
evaluate.py: every evaluation of the PE paper for one checkpoint, with the layer-wise analysis (§3, "the best
visual embeddings are not at the output of the network") as its centrepiece.

    python evaluate.py --all                                        # newest train_clip.py checkpoint (out/clip)
    python evaluate.py --all --checkpoint=out/clip/final.pt --out_dir=out/eval
    python evaluate.py --all --checkpoint=PE-Core-B16-224.pt --model=PE-Core-B16-224   # an official .pt
    python evaluate.py --all --model=PE-Core-Nano8-64 --random_init # an untrained baseline
    python evaluate.py --layerwise                                  # one evaluation alone (flags below)
    python evaluate.py --zero_shot --imagenet_dir=imagenet/val --class_names=imagenet_names.json
    python evaluate.py --retrieval --coco_json=captions_val2017.json --coco_images=val2017
    python evaluate.py --video_zero_shot --kinetics_dir=k400/val
    python evaluate.py --layerwise --ade20k_dir=ADEChallengeData2016 --nyu_dir=nyu --davis_dir=DAVIS
    python evaluate.py --vqa --vqa_checkpoint=out/lang/vlm.pt      # a checkpoint align_lang.py wrote

Writes into --out_dir: results.json (one top-level key per evaluation: zero_shot, robustness, retrieval,
video_zero_shot, layerwise, tracking, vqa, plus meta), results.md (readable tables), layerwise.png (every probe's
score against the layer, normalised, best layer marked) and layerwise_tasks.png (one panel per probe, raw
scores). Flags: --all, or any of --zero_shot --robustness --retrieval --video_zero_shot --layerwise --tracking
--vqa (no flag at all = --all). Every EvalConfig field below is a --field=value option. With a checkpoint of
train_clip.py on the embedded data, the class count, resolution and seed default to its own (train_config), so
the zero-shot number matches its held-out evaluation. 2-core CPU, PE-Core-Nano8-64: --all takes minutes.

The evaluations (CPU-sized defaults on the embedded data of data.py; the public layouts when pointed at them):
  * zero-shot classification as the official benchmark does it (pe_architecture.md §4): per class, the mean of
    the L2-normalised text embeddings over a prompt ensemble, renormalised; logits 100 * image . class;
    top-1 / top-5. Default: held-out renderings of the emoji classes train_clip.py trains on.
  * robustness: the same zero-shot evaluation on distribution-shifted copies of the val set, standing in for
    ImageNet-v2/-R/-Sketch/-A/ObjectNet at small scale (edge sketches, posterisation, blur, noise, occlusion,
    rotation, and the Noto Color Emoji design where installed), and their mean: the paper's "robustness
    average" (clean val not included in the mean).
  * retrieval: image->text and text->image recall@1/5/10. COCO-captions JSON: each image has its ~5 captions
    as matches. Embedded default: a caption says only which emoji it shows, so every caption naming the
    image's class is a match (identical caption strings are kept once).
  * video zero-shot: a video's embedding is the mean of its frames' embeddings (8 uniformly sampled frames,
    §2.2, pe_model.CLIP.encode_video), frames decoded with PyAV. Default: composed object videos written to real
    .mp4 files (data.make_embedded_videos), classes = the emoji each video shows: 10 of the
    classes the core was trained on (--num_classes, from its checkpoint), spread evenly over them.
  * layer-wise frozen probes (§3): the tokens of EVERY block from ONE forward pass per image
    (VisionTransformer.forward_all_layers), shared by all probes of the run; per layer:
      - classification: a linear probe on pooled tokens (mean of the patch tokens, or the class token);
      - semantic segmentation (mIoU) and depth (RMSE): linear probes on patch tokens. Trained on per-patch
        targets (class fractions / mean depth inside each patch); at test time the patch predictions are
        upsampled bilinearly to pixels and scored against the full-resolution labels.
      - tracking: first-frame masks propagated through a video by feature affinity (the DINO / PE DAVIS
        protocol: top-k neighbours, softmax temperature, the first frame plus a context of previous frames,
        a local neighbourhood), scored by J (mean IoU of the propagated masks).
    Probes: closed-form ridge regression for classification and depth (standardised features, strength
    chosen on a held-out 20% of the training set), a softmax probe trained by 150 steps of full-batch
    accelerated gradient descent for segmentation (ridge cannot lift rare classes above the background);
    deterministic, seconds on a CPU. Layers are 0-based block indices, as the official layer_idx (layer i =
    the output of block i; the last is layers - 1); tokens are taken before ln_post. Default data: composed
    scenes and videos of data.py (exact masks and depth; seeds disjoint from the scenes align_spatial.py trains
    on) at the model's resolution raised to 16 patches a side (see dense_resolution).
  * VQA: answer accuracy of a language-aligned checkpoint (align_lang.vqa_accuracy), when one is given.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from tqdm import tqdm

import data
import pe_model

TASKS = ("zero_shot", "robustness", "retrieval", "video_zero_shot", "layerwise", "tracking", "vqa")


@dataclass
class EvalConfig:
    # model
    checkpoint: str = ""  # ours or an official .pt; "" = the newest checkpoint `python train_clip.py` wrote
    model: str = ""  # official name: needed for official .pt files (PE-Core-B16-224); with --random_init alone
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
    image_size: int = 0  # classification / zero-shot / video resolution; 0 = the checkpoint's final training
    #                      resolution (its train_config: train_clip.py evaluates there too), else the model's
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
    # language alignment
    vqa_checkpoint: str = ""  # a checkpoint align_lang.py wrote
    # run
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu


# ---------------------------------------------------------------------------------------------------------
# Model and batching


def load_eval_model(cfg):
    """(model in eval mode, a line describing it, the checkpoint path or None). A CLIP model or a vision-only
    tower (PE-Spatial / PE-Lang style checkpoints: the tasks that need text are skipped)."""
    if cfg.random_init:
        if not cfg.model:
            raise SystemExit("--random_init needs --model=NAME (e.g. --model=PE-Core-Nano8-64)")
        torch.manual_seed(cfg.seed)
        return pe_model.build_model(cfg.model).eval(), f"{cfg.model}, random weights (seed {cfg.seed})", None
    path = pe_model.resolve_checkpoint(cfg.checkpoint or None)
    try:
        model = pe_model.load_model(path, cfg.model or None)
    except ValueError as error:  # CheckpointMismatchError is a ValueError
        raise SystemExit(f"--checkpoint={path}: {error}") from None
    return model.eval(), f"{path}" + (f" ({cfg.model})" if cfg.model else ""), path


def resolve_defaults(cfg, model, checkpoint_path):
    """Fill the 0 = automatic fields: a checkpoint of train_clip.py on the embedded data stores its
    train_config, whose class count, final-stage resolution and seed reproduce its held-out split; otherwise
    100 classes at the model's pretraining size."""
    trained = pe_model.checkpoint_train_config(checkpoint_path) if checkpoint_path else {}
    if trained.get("data") != "emoji":
        trained = {}
    if not cfg.num_classes:
        cfg.num_classes = data.trained_class_count(trained)
    if not cfg.image_size:
        stages = trained.get("resolution_stages")
        # the last "fraction:resolution" stage: where train_clip.py trained last and evaluated
        cfg.image_size = int(str(stages[-1]).split(":")[-1]) if stages else vision_tower(model).image_size
    if trained and cfg.seed == 0:
        cfg.seed = int(trained.get("seed", 0))
    return cfg


def vision_tower(model):
    return model.visual if isinstance(model, pe_model.CLIP) else model


def iterate_batches(dataset, batch_size, desc, indices=None):
    """Yield lists of the dataset's good items, batch_size at a time. A None item is a bad sample that the
    dataset has already counted (its .bad); callers report how many items were used."""
    indices = range(len(dataset)) if indices is None else indices
    batch = []
    for index in tqdm(indices, desc=desc, leave=False):
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
def encode_texts(model, texts, batch_size=256, device="cpu"):
    """Texts -> L2-normalised text embeddings (N, D)."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = pe_model.tokenize(texts[start:start + batch_size], model.context_length).to(device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1])


@torch.no_grad()
def encode_image_dataset(model, dataset, batch_size=64, device="cpu", desc="images", indices=None):
    """A dataset of (image (3, H, W), caption, label) -> (L2-normalised image embeddings (N, D), labels (N,),
    captions [N]); bad items skipped (the dataset counts them)."""
    features, labels, captions = [], [], []
    for batch in iterate_batches(dataset, batch_size, desc, indices):
        images = torch.stack([item[0] for item in batch]).to(device)
        features.append(model.encode_image(images, normalize=True).float().cpu())
        captions += [item[1] for item in batch]
        labels += [int(item[2]) for item in batch]
    if not features:
        raise SystemExit(f"{desc}: no readable images")
    return torch.cat(features), torch.tensor(labels), captions


# ---------------------------------------------------------------------------------------------------------
# Zero-shot classification (pe_architecture.md §4: clip_benchmark's protocol)


@torch.no_grad()
def zero_shot_classifier(model, class_names, templates=tuple(data.ZERO_SHOT_TEMPLATES), batch_size=256, device="cpu"):
    """The zero-shot classifier (D, C): per class, the mean of the L2-normalised text embeddings of the class
    name in every template, renormalised (the official benchmark's prompt ensemble)."""
    texts = [data.format_template(template, name) for name in class_names for template in templates]
    embeddings = encode_texts(model, texts, batch_size, device)  # (C*T, D)
    per_class = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(per_class, dim=-1).T


def topk_accuracy(logits, labels, ks=(1, 5)):
    """{"top1": %, "top5": %}: how often the label is among the k highest logits (k capped at the class count)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, kmax)
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def zero_shot_accuracy(image_features, classifier, labels, ks=(1, 5)):
    """Top-k accuracy (%) of L2-normalised image features (N, D) under a zero-shot classifier (D, C):
    logits = 100 * image_features @ classifier, as the official benchmark."""
    return topk_accuracy(100.0 * image_features @ classifier, labels, ks)


def classification_set(cfg, image_size, transform=None, style="openmoji"):
    """The zero-shot / robustness image set: --imagenet_dir's class folders, or the embedded val renderings.
    Returns (dataset, class names, indices, description)."""
    if cfg.imagenet_dir:
        dataset = data.ClassFolder(cfg.imagenet_dir, transform=transform, image_size=image_size,
                                   class_names=cfg.class_names or None)
        return dataset, dataset.class_names, first_indices(dataset, cfg.max_images), f"class folders {cfg.imagenet_dir}"
    dataset = data.EmojiImageText("val", cfg.num_classes, cfg.num_val, canvas_size=image_size, seed=cfg.seed,
                                  style=style, transform=transform)
    description = f"embedded val ({style}): {cfg.num_classes} emoji classes x {cfg.num_val} held-out renderings"
    return dataset, dataset.class_names, range(len(dataset)), description


def shared_classifier(model, class_names, cfg, device, cache):
    key = ("classifier", tuple(class_names))
    if key not in cache:
        cache[key] = zero_shot_classifier(model, class_names, batch_size=4 * cfg.batch_size, device=device)
    return cache[key]


def clean_embeddings(model, dataset, indices, image_size, cfg, device, cache):
    """The unshifted val set's (embeddings, labels, captions), encoded once per run (zero-shot, robustness and
    embedded retrieval share them)."""
    key = ("clean", cfg.imagenet_dir, image_size, len(indices))
    if key not in cache:
        cache[key] = encode_image_dataset(model, dataset, cfg.batch_size, device, "val images", indices)
    return cache[key]


def run_zero_shot(model, cfg, device, cache):
    image_size = cfg.image_size or vision_tower(model).image_size
    dataset, class_names, indices, description = classification_set(cfg, image_size)
    classifier = shared_classifier(model, class_names, cfg, device, cache)
    features, labels, _ = clean_embeddings(model, dataset, indices, image_size, cfg, device, cache)
    cache["zero_shot_clean"] = zero_shot_accuracy(features, classifier, labels)
    return {**cache["zero_shot_clean"], "images": len(labels), "skipped_bad": len(indices) - len(labels),
            "classes": len(class_names), "templates": len(data.ZERO_SHOT_TEMPLATES), "data": description}


# ---------------------------------------------------------------------------------------------------------
# Robustness: distribution shifts of the val images, standing in for the paper's ImageNet variants. Each
# shift is a plain function (PIL image, torch.Generator) -> PIL image, deterministic given the generator.


def _rand(generator, low=0.0, high=1.0):
    return low + (high - low) * torch.rand((), generator=generator).item()


def shift_sketch(image, generator):
    """ImageNet-Sketch-like: a grey edge map, dark lines on white, colour and texture gone."""
    edges = ImageOps.autocontrast(image.convert("L").filter(ImageFilter.FIND_EDGES))
    return ImageOps.invert(edges).convert("RGB")


def shift_posterize(image, generator):
    """ImageNet-Rendition-like: flat colours, 2 bits per channel."""
    return ImageOps.posterize(image.convert("RGB"), 2)


def shift_blur(image, generator):
    """Defocus: Gaussian blur with a radius of 3% of the image side."""
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=0.03 * max(image.size)))


def shift_noise(image, generator):
    """Sensor noise: additive Gaussian noise, sigma 25% of the range."""
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).float()
    pixels = pixels + 0.25 * 255 * torch.randn(pixels.shape, generator=generator)
    return Image.frombytes("RGB", image.size, pixels.clamp(0, 255).round().to(torch.uint8).numpy().tobytes())


def shift_occlusion(image, generator):
    """ObjectNet / ImageNet-A-like clutter: a grey box over 16-36% of the image at a random place."""
    image = image.convert("RGB").copy()
    width, height = image.size
    side = _rand(generator, 0.4, 0.6)
    box_w, box_h = round(side * width), round(side * height)
    x0, y0 = round(_rand(generator) * (width - box_w)), round(_rand(generator) * (height - box_h))
    grey = round(_rand(generator, 64, 192))
    ImageDraw.Draw(image).rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=(grey, grey, grey))
    return image


def shift_rotation(image, generator):
    """ObjectNet-like unusual viewpoint: rotated by 45-135 degrees either way, grey corners."""
    angle = _rand(generator, 45, 135) * (1 if _rand(generator) < 0.5 else -1)
    return image.convert("RGB").rotate(angle, resample=Image.BILINEAR, fillcolor=(128, 128, 128))


SHIFTS = {"sketch": shift_sketch, "posterize": shift_posterize, "blur": shift_blur, "noise": shift_noise,
          "occlusion": shift_occlusion, "rotation": shift_rotation}


class ShiftTransform:
    """A dataset transform (image, generator) -> tensor: a shift, then the official preprocessing. A class so
    that it pickles for loader workers (a closure would not)."""

    def __init__(self, shift, size):
        self.shift, self.size = shift, size

    def __call__(self, image, generator=None):
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        return pe_model.preprocess_image(self.shift(image, generator), self.size)


def run_robustness(model, cfg, device, cache):
    image_size = cfg.image_size or vision_tower(model).image_size
    dataset, class_names, indices, description = classification_set(cfg, image_size)
    classifier = shared_classifier(model, class_names, cfg, device, cache)
    if "zero_shot_clean" not in cache:
        features, labels, _ = clean_embeddings(model, dataset, indices, image_size, cfg, device, cache)
        cache["zero_shot_clean"] = zero_shot_accuracy(features, classifier, labels)
    sets, notes = {}, {}
    for name, shift in SHIFTS.items():
        shifted, _, _, _ = classification_set(cfg, image_size, transform=ShiftTransform(shift, image_size))
        features, labels, _ = encode_image_dataset(model, shifted, cfg.batch_size, device, f"shift: {name}", indices)
        sets[name] = zero_shot_accuracy(features, classifier, labels)
    if cfg.imagenet_dir:
        notes["noto"] = "embedded data only"
    elif not data.noto_available():
        notes["noto"] = f"skipped: {data.NOTO_FONT} not installed (Debian fonts-noto-color-emoji)"
    else:
        # the other design of the same emoji (as ImageNet-R is renditions of ImageNet classes): the items of the
        # classes Noto has, still classified among all the classes
        noto = classification_set(cfg, image_size, style="noto")[0]
        noto_indices = noto.present_indices()
        features, labels, _ = encode_image_dataset(model, noto, cfg.batch_size, device, "shift: noto", noto_indices)
        sets["noto"] = zero_shot_accuracy(features, classifier, labels)
        if noto.missing_classes:
            missing = ", ".join(noto.class_names[c] for c in noto.missing_classes)
            notes["noto"] = (f"{len(noto_indices)} images: the Noto font lacks {len(noto.missing_classes)} of the "
                             f"{cfg.num_classes} classes ({missing})")
    average = {k: sum(s[k] for s in sets.values()) / len(sets) for k in ("top1", "top5")}
    return {"clean": cache["zero_shot_clean"], "shifts": sets, "robustness_average": average,
            "notes": notes, "images_per_set": len(indices), "data": description}


# ---------------------------------------------------------------------------------------------------------
# Retrieval


def recall_at_k(similarity, relevant, ks=(1, 5, 10)):
    """Recall@k both ways. similarity (N_images, N_texts); relevant (N_images, N_texts) bool, True where the
    text matches the image (COCO: each image's ~5 captions). A query counts as found at k when ANY of its
    matches is among its k most similar items; queries without any match are left out.
    Returns {"image_to_text": {"R@1": %, ...}, "text_to_image": {...}}."""
    out = {}
    for name, scores, matches in (("image_to_text", similarity, relevant), ("text_to_image", similarity.T, relevant.T)):
        ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (Q, kmax)
        hits = matches.gather(1, ranked)  # (Q, kmax): is the r-th ranked item a match
        answerable = matches.any(dim=1)
        out[name] = {f"R@{k}": 100.0 * hits[answerable, :k].any(dim=1).float().mean().item() for k in ks}
    return out


def caption_relevance(captions_per_image):
    """COCO-style matches: [[captions of image 0], [captions of image 1], ...] -> (flat caption list,
    relevant (N_images, N_captions) bool, True for an image's own captions)."""
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
        features, captions_per_image = [], []
        for batch in iterate_batches(dataset, cfg.batch_size, "retrieval images", indices):
            images = torch.stack([item[0] for item in batch]).to(device)
            features.append(model.encode_image(images, normalize=True).float().cpu())
            captions_per_image += [captions_of[item[2]] for item in batch]
        if not features:
            raise SystemExit(f"{cfg.coco_json}: no readable images under {cfg.coco_images}")
        image_features = torch.cat(features)
        texts, relevant = caption_relevance(captions_per_image)
        description = f"COCO captions {cfg.coco_json}"
        skipped = len(indices) - len(captions_per_image)
    else:
        dataset, _, all_indices, _ = classification_set(cfg, image_size)
        image_features, labels, captions = clean_embeddings(model, dataset, all_indices, image_size, cfg, device, cache)
        indices = range(min(len(labels), cfg.num_retrieval))  # the first val images cover every class
        image_features, labels, captions = image_features[:len(indices)], labels[:len(indices)], captions[:len(indices)]
        # a caption names only the class: every caption of the image's class is a match; identical strings once
        unique = sorted({(caption, int(label)) for caption, label in zip(captions, labels)})
        texts = [caption for caption, _ in unique]
        relevant = labels[:, None] == torch.tensor([label for _, label in unique])[None, :]
        description = f"embedded val captions: {len(labels)} images, class-level matches"
        skipped = len(indices) - len(labels)
    text_features = torch.cat([encode_texts(model, texts[s:s + 1024], 4 * cfg.batch_size, device)
                               for s in tqdm(range(0, len(texts), 1024), desc="retrieval texts", leave=False)])
    result = recall_at_k(image_features @ text_features.T, relevant)
    return {**result, "images": image_features.shape[0], "texts": len(texts), "skipped_bad": skipped,
            "data": description}


# ---------------------------------------------------------------------------------------------------------
# Video zero-shot classification (§2.2: a video's embedding is the mean of its frames' embeddings)

VIDEO_TEMPLATES = tuple(data.ZERO_SHOT_TEMPLATES) + ("a video of {a}.", "a clip of {a}")


@torch.no_grad()
def encode_video_dataset(model, dataset, batch_size=8, device="cpu", desc="videos", indices=None):
    """A dataset of (frames (T, 3, H, W), caption, label) -> (video embeddings (N, D): the mean of the
    L2-normalised frame embeddings, renormalised; labels (N,))."""
    features, labels = [], []
    for batch in iterate_batches(dataset, batch_size, desc, indices):
        clips = torch.stack([item[0] for item in batch]).to(device)  # (B, T, 3, H, W)
        features.append(F.normalize(model.encode_video(clips, normalize=True).float(), dim=-1).cpu())
        labels += [int(item[2]) for item in batch]
    if not features:
        raise SystemExit(f"{desc}: no readable videos")
    return torch.cat(features), torch.tensor(labels)


def video_zero_shot(model, dataset, class_names, templates=VIDEO_TEMPLATES, batch_size=8, device="cpu", indices=None):
    """Zero-shot top-1/top-5 (%) of frame-averaged video embeddings against the prompt-ensemble classifier of
    class_names; dataset items (frames (T, 3, H, W), caption, label). Also returns the video count."""
    classifier = zero_shot_classifier(model, class_names, templates, device=device)
    features, labels = encode_video_dataset(model, dataset, batch_size, device, "video zero-shot", indices)
    return {**zero_shot_accuracy(features, classifier, labels), "videos": len(labels)}


def run_video_zero_shot(model, cfg, device, cache):
    image_size = cfg.image_size or vision_tower(model).image_size
    batch_size = max(1, cfg.batch_size // cfg.num_frames)
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
    result = video_zero_shot(model, dataset, class_names, batch_size=batch_size, device=device, indices=indices)
    return {**result, "skipped_bad": len(indices) - result["videos"], "classes": len(class_names),
            "frames_per_video": cfg.num_frames, "data": description}


# ---------------------------------------------------------------------------------------------------------
# Layer-wise frozen features (§3). One forward_all_layers pass per image gives every block's tokens.


@torch.no_grad()
def layer_features(visual, images, batch_size=32, pooling=None, layers=None, device="cpu", desc="layer features"):
    """Frozen features of every layer from ONE forward pass per image. images (N, 3, H, W).
    pooling None: per layer the patch-token grid (N, gh, gw, W) (class token dropped); "mean": the mean of the
    patch tokens (N, W); "cls": the class token (N, W). layers: the 0-based block indices to keep (default all).
    Returns a list with one float32 CPU tensor per kept layer. Tokens are taken before ln_post (official
    forward_features(layer_idx=i) semantics)."""
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
            if pooling == "cls":
                outputs[slot].append(tokens[:, 0].cpu())
                continue
            patches = tokens[:, 1:] if visual.use_cls_token else tokens  # (B, gh*gw, W)
            if pooling == "mean":
                outputs[slot].append(patches.mean(dim=1).cpu())
            else:
                outputs[slot].append(patches.unflatten(1, (grid_h, grid_w)).cpu())  # (B, gh, gw, W)
    return [torch.cat(chunks) for chunks in outputs]


def dense_resolution(visual, image_size=0, min_grid=16):
    """Default input size of the dense probes and tracking: image_size (default the model's pretraining
    size), raised to at least min_grid patches a side. A coarser grid caps the score whatever the features:
    label propagation with oracle features (the true class fractions per patch) reaches J 36 on an 8x8 grid and
    76 on 16x16 (composed videos). PE also evaluates dense tasks above its pretraining resolution."""
    return max(image_size or visual.image_size, min_grid * visual.patch_size)


def probe_layers(visual, stride=1):
    """The 0-based layers to probe: every stride-th block, and always the last."""
    layers = list(range(0, visual.layers, max(1, stride)))
    return layers if layers[-1] == visual.layers - 1 else layers + [visual.layers - 1]


# ---------------------------------------------------------------------------------------------------------
# Linear probes. Classification and depth: closed-form ridge regression. Features are standardised with the
# training statistics, the targets centred; W = (X^T X + lambda I)^-1 X^T Y from one eigendecomposition of
# X^T X, so every lambda of the grid costs one matrix product. lambda is picked on a held-out 20% of the
# training set, then the probe is refit on all of it. Segmentation: a softmax probe (cross-entropy, full-batch
# accelerated gradient descent), see fit_softmax_probe. The standardisation is folded into the returned (weight, bias).

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # lambda as a multiple of the sample count


def _ridge_solutions(x, y, l2_values, chunk=16384):
    """x (n, d) standardised (centred) features, y (n, k) targets -> [(weight (d, k), bias (k,))] in float64
    for each absolute lambda. X^T X is accumulated in float64 chunks (bounded memory for many patches)."""
    mean_y = y.double().mean(dim=0)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start:start + chunk].double(), y[start:start + chunk].double() - mean_y
        gram += xc.T @ xc
        cross += xc.T @ yc
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    rotated = eigenvectors.T @ cross  # (d, k)
    solutions = []
    for l2 in l2_values:
        weight = eigenvectors @ (rotated / (eigenvalues.clamp_min(0) + l2)[:, None])
        solutions.append((weight, mean_y))  # centred features: the bias is the target mean
    return solutions


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
            if select == "accuracy":
                errors.append(-(predictions.argmax(dim=1) == targets[check].argmax(dim=1)).double().mean().item())
            else:
                errors.append((predictions - targets[check].double()).pow(2).mean().item())
        best_l2 = l2_grid[min(range(len(errors)), key=errors.__getitem__)]  # first of equals: least shrinkage
    weight, bias = _ridge_solutions(standardised, targets, [best_l2 * n])[0]
    # ((x - mean) / std) @ weight + bias  ==  x @ (weight / std) + (bias - (mean / std) @ weight)
    mean, std = mean.double(), std.double()
    return (weight / std[:, None]).float(), (bias - (mean / std) @ weight).float()


def fit_softmax_probe(features, targets, l2=1e-4, steps=150, max_samples=20000, seed=0):
    """Multinomial logistic regression from features (n, d) to class targets (n, k) (one-hot or soft class
    fractions): cross-entropy + l2 * |W|^2 on standardised features, minimised by full-batch gradient descent
    with Nesterov momentum from zero, step 1 / L (L bounds the curvature: the softmax Hessian is at most
    1/2 X^T X / n per class), so deterministic and free of tuning. At most max_samples rows (a seeded subset).
    Returns (weight (d, k), bias (k,)) acting on the raw features: logits = features @ weight + bias.
    Used for segmentation rather than ridge: with ~3/4 of the pixels background, ridge's least-squares class
    scores almost never put an object class above background (composed scenes, features = true class
    fractions + noise 0.3: ridge 10 mIoU, this probe 60)."""
    features, targets = features.float(), targets.float()
    if len(features) > max_samples:
        keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_samples]
        features, targets = features[keep], targets[keep]
    n = len(features)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    inputs = torch.cat([(features - mean) / std, torch.ones(n, 1)], dim=1)  # (n, d + 1): the bias as a column
    decay = torch.ones(inputs.shape[1], 1)
    decay[-1] = 0.0  # no weight decay on the bias
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


def _patch_of_pixel(height, width, grid_h, grid_w):
    """(H*W,) index of the patch each pixel falls in: pixel (y, x) -> patch (y * gh // H, x * gw // W)."""
    rows = torch.arange(height) * grid_h // height
    cols = torch.arange(width) * grid_w // width
    return (rows[:, None] * grid_w + cols[None, :]).flatten()


def patch_targets(labels, grid, num_classes, ignore_index=None):
    """Per-patch class targets from pixel class maps (N, H, W) for a (gh, gw) patch grid: the fraction of each
    class among the patch's valid pixels (N, gh, gw, num_classes), and the valid fraction of the patch
    (N, gh, gw). Pixels labelled ignore_index or outside [0, num_classes) are not valid."""
    n, height, width = labels.shape
    grid_h, grid_w = grid
    patch_of_pixel = _patch_of_pixel(height, width, grid_h, grid_w)
    flat = labels.reshape(n, -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        valid &= flat != ignore_index
    patch_index = torch.arange(n)[:, None] * (grid_h * grid_w) + patch_of_pixel[None, :]  # (N, H*W)
    slots = patch_index * num_classes + flat.clamp(0, num_classes - 1)
    counts = torch.bincount(slots[valid], minlength=n * grid_h * grid_w * num_classes).float()
    counts = counts.view(n, grid_h, grid_w, num_classes)
    pixels_per_patch = torch.bincount(patch_of_pixel, minlength=grid_h * grid_w).float().view(grid_h, grid_w)
    totals = counts.sum(dim=-1)
    return counts / totals.clamp_min(1)[..., None], totals / pixels_per_patch


def patch_means(values, grid, valid=None):
    """The mean of a pixel map (N, H, W) over the valid pixels of each patch -> (N, gh, gw), and the valid
    fraction (N, gh, gw)."""
    n, height, width = values.shape
    grid_h, grid_w = grid
    patch_of_pixel = _patch_of_pixel(height, width, grid_h, grid_w)
    slots = (torch.arange(n)[:, None] * (grid_h * grid_w) + patch_of_pixel[None, :]).flatten()
    valid = torch.ones(n, height * width, dtype=torch.bool) if valid is None else valid.reshape(n, -1)
    valid = valid.flatten()
    sums = torch.bincount(slots[valid], weights=values.reshape(-1)[valid].double(), minlength=n * grid_h * grid_w)
    counts = torch.bincount(slots[valid], minlength=n * grid_h * grid_w).double()
    pixels_per_patch = torch.bincount(patch_of_pixel, minlength=grid_h * grid_w).double().repeat(n)
    means = (sums / counts.clamp_min(1)).float().view(n, grid_h, grid_w)
    return means, (counts / pixels_per_patch).float().view(n, grid_h, grid_w)


def upsample_patches(patch_values, size):
    """Patch predictions (N, gh, gw, K) -> pixel predictions (N, K, H, W), bilinear (align_corners=False)."""
    return F.interpolate(patch_values.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """(num_classes, num_classes) counts, rows = target class, columns = predicted class; pixels whose target
    is ignore_index or outside [0, num_classes) are left out."""
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


def miou(pred, target, num_classes, ignore_index=None):
    """Mean IoU (%) of predicted class maps against target maps (any matching shapes), over the whole set."""
    return miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index), ignore_index)


def rmse(pred, target, valid=None):
    """Root mean squared error over the valid pixels (all if valid is None)."""
    error = (pred.double() - target.double()).pow(2)
    return math.sqrt(error[valid].mean().item() if valid is not None else error.mean().item())


def segmentation_probe(train_grids, train_labels, test_grids, test_labels, num_classes, ignore_index=None,
                       chunk=8):
    """mIoU (%) of a linear softmax probe on patch tokens. train/test_grids (N, gh, gw, W); labels (N, H, W)
    class maps. Trained with cross-entropy on per-patch class fractions (patches without a valid pixel left
    out); test logits are upsampled bilinearly to pixels and scored against the full-resolution labels."""
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
    """RMSE of a linear probe on patch tokens regressing depth. Trained on the mean depth of each patch;
    test predictions upsampled bilinearly to pixels, RMSE over the valid pixels (same units as the labels)."""
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


# ---------------------------------------------------------------------------------------------------------
# Tracking by label propagation (the DINO / PE DAVIS protocol): frame t's patch labels are a weighted vote of
# the labels of its top-k most similar patches (cosine, softmax with a temperature) in a context of the first
# frame (with its given mask) and the previous `context` frames (with their propagated soft labels),
# restricted to a neighbourhood of `radius` patches. Predictions upsampled bilinearly to pixels, argmax.


def propagate_labels(features, first_labels, num_labels, topk=5, temperature=0.1, context=7, radius=12):
    """features (T, gh, gw, C): per-frame patch features; first_labels (H, W) long, frame 0's annotation
    (0 = background, 1..num_labels-1 objects). Returns (T, H, W) long: frame 0 as given, frames 1.. propagated."""
    frames, grid_h, grid_w, channels = features.shape
    size = first_labels.shape
    patches = F.normalize(features.reshape(frames, grid_h * grid_w, channels).float(), dim=-1)  # (T, P, C)
    soft = [patch_targets(first_labels[None], (grid_h, grid_w), num_labels)[0][0].reshape(-1, num_labels)]
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
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
    """J (%): for each object 1..num_labels-1, the mean over frames of the IoU of its predicted and true masks
    (1 when both are empty, as the DAVIS toolkit), averaged over objects. Frames whose target is all -1 (not
    annotated) are left out; the first frame (given) is left out with skip_first."""
    start = 1 if skip_first else 0
    frames = [t for t in range(start, len(target)) if (target[t] >= 0).any()]
    scores = []
    for label in range(1, num_labels):
        per_frame = []
        for t in frames:
            p, g = pred[t] == label, target[t] == label
            union = (p | g).sum().item()
            per_frame.append(1.0 if union == 0 else (p & g).sum().item() / union)
        if per_frame:
            scores.append(sum(per_frame) / len(per_frame))
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Layer-wise probe data: the embedded default (held-out emoji renderings, composed scenes and videos) or the
# public layouts.


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


def probe_classification_data(cfg, image_size):
    """(train images, train labels, test images, test labels, num_classes, description) for the probe."""
    if cfg.imagenet_dir:  # a deterministic half/half split of the folder: even items train, odd items test
        dataset = data.ClassFolder(cfg.imagenet_dir, image_size=image_size, class_names=cfg.class_names or None)
        indices = list(first_indices(dataset, cfg.max_images))
        train = stack_dataset(dataset, indices[0::2], "probe images (train)", (0, 2))
        test = stack_dataset(dataset, indices[1::2], "probe images (test)", (0, 2))
        return (*train, *test, len(dataset.class_names), f"class folders {cfg.imagenet_dir}, even/odd split")
    train_set = data.EmojiImageText("train", cfg.num_classes, cfg.num_probe_train, image_size, seed=cfg.seed)
    test_set = data.EmojiImageText("val", cfg.num_classes, cfg.num_val, image_size, seed=cfg.seed)
    train = stack_dataset(train_set, range(len(train_set)), "probe images (train)", (0, 2))
    test = stack_dataset(test_set, range(len(test_set)), "probe images (test)", (0, 2))
    return (*train, *test, cfg.num_classes, f"embedded: {cfg.num_classes} classes, {cfg.num_probe_train} train "
            f"renderings / {cfg.num_val} held-out val renderings per class")


def composed_scene_split(cfg, size):
    """Composed scenes (data.ComposedScenes): 3/4 train, 1/4 test, string seeds disjoint from align_spatial's."""
    num_test = max(1, cfg.num_scenes // 4)
    splits = {}
    for split, count in (("train", cfg.num_scenes - num_test), ("test", num_test)):
        scenes = data.ComposedScenes(count, size, seed=f"evaluate-{split}-{cfg.seed}")
        images, semantic, depth = stack_dataset(scenes, range(count), f"composed scenes ({split})",
                                                ("image", "semantic", "depth"))
        splits[split] = {"images": images, "semantic": semantic, "depth": depth, "valid": None}
    return splits


def public_dense_split(dataset, cfg, desc, keys, test_dataset=None):
    """Train/test items of a public dense set: a separate test set, or a deterministic 3/4-1/4 split."""
    if test_dataset is None:
        indices = list(first_indices(dataset, cfg.max_images))
        cut = len(indices) - max(1, len(indices) // 4)
        train_indices, test_indices, test_dataset = indices[:cut], indices[cut:], dataset
    else:
        train_indices = first_indices(dataset, cfg.max_images)
        test_indices = first_indices(test_dataset, cfg.max_images)
    return (stack_dataset(dataset, train_indices, f"{desc} (train)", keys),
            stack_dataset(test_dataset, test_indices, f"{desc} (test)", keys))


def scene_probe_set(visual, cfg, size, layers, device, cache):
    """The composed scenes (segmentation and depth labels from one set) and their layer features, computed once
    per run and shared by both probes: ({"train": {...}, "test": {...}}, {"train": features, "test": features})."""
    key = ("composed scenes", size, tuple(layers))
    if key not in cache:
        splits = composed_scene_split(cfg, size)
        features = {split: layer_features(visual, splits[split]["images"], max(1, cfg.batch_size // 2), None,
                                          layers, device, f"layer features ({split} scenes)")
                    for split in ("train", "test")}
        cache[key] = splits, features
    return cache[key]


def segmentation_probe_set(visual, cfg, size, layers, device, cache):
    """(splits, features, num_classes, ignore_index, description): ADE20K when given, else composed scenes."""
    if not cfg.ade20k_dir:
        splits, features = scene_probe_set(visual, cfg, size, layers, device, cache)
        return (splits, features, data.DENSE_NUM_CLASSES + 1, None,
                f"composed scenes: {len(splits['train']['images'])} train / {len(splits['test']['images'])} test, "
                f"{data.DENSE_NUM_CLASSES} emoji classes + background")
    train_set = data.SegmentationFolder(cfg.ade20k_dir, "training", size)
    test_set = data.SegmentationFolder(cfg.ade20k_dir, "validation", size)
    train, test = public_dense_split(train_set, cfg, "ADE20K", (0, 1), test_set)
    splits = {"train": {"images": train[0], "semantic": train[1]}, "test": {"images": test[0], "semantic": test[1]}}
    features = {split: layer_features(visual, splits[split]["images"], max(1, cfg.batch_size // 2), None, layers,
                                      device, f"layer features (ADE20K {split})") for split in ("train", "test")}
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    return splits, features, num_classes, 0, f"ADE20K {cfg.ade20k_dir} (label 0 'other' ignored)"


def depth_probe_set(visual, cfg, size, layers, device, cache):
    """(splits, features, description): NYU-style pairs when given, else the composed scenes."""
    if not cfg.nyu_dir:
        splits, features = scene_probe_set(visual, cfg, size, layers, device, cache)
        return splits, features, (f"composed scenes: depth = 1 / object scale (canvas units; background wall at "
                                  f"{1 / data.SCENE_MIN_SCALE:.2f})")
    if all(os.path.isdir(os.path.join(cfg.nyu_dir, split)) for split in ("train", "test")):
        train_set = data.DepthPairs(os.path.join(cfg.nyu_dir, "train"), size)
        test_set = data.DepthPairs(os.path.join(cfg.nyu_dir, "test"), size)
    else:
        train_set, test_set = data.DepthPairs(cfg.nyu_dir, size), None
    train, test = public_dense_split(train_set, cfg, "NYU depth", (0, 1, 2), test_set)
    splits = {name: {"images": part[0], "depth": part[1], "valid": part[2]}
              for name, part in (("train", train), ("test", test))}
    features = {split: layer_features(visual, splits[split]["images"], max(1, cfg.batch_size // 2), None, layers,
                                      device, f"layer features (depth {split})") for split in ("train", "test")}
    return splits, features, f"NYU-style depth {cfg.nyu_dir} (metres)"


def tracking_videos(cfg, size):
    """[(frames (T, 3, S, S), masks (T, S, S) long (-1 = not annotated), number of labels incl. background)]."""
    if cfg.davis_dir:
        davis = data.DavisFolder(cfg.davis_dir, size=size)
        videos = []
        for index in tqdm(first_indices(davis, cfg.max_images), desc="DAVIS sequences", leave=False):
            item = davis[index]
            if item is None or not (item["masks"][0] >= 0).any():
                continue  # unreadable (counted in davis.bad) or no first-frame annotation to propagate
            masks = item["masks"].masked_fill(item["masks"] == 255, -1)  # DAVIS void pixels: not scored
            videos.append((item["frames"], masks, int(masks[0].max()) + 1))
        return videos, f"DAVIS {cfg.davis_dir} ({len(videos)} sequences, resized to {size}x{size})"
    videos = []
    for index in tqdm(range(cfg.num_track_videos), desc="composed videos", leave=False):
        video = data.compose_video(f"evaluate-track-{cfg.seed}-{index}", cfg.track_frames, size)
        frames = torch.stack([pe_model.preprocess_image(frame, size) for frame in video["frames"]])
        videos.append((frames, video["masks"], len(video["labels"]) + 1))
    return videos, f"composed videos: {cfg.num_track_videos} x {cfg.track_frames} frames (moving emoji, exact masks)"


# ---------------------------------------------------------------------------------------------------------
# The layer-wise analysis


def summarize_layers(layers, scores, metric, higher_is_better, description):
    """A probe's per-layer scores -> its results entry (best layer, last layer's score beside it)."""
    finite = [i for i, s in enumerate(scores) if not math.isnan(s)]
    best = (max if higher_is_better else min)(finite, key=lambda i: scores[i]) if finite else len(scores) - 1
    return {"metric": metric, "higher_is_better": higher_is_better, "layers": layers, "per_layer": scores,
            "best_layer": layers[best], "best": scores[best], "last_layer": layers[-1], "last": scores[-1],
            "data": description}


def run_layerwise(model, cfg, device, cache, probes=("classification", "segmentation", "depth", "tracking")):
    """Every probe on every layer; one forward pass per image, its features shared by the probes of that
    image set (the scenes serve segmentation and depth). Returns {"layers", "tasks": {probe: entry}, ...}."""
    visual = vision_tower(model)
    layers = probe_layers(visual, cfg.layer_stride)
    image_size = cfg.image_size or visual.image_size
    dense_size = cfg.dense_size or dense_resolution(visual, image_size)
    batch = max(1, cfg.batch_size // 2)
    tasks, seconds = {}, {}

    if "classification" in probes:
        started = time.time()
        train_x, train_y, test_x, test_y, num_classes, description = probe_classification_data(cfg, image_size)
        train_f = layer_features(visual, train_x, batch, cfg.pooling, layers, device, "layer features (probe train)")
        test_f = layer_features(visual, test_x, batch, cfg.pooling, layers, device, "layer features (probe test)")
        scores = [classification_probe(train_f[i], train_y, test_f[i], test_y, num_classes)
                  for i in tqdm(range(len(layers)), desc="classification probe per layer", leave=False)]
        tasks["classification"] = summarize_layers(layers, scores, f"top-1 % (linear probe, {cfg.pooling} pooling)",
                                                   True, description)
        seconds["classification"] = round(time.time() - started, 1)

    if "segmentation" in probes:
        started = time.time()
        splits, features, num_classes, ignore_index, description = segmentation_probe_set(
            visual, cfg, dense_size, layers, device, cache)
        scores = [segmentation_probe(features["train"][i], splits["train"]["semantic"], features["test"][i],
                                     splits["test"]["semantic"], num_classes, ignore_index)
                  for i in tqdm(range(len(layers)), desc="segmentation probe per layer", leave=False)]
        tasks["segmentation"] = summarize_layers(layers, scores, "mIoU % (linear softmax probe)", True, description)
        seconds["segmentation"] = round(time.time() - started, 1)

    if "depth" in probes:
        started = time.time()
        splits, features, description = depth_probe_set(visual, cfg, dense_size, layers, device, cache)
        scores = [depth_probe(features["train"][i], splits["train"]["depth"], features["test"][i],
                              splits["test"]["depth"], splits["train"]["valid"], splits["test"]["valid"])
                  for i in tqdm(range(len(layers)), desc="depth probe per layer", leave=False)]
        tasks["depth"] = summarize_layers(layers, scores, "RMSE (linear probe, lower is better)", False, description)
        seconds["depth"] = round(time.time() - started, 1)

    if "tracking" in probes:
        started = time.time()
        videos, description = tracking_videos(cfg, dense_size)
        per_layer = [[] for _ in layers]
        for frames, masks, num_labels in tqdm(videos, desc="tracking videos", leave=False):
            features = layer_features(visual, frames, batch, None, layers, device, "layer features (video)")
            first = masks[0].clamp_min(0)
            for slot in range(len(layers)):
                pred = propagate_labels(features[slot], first, num_labels, cfg.track_topk, cfg.track_temperature,
                                        cfg.track_context, cfg.track_radius)
                per_layer[slot].append(track_iou(pred, masks, num_labels))
        scores = [sum(v for v in s if not math.isnan(v)) / max(1, sum(not math.isnan(v) for v in s)) for s in per_layer]
        tasks["tracking"] = summarize_layers(
            layers, scores, f"J % (label propagation: top-{cfg.track_topk}, temperature {cfg.track_temperature}, "
            f"first + {cfg.track_context} previous frames, radius {cfg.track_radius} patches)", True, description)
        seconds["tracking"] = round(time.time() - started, 1)

    return {"num_layers": visual.layers, "layers": layers,
            "layer_index": "0-based block index (official layer_idx): layer i = the output of block i, before ln_post",
            "probe": "linear probes on standardised features: closed-form ridge (classification, depth; lambda "
                     "picked on a held-out 20% of the training set), softmax by full-batch gradient descent "
                     "(segmentation); "
                     "dense predictions upsampled bilinearly from patches to pixels",
            "image_size": image_size, "dense_size": dense_size, "tasks": tasks, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------
# VQA (language alignment, §4): align_lang.py owns the model and its held-out questions


def run_vqa(cfg):
    if not cfg.vqa_checkpoint:
        return {"skipped": "no --vqa_checkpoint given (python align_lang.py writes one)"}
    try:
        import align_lang  # lazily: it pulls the language model code, which the other evaluations do not need
        vqa_accuracy = align_lang.vqa_accuracy
    except (ImportError, AttributeError) as error:
        return {"skipped": f"align_lang.vqa_accuracy unavailable ({error})"}
    return {**vqa_accuracy(cfg.vqa_checkpoint), "checkpoint": cfg.vqa_checkpoint}


# ---------------------------------------------------------------------------------------------------------
# Plots, drawn with Pillow (no plotting library): a line per probe, score against layer, best layer marked.

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]
TASK_LABELS = {"classification": "classification", "segmentation": "segmentation", "depth": "depth",
               "tracking": "tracking"}


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_ticks(low, high, count=5):
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def draw_panel(draw, box, x_values, series, title, y_label, x_label="layer", y_range=None):
    """Line plot inside box = (left, top, right, bottom): axes, ticks, grid, one line per series
    {name: (y values, colour, best index or None)}; the best point of each line marked with a ring."""
    font, small = _font(15), _font(12)
    left, top, right, bottom = box
    plot_l, plot_t, plot_r, plot_b = left + 62, top + 30, right - 14, bottom - 44
    values = [v for ys, _, _ in series.values() for v in ys if not math.isnan(v)]
    low, high = y_range if y_range else (min(values, default=0.0), max(values, default=1.0))
    if not y_range:
        pad = 0.08 * (high - low) if high > low else 0.5
        low, high = low - pad, high + pad
    ticks = [t for t in _nice_ticks(low, high) if low - 1e-9 <= t <= high + 1e-9]
    x_low, x_high = min(x_values), max(x_values)
    x_span = max(x_high - x_low, 1)

    def to_px(x, y):
        return (plot_l + (x - x_low) / x_span * (plot_r - plot_l),
                plot_b - (y - low) / (high - low) * (plot_b - plot_t))

    width, _ = _text_size(draw, title, font)
    draw.text(((left + right - width) / 2, top + 4), title, fill="black", font=font)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = next(d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6 or d == 6)
    for tick in ticks:  # horizontal grid and y tick labels
        _, y = to_px(x_low, tick)
        draw.line([(plot_l, y), (plot_r, y)], fill=(225, 225, 225))
        label = f"{tick:.{decimals}f}"
        w, h = _text_size(draw, label, small)
        draw.text((plot_l - 8 - w, y - h / 2 - 2), label, fill="black", font=small)
    step = max(1, math.ceil(len(x_values) / 12))
    for x in x_values[::step] + ([x_values[-1]] if (len(x_values) - 1) % step else []):
        px, _ = to_px(x, low)
        draw.line([(px, plot_b), (px, plot_b + 5)], fill="black")
        w, _ = _text_size(draw, str(x), small)
        draw.text((px - w / 2, plot_b + 7), str(x), fill="black", font=small)
    draw.line([(plot_l, plot_t), (plot_l, plot_b), (plot_r, plot_b)], fill="black", width=1)
    w, _ = _text_size(draw, x_label, small)
    draw.text(((plot_l + plot_r - w) / 2, plot_b + 24), x_label, fill="black", font=small)
    draw.text((left + 4, top + 8), y_label, fill=(90, 90, 90), font=small)
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
    """All probes in one plot: normalised score (1 = the probe's best layer) against layer, one line per
    probe, the best layer ringed; the legend gives each probe's best layer and the last layer's raw score."""
    image = Image.new("RGB", (1000, 560), "white")
    draw = ImageDraw.Draw(image)
    any_entry = next(iter(tasks.values()))
    series = {}
    for k, (name, entry) in enumerate(tasks.items()):
        best = entry["layers"].index(entry["best_layer"])
        series[name] = (normalised_scores(entry), COLOURS[k % len(COLOURS)], best)
    draw_panel(draw, (0, 0, 700, 560), any_entry["layers"], series, title, "normalised score (1 = best layer)",
               "layer (0-based block index)", y_range=(-0.05, 1.05))
    font, small = _font(14), _font(12)
    y = 60
    for k, (name, entry) in enumerate(tasks.items()):
        colour = COLOURS[k % len(COLOURS)]
        draw.line([(712, y + 9), (742, y + 9)], fill=colour, width=3)
        draw.ellipse([722, y + 4, 732, y + 14], outline="black", width=2)
        draw.text((750, y), TASK_LABELS.get(name, name), fill="black", font=font)
        grey = (60, 60, 60)
        draw.text((750, y + 20), f"best: layer {entry['best_layer']} = {entry['best']:.3g}", fill=grey, font=small)
        draw.text((750, y + 36), f"last: layer {entry['last_layer']} = {entry['last']:.3g}", fill=grey, font=small)
        draw.text((750, y + 52), entry["metric"].split(" (")[0], fill=(110, 110, 110), font=small)
        y += 84
    draw.text((712, y + 4), "ring = best layer", fill=(90, 90, 90), font=small)
    image.save(path)
    return path


def plot_layerwise_tasks(path, tasks):
    """One panel per probe with its raw scores against layer, the best layer ringed."""
    columns = 2 if len(tasks) > 1 else 1
    rows = math.ceil(len(tasks) / columns)
    image = Image.new("RGB", (520 * columns, 340 * rows), "white")
    draw = ImageDraw.Draw(image)
    for k, (name, entry) in enumerate(tasks.items()):
        left, top = 520 * (k % columns), 340 * (k // columns)
        best = entry["layers"].index(entry["best_layer"])
        series = {name: (entry["per_layer"], COLOURS[k % len(COLOURS)], best)}
        title = f"{TASK_LABELS.get(name, name)}: best layer {entry['best_layer']}, last {entry['last_layer']}"
        draw_panel(draw, (left, top, left + 520, top + 340), entry["layers"], series, title,
                   entry["metric"].split(" (")[0], "layer (0-based block index)")
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Reports


def _fmt(value, digits=1):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def results_markdown(results):
    meta = results.get("meta", {})
    lines = [f"# Evaluation: {meta.get('model', '')}", "",
             f"Device {meta.get('device', '')}; wall time {meta.get('seconds', 0):.0f} s; written by "
             f"`{meta.get('command', 'python evaluate.py')}`.", ""]

    def skipped(entry):
        return isinstance(entry, dict) and "skipped" in entry

    entry = results.get("zero_shot")
    if entry is not None:
        lines += ["## Zero-shot classification", ""]
        if skipped(entry):
            lines += [f"Skipped: {entry['skipped']}", ""]
        else:
            lines += [f"{entry['data']}; {entry['templates']}-template ensemble; {entry['images']} images "
                      f"({entry['skipped_bad']} unreadable skipped).", "", "| top-1 % | top-5 % |", "|---|---|",
                      f"| {_fmt(entry['top1'])} | {_fmt(entry['top5'])} |", ""]
    entry = results.get("robustness")
    if entry is not None:
        lines += ["## Robustness (zero-shot on shifted val sets)", ""]
        if skipped(entry):
            lines += [f"Skipped: {entry['skipped']}", ""]
        else:
            lines += [f"{entry['data']}; {entry['images_per_set']} images per set.", "",
                      "| set | top-1 % | top-5 % |", "|---|---|---|",
                      f"| clean val | {_fmt(entry['clean']['top1'])} | {_fmt(entry['clean']['top5'])} |"]
            lines += [f"| {name} | {_fmt(s['top1'])} | {_fmt(s['top5'])} |" for name, s in entry["shifts"].items()]
            average = entry["robustness_average"]
            lines += [f"| **robustness average** | **{_fmt(average['top1'])}** | **{_fmt(average['top5'])}** |", ""]
            lines += [f"- {name}: {note}" for name, note in entry["notes"].items()] + [""]
    entry = results.get("retrieval")
    if entry is not None:
        lines += ["## Retrieval", ""]
        if skipped(entry):
            lines += [f"Skipped: {entry['skipped']}", ""]
        else:
            lines += [f"{entry['data']}; {entry['images']} images, {entry['texts']} texts.", "",
                      "| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
            for direction in ("image_to_text", "text_to_image"):
                r = entry[direction]
                cells = " | ".join(_fmt(r[k]) for k in ("R@1", "R@5", "R@10"))
                lines.append(f"| {direction.replace('_', ' ')} | {cells} |")
            lines.append("")
    entry = results.get("video_zero_shot")
    if entry is not None:
        lines += ["## Video zero-shot classification", ""]
        if skipped(entry):
            lines += [f"Skipped: {entry['skipped']}", ""]
        else:
            lines += [f"{entry['data']}; {entry['frames_per_video']} frames per video, frame embeddings averaged; "
                      f"{entry['videos']} videos ({entry['skipped_bad']} unreadable skipped).", "",
                      "| top-1 % | top-5 % |", "|---|---|", f"| {_fmt(entry['top1'])} | {_fmt(entry['top5'])} |", ""]
    entry = results.get("layerwise")
    if entry is not None and entry.get("tasks"):
        tasks = entry["tasks"]
        lines += ["## Layer-wise frozen probes", "",
                  f"{entry['num_layers']} layers; {entry['layer_index']}. {entry['probe']}.", "",
                  "| probe | metric | best layer | best | last layer | last |", "|---|---|---|---|---|---|"]
        for name, t in tasks.items():
            lines.append(f"| {name} | {t['metric']} | {t['best_layer']} | {_fmt(t['best'], 2)} | {t['last_layer']} | "
                         f"{_fmt(t['last'], 2)} |")
        layers = next(iter(tasks.values()))["layers"]
        lines += ["", "Per layer:", "", "| layer | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for slot, layer in enumerate(layers):
            cells = []
            for t in tasks.values():
                cell = _fmt(t["per_layer"][slot], 2)
                cells.append(f"**{cell}**" if layer == t["best_layer"] else cell)
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines += ["", "Data: " + "; ".join(f"{name}: {t['data']}" for name, t in tasks.items()) + ".", "",
                  "![score per layer](layerwise.png)", "", "![each probe per layer](layerwise_tasks.png)", ""]
    entry = results.get("tracking")
    if entry is not None and "per_layer" in entry:
        lines += ["## Tracking (label propagation)", "",
                  f"{entry['data']}. J: best layer {entry['best_layer']} = {_fmt(entry['best'])}, last layer "
                  f"{entry['last_layer']} = {_fmt(entry['last'])}.", ""]
    entry = results.get("vqa")
    if entry is not None:
        lines += ["## VQA", ""]
        if skipped(entry):
            lines += [f"Skipped: {entry['skipped']}", ""]
        else:
            scalars = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
            cells = " | ".join(_fmt(v, 3) if isinstance(v, float) else str(v) for v in scalars.values())
            lines += ["| " + " | ".join(scalars) + " |", "|" + "---|" * len(scalars), f"| {cells} |", ""]
            for key, value in entry.items():
                if isinstance(value, dict):
                    lines += [f"{key}:", "", "| | |", "|---|---|"]
                    lines += [f"| {k} | {_fmt(v, 3) if isinstance(v, float) else v} |" for k, v in value.items()] + [""]
                elif isinstance(value, list):
                    lines += [f"{key}:", ""] + [f"- {item}" for item in value] + [""]
    return "\n".join(lines)


def json_safe(value):
    """NaN (a probe with nothing to score) -> null, so results.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(results, out_dir):
    """results.json, results.md and (with layer-wise results) the two plots into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    with open(paths[0], "w") as f:
        json.dump(json_safe(results), f, indent=2)
    with open(paths[1], "w") as f:
        f.write(results_markdown(results))
    tasks = (results.get("layerwise") or {}).get("tasks")
    if tasks:
        paths.append(plot_layerwise(os.path.join(out_dir, "layerwise.png"), tasks))
        paths.append(plot_layerwise_tasks(os.path.join(out_dir, "layerwise_tasks.png"), tasks))
    return paths


# ---------------------------------------------------------------------------------------------------------


def summary_line(task, entry):
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    if task in ("zero_shot", "video_zero_shot"):
        return f"top-1 {entry['top1']:.1f}%, top-5 {entry['top5']:.1f}%"
    if task == "robustness":
        average, clean = entry["robustness_average"]["top1"], entry["clean"]["top1"]
        return f"robustness average top-1 {average:.1f}% (clean {clean:.1f}%)"
    if task == "retrieval":
        i2t, t2i = entry["image_to_text"]["R@1"], entry["text_to_image"]["R@1"]
        return f"image->text R@1 {i2t:.1f}%, text->image R@1 {t2i:.1f}%"
    if task == "layerwise":
        return "; ".join(f"{name} best layer {t['best_layer']} ({t['best']:.3g}), last {t['last']:.3g}"
                         for name, t in entry["tasks"].items())
    if task == "tracking":
        return f"J best layer {entry['best_layer']} ({entry['best']:.1f}), last {entry['last']:.1f}"
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
                     if not isinstance(v, (dict, list)))


def main(argv=None):
    cfg = pe_model.parse_config(EvalConfig(), argv)
    selected = [task for task in TASKS if getattr(cfg, task)]
    if cfg.all or not selected:
        selected = list(TASKS)
    if cfg.pooling not in ("mean", "cls"):
        raise SystemExit(f"--pooling={cfg.pooling}: expected mean or cls")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    for field in ("imagenet_dir", "class_names", "coco_json", "coco_images", "kinetics_dir", "ade20k_dir", "nyu_dir",
                  "davis_dir", "vqa_checkpoint"):  # before minutes of work, not after
        if getattr(cfg, field) and not os.path.exists(getattr(cfg, field)):
            raise SystemExit(f"--{field}={getattr(cfg, field)}: no such file or folder")
    started = time.time()
    model, description, checkpoint_path = load_eval_model(cfg)
    resolve_defaults(cfg, model, checkpoint_path)
    model.to(device)
    has_text = isinstance(model, pe_model.CLIP)
    print(f"evaluating {description} on {device} at {cfg.image_size} px: {', '.join(selected)}")
    cache = {}  # per run: the zero-shot classifier, clean accuracy, layer features of the probe scenes
    results = {}
    runners = {"zero_shot": run_zero_shot, "robustness": run_robustness, "retrieval": run_retrieval,
               "video_zero_shot": run_video_zero_shot}
    for task in selected:
        task_started = time.time()
        if task in runners:
            results[task] = (runners[task](model, cfg, device, cache) if has_text else
                             {"skipped": "a vision-only tower (no text tower): zero-shot tasks need a CLIP checkpoint"})
        elif task == "layerwise":
            results["layerwise"] = run_layerwise(model, cfg, device, cache)
        elif task == "tracking":
            tracking = (results.get("layerwise") or {}).get("tasks", {}).get("tracking")
            if tracking is None:
                tracking = run_layerwise(model, cfg, device, cache, probes=("tracking",))["tasks"]["tracking"]
            results["tracking"] = dict(tracking)
        elif task == "vqa":
            results["vqa"] = run_vqa(cfg)
        if isinstance(results.get(task), dict):
            results[task]["seconds"] = round(time.time() - task_started, 1)
        print(f"  {task}: {summary_line(task, results[task])}")
    results["meta"] = {"model": description, "config": asdict(cfg), "device": str(device),
                       "seconds": round(time.time() - started, 1),
                       "command": "python evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    paths = write_results(results, cfg.out_dir)
    print(f"wrote {', '.join(paths)} ({results['meta']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
