"""The machinery every training stage shares, written once: --field=value configs, the default PE-core checkpoint,
torchrun / DDP / FSDP, LAMB, the warmup + cosine schedule, RNG state, the resumable checkpoint, the metrics log and
the reports. Nothing here knows a stage."""

import glob
import importlib
import json
import math
import os
import sys
import typing
from dataclasses import fields

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

import pe_model


# ---------------------------------------------------------------------------------------------------------
# Configs: every field of a stage's config dataclass is an option, --field=value (a bare --flag sets a bool).
BOOLEANS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def _parse_value(text, kind, name):
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if text.lower() in ("none", "null"):
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if kind is bool:
            return BOOLEANS[text.lower()]
        if origin in (tuple, list):  # comma-separated: --resolution_stages=0.25:98,0.75:224
            values = [_parse_value(v, args[0] if args else str, name) for v in text.split(",") if v != ""]
            return tuple(values) if origin is tuple else values
        return kind(text) if kind in (int, float) else text
    except (ValueError, TypeError, KeyError):
        raise SystemExit(f"--{name}={text}: not a valid {getattr(kind, '__name__', kind)}") from None


def parse_config(config, argv=None, rules=None):
    """Set the fields of a config dataclass instance from --field=value arguments, then check_config it."""
    hints, names = typing.get_type_hints(type(config)), [f.name for f in fields(config)]
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: options are --field=value")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in names:
            raise SystemExit(f"unknown option --{name}; the options are: " + " ".join(f"--{n}" for n in names))
        if not has_value and hints[name] is not bool:
            raise SystemExit(f"--{name} needs a value: --{name}=...")
        setattr(config, name, _parse_value(text if has_value else "true", hints[name], name))
    return check_config(config, rules)


def positive(*names):
    """Rules for the fields that must be >= 1: the sizes and counts of a stage that 0 would break."""
    return {name: (lambda v: v >= 1, "an integer >= 1") for name in names}


# Values no run can use: field -> (test, what is allowed), checked at start for every stage whose config has the
# field; any other number must be finite and >= 0. A stage passes its own as parse_config(..., rules=).
RULES = {
    "global_batch": (lambda v: v >= 2, "an integer >= 2 (a contrastive loss needs at least one negative)"),
    **positive("batch_size", "max_steps", "eval_batch", "eval_batch_size", "num_frames", "log_every"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "warmup_fraction": (lambda v: v < 1, "a fraction of max_steps in [0, 1)"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optimizer": (lambda v: v in ("lamb", "adamw"), "lamb or adamw"),
    "lr_schedule": (lambda v: v in ("cosine", "constant"), "cosine or constant"),
    "device": (lambda v: v in ("", "auto") or torch.device(v), "auto, cpu, cuda or cuda:N"),
    "model": (lambda v: not v or v in pe_model.VISION_CONFIGS or os.path.isfile(v),
              "an official name (" + ", ".join(pe_model.VISION_CONFIGS) + ") or a JSON config file"),
    **dict.fromkeys(("hflip_prob", "mask_fraction", "mask_ratio", "drop_path", "brightness", "saturation",
                     "embedded_refined_fraction"), (lambda v: 0 <= v <= 1, "in [0, 1]")),
}


def check_config(config, rules=None):
    """Stop with one line naming the first field whose value no run can use, its value and what is allowed."""
    rules = {**RULES, **(rules or {})}
    for field in fields(config):
        value = getattr(config, field.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        kind = "an integer" if all(isinstance(x, int) for x in numbers) else "a finite number"
        test, allowed = rules.get(field.name, (lambda v: all(x >= 0 for x in numbers), f"{kind} >= 0"))
        try:
            ok = value is None or (all(map(math.isfinite, numbers)) and test(value))
        except (ValueError, TypeError, KeyError, RuntimeError):  # a rule that raises (a malformed pattern) fails
            ok = False
        if not ok:
            raise SystemExit(f"--{field.name}={','.join(map(str, values))}: must be {allowed}")
    return config


def load_plugin(spec, option):
    """`module:function` (a plug-in option, e.g. --captioner=align_lang:make_captioner) -> the function."""
    module, _, function = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as error:
        raise SystemExit(f"--{option}={spec}: cannot load module:function ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# The PE-core checkpoint a stage starts from, and what it was trained on.
DEFAULT_CORE_DIR = "out/clip"  # where `python train_clip.py` writes with its default settings


def checkpoints(out_dir, pattern="*.pt"):
    """The files of out_dir whose names match `pattern`, oldest first (latest_checkpoint: the newest or None)."""
    return sorted((p for p in glob.glob(os.path.join(out_dir, pattern)) if os.path.isfile(p)), key=os.path.getmtime)


def latest_checkpoint(out_dir=DEFAULT_CORE_DIR, pattern="*.pt"):
    return (checkpoints(out_dir, pattern) or [None])[-1]


def resolve_checkpoint(path=None):
    """`path` (a file, or hf:REPO[/FILE] or an official name from the hub), else the newest default checkpoint."""
    if path and not os.path.isfile(path):
        if not path.startswith("hf:") and path not in pe_model.VISION_CONFIGS:
            raise SystemExit(f"--checkpoint={path}: no such file")
        try:
            return pe_model.hub_download(path.removeprefix("hf:"))
        except Exception as error:  # no huggingface_hub, offline without the file, no such repo
            raise SystemExit(f"--checkpoint={path}: {str(error).splitlines()[0]}") from error
    found = path or latest_checkpoint()
    if found is None:
        raise SystemExit(f"no checkpoint given and none found in {DEFAULT_CORE_DIR}/: run `python train_clip.py` first "
                         "(minutes on CPU), or pass --checkpoint=PATH (ours, or an official .pt with --model=NAME)")
    return found


def checkpoint_train_config(path):
    """The train_config that train_clip.py stored in checkpoint `path`, or {}; memory-mapped (no weight is read)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be mapped, and holds no config; nor does a broken one
        return {}
    return dict(blob.get("train_config") or {}) if isinstance(blob, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Distributed: torchrun's environment variables alone switch it on (as in nanoGPT).
def setup_distributed():
    """(rank, world_size, local_rank, device); under torchrun, joins the process group (NCCL on GPUs, gloo)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank, device


def barrier():
    dist.barrier() if dist.is_initialized() else None


def gather_per_rank(value, world_size):
    """[value of rank 0, value of rank 1, ...] on every rank (any picklable value)."""
    gathered = [value] * world_size
    if world_size > 1:
        dist.all_gather_object(gathered, value)
    return gathered


def wrap_for_training(module, device, world_size, fsdp=False, replicated=()):
    """DDP, or FSDP2 (each block of any `resblocks`, then the rest; `replicated` parameters, e.g. a 0-dim logit scale,
    stay whole: the caller averages their gradients) when world_size > 1. Build the optimizer after it (DTensors)."""
    if world_size == 1:
        return module
    if not fsdp:
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world_size,))
    for block in [b for name, child in module.named_modules() if name.endswith("resblocks") for b in child]:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, ignored_params=set(replicated))
    return module


# ---------------------------------------------------------------------------------------------------------
# Optimizer. §2.1 switches from AdamW to LAMB (You et al. 2020): Adam whose update of each tensor is rescaled by the
# trust ratio ||w|| / ||update||, so every layer moves by about lr x its own norm, allowing a higher lr. Neither decay
# (nothing pulls them to 0) nor trust ratio (their norm is no scale) for 0/1-d, position/class embeddings and probe:
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "probe", "logit_scale")


def param_groups(model, weight_decay):
    """Two optimizer groups: weights (decay + trust ratio) and the rest (neither)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "trust_ratio": True},
            {"params": no_decay, "weight_decay": 0.0, "trust_ratio": False}]


class LAMB(torch.optim.Optimizer):
    """LAMB with bias-corrected Adam moments and decoupled weight decay; for each parameter w with gradient g
    at step t:
        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        r = ||w|| / ||u||  (1 where either norm is 0, or the group has trust_ratio=False)
        w = w - lr * r * u"""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0, trust_ratio=True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      trust_ratio=trust_ratio))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in (p for p in group["params"] if p.grad is not None):
                state = self.state[param]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                step, exp_avg, exp_avg_sq = state["step"].item(), state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1**step)).div_(denominator)
                if group["weight_decay"]:
                    update.add_(param, alpha=group["weight_decay"])
                ratio = 1.0
                if group["trust_ratio"]:  # whole-tensor norms (a sharded DTensor's reduced over its shards)
                    norms = [torch.linalg.vector_norm(t) for t in (param, update)]
                    weight_norm, update_norm = (n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms)
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                    if hasattr(update, "full_tensor"):  # a DTensor update: scale it by a plain number
                        ratio = ratio.item()
                param.sub_(update.mul_(ratio * group["lr"]))


def build_optimizer(model, optimizer="lamb", lr=2e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.05):
    """LAMB or AdamW (RULES["optimizer"]) over param_groups(model, weight_decay): the same decay exclusions."""
    return (torch.optim.AdamW if optimizer == "adamw" else LAMB)(param_groups(model, weight_decay), lr=lr,
                                                                  betas=tuple(betas), eps=eps)


def lr_at(step, max_steps, base_lr, warmup_steps, min_lr=0.0, schedule="cosine"):
    """The lr at `step` (from 0): linear warmup to base_lr, then cosine to min_lr at max_steps (or constant)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------------------
# Resumable checkpoints: {"model" (official layout), "config", "optimizer", "step", "rng", "data_position" (a row
# per rank), the stage's extras}, written atomically by rank 0, in tensors and plain data (weights_only=True reads).
def rng_state():
    """The torch and CUDA RNG states (drop path's); no data randomness is global (data.item_generator seeds items)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_training_checkpoint(path, module, model, optimizer, step, position=(), world_size=1, extra=None):
    """Checkpoint `model` (inside the wrapped `module`) and each rank's data `position` (ints). Every rank calls it."""
    positions = gather_per_rank([int(v) for v in position], world_size)
    if isinstance(module, FSDPModule):
        model_state, optimizer_state = get_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model_state = {k.removeprefix("model."): v for k, v in model_state.items()}
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    bad = [k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # never write (nor later resume from) a blown-up model: the last good checkpoint stays the newest
        raise SystemExit(f"step {step}: {len(bad)} weight tensors are not finite ({', '.join(bad[:3])}, ...); "
                         f"{path} is not written. Lower the learning rate, or resume from the last checkpoint")
    if not dist.is_initialized() or dist.get_rank() == 0:
        pe_model.save_checkpoint({"model": model_state, "config": pe_model.get_config(model), "step": step,
                                  "optimizer": optimizer_state, "rng": rng_state(),
                                  "data_position": torch.tensor(positions), **(extra or {})}, path)


def load_training_checkpoint(path, module, model, optimizer=None, rank=0, world_size=1):
    """Restore weights, optimizer and RNG -> (checkpoint dict, this rank's data position); ValueError if unreadable."""
    blob = pe_model.read_checkpoint_file(path)
    if not isinstance(blob, dict) or "model" not in blob or "step" not in blob or "rng" not in blob:
        raise ValueError(f"{path}: not a resumable training checkpoint (no 'model', 'step' and 'rng')")
    positions = torch.atleast_2d(blob.get("data_position", torch.zeros(1, 0, dtype=torch.long)))  # (ranks, ints)
    if len(positions) not in (1, world_size):  # one row: a position that every rank shares (train_clip)
        raise SystemExit(f"{path}: written by {len(positions)} process(es); resume it with as many (now {world_size})")
    # before any weight is touched, the configs' fields ("vision_cfg.width") that differ, both ways
    saved, built = ({f"{k}.{j}".rstrip("."): w for k, v in config.items()
                     for j, w in (v.items() if isinstance(v, dict) else [("", v)])}
                    for config in (blob.get("config") or {}, pe_model.get_config(model)))
    difference = [f"{k}={saved.get(k)} (this run: {built.get(k)})" for k in sorted(saved | built)
                  if saved and saved.get(k) != built.get(k)]
    if difference:
        raise SystemExit(f"{path}: a checkpoint of another model: {', '.join(difference)}")
    if isinstance(module, FSDPModule):
        set_state_dict(module, optimizer, model_state_dict={f"model.{k}": v for k, v in blob["model"].items()},
                       optim_state_dict=blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        try:
            pe_model.load_checkpoint(model, blob["model"], name=path)
            if optimizer is not None:
                optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError) as error:  # CheckpointMismatchError is a ValueError
            raise SystemExit(f"{path}: does not fit this run's model and optimizer: {error}") from None
    set_rng_state(blob["rng"])
    return blob, tuple(int(v) for v in positions[rank if len(positions) > 1 else 0])


def resume_latest(out_dir, pattern, module, model, optimizer=None, rank=0, world_size=1, start=(0, 0)):
    """--resume: the newest readable `pattern` checkpoint of out_dir loaded -> (path, dict, position), else
    (None, None, start); an unreadable one (cut by a full disk) is named and passed over."""
    for path in reversed(checkpoints(out_dir, pattern)):
        try:
            return (path, *load_training_checkpoint(path, module, model, optimizer, rank, world_size))
        except ValueError as error:
            if rank == 0:
                print(f"warning: {error}; resuming from the previous checkpoint instead")
    return None, None, start


def remove_partial_writes(out_dir, rank=0):
    """Delete what killed writes left in out_dir (atomic_write's .NAME.tmpPID); call on every rank at start."""
    if rank == 0:
        for path in glob.glob(os.path.join(glob.escape(out_dir), "**", ".*.tmp*"), recursive=True):
            os.remove(path)
            print(f"removed {path}: a partial write of a killed run")
    barrier()


def prune_checkpoints(out_dir, keep, pattern="step_*.pt"):
    """Delete all but the `keep` newest checkpoints in out_dir whose names match `pattern` (call on rank 0)."""
    for path in checkpoints(out_dir, pattern)[: -keep or None]:
        os.remove(path)


# ---------------------------------------------------------------------------------------------------------
# Metrics and reports
class MetricsLog:
    """metrics.jsonl, a JSON record a line, from rank 0 (enabled); a resumed run keeps its lines up to its step."""

    def __init__(self, path, resumed_step=None, enabled=True):
        self.path, self.enabled, kept = path, enabled, []
        if enabled and resumed_step is not None and os.path.exists(path):
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        if json.loads(line).get("step", 0) <= resumed_step:
                            kept.append(line)
                    except json.JSONDecodeError:  # a line cut by a full disk or a power loss
                        print(f"warning: {path} line {number} is not a whole JSON record (a cut write); dropped")
        if enabled:
            pe_model.atomic_write(path, "".join(kept))

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def write_json(path, obj, indent=2):
    """obj as strict JSON at path, atomically: NaN (a probe with nothing to score) and infinities -> null."""
    strict = json.loads(json.dumps(obj), parse_constant=lambda constant: None)
    pe_model.atomic_write(path, json.dumps(strict, indent=indent, ensure_ascii=False))


def fmt(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header, rows, digits=1):
    """A markdown table: header [names], rows [[cells]]; floats shown with `digits` decimals, None as n/a."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows])
