"""
align_spatial.py: spatial alignment (PE spatial, paper §5.2 and Appendix B.3.1): lift PE core's spatially
strong intermediate features to the output of the network, for dense prediction.

A PE-core checkpoint becomes a PE-Spatial-style tower (no pooling, projection or ln_post, as released),
finetuned against two frozen teachers that see the same, unmasked images:
  1. its own frozen copy at layer k (paper: 41 of PE-core G's 50, "around the peak for many tasks"; scaled to
     the core's depth), distilled into the student's LAST layer (Eq. 2):  L_core = mean_i (1 - cos(S_i, T_k,i));
  2. mask correspondence (Eq. 3): SAM 2.1-L's 1024 mask logits per pixel (a 32x32 grid of point prompts) as
     features M; their token-to-token cosine, sharpened with t = 20, is the target of the student's:
         L_loc = mean_ij (cos(S_i, S_j) - exp(t (cos(M_i, M_j) - 1)))^2;     L_spatial = L_core + L_loc.
The student is regularised so that copying itself is no tautology (Tab. 21: drop path 0.4, MaskFeat masking
of 75% of its input in 2x2-token blocks, LayerScale 0.1 for G only) and trains at 1.5x the core's resolution
(as the released PE-Spatial T/S/B at 512 px over cores at 384 / 224 px).

Teacher 2 is a `--mask_source=module:function` returning `images (B, 3, H, W) in [-1, 1] -> mask logits
(B, M, h, w)`: for SAM 2.1 the automatic mask generator's raw logits of all 1024 prompts (points_per_side=32,
pred_iou_thresh=0, stability_score_thresh=0, mask_threshold=0, Tab. 22), on real images (--shards). SAM does
not install offline, so by DEFAULT an oracle stands in on composed scenes (data.py): each prompt is answered
with the exact mask of the region under it. Not SAM: its masks are perfect and never split an object.

    python align_spatial.py                                    # composed scenes, newest out/clip checkpoint
    torchrun --nproc_per_node 2 align_spatial.py                # DDP: gloo on CPU, NCCL on GPUs
    python align_spatial.py --checkpoint_every=50 [--resume]   # resumable checkpoints; continue the newest
    python align_spatial.py --checkpoint=PE-Core-L14-336.pt --model=PE-Core-L14-336 --resolution=448 \
        --mask_source=my_sam:make_sam_source --shards='data/{00000..00127}.tar'
    python evaluate.py --layerwise --checkpoint=out/clip/final.pt,out/spatial/spatial.pt   # core vs aligned
Writes into --out_dir (default out/spatial): spatial.pt + spatial.json (the tower in the official PE-Spatial
layout: `pe_model.load_model(path)`), metrics.jsonl, spatial_step_NNNNNN.pt (--checkpoint_every); --eval (the
default) runs that evaluate.py command itself, one process per tower (eval/{core,spatial}/, dense_probes.json).
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import pe_model
import training


@dataclass
class SpatialConfig:
    checkpoint: str = ""  # PE-core checkpoint to start from; "" = newest one train_clip.py wrote (out/clip)
    model: str = ""  # official model name, for official .pt files that store no config (PE-Core-L14-336)
    out_dir: str = "out/spatial"
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
    ls_init_value: Optional[float] = None  # LayerScale added to a core without: None (Spatial T/S/B/L), 0.1 (G)
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
    # evaluation: evaluate.py --layerwise on the core and the aligned tower, as separate processes
    eval: bool = True
    eval_scenes: int = 400  # evaluate.py --num_scenes: composed probe scenes, 3/4 train, 1/4 test
    eval_size: int = 0  # evaluate.py --dense_size for both towers; 0 = its default for the aligned tower
    eval_options: str = ""  # more evaluate.py options, e.g. "--layer_stride=4 --num_track_videos=4"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps between resumable spatial_step_NNNNNN.pt checkpoints (the newest is kept)
    resume: bool = False  # continue exactly from the newest spatial_step_NNNNNN.pt in out_dir


RULES = {**training.positive("prompt_grid", "mask_size", "num_scenes"),  # besides training.RULES
         "mask_temperature": (lambda v: v > 0, "a number > 0"), "mask_ratio": (lambda v: v < 1, "in [0, 1)")}


# ---------------------------------------------------------------------------------------------------------
# Teacher: the core's tower without its head, frozen. Student: the same weights as a PE-Spatial tower (§5.2: "we
# add no extra parameters other than LayerScale"), position embedding resampled as the tower does on the fly.
def default_teacher_layer(layers):
    """0-based block index of the paper's layer 41 of 50 (1-based: B.3.1 "layer 40 when indexing from 0")
    scaled to `layers` blocks (6 -> 4, 12 -> 9, 50 -> 40)."""
    return max(0, round(41 / 50 * layers) - 1)


def default_resolution(vision_cfg):
    """1.5x the core's pretraining size in whole patches."""
    return round(1.5 * vision_cfg["image_size"] / vision_cfg["patch_size"]) * vision_cfg["patch_size"]


def build_teacher_and_student(checkpoint, cfg, vision_cfg):
    """(teacher, student) VisionTransformers from a core checkpoint; the teacher frozen, in eval mode."""
    teacher = pe_model.VisionTransformer(**pe_model.headless_config(vision_cfg, drop_path=0.0))
    pe_model.load_checkpoint(teacher, checkpoint, drop_head=True).eval().requires_grad_(False)  # strict except the head
    resolution = cfg.resolution or default_resolution(vision_cfg)
    keep_ls = vision_cfg.get("ls_init_value")  # a core with LayerScale keeps its gammas
    student = pe_model.VisionTransformer(**pe_model.headless_config(
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
# Mask source (teacher 2). SAM's mask logits are FEATURES (§5.2): a pixel is described by its logit under each
# of the M grid prompts, so two pixels are alike when the same prompts select them. SAM's own features are
# not used: they carry global-token artifacts (Fig. 15).
EXACT_LOGIT = 10.0  # logit magnitude of the oracle masks; any value gives the same cosine similarities


def prompt_points(height, width, prompt_grid):
    """(rows, cols) (M,) of a prompt_grid x prompt_grid grid of points at cell centres, as SAM places them."""
    rows = ((torch.arange(prompt_grid) + 0.5) * height / prompt_grid).long()
    cols = ((torch.arange(prompt_grid) + 0.5) * width / prompt_grid).long()
    return rows.repeat_interleave(prompt_grid), cols.repeat(prompt_grid)


def exact_mask_tokens(instance_maps, prompt_grid, grid_h, grid_w, patch_size):
    """The oracle's mask_logit_tokens: instance maps (B, H, W) (0 background, k object k) -> (B, gh*gw, M): prompt
    m answered with the exact mask of the region under its point, +-EXACT_LOGIT; computed per region, not per
    prompt (averaging over a patch is linear), at a fraction of the memory."""
    rows, cols = prompt_points(*instance_maps.shape[-2:], prompt_grid)
    region = instance_maps[:, rows, cols]  # (B, M)
    crop = instance_maps[:, : grid_h * patch_size, : grid_w * patch_size]
    one_hot = F.one_hot(crop.long(), int(instance_maps.max()) + 1).permute(0, 3, 1, 2).float()  # (B, R, H, W)
    inside = F.avg_pool2d(one_hot, patch_size).flatten(2)  # (B, R, gh*gw): fraction of each patch per region
    inside = inside.gather(1, region[:, :, None].long().expand(-1, -1, inside.shape[-1]))  # (B, M, gh*gw)
    return ((inside * 2 - 1) * EXACT_LOGIT).transpose(1, 2)


def mask_logit_tokens(mask_logits, image_size, patch_size):
    """Mask logits (B, M, h, w) of images of image_size (H, W) -> one feature per patch token (B, gh*gw, M):
    resized to the image (B.3.1; §5.2: mask logits are "robust to interpolation"), averaged over each patch."""
    if tuple(mask_logits.shape[-2:]) != tuple(image_size):
        mask_logits = F.interpolate(mask_logits, image_size, mode="bilinear", align_corners=False, antialias=True)
    grid_h, grid_w = image_size[0] // patch_size, image_size[1] // patch_size
    pooled = F.avg_pool2d(mask_logits[..., : grid_h * patch_size, : grid_w * patch_size], patch_size)
    return pooled.flatten(2).transpose(1, 2)  # (B, M, gh, gw) -> (B, gh*gw, M)


# ---------------------------------------------------------------------------------------------------------
# Data: (set_epoch, make_loader) pairs for data.epochs (an epoch's stream is a function of (seed, rank, epoch)).
# Scenes are rendered once and augmented per step with Tab. 21's colour jitter and flip, applied to image and
# instance map together so the oracle masks stay exact (its aspect-ratio jitter would resample the masks).
TRAIN_SCENE_SEED = 7919  # added to --seed (evaluate.py's scenes have string seeds): no training scene is probed


def render_scenes(num_scenes, size, seed, rank=0, world_size=1):
    """Scenes rank, rank + world_size, ... -> images (n, 3, S, S), instance maps (n, S, S) uint8."""
    scenes = data.ComposedScenes(num_scenes=num_scenes, size=size, seed=seed)
    images, maps = [], []
    for index in tqdm(range(rank, num_scenes, world_size), desc="rendering scenes", disable=rank != 0):
        scene = scenes[index]
        ids = torch.arange(1, scene["instance_masks"].shape[0] + 1)
        maps.append((scene["instance_masks"] * ids[:, None, None]).sum(0).to(torch.uint8))  # visible: disjoint
        images.append(scene["image"])
    return torch.stack(images), torch.stack(maps)


def scene_loader(cfg, batch_size, rank, world_size):
    """(set_epoch, make_loader) of (images, instance maps) batches of this process's scenes, from batch `skip`."""
    images, maps = render_scenes(cfg.num_scenes, cfg.resolution, cfg.seed + TRAIN_SCENE_SEED, rank, world_size)

    def make_loader(epoch, skip):
        order = torch.randperm(images.shape[0], generator=data.item_generator(cfg.seed, "spatial", rank, epoch))
        chosen = (order[first : first + batch_size] for first in range(skip * batch_size,
                                                                      len(order) - batch_size + 1, batch_size))
        return ((images[c], maps[c].long()) for c in chosen), True
    return (lambda epoch: None), make_loader


def shard_loader(cfg, batch_size, rank, world_size):
    """(set_epoch, make_loader) of (images, None) batches from tar shards, Tab. 21's colour jitter and flip."""
    augment = data.AugmentConfig(crop_scale=(1.0, 1.0), brightness=cfg.brightness, saturation=cfg.saturation,
                                 hflip_prob=cfg.hflip_prob)
    shards = data.TarShards(cfg.shards, transform=data.make_train_transform(cfg.resolution, augment),
                            image_size=cfg.resolution, shuffle_buffer=256, seed=cfg.seed, rank=rank,
                            world_size=world_size)
    loader = torch.utils.data.DataLoader(shards, batch_size=batch_size, collate_fn=data.collate_image_text,
                                         drop_last=True)
    return shards.set_epoch, lambda epoch, skip: ((None if b is None else (b[0], None) for b in loader), False)


def augment_batch(images, instance_maps, cfg, generator):
    """Per-image hflip (image and map together), brightness then saturation jitter (data.train_augment's
    formulas). images (B, 3, H, W) in [-1, 1], instance_maps (B, H, W)."""
    batch = images.shape[0]
    jitter = lambda strength: 1 + strength * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)  # noqa: E731
    flip = torch.rand(batch, generator=generator) < cfg.hflip_prob
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    instance_maps = torch.where(flip[:, None, None], instance_maps.flip(-1), instance_maps)
    pixels = (images.add(1).div(2) * jitter(cfg.brightness)).clamp(0, 1)
    grey = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2])[:, None]
    pixels = (grey + jitter(cfg.saturation) * (pixels - grey)).clamp(0, 1)
    return pixels.mul(2).sub(1), instance_maps


def block_mask(batch, grid_h, grid_w, ratio, block, generator):
    """The student's input mask (MaskFeat, Tab. 21): (B, gh, gw) bool, True on round(ratio * blocks) random
    blocks of block x block tokens. A masked patch enters as a zero embedding plus its position (§5.2)."""
    blocks_h, blocks_w = math.ceil(grid_h / block), math.ceil(grid_w / block)
    num_blocks = blocks_h * blocks_w
    order = torch.rand(batch, num_blocks, generator=generator).argsort(dim=1)
    masked = torch.zeros(batch, num_blocks, dtype=torch.bool).scatter_(1, order[:, : round(ratio * num_blocks)], True)
    masked = masked.view(batch, blocks_h, blocks_w).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return masked[:, :grid_h, :grid_w]


# ---------------------------------------------------------------------------------------------------------
# Losses (Appendix B.3.1).
def self_distillation_loss(student_tokens, teacher_tokens):
    """Eq. 2 over all tokens. The paper writes "minimize cosine similarity"; it means maximise it: 1 - cos,
    the gradient of -cos, 0 at a perfect match. (B, N, D), (B, N, D) -> scalar."""
    return (1 - F.cosine_similarity(student_tokens, teacher_tokens, dim=-1)).mean()


def pairwise_cosine(tokens):
    """(B, N, D) -> (B, N, N) cosine similarity of every token pair: the "spatial correspondence map"."""
    tokens = F.normalize(tokens, dim=-1)
    return tokens @ tokens.transpose(1, 2)


def correspondence_target(mask_features, temperature):
    """Eq. 3's target: pairwise cosine x of the mask features (B, N, M) sharpened to exp(t (x - 1)) (B.3.1, t = 20
    in Tab. 22): 1 for tokens the same masks select, ~0 otherwise. temperature 0 = the plain cosine."""
    similarity = pairwise_cosine(mask_features)
    return torch.exp(temperature * (similarity - 1)) if temperature else similarity


def correspondence_loss(student_tokens, target_similarity):
    """Eq. 3: mean over the N x N token pairs of (student pairwise cosine - target)^2. (B, N, D), (B, N, N)."""
    return (pairwise_cosine(student_tokens) - target_similarity).square().mean()


def alignment_losses(student, teacher, images, mask_features, cfg, teacher_layer, token_mask=None):
    """{"core": Eq. 2, "loc": Eq. 3} for one batch, over all tokens, masked or not. images (B, 3, H, W) as the
    teachers see them; token_mask (B, gh, gw): masked for the student; mask_features (B, gh*gw, M)."""
    with torch.no_grad():
        teacher_tokens = teacher.forward_features(images, layer_idx=teacher_layer).float()  # (B, N, D)
        target = correspondence_target(mask_features, cfg.mask_temperature)  # (B, gh*gw, gh*gw)
    student_tokens = student(images, patch_mask=None if token_mask is None else token_mask.flatten(1)).float()
    patch_tokens = student_tokens[:, 1:] if teacher.use_cls_token else student_tokens  # masks: patches only
    return {"core": self_distillation_loss(student_tokens, teacher_tokens),
            "loc": correspondence_loss(patch_tokens, target)}


def train(cfg, checkpoint, rank=0, world_size=1, device=torch.device("cpu")):
    """Align a core checkpoint: (student, teacher, teacher_layer, history). DDP when world_size > 1; cfg.resume
    continues the newest cfg.checkpoint_every checkpoint exactly (the uninterrupted run's losses and weights)."""
    try:  # stored in our checkpoints; an official file's from its name
        vision_cfg = pe_model.checkpoint_config(checkpoint, cfg.model or None, "--checkpoint")["vision_cfg"]
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from None
    patch, depth = vision_cfg["patch_size"], vision_cfg["layers"]
    cfg.resolution = cfg.resolution or default_resolution(vision_cfg)
    teacher_layer = cfg.teacher_layer if cfg.teacher_layer is not None else default_teacher_layer(depth)
    if not -depth <= teacher_layer < depth:
        raise SystemExit(f"--teacher_layer={teacher_layer}: the core has {depth} layers")
    if cfg.batch_size % world_size:
        raise SystemExit(f"--batch_size={cfg.batch_size} does not split over {world_size} processes")
    if cfg.shards and not cfg.mask_source:
        raise SystemExit("--shards needs --mask_source: the offline stand-in only knows the composed scenes' masks")
    mask_source = training.load_plugin(cfg.mask_source, "mask_source")() if cfg.mask_source else None
    torch.manual_seed(cfg.seed)
    teacher, student = (tower.to(device) for tower in build_teacher_and_student(checkpoint, cfg, vision_cfg))
    # Tab. 21 gives no decay shape: cosine, as PE-core pretraining
    optimizer = training.build_optimizer(student, "lamb", cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    generator = data.item_generator(cfg.seed, "spatial-masks", rank)
    resume_from, blob, position = (training.resume_latest(cfg.out_dir, "spatial_step_*.pt", student, student, optimizer,
                                                          rank, world_size) if cfg.resume else (None, None, (0, 0)))
    if resume_from:  # before DDP wraps the student: DDP starts every rank from rank 0's weights
        if len(blob.get("mask_generator", ())) != world_size:
            raise SystemExit(f"{resume_from}: not an align_spatial.py checkpoint of {world_size} process(es)")
        # a copy: Generator.set_state reads a row view from its storage's start (rank 1's row would crash)
        generator.set_state(blob["mask_generator"][rank].clone())
    start_step, history = (int(blob["step"]), list(blob["history"])) if resume_from else (0, [])
    if cfg.resume and rank == 0:
        print(f"resuming at step {start_step} from {resume_from}" if resume_from else
              f"--resume: no spatial_step_*.pt in {cfg.out_dir}, starting from {checkpoint}")
    model = training.wrap_for_training(student, device, world_size)

    loaders = (shard_loader if cfg.shards else scene_loader)(cfg, cfg.batch_size // world_size, rank, world_size)
    batches = data.epochs(*loaders, position, "align_spatial")

    grid = cfg.resolution // patch
    log = training.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step if resume_from else None,
                              enabled=rank == 0)
    progress = tqdm(range(start_step + 1, cfg.max_steps + 1), desc="spatial alignment", disable=rank != 0,
                    initial=start_step, total=cfg.max_steps)
    model.train()
    for step in progress:
        (images, instance_maps), position = next(batches)
        if instance_maps is not None:
            images, instance_maps = augment_batch(images, instance_maps, cfg, generator)
        token_mask = block_mask(images.shape[0], grid, grid, cfg.mask_ratio, cfg.mask_size, generator)
        images, token_mask = images.to(device), token_mask.to(device)
        with torch.no_grad():  # teacher 2's features per patch
            mask_features = (exact_mask_tokens(instance_maps.to(device), cfg.prompt_grid, grid, grid, patch)
                             if mask_source is None else
                             mask_logit_tokens(mask_source(images).float(), images.shape[-2:], patch))
        training.set_lr(optimizer, training.lr_at(step - 1, cfg.max_steps, cfg.lr, cfg.warmup_steps))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = alignment_losses(model, teacher, images, mask_features, cfg, teacher_layer, token_mask)
        loss = cfg.core_loss_weight * losses["core"] + cfg.loc_loss_weight * losses["loc"]
        logged = torch.stack([losses["core"], losses["loc"]]).detach()
        if world_size > 1:  # the mean over processes (DDP applies that mean's gradient); every rank sees a NaN
            dist.all_reduce(logged)
        core, loc = (logged / world_size).tolist()
        if not math.isfinite(core + loc):
            raise SystemExit(f"step {step}: the loss is {core + loc}; lower --lr or check the mask source")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": cfg.core_loss_weight * core + cfg.loc_loss_weight * loc, "core": core,
                  "loc": loc, "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        progress.set_postfix(core=f"{core:.4f}", loc=f"{loc:.4f}", lr=f"{record['lr']:.1e}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.log(record)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            training.save_training_checkpoint(
                os.path.join(cfg.out_dir, f"spatial_step_{step:06d}.pt"), student, student, optimizer, step, position,
                world_size, {"mask_generator": torch.stack(training.gather_per_rank(generator.get_state(), world_size)),
                             "history": history, "train_config": asdict(cfg), "teacher_layer": teacher_layer})
            if rank == 0:
                training.prune_checkpoints(cfg.out_dir, 1, "spatial_step_*.pt")
    return student.eval(), teacher, teacher_layer, history


# ---------------------------------------------------------------------------------------------------------
# Evaluation: the aligned tower's LAST layer should reach the core's BEST layer on dense tasks (§5.2, Fig. 16,
# Tab. 13). evaluate.py probes every layer of both, at the same resolution on the same held-out scenes.
EVALUATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate.py")


def dense_probes(cfg, towers, dense_size):
    """{name: {"segmentation": entry, "depth": entry}} (evaluate.py's entries: per_layer, best, best_layer, last)
    from `evaluate.py --layerwise` on each (name, checkpoint, model name); None without evaluate.py."""
    if not os.path.isfile(EVALUATE):
        print(f"--eval: no {EVALUATE}, so no dense probes (copy evaluate.py beside this file, or --eval=false)")
        return None
    scores = {}
    for name, checkpoint, model in towers:
        out_dir = os.path.join(cfg.out_dir, "eval", name)
        # evaluate.py extracts features batch_size // 2 images at a time: cfg.batch_size, as the stage trains
        command = [sys.executable, EVALUATE, "--layerwise", f"--checkpoint={checkpoint}", f"--out_dir={out_dir}",
                   f"--num_scenes={cfg.eval_scenes}", f"--dense_size={dense_size}", f"--seed={cfg.seed}",
                   f"--batch_size={2 * cfg.batch_size}", *([f"--model={model}"] if model else []),
                   *shlex.split(cfg.eval_options)]
        print("$ " + shlex.join(command), flush=True)
        if subprocess.run(command).returncode:
            raise SystemExit(f"evaluate.py failed on {checkpoint} (command above)")
        with open(os.path.join(out_dir, "results.json")) as f:
            tasks = json.load(f)["layerwise"]["tasks"]
        scores[name] = {task: tasks[task] for task in ("segmentation", "depth")}
    return scores


def score_table(scores):
    """The core's last and best layers beside the aligned tower's last layer, as a markdown table."""
    cell = lambda entry, key, digits: f"{entry[key]:.{digits}f} (layer {entry[key + '_layer']})"  # noqa: E731
    rows = [[f"{task}: {metric}"] + [cell(scores[name][task], key, digits)
                                     for name, key in (("core", "last"), ("core", "best"), ("spatial", "last"))]
            for task, metric, digits in (("segmentation", "mIoU % (higher is better)", 1),
                                         ("depth", "RMSE (lower is better)", 3))]
    return training.markdown_table(["probe", "core last layer", "core best layer", "spatial last layer"], rows)


def main(argv=None):
    cfg = training.parse_config(SpatialConfig(), argv, RULES)
    rank, world_size, _, device = training.setup_distributed()
    training.remove_partial_writes(cfg.out_dir, rank)  # a killed run's half-written files
    checkpoint = training.resolve_checkpoint(cfg.checkpoint or None)
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
        export = dict(step=cfg.max_steps, train_config=asdict(cfg), teacher_layer=teacher_layer)
        pe_model.export_tower(student, path, metrics=metrics, **export)
        print(f"teacher layer {teacher_layer} (0-based) of {teacher.layers}, {cfg.resolution}px, {cfg.max_steps} "
              f"steps in {train_seconds:.0f}s; mean of the first / last {window} steps: L_core {first['core']:.4f} "
              f"-> {last['core']:.4f}, L_loc {first['loc']:.4f} -> {last['loc']:.4f}\nwrote {path} "
              "(pe_model.load_model rebuilds the PE-Spatial-style tower)")
        if cfg.eval:
            dense_size = cfg.eval_size or max(cfg.resolution, 16 * student.patch_size)  # evaluate.py's default
            scores = dense_probes(cfg, [("core", checkpoint, cfg.model), ("spatial", path, "")], dense_size)
            if scores is not None:
                pe_model.export_tower(student, path, metrics={**metrics, "dense_probes": scores}, **export)
                training.write_json(os.path.join(cfg.out_dir, "dense_probes.json"), scores, indent=1)
                print(score_table(scores))
    if world_size > 1:
        training.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
