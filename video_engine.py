"""
video_engine.py: the video data engine and the video finetuning of PE core (paper §2.2).

Video-text data is scarce, so PE makes its own: a captioner describes the frames and the clip of each video,
human-refined captions are merged in where they exist, and a language model summarises all of it into one caption
per video; PE core is then finetuned on these video-caption pairs mixed with image-caption pairs, a video's
embedding being the mean of its 8 frames' embeddings. The paper's captioner is an early Perception Language Model,
its summariser Llama 3.2; the defaults here are zero-shot caption retrieval with the PE-core checkpoint itself and
an extractive summary (no generative model exists before align_lang.py is trained), each replaced by a plug-in
--captioner=MODULE:FUNCTION or --summarizer=MODULE:FUNCTION (see load_component). The human pass (the PE Video
Dataset) comes as a PVD-style JSONL file (--annotations, see read_annotations); the embedded default simulates it.

  python train_clip.py                     # first: the PE-core checkpoint this stage starts from (out/clip)
  python video_engine.py                   # the engine on the embedded videos, then a short finetuning
  python video_engine.py --videos=DIR --vocabulary=classes.txt --annotations=pvd.jsonl --steps=2000
  python video_engine.py --captioner=align_lang:make_captioner --captioner_checkpoint=out/lang/vlm.pt \\
      --summarizer=align_lang:make_summarizer --summarizer_checkpoint=out/lang/vlm.pt --skip_finetune
  torchrun --nproc_per_node=8 video_engine.py --videos=DIR --vocabulary=classes.txt --video_batch_size=64
Under torchrun the ranks share the captioning and summarising, and every rank finetunes on its own shards.

Writes into --out_dir, each stage to disk so that a killed run redoes no finished video: records/{key}.json (each
video's captions and what made them), shards/shard-NNNNN.tar ({key}.mp4 + .txt + .json: video, final caption, record),
video_finetune.pt (with the start checkpoint's train_config: evaluate.py uses its classes and resolution), embedded/
(the default videos), eval/ (evaluate.py's), results.json (counts, losses, video zero-shot before and after).
"""

import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import pe_model
import training
from kernels.contrastive_loss import contrastive_loss


@dataclasses.dataclass
class VideoEngineConfig:
    checkpoint: str = ""  # the PE-core checkpoint to start from; "" = the newest one train_clip.py wrote
    model: str = ""  # official model name, needed only when --checkpoint is an official .pt (no config inside)
    out_dir: str = "out/video"
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
    captioner: str = ""  # plug-in module:function(checkpoint, device) -> captioner; "" = PE retrieval
    captioner_checkpoint: str = ""  # the plug-in's checkpoint (alone: --captioner=align_lang:make_captioner)
    summarizer: str = ""  # plug-in module:function(checkpoint, device) -> summariser; "" = extractive
    summarizer_checkpoint: str = ""  # the plug-in's checkpoint (alone: --summarizer=align_lang:make_summarizer)
    annotations: str = ""  # PVD-style JSONL of human-refined captions (see read_annotations)
    shard_size: int = 64  # videos per tar shard
    skip_finetune: bool = False  # run the engine only
    # finetuning (§2.2); Tab. 19's recipe: --lr=1e-6 --warmup_steps=2000 --steps=5400, batch 4096 in all
    steps: int = 40
    video_batch_size: int = 8  # videos per step per rank (x num_frames frames through the image tower)
    image_batch_size: int = 8  # image-caption pairs per step per rank (keeps the image task); 0 = videos only
    image_classes: int = 0  # image pairs' classes (the embedded videos' too); 0 = the start checkpoint's, else 100
    image_size: int = 0  # training resolution; 0 = the start checkpoint's last stage (as evaluate.py), else the model's
    optimizer: str = "lamb"  # lamb | adamw
    lr: float = 1e-3  # LAMB: each layer moves about lr x its norm per step
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 4
    checkpoint_every: int = 0  # steps between video_finetune_step_NNNNNN.pt checkpoints (the final is always written)
    resume: bool = False  # continue the finetuning exactly from the newest checkpoint in out_dir (see finetune)
    evaluate: bool = True  # evaluate.py's video zero-shot before and after the finetuning, as separate processes
    num_workers: int = 0  # DataLoader workers per rank
    seed: int = 0
    device: str = ""  # "" = cuda:LOCAL_RANK if available, else cpu


RULES = training.positive("num_videos", "video_length", "video_size", "video_classes", "video_batch_size", "shard_size")


# ---------------------------------------------------------------------------------------------------------
# Stage 1: frame and clip captioning, one record (JSON) per video, replaced atomically (a crash never leaves half a
# record). A captioner is any callable frames (T, H, W, 3) uint8 -> str: for each frame (T = 1) and for the clip.
def read_record(record_dir, key):
    """The record of `key`, or None if there is none (or it is unreadable: it is then redone)."""
    try:
        with open(os.path.join(record_dir, f"{key}.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_record(record_dir, key, record):
    training.write_json(os.path.join(record_dir, f"{key}.json"), record, indent=1)


def video_key(relative_path):
    """A video's key: its path under the folder without extension, "/" -> "__", anything but letters, digits,
    "_" and "-" -> "_" (webdataset keys end at the first dot of a tar member's name)."""
    stem = os.path.splitext(relative_path)[0].replace(os.sep, "__").replace("/", "__")
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def list_videos(folder, bad):
    """[(key, path)] of the videos under `folder`, recursively, sorted. Of two files with the same key (a.mp4
    and a.webm, which would share a record) the second is skipped and counted."""
    videos = {}
    for root, _, files in sorted(os.walk(folder)):
        for path in [os.path.join(root, name) for name in sorted(files)
                     if name.rpartition(".")[2].lower() in data.VIDEO_EXTENSIONS]:
            key = video_key(os.path.relpath(path, folder))
            if key in videos:
                bad.add("duplicate_key", path, f"same key {key!r} as {videos[key]}")
            videos.setdefault(key, path)
    if not videos:
        raise SystemExit(f"--videos={folder}: no such folder, or no video files ({', '.join(data.VIDEO_EXTENSIONS)})")
    return list(videos.items())


def load_component(spec, checkpoint, option, device):
    """The --captioner / --summarizer plug-in `module:function`, called as function(checkpoint, device) -> a callable
    with a .name; None without one (the built-in default). A checkpoint alone means align_lang's (older flags)."""
    spec = spec or (f"align_lang:make_{option}" if checkpoint else "")
    return training.load_plugin(spec, option)(checkpoint, device) if spec else None


CLIP_TEMPLATES = [lambda pair, t=t: t.format(a=data.with_article(pair[0]), motion=pair[1])  # (name, motion)
                  for t in data.VIDEO_CAPTION_TEMPLATES]


class RetrievalCaptioner:
    """Zero-shot caption retrieval with PE core: every class name (frames) and class x motion (clips), embedded by
    the prompt ensemble over their templates; a clip is scored on the mean of its frames' embeddings (blind to
    their order: left/right and in/out are guesses, which refined captions and a generative captioner lift)."""

    name = "pe-retrieval"

    def __init__(self, model, class_names, motions=data.MOTIONS, device="cpu", image_size=None):
        self.model, self.device = model.eval(), device
        self.image_size, self._cache = image_size or model.image_size, {}
        names = list(dict.fromkeys(class_names))
        self.frame_vocabulary = [pe_model.format_prompt(data.ZERO_SHOT_TEMPLATES[0], name) for name in names]
        self.frame_embeddings = pe_model.zero_shot_classifier(model, names, data.ZERO_SHOT_TEMPLATES, device=device)
        pairs = [(name, motion) for name in names for motion in motions]
        self.clip_vocabulary = [CLIP_TEMPLATES[0](pair) for pair in pairs]
        self.clip_embeddings = pe_model.zero_shot_classifier(model, pairs, CLIP_TEMPLATES, device=device) \
            if pairs else self.frame_embeddings[:0]

    @torch.no_grad()
    def __call__(self, frames):
        keys = [hash(frame.numpy().tobytes()) for frame in frames]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:  # recent frames are cached (the clip call encodes none); the preprocessing is data.TarShards'
            pixels = torch.stack([pe_model.preprocess_image(Image.fromarray(frames[i].numpy(), "RGB"), self.image_size)
                                  for i in missing]).to(self.device)  # (M, 3, S, S)
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache.update(zip([keys[i] for i in missing], self.model.encode_image(pixels, normalize=True)))
        query = F.normalize(torch.stack([self._cache[key] for key in keys]).mean(0), dim=-1)  # (D,)
        if len(frames) > 1 and len(self.clip_vocabulary):
            return self.clip_vocabulary[int((self.clip_embeddings @ query).argmax())]
        return self.frame_vocabulary[int((self.frame_embeddings @ query).argmax())]


def caption_videos(videos, record_dir, captioner, bad, num_frames=8, rank=0, world_size=1, progress=True):
    """Stage 1. Each (key, path) of this rank without a record of this very file (its SHA-1) by this captioner:
    num_frames frames read uniformly, each frame and the clip captioned, the record written. An unreadable video
    is counted in `bad` (its record of an earlier version removed). Returns the number captioned now."""
    name, done = getattr(captioner, "name", None) or captioner.__name__, 0  # what the record says made it
    for key, path in tqdm(videos[rank::world_size], desc="1/4 caption", disable=not progress or rank != 0):
        record = read_record(record_dir, key)
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha1").hexdigest()
            if record and (record.get("captioner"), record.get("num_frames"), record.get("source_sha1")) == \
                    (name, num_frames, digest):
                continue  # finished by an earlier run
            frames, indices = data.read_video(path, num_frames, name=path, return_indices=True)
        except (OSError, data.VideoError) as error:
            bad.add("bad_video" if isinstance(error, data.VideoError) else "unreadable_file", path, str(error))
            if record is not None and isinstance(error, data.VideoError):
                os.remove(os.path.join(record_dir, f"{key}.json"))
            continue
        write_record(record_dir, key, {
            "key": key, "source": os.path.abspath(path), "source_sha1": digest, "num_frames": num_frames,
            "frame_indices": indices, "captioner": name,
            "frame_captions": [captioner(frames[t:t + 1]) for t in range(len(frames))],
            "video_caption": captioner(frames)})
        done += 1
    return done


# ---------------------------------------------------------------------------------------------------------
# Stage 2: human-refined captions. Stage 3: one caption per video; a summariser is any callable
# (frame_captions, video_caption, metadata) -> str. Stage 4: tar shards. Then the whole engine.
def read_annotations(path):
    """{video_id: {"refined_caption", "metadata"}} from a PVD-style JSONL file, one object per line: {"video_id":
    the video's key (video_key), "refined_caption": text, "metadata": optional fields (category, title, ...),
    merged into the record and given to the summariser, as to the paper's LLM}. A bad line stops the run."""
    annotations = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = {"metadata": {}, **json.loads(line)} if line.strip() else None
            except (ValueError, TypeError) as error:  # TypeError: valid JSON, but no object
                raise SystemExit(f"{path}:{number}: not a JSON object ({error})") from None
            for field, kind in (("video_id", str), ("refined_caption", str), ("metadata", dict)) if row else ():
                if not isinstance(row.get(field), kind) or (kind is str and not row[field].strip()):
                    raise SystemExit(f"{path}:{number}: field '{field}' must be a "
                                     + ("non-empty string" if kind is str else "JSON object"))
            if row:
                annotations[row["video_id"]] = {"refined_caption": row["refined_caption"].strip(),
                                                "metadata": row["metadata"]}
    return annotations


def merge_annotations(record_dir, keys, annotations, bad):
    """Stage 2. Each annotation into its video's record (a changed refined caption drops the final caption, for
    stage 3 to redo); annotations of videos without a record are counted. Returns the number of records changed."""
    known, changed = set(keys), 0
    for video_id, annotation in annotations.items():
        record = read_record(record_dir, video_id) if video_id in known else None
        if record is None:
            bad.add("annotation_without_video", video_id)
            continue
        metadata = {**record.get("metadata", {}), **annotation["metadata"]}
        if record.get("refined_caption") != annotation["refined_caption"]:
            record.pop("caption", None)
        elif record.get("metadata") == metadata:
            continue
        record["refined_caption"], record["metadata"] = annotation["refined_caption"], metadata
        write_record(record_dir, video_id, record)
        changed += 1
    return changed


class ExtractiveSummarizer:
    """The default summariser, extractive (`embed`: texts -> (N, D) normalised): the consensus, the frame caption
    of highest mean cosine similarity to all T, unless the clip caption (it adds the motion) is nearest to it
    among the frame captions and `reference_captions` (frame-style: a template's shared wording does not decide)."""

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


@torch.no_grad()
def embed_texts(model, texts, device="cpu"):
    """texts -> (N, D) L2-normalised embeddings from PE core's text tower (the extractive summariser's)."""
    tokens = pe_model.tokenize(list(texts), model.context_length).to(device)
    return model.eval().encode_text(tokens, normalize=True).float()


def summarize_records(record_dir, keys, summarizer, bad, rank=0, world_size=1, progress=True):
    """Stage 3. Each captioned video of this rank gets its final caption: the refined one where stage 2 merged
    one (caption_source "human"), else the summariser's (redone when it changed; an empty one is counted and
    leaves the video out of the shards). Returns the number of records written."""
    name, written = getattr(summarizer, "name", None) or summarizer.__name__, 0
    for key in tqdm(keys[rank::world_size], desc="3/4 summarise", disable=not progress or rank != 0):
        record = read_record(record_dir, key)
        if record is None or (not record.get("refined_caption") and record.get("caption")
                              and record.get("caption_source") == name):
            continue  # a bad video (skipped in stage 1), or summarised by an earlier run
        caption, source = record.get("refined_caption"), "human"
        if not caption:
            caption = summarizer(record["frame_captions"], record["video_caption"], record.get("metadata", {}))
            caption, source = caption.strip(), name
            if not caption:
                bad.add("empty_caption", key, f"from {name}")
                if record.pop("caption", None) is not None:
                    write_record(record_dir, key, record)
                continue
        if (record.get("caption"), record.get("caption_source")) != (caption, source):
            record["caption"], record["caption_source"] = caption, source
            write_record(record_dir, key, record)
            written += 1
    return written


def write_shards(record_dir, videos, shard_dir, shard_size=64, progress=True):
    """Stage 4. Every video with a final caption, in key order, shard_size per shard, each written atomically;
    the shards of a bigger earlier run are removed. Returns the shard paths."""
    finished = [(key, path, record) for key, path in videos
                if (record := read_record(record_dir, key)) is not None and record.get("caption")]

    def write_tar(f, group):
        with tarfile.open(fileobj=f, mode="w") as tar:
            for key, path, record in group:
                with open(path, "rb") as video:
                    members = {f"{key}.{path.rpartition('.')[2].lower()}": video.read(),
                               f"{key}.txt": record["caption"].encode("utf-8"),
                               f"{key}.json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)  # mtime 0: the same records give the same bytes
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))

    os.makedirs(shard_dir, exist_ok=True)
    paths = [os.path.join(shard_dir, f"shard-{n:05d}.tar") for n in range(math.ceil(len(finished) / shard_size))]
    for number, path in enumerate(tqdm(paths, desc="4/4 shards", disable=not progress)):
        pe_model.atomic_write(path, functools.partial(write_tar, group=finished[number * shard_size:][:shard_size]))
    for stale in set(glob.glob(os.path.join(shard_dir, "shard-[0-9][0-9][0-9][0-9][0-9].tar"))) - set(paths):
        os.remove(stale)
    return paths


def run_engine(cfg, model, device="cpu", rank=0, world_size=1, captioner=None, summarizer=None, progress=True,
               trained=None):
    """Stages 1-4 on cfg's videos; returns {"shards", "videos", "captioned", "summarised", "refined", "bad"}.
    captioner / summarizer override cfg's (tests count the captioner's calls through this); trained: the start
    checkpoint's train_config, whose classes the embedded videos show, at whose resolution frames are seen."""
    bad, trained = data.BadSamples("video_engine"), trained or {}
    class_pool = cfg.image_classes or data.trained_class_count(trained)
    annotation_path, class_names, folder = cfg.annotations, [], cfg.videos
    if not cfg.videos:  # the embedded default, made once by rank 0, and its stand-in for PVD's human pass
        folder = os.path.join(cfg.out_dir, "embedded", "videos")
        if not annotation_path and cfg.embedded_refined_fraction > 0:
            annotation_path = os.path.join(cfg.out_dir, "embedded", "annotations.jsonl")
        if rank == 0:  # evaluate.py's held-out videos show the same classes, with other seeds
            rows = data.make_embedded_videos(os.path.join(cfg.out_dir, "embedded"), cfg.num_videos, cfg.video_length,
                                             cfg.video_size, seed=data.seed_for(cfg.seed, "video-engine"),
                                             num_classes=cfg.video_classes, class_pool=class_pool)
            if annotation_path and not cfg.annotations:  # a deterministic fraction get their true caption
                pe_model.atomic_write(annotation_path, "".join(
                    json.dumps({"video_id": video_key(os.path.basename(path)), "refined_caption": caption,
                                "metadata": {"category": label["class_name"], "motion": label["motion"]}}) + "\n"
                    for i, (path, label, caption) in enumerate(rows)
                    if data.seed_for(cfg.seed, "refined", i) % 1000 < cfg.embedded_refined_fraction * 1000))
        training.barrier()
        class_names = [name for _, name in data.embedded_video_classes(cfg.video_classes, class_pool)]
    if cfg.vocabulary:
        if not os.path.isfile(cfg.vocabulary):
            raise SystemExit(f"--vocabulary={cfg.vocabulary}: no such file")
        with open(cfg.vocabulary, encoding="utf-8") as f:
            class_names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    videos = list_videos(folder, bad)
    captioner = captioner or load_component(cfg.captioner, cfg.captioner_checkpoint, "captioner", device)
    if captioner is None and not class_names:
        raise SystemExit(f"--videos={cfg.videos}: the retrieval captioner needs a vocabulary: pass "
                         "--vocabulary=FILE (one class name per line) or a --captioner plug-in")
    captioner = captioner or RetrievalCaptioner(model, class_names, cfg.motions, device,
                                                cfg.image_size or data.trained_resolution(trained, model.image_size))
    summarizer = summarizer or load_component(cfg.summarizer, cfg.summarizer_checkpoint, "summarizer", device) \
        or ExtractiveSummarizer(functools.partial(embed_texts, model, device=device),
                                getattr(captioner, "frame_vocabulary", ()))
    if annotation_path and not os.path.isfile(annotation_path):
        raise SystemExit(f"--annotations={annotation_path}: no such file")
    annotations = read_annotations(annotation_path) if annotation_path else {}  # every rank: errors stop them all
    record_dir, shard_dir = os.path.join(cfg.out_dir, "records"), os.path.join(cfg.out_dir, "shards")
    keys = [key for key, _ in videos]
    captioned = caption_videos(videos, record_dir, captioner, bad, cfg.num_frames, rank, world_size, progress)
    training.barrier()
    refined = merge_annotations(record_dir, keys, annotations, bad) if rank == 0 else 0
    training.barrier()
    summarised = summarize_records(record_dir, keys, summarizer, bad, rank, world_size, progress)
    training.barrier()
    if rank == 0:
        write_shards(record_dir, videos, shard_dir, cfg.shard_size, progress)
    training.barrier()
    shards = sorted(os.path.join(shard_dir, name) for name in os.listdir(shard_dir) if name.endswith(".tar"))
    captioned, summarised = map(sum, zip(*training.gather_per_rank((captioned, summarised), world_size)))
    return {"shards": shards, "videos": len(videos), "captioned": captioned, "refined": refined,
            "summarised": summarised, "bad": bad}


def embedded_caption_accuracy(out_dir):
    """How right the machine captions (not refined) of the embedded videos are, against their composition
    (embedded/manifest.jsonl): the share naming the right object, and the right object and motion."""
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


# ---------------------------------------------------------------------------------------------------------
# Video finetuning (§2.2): the contrastive loss over the global batch (optimizer, schedule, checkpoints: training.py's)
def pool_videos(features, videos, num_frames):
    """(B*T + B_i, D) features of `videos` videos' frames then images -> (B + B_i, D): a video's feature is the
    mean of its frames' L2-normalised features (§2.2), renormalised."""
    frames = features[:videos * num_frames].unflatten(0, (videos, num_frames))  # (B, T, D)
    return torch.cat([F.normalize(frames.mean(1), dim=-1), features[videos * num_frames:]])


def finetune(cfg, model, shard_dir, device="cpu", rank=0, world_size=1, start_checkpoint="", progress=True):
    """Train `model` (a PE-core CLIP) cfg.steps steps into out_dir/video_finetune.pt (and, every checkpoint_every,
    video_finetune_step_NNNNNN.pt, the newest kept, which --resume continues exactly with as many processes as
    wrote it: each rank's data position is its own). Returns {"path", "losses" (of this call's steps)}."""
    device, group = torch.device(device), dist.group.WORLD if world_size > 1 else None
    trained = training.checkpoint_train_config(start_checkpoint) if start_checkpoint else {}
    image_size = cfg.image_size or data.trained_resolution(trained, model.image_size)
    torch.manual_seed(cfg.seed)
    model = model.to(device).train()
    train_forward = training.wrap_for_training(model, device, world_size)  # DDP: gradients averaged over ranks
    optimizer = training.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    resumed, state, position = (training.resume_latest(cfg.out_dir, "video_finetune*.pt", train_forward, model,
                                                       optimizer, rank, world_size, (0,) * 4) if cfg.resume
                                else (None, None, (0,) * 4))
    if resumed and len(state["data_position"]) != world_size:  # each rank reads its own shards: its own position
        raise SystemExit(f"{resumed}: written by {len(state['data_position'])} process(es); resume it with as many "
                         f"(now {world_size})")
    step = int(state["step"]) if resumed else 0
    if cfg.resume and rank == 0:
        print(f"resuming the finetuning at step {step} from {resumed}" if resumed else
              f"--resume: no finetuning checkpoint in {cfg.out_dir}, starting from {start_checkpoint or 'the model'}")
    extra = dict(train_config=trained, video_engine_config=dataclasses.asdict(cfg), start_checkpoint=start_checkpoint)
    # endless (batch, position) streams (data.epochs) from position = (video epoch, batches, image epoch, batches)
    video_augment = data.AugmentConfig(crop_scale=(0.6, 1.0), hflip_prob=0.0)  # a flip makes "moving left" wrong
    videos = data.TarShards(shard_dir, transform=data.make_train_transform(image_size, video_augment),
                            media="video", num_frames=cfg.num_frames, shuffle_buffer=4 * cfg.video_batch_size,
                            seed=cfg.seed, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(videos, batch_size=cfg.video_batch_size, num_workers=cfg.num_workers,
                                         collate_fn=data.collate_image_text)  # iterable: used batches read and dropped
    video_batches = data.epochs(videos.set_epoch, lambda epoch, skip: (loader, False), position[:2], name=shard_dir)
    image_batches = None
    if cfg.image_batch_size > 0:
        transform = data.make_train_transform(image_size, data.AugmentConfig())
        images = data.EmojiImageText("train", num_classes=cfg.image_classes or data.trained_class_count(trained),
                                     canvas_size=image_size, seed=cfg.seed, transform=transform)

        def image_loader(epoch, skip):  # map-style: this rank's order of the epoch, without the used batches
            generator = data.item_generator(cfg.seed, "video-finetune-images", rank, epoch)
            order = torch.randperm(len(images), generator=generator)[skip * cfg.image_batch_size:].tolist()
            return torch.utils.data.DataLoader(images, batch_size=cfg.image_batch_size, sampler=order, drop_last=True,
                                               num_workers=cfg.num_workers, collate_fn=data.collate_image_text), True

        image_batches = data.epochs(images.set_epoch, image_loader, position[2:], name="image-caption pairs")
    losses = []
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not progress or rank != 0)
    while step < cfg.steps:
        lr = training.lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        training.set_lr(optimizer, lr)
        (videos, tokens), video_position = next(video_batches)  # (B, T, 3, S, S), (B, L)
        pixels, image_position = videos.flatten(0, 1), position[2:]  # (B*T, 3, S, S)
        if image_batches is not None:
            (images, image_tokens), image_position = next(image_batches)
            pixels, tokens = torch.cat([pixels, images]), torch.cat([tokens, image_tokens])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features, text, logit_scale = train_forward(pixels.to(device), tokens.to(device))
        visual = pool_videos(features, len(videos), cfg.num_frames)  # (B + B_i, D)
        loss = contrastive_loss(visual.float(), text.float(), logit_scale.float(), group)  # the global batch's
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP (Radford et al. 2021, §2.5) caps the logit multiplier at 100, as Tab. 19
            model.logit_scale.clamp_(0, math.log(100))
        loss = loss.item()
        if not math.isfinite(loss):
            raise SystemExit(f"step {step}: the loss is {loss}; lower --lr, or --resume from the last checkpoint")
        step, position = step + 1, (*video_position, *image_position)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        bar.update()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            training.save_training_checkpoint(os.path.join(cfg.out_dir, f"video_finetune_step_{step:06d}.pt"),
                                              train_forward, model, optimizer, step, position, world_size, extra)
            if rank == 0:  # the newest step checkpoint only (a final video_finetune.pt is never pruned)
                training.prune_checkpoints(cfg.out_dir, 1, "video_finetune_step_*.pt")
    bar.close()
    path = os.path.join(cfg.out_dir, "video_finetune.pt")
    training.save_training_checkpoint(path, train_forward, model, optimizer, step, position, world_size, extra)
    training.barrier()
    return {"path": path, "losses": losses}


def evaluate_video_zero_shot(checkpoints, out_dir, script=None):
    """evaluate.py's video zero-shot (held-out videos, at the classes and resolution of the checkpoint's
    train_config) of each (checkpoint, official model name or ""), one process each, into out_dir: [its
    "video_zero_shot" or None where it failed], or None without evaluate.py beside this file."""
    script = script or os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate.py")
    if not os.path.isfile(script):
        print(f"video zero-shot skipped: no {script}; measure the checkpoints with evaluate.py --video_zero_shot")
        return None
    env, results = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, []  # a process, not a rank
    for checkpoint, name in checkpoints:
        command = [sys.executable, script, "--video_zero_shot", f"--checkpoint={checkpoint}", f"--out_dir={out_dir}",
                   *([f"--model={name}"] if name else [])]
        print("$ " + shlex.join(command), flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            print(f"video zero-shot of {checkpoint}: evaluate.py failed (its messages are above)")
            results.append(None)
            continue
        with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
            found = json.load(f)
        results.append((found["checkpoints"][0] if "checkpoints" in found else found).get("video_zero_shot"))
    return results


def main(argv=None):
    cfg = training.parse_config(VideoEngineConfig(), argv, RULES)
    rank, world_size, _, device = training.setup_distributed()
    training.remove_partial_writes(cfg.out_dir, rank)  # a killed run's half-written files
    device = torch.device(cfg.device) if cfg.device not in ("", "auto") else device
    checkpoint = training.resolve_checkpoint(cfg.checkpoint or None)
    try:
        model = pe_model.load_model(checkpoint, name=cfg.model or None).to(device)
    except ValueError as error:  # CheckpointMismatchError is a ValueError
        raise SystemExit(f"--checkpoint={checkpoint}: {error}") from None
    if not isinstance(model, pe_model.CLIP):
        raise SystemExit(f"--checkpoint={checkpoint}: a PE-core CLIP checkpoint (vision + text towers) is needed")
    started = time.time()
    engine = run_engine(cfg, model, device, rank, world_size, trained=training.checkpoint_train_config(checkpoint))
    bad = engine["bad"].all_reduce()
    quality = embedded_caption_accuracy(cfg.out_dir) if rank == 0 and not cfg.videos else None
    if rank == 0:
        print(f"engine: {engine['videos']} videos, {engine['captioned']} captioned now (the others resumed), "
              f"{engine['refined']} refined captions merged, {engine['summarised']} summaries written, "
              f"{len(engine['shards'])} shard(s) in {os.path.join(cfg.out_dir, 'shards')} "
              f"({time.time() - started:.0f} s)\n{bad.report()}")
        if quality:
            print(f"machine captions of the {quality['videos']} unrefined embedded videos: right object "
                  f"{100 * quality['object']:.0f}%, right object and motion {100 * quality['object_and_motion']:.0f}%")
    if cfg.skip_finetune:
        return
    result = finetune(cfg, model, os.path.join(cfg.out_dir, "shards"), device, rank, world_size, checkpoint)
    if rank == 0:
        losses = result["losses"]
        if losses:
            print(f"finetuned to step {cfg.steps} from {checkpoint}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        before, after = (cfg.evaluate and evaluate_video_zero_shot([(checkpoint, cfg.model), (result["path"], "")],
                                                                   os.path.join(cfg.out_dir, "eval"))) or (None, None)
        if before and after:
            print(f"video zero-shot ({after['videos']} held-out videos, {after['classes']} classes), before -> after:\n"
                  + training.markdown_table(["", "top-1 %", "top-5 %"], [[checkpoint, before["top1"], before["top5"]],
                                            [result["path"], after["top1"], after["top5"]]]))
        training.write_json(os.path.join(cfg.out_dir, "results.json"), {
            "checkpoint": checkpoint, "finetuned": result["path"], "steps": cfg.steps,
            "engine": {k: v for k, v in engine.items() if k != "bad"}, "bad_samples": dict(bad.counts),
            "embedded_caption_accuracy": quality, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "video_zero_shot_before": before,
            "video_zero_shot_after": after})
        print(f"checkpoint: {result['path']}; summary: {os.path.join(cfg.out_dir, 'results.json')}")
    if dist.is_initialized():  # leave together, as train_clip.py
        training.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
