"""
align_spatial.py: spatial alignment (PE spatial, paper §5.2 and Appendix B.3.1): lift PE core's spatially
strong intermediate features to the output of the network for dense prediction.

A PE-core checkpoint becomes a PE-Spatial-style tower (no pooling, no projection, no ln_post: the official
PE-Spatial layout) and is finetuned against two frozen teachers that see the exact same images:

  1. its own frozen copy, read at an intermediate layer k (paper: layer 41 of PE-core G's 50, "a layer
     around the peak for many tasks"; scaled here to the checkpoint's depth: 4 of 6 blocks, 0-based),
     distilled into the student's LAST layer, all tokens (Eq. 2):  L_core = mean_i (1 - cos(S_i, T_k,i));
  2. mask correspondence (Eq. 3): SAM 2.1-L prompted with a 32x32 grid of points gives 1024 mask logits per
     pixel, used as a 1024-d feature map; its token-to-token cosine x, sharpened to exp(t (x - 1)) with
     t = 20, is the target of the student's token-to-token cosine, with MSE over all N x N pairs:
     L_loc = mean_ij (cos(S_i, S_j) - exp(t (cos(M_i, M_j) - 1)))^2.
  L_spatial = L_core + L_loc (weights 1 and 1, Tab. 22-23).

The student is regularised so that copying a layer of itself is no tautology: drop path 0.4 and
MaskFeat-style masking of 75% of its input in 2x2-token blocks (Tab. 21); LayerScale 0.1 only for G-size
towers (--ls_init_value=0.1: the released PE-Spatial-G has it, the smaller Spatial configs do not, and on
our short CPU run adding it to a core without one cost 1.3 mIoU points; bench/RESULTS.md); LAMB, lr 5e-4, betas
(0.9, 0.95), weight decay 0.05, no warmup (the CPU default raises the lr to 2e-3 for its few hundred steps:
4x 5e-4 beat 5e-4 on both probes at 150 steps). It trains above the core's pretraining resolution (1.5x by
default; the released PE-Spatial T/S/B run at 512 px over cores at 384 / 224 px).

Mask source. Teacher 2 is any callable `mask_source(images (B, 3, H, W) in [-1, 1]) -> mask logits
(B, M, h, w)` for M prompted masks (any h, w: resized to the image, then averaged over each patch). No SAM
weights install from a package registry, so the DEFAULT runs offline on composed scenes (data.py: emoji
pasted over backgrounds, exact instance masks) with an oracle in SAM's place: the same grid of point
prompts, each answered with the exact mask of the object (or background) under the point, as logits +-10
(`exact_mask_logits`). A stand-in, not SAM: its masks are perfect and never split an object into parts.
To use SAM 2.1, write a module whose function returns such a callable (e.g. SAM 2.1-L's automatic mask
generator with points_per_side=32, pred_iou_thresh=0, stability_score_thresh=0, mask_threshold=0 (Tab. 22),
returning the raw logits of all 1024 prompts; the paper runs SAM at 1024 px and interpolates the logits
down) and pass --mask_source=my_module:make_sam_source, with real images as webdataset / img2dataset tar
shards (the paper aligns on PE-core's pretraining data): --shards='data/{00000..00127}.tar'.

Run (CPU, minutes; starts from the newest checkpoint `python train_clip.py` wrote, or --checkpoint=PATH):
    python align_spatial.py                                   # composed scenes; prints the dense probes
    python align_spatial.py --checkpoint=out/clip/final.pt --max_steps=600 --teacher_layer=3
    torchrun --nproc_per_node 2 align_spatial.py               # DDP: gloo on CPU, NCCL on GPUs
    python align_spatial.py --checkpoint_every=50 [--resume]  # resumable checkpoints; continue the newest
    python align_spatial.py --checkpoint=PE-Core-L14-336.pt --model=PE-Core-L14-336 --resolution=448 \
        --mask_source=my_sam:make_sam_source --shards='data/{00000..00127}.tar'
Writes into --out_dir (default out/spatial): spatial.pt ({"model": the tower's state_dict in the official
PE-Spatial layout, "config": pe_model.get_config(tower), training state, metrics};
`pe_model.load_model("out/spatial/spatial.pt")` rebuilds it), metrics.jsonl (losses), dense_probes.json
(segmentation mIoU and depth RMSE per layer of the core and of the aligned tower, evaluate.py's probes), and
with --checkpoint_every the newest resumable spatial_step_NNNNNN.pt (student, optimizer, RNG, data position).
"""

import importlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate
import pe_model
import train_clip


@dataclass
class SpatialConfig:
    checkpoint: str = ""  # PE-core checkpoint to start from; "" = newest one train_clip.py wrote (out/clip)
    model: str = ""  # official model name, for official .pt files that store no config (PE-Core-L14-336)
    out_dir: str = "out/spatial"  # spatial.pt and metrics.jsonl go here
    # teacher 1: frozen self-distillation (Eq. 2, Tab. 23)
    teacher_layer: Optional[int] = None  # 0-based block of the frozen copy; None = layer 41 of 50, scaled
    core_loss_weight: float = 1.0  # Tab. 23
    # teacher 2: mask-logit correspondence (Eq. 3, Tab. 22)
    mask_source: str = ""  # "module:function" returning a mask-source callable; "" = exact scene masks
    prompt_grid: int = 16  # point prompts per side (paper: 32x32 = 1024 on 1024 px images)
    mask_temperature: float = 20.0  # t in exp(t (x - 1)) on the teacher's pairwise cosine (Tab. 22)
    loc_loss_weight: float = 1.0  # Tab. 22
    # student regularisation (Tab. 21)
    mask_ratio: float = 0.75  # MaskFeat masking of the student's input
    mask_size: int = 2  # masked blocks of mask_size x mask_size tokens
    drop_path: float = 0.4
    # LayerScale added to a core that has none: None (the released Spatial T/S/B/L: "No layerscale on the
    # smaller spatial models") or 0.1 (Spatial-G)
    ls_init_value: Optional[float] = None
    # optimisation (Tab. 21: LAMB (0.9, 0.95), weight decay 0.05, lr 5e-4, no warmup, 24K steps of 12,288)
    lr: float = 2e-3  # 4x the paper's 5e-4 for a run of a few hundred steps (train_clip.py likewise scales up)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    max_steps: int = 200
    batch_size: int = 32  # global, over all processes
    resolution: int = 0  # training resolution; 0 = 1.5x the core's pretraining size, rounded to patches
    # data: composed scenes (default) or tar shards (with a real mask source)
    num_scenes: int = 1024  # composed training scenes (seeds disjoint from the evaluation scenes)
    shards: str = ""  # webdataset / img2dataset tar shards (needs --mask_source)
    brightness: float = 0.32  # colour jitter j(0.32, 0, 0.32, 0) and hflip p(0.5) (Tab. 21)
    saturation: float = 0.32
    hflip_prob: float = 0.5
    # evaluation: evaluate.py's dense linear probes (segmentation mIoU, depth RMSE) on held-out composed scenes
    eval: bool = True
    eval_scenes: int = 400  # 3/4 probe train, 1/4 test (evaluate.py's split and seeds)
    eval_size: int = 0  # probe resolution for both models; 0 = evaluate.py's default for the student
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps between resumable spatial_step_NNNNNN.pt checkpoints (the newest is kept)
    resume: bool = False  # continue exactly from the newest spatial_step_NNNNNN.pt in out_dir


# ---------------------------------------------------------------------------------------------------------
# Teacher and student. The teacher is the core checkpoint's vision tower without its head, frozen. The
# student is the same weights in a PE-Spatial-style tower: no pooling, projection or ln_post (§5.2: "we add
# no extra parameters other than LayerScale"), LayerScale and drop path added, position embedding resampled
# to the training resolution (the same bilinear resampling the tower does on the fly, so nothing changes).

PAPER_TEACHER_LAYER, PAPER_DEPTH = 41, 50  # 1-based, PE-core G (B.3.1: "it is layer 40 when indexing from 0")


def default_teacher_layer(layers):
    """0-based block index of the paper's layer 41/50 scaled to a tower of `layers` blocks (6 -> 4, 8 -> 6,
    12 -> 9, 24 -> 19, 50 -> 40)."""
    return max(0, round(PAPER_TEACHER_LAYER / PAPER_DEPTH * layers) - 1)


def default_resolution(vision_cfg):
    """1.5x the core's pretraining size in whole patches: spatial alignment trains above the core's resolution,
    as the released PE-Spatial T/S/B (512 px) over their cores (384 / 224 px)."""
    patch = vision_cfg["patch_size"]
    return round(1.5 * vision_cfg["image_size"] / patch) * patch


def read_core_config(checkpoint, name=""):
    """The vision config dict of a core checkpoint: stored in ours, from the official name otherwise."""
    if name:
        return pe_model.model_config(name)["vision_cfg"]
    try:
        blob = pe_model.read_checkpoint_file(checkpoint)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--checkpoint={checkpoint}: {error}") from None
    if not (isinstance(blob, dict) and isinstance(blob.get("config"), dict)):
        raise SystemExit(f"--checkpoint={checkpoint}: stores no model config (an official file?); name the "
                         f"model, e.g. --model=PE-Core-L14-336")
    return blob["config"]["vision_cfg"]


def headless(vision_cfg, **changes):
    """A PE-Spatial-style config: the tower's tokens are its output (pe_architecture.md §1, Spatial)."""
    return {**vision_cfg, "pool_type": "none", "output_dim": None, "use_ln_post": False, **changes}


def build_teacher_and_student(checkpoint, cfg, vision_cfg):
    """(teacher, student) VisionTransformers from a core checkpoint. Teacher: frozen, eval mode."""
    teacher = pe_model.VisionTransformer(**headless(vision_cfg, drop_path=0.0))
    pe_model.load_checkpoint(teacher, checkpoint, drop_head=True)  # strict on everything but the head
    teacher.eval().requires_grad_(False)

    resolution = cfg.resolution or default_resolution(vision_cfg)
    keep_ls = vision_cfg.get("ls_init_value")  # a core with LayerScale keeps its gammas
    student = pe_model.VisionTransformer(**headless(
        vision_cfg, image_size=resolution, drop_path=cfg.drop_path,
        ls_init_value=keep_ls if keep_ls is not None else cfg.ls_init_value))
    grid = resolution // teacher.patch_size
    state = teacher.state_dict()
    if "positional_embedding" in state:
        state["positional_embedding"] = teacher.interpolated_posemb(grid, grid).detach()
    for key, value in student.state_dict().items():
        state.setdefault(key, value)  # the new LayerScale gammas keep their init value
    pe_model.load_checkpoint(student, state, name=f"{checkpoint} (as a spatial tower)")
    return teacher, student


# ---------------------------------------------------------------------------------------------------------
# Mask source (teacher 2). Interface: mask_source(images (B, 3, H, W)) -> mask logits (B, M, h, w).
# SAM's mask logits are used as FEATURES (§5.2): M = 1024 grid prompts, each pixel described by its logit
# under every prompt. Two pixels have similar features when the same prompts select them, i.e. when they lie
# in the same masks; SAM's own features are not used because they carry global-token artifacts (Fig. 15).

EXACT_LOGIT = 10.0  # logit magnitude of the oracle masks; any value gives the same cosine similarities


def prompt_points(height, width, prompt_grid):
    """Pixel (rows, cols) of a prompt_grid x prompt_grid grid of points at cell centres, as SAM's
    automatic mask generator places them. (M,), (M,) long."""
    rows = ((torch.arange(prompt_grid) + 0.5) * height / prompt_grid).long()
    cols = ((torch.arange(prompt_grid) + 0.5) * width / prompt_grid).long()
    return rows.repeat_interleave(prompt_grid), cols.repeat(prompt_grid)


def exact_mask_logits(instance_maps, prompt_grid=16):
    """The offline stand-in for SAM 2.1: instance maps (B, H, W) long (0 background, k object k) -> mask
    logits (B, M, H, W), M = prompt_grid**2: prompt m is answered with the exact mask of the region under
    its point (an object, or the background), +EXACT_LOGIT inside and -EXACT_LOGIT outside."""
    rows, cols = prompt_points(*instance_maps.shape[-2:], prompt_grid)
    region = instance_maps[:, rows, cols]  # (B, M): the region id under each prompt
    inside = instance_maps[:, None, :, :] == region[:, :, None, None]  # (B, M, H, W)
    return (inside.float() * 2 - 1) * EXACT_LOGIT


def exact_mask_tokens(instance_maps, prompt_grid, grid_h, grid_w, patch_size):
    """mask_logit_tokens(exact_mask_logits(...)) computed per region instead of per prompt (averaging over a
    patch is linear, so the two are equal; tested): (B, H, W) -> (B, gh*gw, M) at a fraction of the memory."""
    rows, cols = prompt_points(*instance_maps.shape[-2:], prompt_grid)
    region = instance_maps[:, rows, cols]  # (B, M)
    crop = instance_maps[:, : grid_h * patch_size, : grid_w * patch_size]
    one_hot = F.one_hot(crop.long(), int(instance_maps.max()) + 1).permute(0, 3, 1, 2).float()  # (B, R, H, W)
    inside = F.avg_pool2d(one_hot, patch_size).flatten(2)  # (B, R, gh*gw): fraction of each patch per region
    inside = inside.gather(1, region[:, :, None].long().expand(-1, -1, inside.shape[-1]))  # (B, M, gh*gw)
    return ((inside * 2 - 1) * EXACT_LOGIT).transpose(1, 2)


def load_mask_source(spec):
    """--mask_source=module:function -> the callable that function returns (see the module docstring)."""
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise SystemExit(f"--mask_source={spec}: expected module:function, e.g. my_sam:make_source")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"--mask_source={spec}: cannot import it ({error})") from None
    return factory()


def mask_logit_tokens(mask_logits, image_size, patch_size):
    """Mask logits (B, M, h, w) of images of image_size (H, W) -> one feature per patch token (B, gh*gw, M):
    resized to the image if they are not at its size (bilinear; B.3.1 runs SAM at 1024 px and interpolates to
    the training size, §5.2: mask logits are "robust to interpolation"), cropped to the pixels the patch grid
    covers, averaged over each patch."""
    height, width = image_size
    if tuple(mask_logits.shape[-2:]) != (height, width):
        mask_logits = F.interpolate(mask_logits, size=(height, width), mode="bilinear", align_corners=False,
                                    antialias=True)
    grid_h, grid_w = height // patch_size, width // patch_size
    pooled = F.avg_pool2d(mask_logits[..., : grid_h * patch_size, : grid_w * patch_size], patch_size)
    return pooled.flatten(2).transpose(1, 2)  # (B, M, gh, gw) -> (B, gh*gw, M)


# ---------------------------------------------------------------------------------------------------------
# Data. Default: composed scenes rendered once (each process its share), augmented per step with the
# paper's photometric jitter and a horizontal flip applied to image and instance map together, so the
# oracle masks stay exact. (Tab. 21's aspect-ratio jitter is left out: it would resample the masks.)


TRAIN_SCENE_SEED = 7919  # added to --seed: scene seeds are hashed from it, so no training scene is a probe scene


def render_scenes(num_scenes, size, seed, rank=0, world_size=1):
    """Scenes rank, rank + world_size, ... of data.ComposedScenes -> images (n, 3, S, S), instance maps
    (n, S, S) uint8. The seed is offset from evaluate.py's, so training never sees the probe scenes."""
    scenes = data.ComposedScenes(num_scenes=num_scenes, size=size, seed=seed)
    indices = range(rank, num_scenes, world_size)
    images, maps = [], []
    for index in tqdm(indices, desc=f"rendering {len(indices)} scenes", disable=rank != 0):
        scene = scenes[index]
        ids = torch.arange(1, scene["instance_masks"].shape[0] + 1)
        maps.append((scene["instance_masks"] * ids[:, None, None]).sum(0).to(torch.uint8))  # visible: disjoint
        images.append(scene["image"])
    return torch.stack(images), torch.stack(maps)


def augment_batch(images, instance_maps, cfg, generator):
    """Per-image hflip (image and map together), brightness then saturation jitter (data.train_augment's
    formulas). images (B, 3, H, W) in [-1, 1], instance_maps (B, H, W)."""
    batch = images.shape[0]
    flip = torch.rand(batch, generator=generator) < cfg.hflip_prob
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    instance_maps = torch.where(flip[:, None, None], instance_maps.flip(-1), instance_maps)
    pixels = images.add(1).div(2)
    brightness = 1 + cfg.brightness * (2 * torch.rand(batch, generator=generator) - 1)
    pixels = (pixels * brightness[:, None, None, None]).clamp(0, 1)
    grey = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2])[:, None]
    saturation = 1 + cfg.saturation * (2 * torch.rand(batch, generator=generator) - 1)
    pixels = (grey + saturation[:, None, None, None] * (pixels - grey)).clamp(0, 1)
    return pixels.mul(2).sub(1), instance_maps


# ---------------------------------------------------------------------------------------------------------
# Student input masking (MaskFeat, 75% of 2x2-token blocks, Tab. 21). Masked pixels are set to 0 (grey in
# [-1, 1]); the patch convolution has no bias, so a masked patch embeds to exactly 0: a fixed zero mask
# token plus its position, which adds no parameter (§5.2: "no extra parameters other than LayerScale"). The
# teachers see the unmasked image and the losses apply to all tokens, masked or not.


def block_mask(batch, grid_h, grid_w, ratio, block, generator):
    """(B, gh, gw) bool, True = masked: round(ratio * blocks) random blocks of block x block tokens."""
    blocks_h, blocks_w = math.ceil(grid_h / block), math.ceil(grid_w / block)
    num_blocks = blocks_h * blocks_w
    num_masked = round(ratio * num_blocks)
    order = torch.rand(batch, num_blocks, generator=generator).argsort(dim=1)
    masked = torch.zeros(batch, num_blocks, dtype=torch.bool)
    masked.scatter_(1, order[:, :num_masked], True)
    masked = masked.view(batch, blocks_h, blocks_w).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return masked[:, :grid_h, :grid_w]


def mask_images(images, token_mask, patch_size):
    """Zero the pixels of masked tokens. images (B, 3, H, W), token_mask (B, gh, gw)."""
    pixels = token_mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)  # (B, gh*P, gw*P)
    keep = torch.ones(images.shape[0], *images.shape[-2:], dtype=images.dtype, device=images.device)
    keep[:, : pixels.shape[1], : pixels.shape[2]] = (~pixels).to(images.dtype)
    return images * keep[:, None]


# ---------------------------------------------------------------------------------------------------------
# Losses (Appendix B.3.1).


def self_distillation_loss(student_tokens, teacher_tokens):
    """Eq. 2: per-token cosine between the student's last layer and the frozen teacher layer, over all
    tokens. The paper writes "minimize cosine similarity"; it means maximise it: 1 - cos, which has the same
    gradient as -cos and is 0 at a perfect match. (B, N, D), (B, N, D) -> scalar."""
    return (1 - F.cosine_similarity(student_tokens, teacher_tokens, dim=-1)).mean()


def pairwise_cosine(tokens):
    """(B, N, D) -> (B, N, N) cosine similarity of every token pair: the "spatial correspondence map"."""
    tokens = F.normalize(tokens, dim=-1)
    return tokens @ tokens.transpose(1, 2)


def correspondence_target(mask_features, temperature):
    """The teacher side of Eq. 3: pairwise cosine x of the mask-logit features (B, N, M), sharpened to
    exp(t (x - 1)) (B.3.1: "a temperature on the SAM teacher's pairwise cosine similarity term"; t = 20,
    Tab. 22): 1 for tokens the same masks select, ~0 otherwise. temperature 0 = the plain cosine."""
    similarity = pairwise_cosine(mask_features)
    return torch.exp(temperature * (similarity - 1)) if temperature else similarity


def correspondence_loss(student_tokens, target_similarity):
    """Eq. 3: mean over the N x N token pairs of (student pairwise cosine - target)^2. (B, N, D), (B, N, N)."""
    return (pairwise_cosine(student_tokens) - target_similarity).square().mean()


def alignment_losses(student, teacher, images, mask_features, cfg, teacher_layer, token_mask=None):
    """{"core": Eq. 2, "loc": Eq. 3} for one batch. images (B, 3, H, W): what the teachers see; token_mask
    (B, gh, gw): the student's copy is masked there; mask_features (B, gh*gw, M): mask-logit features per
    patch (mask_logit_tokens). Loss weights 1 and 1 (Tab. 22, 23): L_spatial = L_core + L_loc."""
    with torch.no_grad():
        teacher_tokens = teacher.forward_features(images, layer_idx=teacher_layer)  # (B, N, D)
        target = correspondence_target(mask_features, cfg.mask_temperature)  # (B, gh*gw, gh*gw)
    student_input = images if token_mask is None else mask_images(images, token_mask, teacher.patch_size)
    student_tokens = student(student_input).float()  # (B, N, D): pool "none", no projection: all tokens
    teacher_tokens = teacher_tokens.float()
    patch_tokens = student_tokens[:, 1:] if teacher.use_cls_token else student_tokens  # masks: patches only
    return {"core": self_distillation_loss(student_tokens, teacher_tokens),
            "loc": correspondence_loss(patch_tokens, target)}


# ---------------------------------------------------------------------------------------------------------
# Training.


def scene_batches(images, instance_maps, batch_size, seed, rank, start=(0, 0)):
    """Endless (images, instance_maps, position after the batch) from this process's scenes, reshuffled every
    epoch with a generator seeded from (seed, rank, epoch), so a run is reproducible; position = (epoch,
    batches used in it), start = where a resumed run continues."""
    epoch, skip = start
    while True:
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(
            data.seed_for(seed, "spatial", rank, epoch)))
        for index, first in enumerate(range(0, len(order) - batch_size + 1, batch_size)):
            if index >= skip:
                chosen = order[first : first + batch_size]
                yield images[chosen], instance_maps[chosen].long(), (epoch, index + 1)
        epoch, skip = epoch + 1, 0


def shard_batches(cfg, batch_size, rank, world_size, start=(0, 0)):
    """Endless (images, None, position) from tar shards (for a real mask source): Tab. 21's colour jitter and
    flip (no crop; the aspect-ratio jitter is left out, as for the scenes). A resumed run re-reads the
    batches its epoch already used and drops them (an epoch's stream is a function of (seed, epoch))."""
    augment = data.AugmentConfig(crop_scale=(1.0, 1.0), brightness=cfg.brightness, saturation=cfg.saturation,
                                 hflip_prob=cfg.hflip_prob)
    shards = data.TarShards(cfg.shards, transform=data.make_train_transform(cfg.resolution, augment),
                            image_size=cfg.resolution, shuffle_buffer=256, seed=cfg.seed, rank=rank,
                            world_size=world_size)
    epoch, skip = start
    while True:
        shards.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(shards, batch_size=batch_size, collate_fn=data.collate_image_text,
                                             drop_last=True)
        for index, batch in enumerate(loader):
            if batch is not None and index >= skip:
                yield batch[0], None, (epoch, index + 1)
        epoch, skip = epoch + 1, 0


def save_spatial_checkpoint(path, student, step, cfg, teacher_layer, metrics):
    """The aligned tower in the official PE-Spatial layout (a VisionTransformer state_dict) with the config
    pe_model.load_model rebuilds it from (drop path off: it is a training-time regulariser)."""
    config = pe_model.get_config(student)
    config["vision_cfg"]["drop_path"] = 0.0
    pe_model.save_checkpoint({"model": student.state_dict(), "config": config, "step": step,
                              "train_config": asdict(cfg), "teacher_layer": teacher_layer,
                              "metrics": metrics}, path)


def save_training_state(path, student, optimizer, step, position, generator, history, cfg, teacher_layer,
                        world_size=1):
    """A resumable checkpoint: the student (official PE-Spatial layout + config), optimizer, step, RNG
    states, and per rank its data position and student-mask generator; the loss history. Call on every rank
    (the per-rank parts are gathered); rank 0 writes it atomically."""
    positions = train_clip.gather_per_rank(list(position), world_size)
    generators = train_clip.gather_per_rank(generator.get_state(), world_size)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    pe_model.save_checkpoint({"model": student.state_dict(), "config": pe_model.get_config(student),
                              "optimizer": optimizer.state_dict(), "step": step, "rng": train_clip.rng_state(),
                              "data_position": torch.tensor(positions), "mask_generator": torch.stack(generators),
                              "history": history, "train_config": asdict(cfg), "teacher_layer": teacher_layer},
                             path)


def load_training_state(path, student, optimizer, rank, world_size):
    """Restore what save_training_state wrote into the student and optimizer (and the RNG states); returns
    (step, this rank's data position, its mask-generator state, history)."""
    state = pe_model.read_checkpoint_file(path)
    if not isinstance(state, dict) or "mask_generator" not in state:
        raise SystemExit(f"{path}: not a resumable align_spatial.py checkpoint")
    if len(state["data_position"]) != world_size:
        raise SystemExit(f"{path}: written by {len(state['data_position'])} process(es); resume it with as many "
                         f"(now {world_size})")
    pe_model.load_checkpoint(student, state["model"], name=path)
    optimizer.load_state_dict(state["optimizer"])
    train_clip.set_rng_state(state["rng"])
    position = tuple(int(v) for v in state["data_position"][rank])
    # a copy: Generator.set_state reads a row view of the stacked states from its storage's start (rank 1
    # of a stack crashes the process)
    return int(state["step"]), position, state["mask_generator"][rank].clone(), list(state["history"])


def train(cfg, checkpoint, rank=0, world_size=1, device=torch.device("cpu")):
    """Align a core checkpoint; returns (student tower, teacher tower, teacher_layer, history). The student
    is wrapped in DDP when world_size > 1 (gradients averaged over processes). With cfg.checkpoint_every,
    resumable checkpoints are written; cfg.resume continues the newest exactly (same losses and weights as
    an uninterrupted run)."""
    vision_cfg = read_core_config(checkpoint, cfg.model)
    patch = vision_cfg["patch_size"]
    cfg.resolution = cfg.resolution or default_resolution(vision_cfg)
    teacher_layer = cfg.teacher_layer if cfg.teacher_layer is not None else default_teacher_layer(
        vision_cfg["layers"])
    if not -vision_cfg["layers"] <= teacher_layer < vision_cfg["layers"]:
        raise SystemExit(f"--teacher_layer={teacher_layer}: the core has {vision_cfg['layers']} layers")
    if cfg.batch_size % world_size:
        raise SystemExit(f"--batch_size={cfg.batch_size} does not split over {world_size} processes")
    if cfg.shards and not cfg.mask_source:
        raise SystemExit("--shards needs --mask_source: the offline stand-in only knows the composed scenes' masks")
    torch.manual_seed(cfg.seed)
    teacher, student = build_teacher_and_student(checkpoint, cfg, vision_cfg)
    teacher, student = teacher.to(device), student.to(device)
    # LAMB, (0.9, 0.95), weight decay 0.05, lr 5e-4, no warmup (Tab. 21); the decay shape is not given there:
    # cosine, as PE-core pretraining. train_clip's groups: no decay / trust ratio on gammas, biases, posemb.
    optimizer = train_clip.build_optimizer(student, "lamb", cfg.lr, (cfg.beta1, cfg.beta2),
                                           weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(data.seed_for(cfg.seed, "spatial-masks", rank))
    start_step, position, history = 0, (0, 0), []
    resume_from = pe_model.latest_checkpoint(cfg.out_dir, "spatial_step_*.pt") if cfg.resume else None
    if resume_from:  # before DDP wraps the student: DDP starts every rank from rank 0's weights
        start_step, position, generator_state, history = load_training_state(resume_from, student, optimizer,
                                                                              rank, world_size)
        generator.set_state(generator_state)
        if rank == 0:
            print(f"resuming at step {start_step} from {resume_from}")
    elif cfg.resume and rank == 0:
        print(f"--resume: no spatial_step_*.pt in {cfg.out_dir}, starting from {checkpoint}")
    model = torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else student
    mask_source = load_mask_source(cfg.mask_source) if cfg.mask_source else None

    local_batch = cfg.batch_size // world_size
    if cfg.shards:
        batches = shard_batches(cfg, local_batch, rank, world_size, position)
    else:
        scene_images, scene_maps = render_scenes(cfg.num_scenes, cfg.resolution, cfg.seed + TRAIN_SCENE_SEED,
                                                 rank, world_size)
        batches = scene_batches(scene_images, scene_maps, local_batch, cfg.seed, rank, position)

    grid = cfg.resolution // patch
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        kept = []  # a resumed run keeps the lines of the steps its checkpoint covers; a fresh run starts anew
        if resume_from and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    progress = tqdm(range(start_step + 1, cfg.max_steps + 1), desc="spatial alignment", disable=rank != 0,
                    initial=start_step, total=cfg.max_steps)
    model.train()
    for step in progress:
        images, instance_maps, position = next(batches)
        if instance_maps is not None:
            images, instance_maps = augment_batch(images, instance_maps, cfg, generator)
        token_mask = block_mask(images.shape[0], grid, grid, cfg.mask_ratio, cfg.mask_size, generator)
        images, token_mask = images.to(device), token_mask.to(device)
        with torch.no_grad():
            if mask_source is None:
                mask_features = exact_mask_tokens(instance_maps.to(device), cfg.prompt_grid, grid, grid, patch)
            else:
                mask_features = mask_logit_tokens(mask_source(images).float(), images.shape[-2:], patch)
        for group in optimizer.param_groups:
            group["lr"] = train_clip.lr_at(step - 1, cfg.max_steps, cfg.lr, cfg.warmup_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = alignment_losses(model, teacher, images, mask_features, cfg, teacher_layer, token_mask)
        loss = cfg.core_loss_weight * losses["core"] + cfg.loc_loss_weight * losses["loc"]
        logged = torch.stack([losses["core"], losses["loc"]]).detach()
        if world_size > 1:  # the mean over processes (DDP applies that mean's gradient); every rank sees a NaN
            dist.all_reduce(logged)
            logged /= world_size
        core, loc = logged.tolist()
        if not math.isfinite(core + loc):
            raise SystemExit(f"step {step}: the loss is {core + loc}; lower --lr or check the mask source")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": cfg.core_loss_weight * core + cfg.loc_loss_weight * loc, "core": core,
                  "loc": loc, "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        progress.set_postfix(core=f"{record['core']:.4f}", loc=f"{record['loc']:.4f}", lr=f"{record['lr']:.1e}")
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save_training_state(os.path.join(cfg.out_dir, f"spatial_step_{step:06d}.pt"), student, optimizer, step,
                                position, generator, history, cfg, teacher_layer, world_size)
            if rank == 0:
                train_clip.prune_checkpoints(cfg.out_dir, 1, "spatial_step_*.pt")
    return student.eval(), teacher, teacher_layer, history


# ---------------------------------------------------------------------------------------------------------
# Evaluation: the paper's claim (§5.2, Fig. 16, Tab. 13) is that the aligned tower's LAST layer reaches or
# passes the core's BEST layer on dense tasks. Both towers are probed at the same resolution on the same
# held-out scenes with evaluate.py's probes; the core's layers are the frozen teacher's (pre-ln_post tokens).


def dense_probe_scores(towers, cfg, device):
    """{name: {"segmentation": entry, "depth": entry}} for every layer of each tower in `towers` (a dict
    name -> VisionTransformer); entries as evaluate.summarize_layers (per_layer, best, best_layer, last)."""
    student = towers["spatial"]
    eval_cfg = evaluate.EvalConfig(num_scenes=cfg.eval_scenes, seed=cfg.seed, batch_size=cfg.batch_size)
    size = cfg.eval_size or evaluate.dense_resolution(student)
    splits = evaluate.composed_scene_split(eval_cfg, size)
    num_classes = data.DENSE_NUM_CLASSES + 1
    description = f"composed scenes at {size}px: {len(splits['train']['images'])} train / " \
                  f"{len(splits['test']['images'])} test"
    scores = {}
    for name, tower in towers.items():
        layers = list(range(tower.layers))
        features = {split: evaluate.layer_features(tower.eval(), splits[split]["images"], cfg.batch_size, None,
                                                   layers, device, f"{name} features ({split})")
                    for split in ("train", "test")}
        segmentation = [evaluate.segmentation_probe(features["train"][i], splits["train"]["semantic"],
                                                    features["test"][i], splits["test"]["semantic"], num_classes)
                        for i in tqdm(range(len(layers)), desc=f"{name} segmentation probes", leave=False)]
        depth = [evaluate.depth_probe(features["train"][i], splits["train"]["depth"], features["test"][i],
                                      splits["test"]["depth"]) for i in range(len(layers))]
        scores[name] = {"segmentation": evaluate.summarize_layers(layers, segmentation, "mIoU %", True, description),
                        "depth": evaluate.summarize_layers(layers, depth, "RMSE", False, description)}
    return scores


def score_table(scores):
    """Markdown lines: segmentation mIoU and depth RMSE of the core's last and best layers and the aligned
    tower's last layer."""
    core, spatial = scores["core"], scores["spatial"]
    lines = ["| probe | core last layer | core best layer | spatial last layer |", "|---|---|---|---|"]
    for task, metric in (("segmentation", "mIoU % (higher is better)"), ("depth", "RMSE (lower is better)")):
        digits = 1 if task == "segmentation" else 3
        lines.append(f"| {task}: {metric} | {core[task]['last']:.{digits}f} (layer {core[task]['last_layer']}) | "
                     f"{core[task]['best']:.{digits}f} (layer {core[task]['best_layer']}) | "
                     f"{spatial[task]['last']:.{digits}f} (layer {spatial[task]['last_layer']}) |")
    return lines


def main(argv=None):
    cfg = pe_model.parse_config(SpatialConfig(), argv)
    rank, world_size, _, device = train_clip.setup_distributed()
    checkpoint = pe_model.resolve_checkpoint(cfg.checkpoint or None)
    if rank == 0:
        print(f"spatial alignment of {checkpoint} on {world_size} process(es), {device}")
    started = time.time()
    student, teacher, teacher_layer, history = train(cfg, checkpoint, rank, world_size, device)
    if rank == 0:
        train_seconds = time.time() - started
        window = max(1, len(history) // 10)  # per-batch losses are noisy: mean of the first / last 10% of steps
        first, last = ({key: sum(r[key] for r in part) / len(part) for key in ("core", "loc")}
                       for part in (history[:window], history[-window:]))
        metrics = {"teacher_layer": teacher_layer, "resolution": cfg.resolution, "train_seconds": train_seconds,
                   "first_losses": first, "last_losses": last}
        path = os.path.join(cfg.out_dir, "spatial.pt")
        save_spatial_checkpoint(path, student, cfg.max_steps, cfg, teacher_layer, metrics)
        print(f"teacher layer {teacher_layer} (0-based) of {teacher.layers}, {cfg.resolution}px, {cfg.max_steps} "
              f"steps in {train_seconds:.0f}s; mean of the first / last {window} steps: L_core {first['core']:.4f} "
              f"-> {last['core']:.4f}, L_loc {first['loc']:.4f} -> {last['loc']:.4f}")
        print(f"wrote {path} (pe_model.load_model rebuilds the PE-Spatial-style tower)")
        if cfg.eval:
            scores = dense_probe_scores({"core": teacher, "spatial": student}, cfg, device)
            metrics["dense_probes"] = scores
            save_spatial_checkpoint(path, student, cfg.max_steps, cfg, teacher_layer, metrics)
            with open(os.path.join(cfg.out_dir, "dense_probes.json"), "w") as f:
                json.dump(scores, f, indent=1)
            print("\n".join(score_table(scores)))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
