"""
video_engine.py: the video data engine and the video finetuning of PE core (paper §2.2).

Video-text data is scarce, so PE makes its own: a captioner describes the frames and the clip of each video,
human-refined captions are merged in where they exist, and a language model summarises everything into one
caption per video. PE core is then finetuned on these video-caption pairs mixed with image-caption pairs,
a video's embedding being the mean of its frames' embeddings (8 frames, pe_model.CLIP.encode_video).

What the paper used, and what stands in here (pe_paper_method.md §2.2; official README, github.com/
facebookresearch/perception_models apps/pe/README.md; review at kobybibas.github.io/posts/20251228_
perception_encoder/summary):
  - captioner: an early Perception Language Model (PE + Llama decoder) captioning frames and clips. Default
    here: zero-shot caption retrieval with the PE-core checkpoint itself (a vocabulary of captions built from
    the dataset's labels and templates, scored against each frame and against the clip's mean embedding),
    because no generative captioner exists before align_lang.py has been trained; with
    --captioner_checkpoint=PATH an align_lang.py model captions instead, as PLM does.
  - human refinement: the PE Video Dataset (PVD), 1M videos in 10 categories, 120K of the most dynamic ones
    captioned by the engine and then refined by annotators, used to improve the captioner and as data. Here:
    a PVD-style JSONL file (--annotations, fields below) merged into the records; the refined caption is
    taken as the video's final caption. The embedded default simulates it: a fraction of the composed videos
    (--embedded_refined_fraction) get their true caption, as the human pass would give.
  - summariser: an LLM (Llama 3.2) turning the frame captions, the video caption and the metadata into one
    caption. Default here: a deterministic extractive summariser (no LLM fits a 2-core CPU, nor installs
    offline): among the frame captions, the one most consistent across frames by PE text-embedding
    similarity; the clip caption instead when it names the same thing (it adds the motion that no single
    frame shows). With --summarizer_checkpoint=PATH an align_lang.py language model summarises instead (our
    prompt, SUMMARY_PROMPT: the paper's prompt is not in what we read).
  - finetuning: after a short image cooldown at the maximum resolution (§2.4: 50M samples of the pretraining
    data), ~22M synthetically captioned videos, 8 uniformly sampled frames, frame-averaged embeddings, the
    same contrastive loss. Tab. 19 (video finetuning): LAMB, betas (0.9, 0.95), weight decay 0.05, lr 1e-6,
    batch 4,096, 2K warmup steps, 5.4K steps (one pass over the 22M videos), max logit scale 100, and
    pretraining's augmentation (aspect jitter, crop s(0.08, 1), colour jitter, flip p 0.5). The defaults
    below differ on purpose, sized for the embedded data on a CPU: a few dozen steps from a core trained for
    minutes, where lr 1e-6 would move nothing (lr 1e-3, 4 warmup steps, cosine); half of each batch image-
    caption pairs, which keeps the core's image task while its text tower learns the new captions; a milder
    crop (s(0.6, 1): the subject of a composed video can be small) and no flip, because the embedded
    captions name the direction of motion ("moving left") and a flip would make them wrong. For the
    paper's recipe: --lr=1e-6 --warmup_steps=2000 --steps=5400 and --video_batch_size x ranks = 4096.

Stages, each writing to disk so a killed run resumes without redoing finished videos:
  1. caption   out_dir/records/{key}.json (atomic): frame indices, frame captions, video caption, captioner
  2. refine    the annotation file's refined caption and metadata merged into the records
  3. summarise the final caption (+ its source and the summariser) added to the records
  4. shards    out_dir/shards/shard-{n:05d}.tar: {key}.mp4 (the source bytes; other containers keep their
               extension) + {key}.txt (final caption) + {key}.json (the record: every intermediate caption),
               read by data.TarShards(media="video", with_meta=True).
Bad videos (corrupt, truncated, zero bytes) are skipped and counted (data.BadSamples) and reported at the end.

PVD-style annotation file (--annotations=FILE.jsonl), one JSON object per line:
  {"video_id": "00012",                  # required: the video's key (its file name without extension, path
                                         #   separators and dots turned into "_"; see video_key)
   "refined_caption": "a dog ...",       # required: the human-refined caption (non-empty string)
   "metadata": {"category": "animals",   # optional: free-form fields of the video (title, description,
                "title": "..."}}         #   category, duration ...), merged into the record and passed on
                                         #   to the summariser, as the paper's LLM gets the video metadata
A malformed line stops the run with the file and line number; a video_id not among the videos is counted.

Run:
  python train_clip.py                     # first: the PE-core checkpoint this stage starts from (out/clip)
  python video_engine.py                   # engine on the embedded videos + a short finetuning, CPU, minutes
  python video_engine.py --checkpoint=out/clip/final.pt --out_dir=out/video --steps=100
  python video_engine.py --skip_finetune   # the engine only (then read out/video/records/*.json)
  python video_engine.py --videos=DIR --vocabulary=classes.txt --annotations=pvd.jsonl --steps=2000
  python video_engine.py --captioner_checkpoint=out/lang/vlm.pt --summarizer_checkpoint=out/lang/vlm.pt
  torchrun --nproc_per_node=2 video_engine.py --shard_size=16            # two CPU processes (gloo)
  torchrun --nproc_per_node=8 video_engine.py --videos=DIR --vocabulary=classes.txt --steps=20000 \
      --video_batch_size=64 --image_batch_size=64 --num_workers=4        # 8 GPUs (NCCL, DDP, bf16 autocast)
  python evaluate.py --video_zero_shot --checkpoint=out/video/video_finetune.pt   # the finetuned model
Under torchrun the ranks share the captioning and summarising (video i on rank i % world_size), rank 0 merges
the annotations and writes the shards, and all ranks finetune with the loss over the global batch (each rank
reads its own shards: at least ranks x workers of them).
Outputs in --out_dir: records/, shards/, video_finetune.pt (train_clip.py's checkpoint format: "model" in the
official layout + "config" + optimizer/step; pe_model.load_model reads it), embedded/ (the default videos and
their annotation file), eval/ (evaluate.py's held-out videos). Before and after finetuning, rank 0 prints
evaluate.py's video zero-shot accuracy (--evaluate=false skips it).
Check: python -m pytest -q tests/test_video_engine.py
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import pe_model
import train_clip
from kernels.contrastive_loss import contrastive_loss


@dataclass
class VideoEngineConfig:
    checkpoint: str = ""  # the PE-core checkpoint to start from; "" = the newest one train_clip.py wrote
    model: str = ""  # official model name, needed only when --checkpoint is an official .pt (no config inside)
    out_dir: str = "out/video"  # records/, shards/ and video_finetune.pt go here
    # the videos
    videos: str = ""  # folder of videos (any container FFmpeg reads, searched recursively); "" = embedded
    num_videos: int = 48  # embedded default: composed object-motion videos (data.make_embedded_videos)
    video_length: int = 16  # embedded default: frames per composed video
    video_size: int = 64  # embedded default: frame side in pixels
    video_classes: int = 10  # embedded default: emoji classes of the moving subjects, among the core's classes
    embedded_refined_fraction: float = 0.25  # embedded default: share of videos given a "human-refined" caption
    # the engine
    num_frames: int = 8  # frames sampled per video, uniformly (§2.2: 8)
    vocabulary: str = ""  # retrieval captioner: a text file, one class name per line; "" = the embedded classes
    motions: tuple[str, ...] = data.MOTIONS  # retrieval captioner: the motions its clip captions name
    captioner_checkpoint: str = ""  # an align_lang.py checkpoint: its generative model captions instead
    summarizer_checkpoint: str = ""  # an align_lang.py checkpoint: its language model summarises instead
    annotations: str = ""  # PVD-style JSONL of human-refined captions (fields in the docstring)
    shard_size: int = 64  # videos per tar shard
    skip_finetune: bool = False  # run the engine only
    # finetuning (§2.2); the recipe's numbers are ours (see the docstring)
    steps: int = 40
    video_batch_size: int = 8  # videos per step per rank (x num_frames frames through the image tower)
    image_batch_size: int = 8  # image-caption pairs per step per rank (data.EmojiImageText); 0 = videos only
    image_classes: int = 0  # classes of the image pairs (and the pool of the embedded videos' subjects); 0 = the
    #                         start checkpoint's (its train_config), else 100
    image_size: int = 0  # training resolution; 0 = the start checkpoint's last stage (as evaluate.py), else the model's
    optimizer: str = "lamb"  # lamb | adamw (train_clip.build_optimizer)
    lr: float = 1e-3  # LAMB: each layer moves about lr x its norm per step
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 4
    checkpoint_every: int = 0  # steps between video_finetune_step_NNNNNN.pt checkpoints (the final is always written)
    resume: bool = False  # continue the finetuning exactly from the newest checkpoint in out_dir (see finetune)
    evaluate: bool = True  # evaluate.py's video zero-shot before and after the finetuning (rank 0)
    num_workers: int = 0  # DataLoader workers per rank
    seed: int = 0
    device: str = ""  # "" = train_clip.setup_distributed's choice (cuda:LOCAL_RANK if available, else cpu)


# ---------------------------------------------------------------------------------------------------------
# Records on disk: one JSON per video, replaced atomically, so a crash never leaves half a record. Under torchrun
# every rank writes only the records of its own videos.


def barrier():
    """Wait for every rank (under torchrun; a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_json(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(temporary, path)


def read_record(record_dir, key):
    """The record of `key`, or None if there is none (or it is unreadable: it is then redone)."""
    path = os.path.join(record_dir, f"{key}.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def video_key(relative_path):
    """A video's key: its path under the folder without extension, "/" -> "__", anything but letters, digits,
    "_" and "-" -> "_" (webdataset keys end at the first dot of a tar member's name)."""
    stem = os.path.splitext(relative_path)[0].replace(os.sep, "__").replace("/", "__")
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def list_videos(folder, bad):
    """[(key, path)] of the videos under `folder` (recursively, sorted). Two files with the same key (a.mp4 and
    a.webm) would overwrite each other's record: the second is skipped and counted."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--videos={folder}: no such folder")
    videos, seen = [], {}
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.rpartition(".")[2].lower() not in data.VIDEO_EXTENSIONS:
                continue
            path = os.path.join(root, name)
            key = video_key(os.path.relpath(path, folder))
            if key in seen:
                bad.add("duplicate_key", path, f"same key {key!r} as {seen[key]}")
                continue
            seen[key] = path
            videos.append((key, path))
    if not videos:
        raise SystemExit(f"--videos={folder}: no video files ({', '.join(data.VIDEO_EXTENSIONS)})")
    return videos


# ---------------------------------------------------------------------------------------------------------
# Stage 1: frame and clip captioning. A captioner is any callable frames (T, H, W, 3) uint8 -> str; the
# engine calls it once per sampled frame (T = 1) and once for the clip (T = num_frames).


def frames_to_pixels(frames, image_size):
    """(T, H, W, 3) uint8 -> (T, 3, S, S) in [-1, 1], the official preprocessing of each frame (as
    data.TarShards gives the finetuning, so captioning and training see the same pixels)."""
    return torch.stack([pe_model.preprocess_image(Image.fromarray(frame.numpy(), "RGB"), image_size)
                        for frame in frames])


FRAME_TEMPLATES = data.ZERO_SHOT_TEMPLATES  # frame vocabulary: an object, as an image shows it
CLIP_TEMPLATES = data.VIDEO_CAPTION_TEMPLATES  # clip vocabulary: an object and its motion


class RetrievalCaptioner:
    """Zero-shot caption retrieval with PE core: the vocabulary is every class name (frames) and every class x
    motion (clips); each entry's text embedding is the mean of its normalised embeddings over the templates
    (a prompt ensemble), and the emitted caption is its first template. One frame is scored on its own
    embedding against the frame vocabulary; a clip on the mean of its frames' embeddings against the clip
    vocabulary (frame averaging is blind to the order of frames, so left/right and in/out are guesses: the
    limit that the human-refined captions and a generative captioner lift)."""

    name = "pe-retrieval"

    def __init__(self, model, class_names, motions=data.MOTIONS, device="cpu", image_size=None):
        self.model, self.device = model.eval(), device
        self.image_size, self._cache = image_size or model.image_size, {}
        names = list(dict.fromkeys(class_names))
        self.frame_vocabulary = [data.format_template(FRAME_TEMPLATES[0], name) for name in names]
        self.frame_embeddings = self._ensemble([[data.format_template(t, name) for t in FRAME_TEMPLATES]
                                                for name in names])
        pairs = [(name, motion) for name in names for motion in motions]
        clip_text = [[t.format(a=data.with_article(name), motion=motion) for t in CLIP_TEMPLATES]
                     for name, motion in pairs]
        self.clip_vocabulary = [texts[0] for texts in clip_text]
        self.clip_embeddings = self._ensemble(clip_text) if pairs else self.frame_embeddings[:0]

    @torch.no_grad()
    def _ensemble(self, texts_per_entry):
        """[[text] * templates] * entries -> (entries, D): mean of normalised embeddings, renormalised."""
        flat = [text for texts in texts_per_entry for text in texts]
        tokens = pe_model.tokenize(flat, self.model.context_length).to(self.device)
        embeddings = torch.cat([self.model.encode_text(chunk, normalize=True) for chunk in tokens.split(256)])
        embeddings = embeddings.unflatten(0, (len(texts_per_entry), -1)).mean(1)  # (E * K, D) -> (E, D)
        return F.normalize(embeddings, dim=-1)

    @torch.no_grad()
    def _frame_features(self, frames):
        """(T, H, W, 3) uint8 -> (T, D) normalised; frames seen in the last calls come from a small cache, so
        the clip call after its T frame calls encodes nothing again."""
        keys = [hash(frame.numpy().tobytes()) for frame in frames]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            pixels = frames_to_pixels(frames[missing], self.image_size).to(self.device)  # (M, 3, S, S)
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache.update(zip([keys[i] for i in missing], self.model.encode_image(pixels, normalize=True)))
        return torch.stack([self._cache[key] for key in keys])

    @torch.no_grad()
    def __call__(self, frames):
        features = self._frame_features(frames)  # (T, D)
        query = F.normalize(features.mean(0), dim=-1)  # (D,): the clip's (or the frame's) embedding
        if len(frames) > 1 and len(self.clip_vocabulary):
            return self.clip_vocabulary[int((self.clip_embeddings @ query).argmax())]
        return self.frame_vocabulary[int((self.frame_embeddings @ query).argmax())]


def contact_sheet(frames):
    """(T, H, W, 3) uint8 -> (1, H, W, 3): the T frames tiled in time order on a ceil(sqrt(T))-wide grid and
    shrunk back to one frame's size, for an image-only VLM to see a whole clip at once."""
    count, height, width = frames.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for t, frame in enumerate(frames):
        sheet.paste(Image.fromarray(frame.numpy(), "RGB"), ((t % columns) * width, (t // columns) * height))
    sheet = sheet.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(sheet).copy())[None]


def load_vlm_captioner(checkpoint, device):
    """An align_lang.py model as the captioner (the paper's PLM role), imported lazily: the default engine does
    not need it. A frame is asked "describe the image." (a phrasing align_lang trains on); a clip is shown as a
    contact sheet of its frames, because align_lang.generate takes one image per prompt (PLM reads the frames'
    tokens in sequence)."""
    import align_lang

    vlm = align_lang.load_vlm(checkpoint, device=device)
    tokenizer = vlm.tokenizer  # the one the VLM was trained with (a compact vocabulary for a from-scratch LM)
    image_size = vlm.vision.image_size

    def captioner(frames):
        image = frames if len(frames) == 1 else contact_sheet(frames)
        pixels = frames_to_pixels(image, image_size)  # (1, 3, S, S)
        return align_lang.generate(vlm, tokenizer, pixels, ["describe the image."])[0].strip()

    captioner.name = f"align_lang:{os.path.abspath(checkpoint)}"
    return captioner


def component_name(component):
    """What a record says made it: a captioner's or summariser's `name`, else its function or class name."""
    return getattr(component, "name", None) or getattr(component, "__name__", None) or type(component).__name__


def file_digest(path):
    """SHA-1 of a file's bytes: a record is reused only for the very file it was made from."""
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
    return sha1.hexdigest()


def caption_videos(videos, record_dir, captioner, num_frames=8, bad=None, rank=0, world_size=1, progress=True):
    """Stage 1. For each (key, path) of this rank without a record of this very file by this captioner: read
    num_frames frames uniformly (data.read_video), caption each frame and the clip, write the record. An
    unreadable video is skipped and counted in `bad` (and a record left from an earlier version of the file is
    removed). Returns the number of videos captioned now."""
    bad = bad if bad is not None else data.BadSamples("video_engine")
    name = component_name(captioner)
    done = 0
    mine = videos[rank::world_size]
    for key, path in tqdm(mine, desc="1/4 caption", disable=not progress or rank != 0):
        record = read_record(record_dir, key)
        try:
            digest = file_digest(path)
        except OSError as error:
            bad.add("unreadable_file", path, str(error))
            continue
        if (record is not None and record.get("captioner") == name and record.get("num_frames") == num_frames
                and record.get("source_sha1") == digest):
            continue  # finished by an earlier run (same file, captioner and frame count)
        try:
            frames, indices = data.read_video(path, num_frames, name=path, return_indices=True)
        except data.VideoError as error:
            bad.add("bad_video", path, str(error))
            if record is not None:
                os.remove(os.path.join(record_dir, f"{key}.json"))
            continue
        frame_captions = [captioner(frames[t:t + 1]) for t in range(len(frames))]
        video_caption = captioner(frames)
        write_json(os.path.join(record_dir, f"{key}.json"), {
            "key": key, "source": os.path.abspath(path), "source_sha1": digest, "num_frames": num_frames,
            "frame_indices": indices, "captioner": name, "frame_captions": frame_captions,
            "video_caption": video_caption})
        done += 1
    return done


# ---------------------------------------------------------------------------------------------------------
# Stage 2: human-refined captions (PVD-style JSONL; fields in the docstring).


def read_annotations(path):
    """{video_id: {"refined_caption", "metadata"}} from a PVD-style JSONL file; a malformed line stops with
    the file and line number."""
    annotations = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except ValueError as error:
                raise SystemExit(f"{where}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"{where}: expected a JSON object")
            video_id, caption = row.get("video_id"), row.get("refined_caption")
            if not isinstance(video_id, str) or not video_id:
                raise SystemExit(f"{where}: field 'video_id' must be a non-empty string")
            if not isinstance(caption, str) or not caption.strip():
                raise SystemExit(f"{where}: field 'refined_caption' must be a non-empty string")
            metadata = row.get("metadata", {})
            if not isinstance(metadata, dict):
                raise SystemExit(f"{where}: field 'metadata' must be a JSON object")
            annotations[video_id] = {"refined_caption": caption.strip(), "metadata": metadata}
    return annotations


def merge_annotations(record_dir, keys, annotations, bad=None):
    """Stage 2. Merge each annotation into its video's record; a changed refined caption drops the final
    caption so that stage 3 redoes it. Annotations of videos without a record are counted. Returns the
    number of records changed."""
    bad = bad if bad is not None else data.BadSamples("video_engine")
    known = set(keys)
    changed = 0
    for video_id, annotation in annotations.items():
        record = read_record(record_dir, video_id) if video_id in known else None
        if record is None:
            bad.add("annotation_without_video", video_id)
            continue
        metadata = {**record.get("metadata", {}), **annotation["metadata"]}
        if record.get("refined_caption") == annotation["refined_caption"] and record.get("metadata") == metadata:
            continue
        if record.get("refined_caption") != annotation["refined_caption"]:
            record.pop("caption", None)
        record["refined_caption"], record["metadata"] = annotation["refined_caption"], metadata
        write_json(os.path.join(record_dir, f"{video_id}.json"), record)
        changed += 1
    return changed


# ---------------------------------------------------------------------------------------------------------
# Stage 3: one caption per video. A summariser is any callable (frame_captions, video_caption, metadata) -> str.


def pe_text_embedder(model, device="cpu"):
    """texts -> (N, D) L2-normalised embeddings from PE core's text tower."""

    @torch.no_grad()
    def embed(texts):
        tokens = pe_model.tokenize(list(texts), model.context_length).to(device)
        return model.eval().encode_text(tokens, normalize=True).float()

    return embed


class ExtractiveSummarizer:
    """The default summariser: deterministic and extractive, by text-embedding similarity (`embed`: texts ->
    (N, D) normalised, PE's text tower by default). The consensus is the distinct frame caption with the highest
    mean cosine similarity to all T frame captions (the one most consistent across frames). The clip caption is
    kept (it adds the motion that no single frame shows) if, among the video's frame captions and the
    `reference_captions` (every frame caption the captioner could give: its frame vocabulary), the one nearest
    to it is the consensus, i.e. it describes the same thing; else the consensus is the summary. Comparing only
    with frame-style captions keeps the shared wording of a template from deciding. Metadata is not used: only
    a language model can weave it in (the paper's Llama 3.2 does)."""

    name = "extractive"

    def __init__(self, embed, reference_captions=()):
        self.embed, self.references = embed, list(dict.fromkeys(reference_captions))
        self.reference_embeddings = embed(self.references) if self.references else None

    def __call__(self, frame_captions, video_caption, metadata=None):
        if not frame_captions:
            return video_caption
        distinct = list(dict.fromkeys(frame_captions))
        embeddings = self.embed(distinct + [video_caption])  # (C + 1, D)
        candidates, video = embeddings[:-1], embeddings[-1]
        per_frame = candidates[[distinct.index(c) for c in frame_captions]]  # (T, D)
        consensus = int((candidates @ per_frame.T).mean(1).argmax())  # (C,) -> the first of equals: deterministic
        extra = [i for i, text in enumerate(self.references) if text not in distinct]
        pool = torch.cat([candidates, self.reference_embeddings[extra]]) if extra else candidates  # (C + R, D)
        return video_caption if int((pool @ video).argmax()) == consensus else distinct[consensus]


SUMMARY_PROMPT = ("Here are captions of frames of one video, a caption of the whole video and its metadata. "
                  "Write one sentence describing the video.\nFrame captions: {frames}\nVideo caption: {video}\n"
                  "Metadata: {metadata}\nSummary:")  # ours: the paper's prompt is not public in what we read


def load_lm_summarizer(checkpoint, device):
    """An align_lang.py language model as the summariser (the paper's Llama 3.2 role), imported lazily. The
    prompt carries the captions and metadata; align_lang.generate always takes an image, so a blank (mid-grey)
    one is passed: the summary rests on the text alone, as the paper's text-only LLM's does."""
    import align_lang

    vlm = align_lang.load_vlm(checkpoint, device=device)
    tokenizer = vlm.tokenizer  # the one the VLM was trained with (a compact vocabulary for a from-scratch LM)
    blank = torch.zeros(1, 3, vlm.vision.image_size, vlm.vision.image_size)  # 0 = mid-grey in [-1, 1]

    def summarizer(frame_captions, video_caption, metadata=None):
        prompt = SUMMARY_PROMPT.format(frames="; ".join(frame_captions), video=video_caption,
                                       metadata=json.dumps(metadata or {}, ensure_ascii=False))
        return align_lang.generate(vlm, tokenizer, blank, [prompt])[0].strip() or video_caption

    summarizer.name = f"align_lang:{os.path.abspath(checkpoint)}"
    return summarizer


def summarize_records(record_dir, keys, summarizer, rank=0, world_size=1, progress=True, bad=None):
    """Stage 3. Each captioned video of this rank gets its final caption: the human-refined one where stage 2
    merged one (caption_source "human"), else the summariser's (redone when the summariser changed). An empty
    summary is counted and leaves the video out of the shards. Returns the number of records written."""
    bad = bad if bad is not None else data.BadSamples("video_engine")
    name = component_name(summarizer)
    written = 0
    for key in tqdm(keys[rank::world_size], desc="3/4 summarise", disable=not progress or rank != 0):
        record = read_record(record_dir, key)
        if record is None:  # skipped in stage 1 (bad video)
            continue
        if record.get("refined_caption"):
            caption, source = record["refined_caption"], "human"
        elif record.get("caption") and record.get("caption_source") == name:
            continue
        else:
            caption = summarizer(record["frame_captions"], record["video_caption"], record.get("metadata", {}))
            caption, source = caption.strip(), name
            if not caption:
                bad.add("empty_caption", key, f"from {name}")
                if record.pop("caption", None) is not None:
                    write_json(os.path.join(record_dir, f"{key}.json"), record)
                continue
        if record.get("caption") == caption and record.get("caption_source") == source:
            continue
        record["caption"], record["caption_source"] = caption, source
        write_json(os.path.join(record_dir, f"{key}.json"), record)
        written += 1
    return written


# ---------------------------------------------------------------------------------------------------------
# Stage 4: tar shards of {key}.mp4 + {key}.txt + {key}.json.


def _add_bytes(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: the same records give the same bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(record_dir, videos, shard_dir, shard_size=64, progress=True):
    """Stage 4. Every video with a final caption, in key order, into shards of shard_size samples; each shard is
    written to a temporary name and renamed, and shards left over from a bigger earlier run are removed.
    Returns the shard paths."""
    finished = []
    for key, path in videos:
        record = read_record(record_dir, key)
        if record is not None and record.get("caption"):
            finished.append((key, path, record))
    os.makedirs(shard_dir, exist_ok=True)
    paths = []
    groups = [finished[i:i + shard_size] for i in range(0, len(finished), shard_size)]
    for number, group in enumerate(tqdm(groups, desc="4/4 shards", disable=not progress)):
        shard = os.path.join(shard_dir, f"shard-{number:05d}.tar")
        temporary = os.path.join(shard_dir, f".shard-{number:05d}.tar.tmp{os.getpid()}")
        with tarfile.open(temporary, "w") as tar:
            for key, path, record in group:
                extension = path.rpartition(".")[2].lower()
                with open(path, "rb") as f:
                    _add_bytes(tar, f"{key}.{extension}", f.read())
                _add_bytes(tar, f"{key}.txt", record["caption"].encode("utf-8"))
                _add_bytes(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        os.replace(temporary, shard)
        paths.append(shard)
    for stale in sorted(os.listdir(shard_dir)):
        if re.fullmatch(r"shard-\d{5}\.tar", stale) and os.path.join(shard_dir, stale) not in paths:
            os.remove(os.path.join(shard_dir, stale))
    return paths


# ---------------------------------------------------------------------------------------------------------
# The whole engine, and its embedded default input.


def write_embedded_annotations(rows, path, fraction, seed=0):
    """The embedded default's stand-in for PVD's human pass: a deterministic `fraction` of the composed videos
    get their true caption (object and motion, from the composition) as refined caption, with their labels
    as metadata. Returns the path."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i, (video_path, label, caption) in enumerate(rows):
            if data.seed_for(seed, "refined", i) % 1000 < fraction * 1000:
                f.write(json.dumps({"video_id": video_key(os.path.basename(video_path)), "refined_caption": caption,
                                    "metadata": {"category": label["class_name"], "motion": label["motion"]}})
                        + "\n")
    os.replace(path + ".tmp", path)
    return path


def prepare_videos(cfg, rank=0, bad=None, class_pool=100):
    """(videos [(key, path)], class names for the retrieval vocabulary, annotation file or ""). The embedded
    default is made (once, by rank 0) under out_dir/embedded with its annotation file; its subjects are
    spread over the class_pool classes the core was trained on (data.embedded_video_classes)."""
    bad = bad if bad is not None else data.BadSamples("video_engine")
    annotations = cfg.annotations
    if cfg.videos:
        folder, class_names = cfg.videos, []
    else:
        folder = os.path.join(cfg.out_dir, "embedded", "videos")
        if rank == 0:
            # the same classes as evaluate.py's held-out videos, other seeds: no evaluation video is trained on
            rows = data.make_embedded_videos(os.path.join(cfg.out_dir, "embedded"), cfg.num_videos, cfg.video_length,
                                             cfg.video_size, seed=data.seed_for(cfg.seed, "video-engine"),
                                             num_classes=cfg.video_classes, class_pool=class_pool)
            if not annotations and cfg.embedded_refined_fraction > 0:
                annotations = write_embedded_annotations(
                    rows, os.path.join(cfg.out_dir, "embedded", "annotations.jsonl"), cfg.embedded_refined_fraction,
                    cfg.seed)
        elif not annotations and cfg.embedded_refined_fraction > 0:
            annotations = os.path.join(cfg.out_dir, "embedded", "annotations.jsonl")
        barrier()
        class_names = [name for _, name in data.embedded_video_classes(cfg.video_classes, class_pool)]
    if cfg.vocabulary:
        if not os.path.isfile(cfg.vocabulary):
            raise SystemExit(f"--vocabulary={cfg.vocabulary}: no such file")
        with open(cfg.vocabulary, encoding="utf-8") as f:
            class_names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return list_videos(folder, bad), class_names, annotations


def run_engine(cfg, model, device="cpu", rank=0, world_size=1, captioner=None, summarizer=None, progress=True,
               image_size=None, class_pool=None):
    """Stages 1-4 on cfg's videos; returns {"shards", "videos", "captioned", "summarised", "refined", "bad"}.
    captioner / summarizer override the defaults (tests count the captioner's calls through this);
    image_size: the retrieval captioner's resolution (default: the model's); class_pool: the core's training
    class count, whose classes the embedded videos show (default: core_classes without a checkpoint)."""
    bad = data.BadSamples("video_engine")
    videos, class_names, annotation_path = prepare_videos(cfg, rank, bad, class_pool or core_classes(cfg, {}))
    if captioner is None and cfg.captioner_checkpoint:
        captioner = load_vlm_captioner(cfg.captioner_checkpoint, device)
    elif captioner is None:
        if not class_names:
            raise SystemExit(f"--videos={cfg.videos}: the retrieval captioner needs a vocabulary: pass "
                             "--vocabulary=FILE (one class name per line) or --captioner_checkpoint=PATH")
        captioner = RetrievalCaptioner(model, class_names, cfg.motions, device, image_size)
    if summarizer is None and cfg.summarizer_checkpoint:
        summarizer = load_lm_summarizer(cfg.summarizer_checkpoint, device)
    elif summarizer is None:
        summarizer = ExtractiveSummarizer(pe_text_embedder(model, device),
                                          getattr(captioner, "frame_vocabulary", ()))
    if annotation_path and not os.path.isfile(annotation_path):
        raise SystemExit(f"--annotations={annotation_path}: no such file")
    annotations = read_annotations(annotation_path) if annotation_path else {}  # every rank: errors stop them all
    record_dir, shard_dir = os.path.join(cfg.out_dir, "records"), os.path.join(cfg.out_dir, "shards")
    keys = [key for key, _ in videos]
    captioned = caption_videos(videos, record_dir, captioner, cfg.num_frames, bad, rank, world_size, progress)
    barrier()
    refined = merge_annotations(record_dir, keys, annotations, bad) if rank == 0 else 0
    barrier()
    summarised = summarize_records(record_dir, keys, summarizer, rank, world_size, progress, bad)
    barrier()
    shards = write_shards(record_dir, videos, shard_dir, cfg.shard_size, progress) if rank == 0 else None
    barrier()
    shards = sorted(os.path.join(shard_dir, name) for name in os.listdir(shard_dir) if name.endswith(".tar"))
    if dist.is_available() and dist.is_initialized():  # the counts of every rank
        counts = torch.tensor([captioned, summarised], device=device)
        dist.all_reduce(counts)
        captioned, summarised = (int(n) for n in counts.tolist())
    return {"shards": shards, "videos": len(videos), "captioned": captioned, "refined": refined,
            "summarised": summarised, "bad": bad}


def embedded_caption_accuracy(out_dir):
    """How right the engine's own captions are on the embedded default, whose truth is known from the
    composition (out_dir/embedded/manifest.jsonl): among the videos captioned by machine (not refined), the
    share whose final caption names the right object, and the right object and motion."""
    with open(os.path.join(out_dir, "embedded", "manifest.jsonl"), encoding="utf-8") as f:
        truth = {video_key(os.path.basename(row["path"])): row["label"] for row in map(json.loads, f)}
    objects = both = total = 0
    for key, label in truth.items():
        record = read_record(os.path.join(out_dir, "records"), key)
        if record is None or not record.get("caption") or record.get("caption_source") == "human":
            continue
        named = f" {data.with_article(label['class_name'])} " in f" {record['caption'].rstrip('.')} "
        total, objects = total + 1, objects + named
        both += named and f" {label['motion']}" in record["caption"]
    return {"videos": total, "object": objects / max(1, total), "object_and_motion": both / max(1, total)}


def read_shards(shard_dir, num_frames=8, image_size=64):
    """Every sample of the engine's shards as (frames (T, 3, S, S), caption, key, record), in shard order,
    through data.TarShards' video mode (what the finetuning reads)."""
    shards = data.TarShards(shard_dir, image_size=image_size, media="video", num_frames=num_frames,
                            with_meta=True, shuffle_shards=False, rank=0, world_size=1)
    return list(shards), shards.bad


# ---------------------------------------------------------------------------------------------------------
# Video finetuning (§2.2): PE core on the engine's video-caption pairs mixed with image-caption pairs. The step,
# optimizer, schedule, distributed wrapping and checkpoints are train_clip.py's.


class VideoTrainingForward(train_clip.TrainingForward):
    """train_clip.TrainingForward for a batch of B videos followed by B_i images, flattened to frames, so that
    train_clip.contrastive_step trains on it unchanged: images (B*T + B_i, 3, S, S) with tokens (B + B_i, L), T =
    num_frames; B follows from the two lengths. A video's feature is the mean of its frames' L2-normalised
    features, renormalised (encode_video(normalize=True), §2.2; as evaluate.py's video zero-shot)."""

    def __init__(self, model, num_frames):
        super().__init__(model)
        self.num_frames = num_frames

    def forward(self, images=None, tokens=None, *masking):
        # (B*T + B_i, D), (B + B_i, D), the multiplier, then whatever else TrainingForward returns (mask
        # regularization's tokens: None here, video finetuning does not mask)
        features, text_features, logit_scale, *rest = super().forward(images, tokens, *masking)
        extra = len(images) - len(tokens)  # B*T + B_i - (B + B_i) = B * (T - 1)
        videos = extra // (self.num_frames - 1) if self.num_frames > 1 else 0
        if extra < 0 or (self.num_frames > 1 and extra % (self.num_frames - 1)):
            raise ValueError(f"VideoTrainingForward: {len(images)} frames and images do not fit {len(tokens)} "
                             f"captions at {self.num_frames} frames per video")
        frames = features[:videos * self.num_frames].unflatten(0, (videos, self.num_frames))  # (B, T, D)
        video_features = F.normalize(frames.mean(1), dim=-1)  # (B, D)
        return (torch.cat([video_features, features[videos * self.num_frames:]]), text_features, logit_scale,
                *rest)


def video_text_loss(model, videos, tokens, group=None):
    """The CLIP loss of videos (B, T, 3, S, S) against their captions' tokens (B, L), over the global batch."""
    visual, text, logit_scale = VideoTrainingForward(model, videos.shape[1])(videos.flatten(0, 1), tokens)[:3]
    return contrastive_loss(visual, text, logit_scale, group)


def core_classes(cfg, trained):
    """The emoji classes of the finetuning's image pairs, which are also the pool the embedded videos' subjects
    come from: --image_classes, else those of the start checkpoint's training (its train_config), else 100
    (train_clip.py's default)."""
    return cfg.image_classes or data.trained_class_count(trained)


def training_resolution(cfg, model, trained):
    """--image_size, else the final stage resolution of train_clip.py's run (where evaluate.py evaluates too),
    else the model's own."""
    if cfg.image_size:
        return cfg.image_size
    stages = trained.get("resolution_stages")
    return train_clip.parse_stages(stages)[-1][1] if stages else model.image_size


def _epochs(dataset, make_loader, start):
    """Endless (batch, position after it) from `dataset`, epoch after epoch; position = (epoch, loader batches
    used in it). start = the position to continue from: an epoch's stream is a function of (seed, epoch), so a
    resumed run continues the exact stream of an uninterrupted one. make_loader(epoch, skip) -> a loader of
    that epoch without its first `skip` batches, or the whole epoch, whose first `skip` batches are then read
    and dropped (tar shards: they cannot be skipped unread). A batch of bad samples only (None, counted by
    the dataset) is passed over; an epoch without one good batch stops the run."""
    epoch, skip = start
    while True:
        dataset.set_epoch(epoch)
        loader, skipped = make_loader(epoch, skip)
        got = False
        for index, batch in enumerate(loader, skip if skipped else 0):
            got = got or batch is not None
            if batch is not None and index >= skip:
                yield batch, (epoch, index + 1)
        if not got and not skip:
            raise SystemExit(f"{type(dataset).__name__}: an epoch gave no sample on this rank")
        epoch, skip = epoch + 1, 0


def make_loaders(cfg, shard_dir, image_size, image_classes, rank=0, world_size=1, start=(0, 0, 0, 0)):
    """Endless iterators of (batch, position) for the video batches from the engine's shards and the image
    batches from data.EmojiImageText (None without images), from start = (video epoch, video batches used in
    it, image epoch, image batches used in it). Video frames get the same mild crop and colour jitter on
    every frame of a clip and no flip (a flip turns "moving left" into "moving right")."""
    video_augment = data.AugmentConfig(crop_scale=(0.6, 1.0), hflip_prob=0.0)
    videos = data.TarShards(shard_dir, transform=data.make_train_transform(image_size, video_augment),
                            media="video", num_frames=cfg.num_frames, shuffle_buffer=4 * cfg.video_batch_size,
                            seed=cfg.seed, rank=rank, world_size=world_size)
    readers = world_size * max(1, cfg.num_workers)
    if len(videos.shards) < readers:
        raise SystemExit(f"{shard_dir}: {len(videos.shards)} shards for {readers} readers (ranks x workers): each "
                         f"needs at least one; lower --shard_size (now {cfg.shard_size}) or --num_workers")

    def video_loader(epoch, skip):  # an iterable dataset: the used batches are read again and dropped
        return torch.utils.data.DataLoader(videos, batch_size=cfg.video_batch_size, num_workers=cfg.num_workers,
                                           collate_fn=data.collate_image_text), False

    video_batches = _epochs(videos, video_loader, start[:2])
    if cfg.image_batch_size <= 0:
        return video_batches, None
    images = data.EmojiImageText("train", num_classes=image_classes, canvas_size=image_size, seed=cfg.seed,
                                 transform=data.make_train_transform(image_size, data.AugmentConfig()))

    def image_loader(epoch, skip):  # map-style: this rank's order of the epoch, without the used batches
        order = torch.randperm(len(images), generator=data.item_generator(cfg.seed, "video-finetune-images",
                                                                           rank, epoch))
        return torch.utils.data.DataLoader(images, batch_size=cfg.image_batch_size,
                                           sampler=order[skip * cfg.image_batch_size:].tolist(),
                                           num_workers=cfg.num_workers, collate_fn=data.collate_image_text,
                                           drop_last=True), True

    return video_batches, _epochs(images, image_loader, start[2:])


def finetune(cfg, model, shard_dir, device="cpu", rank=0, world_size=1, start_checkpoint="", progress=True):
    """Continue training `model` (a PE-core CLIP) for cfg.steps steps on the engine's shards mixed with
    image-caption pairs; writes out_dir/video_finetune.pt (train_clip's checkpoint format, plus the start
    checkpoint's train_config so that evaluate.py picks the same classes and resolution) and, every
    cfg.checkpoint_every steps, video_finetune_step_NNNNNN.pt (the newest is kept). --resume continues from the
    newest of them: weights, optimizer, step, RNG states and each rank's position in both data streams (so with
    as many processes as wrote it), and the resumed run reproduces the uninterrupted one. Returns {"path",
    "losses"} (the losses of this call's steps)."""
    device = torch.device(device)
    group = dist.group.WORLD if world_size > 1 else None
    trained = pe_model.checkpoint_train_config(start_checkpoint) if start_checkpoint else {}
    image_size = training_resolution(cfg, model, trained)
    image_classes = core_classes(cfg, trained)
    torch.manual_seed(cfg.seed)
    model = model.to(device).train()
    train_forward = train_clip.wrap_for_training(VideoTrainingForward(model, cfg.num_frames), device, world_size)
    optimizer = train_clip.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    path = os.path.join(cfg.out_dir, "video_finetune.pt")
    step, position = 0, (0, 0, 0, 0)
    resume_from = pe_model.latest_checkpoint(cfg.out_dir, "video_finetune*.pt") if cfg.resume else None
    if resume_from:
        state = train_clip.load_training_checkpoint(resume_from, train_forward, optimizer)
        step = int(state["step"])
        positions = state.get("data_position", torch.zeros(world_size, 4, dtype=torch.long)).view(-1, 4)
        if len(positions) != world_size:  # every rank reads its own shards: its position is its own
            raise SystemExit(f"{resume_from}: written by {len(positions)} process(es); resume it with as many "
                             f"(now {world_size})")
        position = tuple(int(v) for v in positions[rank])
        if rank == 0:
            print(f"resuming the finetuning at step {step} from {resume_from}")
    elif cfg.resume and rank == 0:
        print(f"--resume: no finetuning checkpoint in {cfg.out_dir}, starting from {start_checkpoint or 'the model'}")
    extra = {"train_config": trained, "video_engine_config": dataclasses.asdict(cfg),
             "start_checkpoint": str(start_checkpoint)}
    video_batches, image_batches = make_loaders(cfg, shard_dir, image_size, image_classes, rank, world_size,
                                                position)
    losses = []
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not progress or rank != 0)
    while step < cfg.steps:
        lr = train_clip.lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        (videos, tokens), video_position = next(video_batches)  # (B, T, 3, S, S), (B, L)
        pixels = videos.flatten(0, 1)  # (B*T, 3, S, S)
        image_position = position[2:]
        if image_batches is not None:
            (images, image_tokens), image_position = next(image_batches)
            pixels, tokens = torch.cat([pixels, images]), torch.cat([tokens, image_tokens])
        stats = train_clip.contrastive_step(train_forward, optimizer, pixels.to(device), tokens.to(device),
                                            group=group, autocast=device.type == "cuda")
        if not math.isfinite(stats["loss"]):
            raise SystemExit(f"step {step}: the loss is {stats['loss']}; lower --lr, or --resume from the last "
                             f"checkpoint in {cfg.out_dir}")
        step, position = step + 1, (*video_position, *image_position)
        losses.append(stats["loss"])
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.1e}")
        bar.update()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            train_clip.save_training_checkpoint(
                os.path.join(cfg.out_dir, f"video_finetune_step_{step:06d}.pt"), train_forward, optimizer, step,
                {**extra, "data_position": torch.tensor(train_clip.gather_per_rank(position, world_size))})
            if rank == 0:  # the newest step checkpoint only (a final video_finetune.pt is never pruned)
                train_clip.prune_checkpoints(cfg.out_dir, 1, "video_finetune_step_*.pt")
    bar.close()
    train_clip.save_training_checkpoint(path, train_forward, optimizer, step, {
        **extra, "data_position": torch.tensor(train_clip.gather_per_rank(position, world_size))})  # (ranks, 4)
    barrier()
    return {"path": path, "losses": losses}


# ---------------------------------------------------------------------------------------------------------


def video_zero_shot(model, checkpoint, cfg, device):
    """evaluate.py's video zero-shot (top-1 / top-5 %) of `model`, with the defaults `python evaluate.py
    --video_zero_shot --checkpoint=...` resolves from `checkpoint`: held-out composed videos whose seeds the
    engine's videos do not share."""
    import evaluate

    eval_cfg = evaluate.EvalConfig(checkpoint=checkpoint, out_dir=os.path.join(cfg.out_dir, "eval"),
                                   video_zero_shot=True)
    evaluate.resolve_defaults(eval_cfg, model, checkpoint)
    was_training = model.training
    result = evaluate.run_video_zero_shot(model.eval(), eval_cfg, device, {})
    model.train(was_training)
    return result


def main(argv=None):
    cfg = pe_model.parse_config(VideoEngineConfig(), argv)
    rank, world_size, _, device = train_clip.setup_distributed()
    if cfg.device:
        device = torch.device(cfg.device)
    checkpoint = pe_model.resolve_checkpoint(cfg.checkpoint or None)
    try:
        model = pe_model.load_model(checkpoint, name=cfg.model or None).to(device)
    except ValueError as error:  # CheckpointMismatchError is a ValueError
        raise SystemExit(f"--checkpoint={checkpoint}: {error}") from None
    if not isinstance(model, pe_model.CLIP):
        raise SystemExit(f"--checkpoint={checkpoint}: a PE-core CLIP checkpoint (vision + text towers) is needed")
    started = time.time()
    trained = pe_model.checkpoint_train_config(checkpoint)
    engine = run_engine(cfg, model, device, rank, world_size, image_size=training_resolution(cfg, model, trained),
                        class_pool=core_classes(cfg, trained))
    bad = engine["bad"].all_reduce()
    master = rank == 0
    if master:
        print(f"engine: {engine['videos']} videos, {engine['captioned']} captioned now (the others resumed), "
              f"{engine['refined']} refined captions merged, {engine['summarised']} summaries written, "
              f"{len(engine['shards'])} shard(s) in {os.path.join(cfg.out_dir, 'shards')} "
              f"({time.time() - started:.0f} s)")
        print(bad.report())
        quality = None
        if not cfg.videos:
            quality = embedded_caption_accuracy(cfg.out_dir)
            print(f"machine captions of the {quality['videos']} unrefined embedded videos: right object "
                  f"{100 * quality['object']:.0f}%, right object and motion {100 * quality['object_and_motion']:.0f}%")
    if cfg.skip_finetune:
        return
    before = video_zero_shot(model, checkpoint, cfg, device) if cfg.evaluate and master else None
    result = finetune(cfg, model, os.path.join(cfg.out_dir, "shards"), device, rank, world_size, checkpoint)
    after = video_zero_shot(model, result["path"], cfg, device) if cfg.evaluate and master else None
    if master:
        if result["losses"]:
            print(f"finetuned to step {cfg.steps} from {checkpoint}: loss {result['losses'][0]:.3f} -> "
                  f"{result['losses'][-1]:.3f}")
        if before and after:
            print(f"video zero-shot ({after['videos']} held-out videos, {after['classes']} classes), before -> after:"
                  f"\n| | top-1 % | top-5 % |\n|---|---|---|\n| {checkpoint} | {before['top1']:.1f} | "
                  f"{before['top5']:.1f} |\n| {result['path']} | {after['top1']:.1f} | {after['top5']:.1f} |")
        summary = {"checkpoint": checkpoint, "finetuned": result["path"], "steps": cfg.steps,
                   "engine": {k: v for k, v in engine.items() if k != "bad"}, "bad_samples": dict(bad.counts),
                   "embedded_caption_accuracy": quality,
                   "loss_first": result["losses"][0] if result["losses"] else None,
                   "loss_last": result["losses"][-1] if result["losses"] else None,
                   "video_zero_shot_before": before, "video_zero_shot_after": after}
        with open(os.path.join(cfg.out_dir, "results.json.tmp"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(os.path.join(cfg.out_dir, "results.json.tmp"), os.path.join(cfg.out_dir, "results.json"))
        print(f"checkpoint: {result['path']}; summary: {os.path.join(cfg.out_dir, 'results.json')}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
