"""
train_clip.py: robust contrastive image-text pretraining of PE core (Bolya et al. 2025, §2.1).

PE core starts from vanilla CLIP (a softmax contrastive loss over the global batch, learnable logit scale) and
adds, one ablation step at a time: progressive resolution, a larger global batch, the LAMB optimizer, a final
high-resolution stage, 2D RoPE, attention pooling, tuned augmentation and mask regularization. Every step is
its own switch in TrainConfig below, so the ablation can be rerun; `--preset=vanilla` switches them all off,
`--preset=pe` (the default) switches them all on.

    python train_clip.py                                  # the PE recipe on the embedded emoji data (CPU minutes)
    python train_clip.py --preset=vanilla                 # the plain-CLIP baseline of the ablation
    python train_clip.py --max_steps=50 --out_dir=out/try # a short run
    python train_clip.py --resume                         # continue from the newest checkpoint in --out_dir
    torchrun --nproc_per_node 2 train_clip.py             # two processes on a CPU (gloo, DDP)
    torchrun --nproc_per_node 8 train_clip.py --model=PE-Core-L14-336 --data=tar --global_batch=4096 \\
        --train_data='shards/{00000..01023}.tar' --resolution_stages=0.3:98,0.3:154,0.3:224,0.1:336 \\
        --max_steps=100000 --lr=2e-3                      # 8 GPUs (NCCL, DDP, bf16 autocast); add --fsdp for G

Every config field is an option, --field=value. Outputs in --out_dir: step_NNNNNN.pt and final.pt (the official
state_dict layout plus "config": pe_model.load_model reads it), metrics.jsonl (one line per step, plus zero-shot
evaluations) and bad_samples/ (skipped inputs, counted). Then measure it: python evaluate.py --all
--checkpoint=out/clip/final.pt (the command is printed at the end).
"""

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import data
import pe_model
import training
from kernels.contrastive_loss import contrastive_loss


@dataclass
class TrainConfig:
    preset: str = "pe"  # "pe" (the robust recipe of §2.1) or "vanilla" (plain CLIP); explicit options win
    # model
    model: str = "PE-Core-Nano8-64"  # an official name (pe_model.VISION_CONFIGS) or a JSON config file
    use_rope2d: bool = True  # §2.1 "2D RoPE" in every attention layer, besides the absolute position embedding
    pool_type: str = "attn"  # §2.1 "attention pooling"; "tok" = the class token (vanilla CLIP)
    grad_checkpointing: bool = False  # recompute block activations in the backward (memory for compute)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (torch fully_shard); for G
    # data
    data: str = "emoji"  # emoji (embedded) | tar (webdataset shards) | captions (CSV/JSONL) | coco
    train_data: str = ""  # tar: a brace pattern or folder; captions: the CSV/JSONL file; coco: the JSON file
    image_root: str = ""  # captions / coco: the image folder (captions default: the file's folder)
    num_classes: int = 100  # emoji: classes (zero-shot chance = 1 / num_classes)
    images_per_class: int = 50  # emoji: training items per class per epoch (freshly rendered each epoch)
    val_images_per_class: int = 10  # emoji: held-out renderings per class for zero-shot evaluation
    num_workers: int = 1  # data loader processes per rank
    shuffle_buffer: int = 1000  # tar: samples shuffled in a buffer of this size
    # recipe (§2.1, in the order of the paper's ablation)
    global_batch: int = 128  # images per step over all ranks (§2.1 doubles it: more negatives)
    max_steps: int = 400  # the default run: 51,200 images (its figures: bench/RESULTS.md)
    # fraction:resolution, ending at the model's native 64 px (§2.1: low-resolution steps are cheap steps)
    resolution_stages: typing.Tuple[str, ...] = ("0.4:32", "0.3:40", "0.2:48", "0.1:64")
    load_size: int = 0  # images are read at this size and resized per stage; 0 = the largest stage resolution
    optimizer: str = "lamb"  # lamb (§2.1) | adamw (vanilla)
    lr: float = 2e-3  # §2.1: LAMB at 2e-3
    min_lr: float = 0.0  # the cosine ends here
    lr_schedule: str = "cosine"  # cosine | constant (both after a linear warmup)
    warmup_fraction: float = 0.05  # of max_steps
    betas: typing.Tuple[float, ...] = (0.9, 0.95)  # Tab. 18 (LAMB betas, weight decay 0.05); eps is ours
    eps: float = 1e-6
    weight_decay: float = 0.05  # not on biases, norms, LayerScale, position/class embeddings, probe, logit scale
    crop_scale: typing.Tuple[float, ...] = (0.08, 1.0)  # §2.1 tuned augmentation, Tab. 18: random crop s(0.08, 1)
    brightness: float = 0.32  # Tab. 18 colour jitter j(0.32, 0, 0.32, 0): brightness factor in [1 - b, 1 + b]
    saturation: float = 0.32  # ... and saturation factor in [1 - s, 1 + s]
    hflip_prob: float = 0.5  # Tab. 18: horizontal flip p(0.5)
    mask_fraction: float = 1 / 16  # §2.1 mask regularization: share of the batch duplicated and masked (Tab. 18)
    mask_ratio: float = 0.4  # Tab. 18 "mask reg ratio 0.4": share of the patches masked in those copies
    mask_weight: float = 1.0  # weight of the mask-regularization loss next to the contrastive loss
    # run
    seed: int = 0
    out_dir: str = training.DEFAULT_CORE_DIR  # where checkpoints (*.pt), logs and metrics go (out/clip)
    resume: bool = False  # continue from the newest checkpoint in out_dir
    checkpoint_every: int = 250  # steps; 0 = only the final checkpoint
    keep_checkpoints: int = 2  # step checkpoints kept on disk (final.pt is always kept)
    eval_every: int = 250  # zero-shot accuracy on the held-out split every N steps (and at the end); 0 = never
    eval_batch: int = 250


# The plain-CLIP baseline of the §2.1 ablation (OpenCLIP's recipe): half the batch for twice the steps (as many
# images) and OpenCLIP's light augmentation (a random resized crop of 90-100%, nothing else).
PRESETS = {
    "pe": {},
    "vanilla": dict(global_batch=64, max_steps=800, resolution_stages=("1:64",), optimizer="adamw", lr=1e-3,
                    betas=(0.9, 0.98), weight_decay=0.2, use_rope2d=False, pool_type="tok", crop_scale=(0.9, 1.0),
                    brightness=0.0, saturation=0.0, hflip_prob=0.0, mask_fraction=0.0),
}


# What TrainConfig's fields must be besides training.RULES (checked at start: one line names the field)
RULES = {
    "preset": (lambda v: v in PRESETS, "one of " + ", ".join(PRESETS)),
    "data": (lambda v: v in ("emoji", "tar", "captions", "coco"), "emoji, tar, captions or coco"),
    "train_data": (lambda v: data.expand_braces(v), "a path or a brace pattern with balanced {}"),
    "pool_type": (lambda v: v in ("attn", "tok"), "attn or tok"),
    "resolution_stages": (lambda v: parse_stages(v), "fraction:resolution stages whose fractions sum to 1"),
    "crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two numbers 0 < min <= max <= 1"),
    "mask_ratio": (lambda v: 0 <= v < 1, "in [0, 1) (a share of the patches)"),
    "num_classes": (lambda v: v >= 2, "an integer >= 2"),
    "images_per_class": (lambda v: v >= 1, "an integer >= 1"),
}


def make_config(argv=None):
    """TrainConfig from the command line: the --preset's values first, then every explicit option."""
    preset = training.parse_config(TrainConfig(), argv, RULES).preset  # a first pass reads --preset (checks all)
    return training.parse_config(TrainConfig(preset=preset, **PRESETS[preset]), argv, RULES)


# ---------------------------------------------------------------------------------------------------------
# Model
def build_clip(name_or_path, use_rope2d=None, pool_type=None):
    """A PE CLIP model from an official name or a JSON config file, with the two architecture switches of
    the §2.1 ablation applied to its vision config (None keeps the config's own)."""
    if name_or_path.endswith(".json"):
        with open(name_or_path) as f:
            config = json.load(f)
    else:
        config = pe_model.model_config(name_or_path)
    if config.get("model_class", "CLIP") != "CLIP":
        raise SystemExit(f"--model={name_or_path}: a vision-only tower; contrastive training needs a CLIP model "
                         f"(one of {', '.join(pe_model.TEXT_CONFIGS)})")
    vision = config["vision_cfg"]
    vision.update({k: v for k, v in (("use_rope2d", use_rope2d), ("pool_type", pool_type)) if v is not None})
    if vision.get("pool_type") == "tok" and not vision.get("use_cls_token"):
        raise SystemExit(f"--pool_type=tok needs a class token, and {name_or_path} has none: use --pool_type=attn")
    return pe_model.build_model(config)


class TrainingForward(nn.Module):
    """The CLIP model with the one forward a training step needs, so that DDP / FSDP wrap the whole step. The
    images and the masked copies of images[masked_rows] (patch_mask (M,N) hides their patches) go through the
    vision tower as one batch -> (image_features (B,D), text_features (B,D), logit_scale (the multiplier),
    clean_tokens, masked_tokens (M,N,W): the final patch tokens of the masked images' originals and copies)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images=None, tokens=None, masked_rows=None, patch_mask=None):
        image_features = text_features = clean_tokens = masked_tokens = None
        if images is not None:
            visual, batch = self.model.visual, images.shape[0]
            if masked_rows is not None:
                patch_mask = torch.cat([patch_mask.new_zeros(batch, patch_mask.shape[1]), patch_mask])
                images = torch.cat([images, images[masked_rows]])  # (B + M, 3, H, W): the copies after the batch
            all_tokens = visual.forward_features(images, norm=True, patch_mask=patch_mask)  # (B + M, N(+1), W)
            image_features = F.normalize(visual.pool(all_tokens[:batch]), dim=-1)  # (B, D)
            if masked_rows is not None:
                patch_tokens = all_tokens[:, 1:] if visual.use_cls_token else all_tokens  # (B + M, N, W)
                clean_tokens, masked_tokens = patch_tokens[masked_rows], patch_tokens[batch:]  # (M, N, W) each
        if tokens is not None:
            text_features = self.model.encode_text(tokens, normalize=True)  # (B, D)
        return image_features, text_features, self.model.logit_scale.exp(), clean_tokens, masked_tokens


def parse_stages(stages):
    """("0.3:98", "0.7:224") or [(0.3, 98), (0.7, 224)] -> [(0.3, 98), (0.7, 224)]: the progressive-resolution
    schedule of §2.1 as (fraction of training, resolution) stages; the fractions must sum to 1."""
    parsed = []
    for stage in stages:
        try:
            fraction, resolution = stage.split(":") if isinstance(stage, str) else stage
            fraction, resolution = float(fraction), int(resolution)
        except (ValueError, TypeError):
            raise SystemExit(f"--resolution_stages: {stage!r} is not fraction:resolution (e.g. 0.3:98)") from None
        if fraction <= 0 or resolution <= 0:
            raise SystemExit(f"--resolution_stages: {stage!r} needs a positive fraction and resolution")
        parsed.append((fraction, resolution))
    if not parsed or abs(sum(f for f, _ in parsed) - 1) > 1e-6:
        raise SystemExit(f"--resolution_stages={','.join(map(str, stages))}: the fractions must sum to 1")
    return parsed


def resolution_at(step, max_steps, stages):
    """The training resolution at `step`: stage k covers steps [round(F_{k-1} max_steps), round(F_k max_steps))
    where F_k is the sum of the first k fractions."""
    cumulative = 0.0
    for fraction, resolution in stages:
        cumulative += fraction
        if step < round(cumulative * max_steps):
            return resolution
    return stages[-1][1]


# ---------------------------------------------------------------------------------------------------------
# Data: images at one load size, resized per batch to the stage's resolution. Batch order and augmentation are
# functions of (seed, epoch, index) (data.py): a checkpoint's position (epoch, batch) continues the same stream.
def build_train_dataset(cfg, load_size, bad_dir):
    """The training set named by cfg.data, augmented with the §2.1 augmentation at load_size."""
    augment = data.AugmentConfig(crop_scale=tuple(cfg.crop_scale), brightness=cfg.brightness,
                                 saturation=cfg.saturation, hflip_prob=cfg.hflip_prob)
    transform = data.make_train_transform(load_size, augment)
    if cfg.data == "emoji":
        return data.EmojiImageText("train", cfg.num_classes, cfg.images_per_class, load_size, seed=cfg.seed,
                                   transform=transform)
    if not cfg.train_data:
        raise SystemExit(f"--data={cfg.data} needs --train_data=...")
    for field in ("train_data", "image_root"):  # a shard pattern is checked shard by shard (bad ones are counted)
        path = getattr(cfg, field)
        if path and not (cfg.data == "tar" and field == "train_data") and not os.path.exists(path):
            raise SystemExit(f"--{field}={path}: no such file or folder")
    common = dict(seed=cfg.seed, bad_report_dir=bad_dir)
    if cfg.data == "tar":
        return data.TarShards(cfg.train_data, transform, shuffle_buffer=cfg.shuffle_buffer, **common)
    if cfg.data == "captions":
        return data.CaptionFile(cfg.train_data, cfg.image_root or None, transform, **common)
    if not cfg.image_root:  # coco
        raise SystemExit("--data=coco needs --image_root=FOLDER (the images of the annotations file)")
    return data.CocoCaptions(cfg.train_data, cfg.image_root, transform, **common)


def trim_padding(tokens):
    """Drop the padding columns that no caption of the batch reaches: (B, L) -> (B, longest caption). Exact: the
    text tower is causal and reads its output at the end-of-text token, so what comes after never matters."""
    return tokens[:, : max(1, int((tokens != pe_model.PAD_TOKEN_ID).sum(dim=1).max()))]


def train_batches(dataset, cfg, start, rank, world_size, load_size, context_length, group):
    """Yield (images, tokens, position after this batch) for every step, on every rank in lockstep, from start =
    (epoch, batches already used in it). A map-style dataset's global batch k is order[k*G : (k+1)*G] and rank r
    takes its r-th slice, so the union over ranks does not depend on their number, and the used batches are skipped;
    tar shards (each rank reads its own) re-read and drop them. A rank whose items were all bad gets an empty batch;
    a global batch without one good item is skipped; every rank starts the next epoch as soon as one rank runs out
    of data (tar shards need not split evenly), so the ranks never wait on each other."""
    collate = functools.partial(data.collate_image_text, context_length=context_length)
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if not iterable and len(dataset) < cfg.global_batch:
        raise SystemExit(f"--global_batch={cfg.global_batch} is larger than the dataset ({len(dataset)} items)")
    empty = (torch.zeros(0, 3, load_size, load_size), torch.zeros(0, context_length, dtype=torch.long))
    (epoch, skip), g, local = start, cfg.global_batch, cfg.global_batch // world_size
    epochs_since_data = 0  # reset by every batch yielded: 2 = a whole epoch gave nothing
    while True:
        dataset.set_epoch(epoch)
        batching = dict(batch_size=local)
        if not iterable:
            order = torch.randperm(len(dataset), generator=data.item_generator(cfg.seed, "order", epoch))  # all ranks
            batching = dict(batch_sampler=[order[k * g + rank * local: k * g + (rank + 1) * local].tolist()
                                           for k in range(skip, len(dataset) // g)])
        loader = torch.utils.data.DataLoader(dataset, collate_fn=collate, num_workers=cfg.num_workers, **batching)
        for index, batch in itertools.chain(enumerate(loader, 1 if iterable else skip + 1), [(None, None)]):
            if index is not None and index <= skip:  # tar shards: a used batch, read again
                continue
            images, tokens = batch if batch is not None else empty
            status = torch.tensor([float(index is None), float(len(images))])  # index None: this rank's data ran out
            if group is not None:
                dist.all_reduce(status, group=group)
            if status[0] > 0:  # some rank ran out of data: all restart at the next epoch
                break
            if status[1] > 0:  # else no rank has a good item in this global batch (the dataset counted them)
                epochs_since_data = 0
                yield images, tokens, (epoch, index)
        epochs_since_data += 1
        if epochs_since_data >= 2:
            raise SystemExit(f"--data={cfg.data}: a whole epoch gave no usable sample (see the bad-sample "
                             "warnings above)")
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------
# Mask regularization (§2.1): "we want the model to produce the same features if some patches are not visible",
# but CLIP gradients through masked images could alter its behaviour on unmasked ones, so MaskFeat (Wei et al.
# 2022) becomes a regularizer: 1/16 of the batch is duplicated and masked (Tab. 18, ratio 0.4) and the copies'
# output tokens are aligned to their unmasked counterparts by cosine; the copies stay out of the contrastive
# loss and the unmasked side is a detached target. What the paper leaves open, in its simplest reading: a masked
# patch is 0 (with the bias-free conv1 it enters as its position embedding alone, a parameter-free mask token);
# patches are masked uniformly at random; the loss is the mean of 1 - cos over the masked final patch tokens.
def sample_masks(batch_size, grid_size, fraction, ratio, step, seed, offset=0):
    """Which rows of a batch get a masked copy, and which patches each copy hides. rows (M,): the j with
    (offset + j) % round(1 / fraction) == 0, offset = this rank's first position in the global batch; patch_mask
    (M, grid_size**2) bool, True = masked: round(ratio * grid_size**2) patches per copy, drawn from
    item_generator(seed, "mask", step, global position), so neither depends on the number of ranks or a resume."""
    num_patches = grid_size * grid_size
    every = max(1, round(1 / fraction))
    rows = [j for j in range(batch_size) if (offset + j) % every == 0]
    num_masked = round(ratio * num_patches)
    patch_mask = torch.zeros(len(rows), num_patches, dtype=torch.bool)
    for i, j in enumerate(rows):
        order = torch.randperm(num_patches, generator=data.item_generator(seed, "mask", step, offset + j))
        patch_mask[i, order[:num_masked]] = True
    return torch.tensor(rows, dtype=torch.long), patch_mask


def mask_regularization_loss(clean_tokens, masked_tokens, patch_mask):
    """(sum over the masked positions of 1 - cos(masked token, unmasked token), their number): a sum and a count,
    for the global mean over ranks. clean_tokens (detached: the target), masked_tokens: (M, N, W)."""
    similarity = F.cosine_similarity(masked_tokens.float(), clean_tokens.detach().float(), dim=-1)  # (M, N)
    patch_mask = patch_mask.to(similarity.device)
    return (1 - similarity)[patch_mask].sum(), patch_mask.sum()


def contrastive_step(train_forward, optimizer, images, tokens, masking=None, mask_weight=1.0, group=None,
                     autocast=False):
    """One optimizer update: forward, the contrastive loss over the global batch (+ mask regularization),
    backward, step. masking: sample_masks' (rows, patch_mask), or None; autocast: bf16 (GPU). Returns the
    global losses as floats (the same on every rank): {"loss", "clip_loss", "mask_loss"}."""
    world_size = dist.get_world_size(group) if group is not None else 1
    rows, patch_mask = masking if masking is not None and len(masking[0]) else (None, None)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        image_features, text_features, logit_scale, clean_tokens, masked_tokens = train_forward(
            images, tokens, None if rows is None else rows.to(images.device), patch_mask)
    clip_loss = contrastive_loss(image_features.float(), text_features.float(), logit_scale.float(), group)
    loss, mask_loss = clip_loss, torch.zeros(())
    if masking is not None:
        total, count = (mask_regularization_loss(clean_tokens, masked_tokens, patch_mask) if rows is not None else
                        (torch.zeros((), device=images.device), torch.zeros((), device=images.device)))
        sums = torch.stack([total.detach().float(), count.float()])
        if group is not None:
            dist.all_reduce(sums, group=group)
        # DDP / FSDP average gradients over ranks: world_size x this rank's sum over the global count has
        # the gradient of the global mean
        loss = loss + mask_weight * total * world_size / sums[1].clamp(min=1)
        mask_loss = sums[0] / sums[1].clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = getattr(train_forward, "module", train_forward).model  # (DDP wraps it as .module)
    if group is not None and isinstance(train_forward, FSDPModule):  # the replicated logit scale (wrap_for_training)
        dist.all_reduce(clip.logit_scale.grad, group=group)
        clip.logit_scale.grad.div_(world_size)
    optimizer.step()
    with torch.no_grad():  # CLIP (Radford et al. 2021, §2.5) caps the logit multiplier at 100
        clip.logit_scale.clamp_(0, math.log(100))
    clip_value, mask_value = clip_loss.item(), mask_loss.item()
    return {"loss": clip_value + mask_weight * mask_value, "clip_loss": clip_value, "mask_loss": mask_value}


@torch.no_grad()
def zero_shot_accuracy(train_forward, images, labels, class_names, resolution, batch_size=250, autocast=False):
    """Held-out zero-shot top-1 (pe_model.zero_shot_classifier's prompt ensemble) during training. Through the
    training module's forward, which an FSDP model needs to gather its shards (every rank runs it)."""
    device = next(train_forward.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        clip = getattr(train_forward, "module", train_forward).model  # (DDP wraps it as .module)
        classifier = pe_model.zero_shot_classifier(clip, class_names, data.ZERO_SHOT_TEMPLATES, 4096, device,
                                                   lambda tokens: train_forward(None, tokens)[1])
        correct = 0
        for start in range(0, len(images), batch_size):
            batch = images[start: start + batch_size].to(device)
            if batch.shape[-1] != resolution:
                batch = F.interpolate(batch, size=(resolution, resolution), mode="bilinear", antialias=True)
            logits = train_forward(batch)[0].float() @ classifier.float().T  # (b, classes)
            correct += logits.argmax(dim=1).eq(labels[start: start + batch_size].to(device)).sum()
    return float(correct) / max(1, len(images))


# ---------------------------------------------------------------------------------------------------------
# The training loop
def train(cfg):
    """Run the training of `cfg` (from any number of torchrun processes); returns a summary dict: losses
    (this process's run, one per step), final checkpoint path, zero-shot accuracy, bad-sample counts."""
    rank, world_size, _, device = training.setup_distributed()
    group = dist.group.WORLD if world_size > 1 else None
    master = rank == 0
    if cfg.global_batch % world_size:
        raise SystemExit(f"--global_batch={cfg.global_batch} must be divisible by the {world_size} processes")
    stages = parse_stages(cfg.resolution_stages)
    autocast = device.type == "cuda"  # bf16 autocast on GPU; float32 on CPU

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_clip(cfg.model, cfg.use_rope2d, cfg.pool_type)
    patch_size = model.visual.patch_size
    if any(resolution % patch_size for _, resolution in stages):
        raise SystemExit(f"--resolution_stages={','.join(cfg.resolution_stages)}: every resolution must be a multiple "
                         f"of the patch size {patch_size}")
    model.visual.transformer.grad_checkpointing = model.transformer.grad_checkpointing = cfg.grad_checkpointing
    train_forward = training.wrap_for_training(TrainingForward(model.to(device)), device, world_size, cfg.fsdp,
                                               replicated=[model.logit_scale])
    optimizer = training.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)

    load_size = cfg.load_size or max(resolution for _, resolution in stages)
    bad_dir = os.path.join(cfg.out_dir, "bad_samples")
    training.remove_partial_writes(cfg.out_dir, rank)
    resumed_from, state, position = (training.resume_latest(cfg.out_dir, "*.pt", train_forward, model, optimizer,
                                                            rank, world_size) if cfg.resume else (None, None, (0, 0)))
    step = int(state["step"]) if resumed_from else 0
    if resumed_from:
        changed = [k for k, v in state.get("train_config", {}).items()
                   if k in ("global_batch", "max_steps", "resolution_stages", "seed", "lr", "optimizer")
                   and v != getattr(cfg, k)]
        if master and changed:
            print(f"warning: resuming with different {', '.join(changed)}: the loss curve will differ from an "
                  "uninterrupted run")
    else:
        data.BadSamples.reset(bad_dir)  # a fresh run counts its own bad samples, not an earlier run's
        if master and cfg.resume:
            print(f"--resume: no checkpoint in {cfg.out_dir}, starting from scratch")
        if master and training.latest_checkpoint(cfg.out_dir):
            print(f"note: {cfg.out_dir} holds checkpoints of an earlier run; this run starts from scratch "
                  "(--resume continues the newest)")
    dataset = build_train_dataset(cfg, load_size, bad_dir)
    metrics = training.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), step if resumed_from else None, master)

    if cfg.eval_every:  # the held-out renderings, made once (their rendering does not depend on the epoch)
        val_set = data.EmojiImageText("val", cfg.num_classes, cfg.val_images_per_class, load_size, seed=cfg.seed)
        val_images = torch.stack([val_set[i][0] for i in range(len(val_set))])  # (N, 3, S, S)
        val_labels = torch.tensor([i % cfg.num_classes for i in range(len(val_set))])

    def evaluate():  # every rank runs the same forwards (FSDP needs them all)
        train_forward.eval()
        accuracy = zero_shot_accuracy(train_forward, val_images, val_labels, val_set.class_names, stages[-1][1],
                                      cfg.eval_batch, autocast)
        train_forward.train()
        metrics.log({"step": step, "zero_shot_top1": accuracy})
        return accuracy

    def bad_samples():
        found = data.BadSamples.collect(bad_dir, "training data") if os.path.isdir(bad_dir) else None
        return found if found is not None and found.total() else None

    def checkpoint(path):
        training.save_training_checkpoint(path, train_forward, model, optimizer, step, position, 1, {
            "train_config": dataclasses.asdict(cfg), "schedule": {"lr": lr, "resolution": resolution}})

    batches = train_batches(dataset, cfg, position, rank, world_size, load_size, model.context_length, group)
    warmup_steps = round(cfg.warmup_fraction * cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    losses, images_per_second, accuracy = [], None, None
    lr = resolution = None
    last_time = time.time()
    while step < cfg.max_steps:
        images, tokens, next_position = next(batches)
        resolution = resolution_at(step, cfg.max_steps, stages)
        lr = training.lr_at(step, cfg.max_steps, cfg.lr, warmup_steps, cfg.min_lr, cfg.lr_schedule)
        training.set_lr(optimizer, lr)
        images, tokens = images.to(device, non_blocking=True), trim_padding(tokens).to(device, non_blocking=True)
        if images.shape[-2:] != (resolution, resolution):  # progressive resolution: resize the whole batch
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
        masking = None
        if cfg.mask_fraction > 0 and cfg.mask_ratio > 0:
            masking = sample_masks(len(images), resolution // patch_size, cfg.mask_fraction, cfg.mask_ratio, step,
                                   cfg.seed, offset=rank * cfg.global_batch // world_size)
        stats = contrastive_step(train_forward, optimizer, images, tokens, masking, cfg.mask_weight, group, autocast)
        if not math.isfinite(stats["loss"]):
            raise SystemExit(f"step {step}: the loss is {stats['loss']} (contrastive {stats['clip_loss']}, mask "
                             f"{stats['mask_loss']}); stopping. Lower --lr, or --resume from the last checkpoint "
                             f"in {cfg.out_dir}")
        step, position = step + 1, next_position
        losses.append(stats["loss"])
        now = time.time()
        rate = cfg.global_batch / max(now - last_time, 1e-9)
        images_per_second = rate if images_per_second is None else 0.9 * images_per_second + 0.1 * rate
        last_time = now
        metrics.log({"step": step, **stats, "lr": lr, "resolution": resolution,
                     "logit_scale": model.logit_scale.exp().item(), "images_per_s": round(images_per_second, 1)})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.2e}", res=resolution,
                        img_s=f"{images_per_second:.0f}", refresh=False)
        bar.update()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            checkpoint(os.path.join(cfg.out_dir, f"step_{step:06d}.pt"))
            if master:
                training.prune_checkpoints(cfg.out_dir, cfg.keep_checkpoints)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            accuracy = evaluate()
            if master:
                bad = bad_samples()
                tqdm.write(f"step {step}: held-out zero-shot top-1 {accuracy:.3f} (chance {1 / cfg.num_classes:.3f})"
                           + (f"; {bad.report()}" if bad else ""))
    bar.close()

    final_path = os.path.join(cfg.out_dir, "final.pt")
    checkpoint(final_path)
    if cfg.eval_every:
        accuracy = evaluate()
    bad = bad_samples() if master else None
    if bad:
        metrics.log({"step": step, "bad_samples": bad.counts})
    if master:
        print(f"trained {step} steps ({cfg.preset} recipe, {world_size} process(es), {device.type}); "
              f"final loss {losses[-1] if losses else float('nan'):.4f}"
              + (f"; held-out zero-shot top-1 {accuracy:.3f} over {cfg.num_classes} classes" if accuracy is not None
                 else ""))
        print(bad.report() if bad else "no bad samples")
        print(f"checkpoint: {final_path}; metrics: {metrics.path}")
        if os.path.exists("evaluate.py"):
            print(f"measure it: python evaluate.py --all --checkpoint={final_path}")
    return {"losses": losses, "checkpoint": final_path, "zero_shot_top1": accuracy, "steps": step,
            "bad_samples": dict(bad.counts) if bad else {}}


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    train(make_config(argv))
    if dist.is_initialized():  # leave together: a rank tearing gloo down while another still writes can abort
        training.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
