"""
align_lang.py: language alignment (PE lang, paper §4): a PE-core vision tower cut at its best language layer,
a projector and a Llama-style decoder, trained with next-token prediction on answers, as the official PLM
set-up does (pe_architecture.md §8). The aligned tower is exported alone in the official PE-Lang layout.

    python align_lang.py                                     # embedded emoji QA on CPU (newest out/clip checkpoint)
    python align_lang.py --checkpoint=out/clip/final.pt --vision_layers=4 --out_dir=out/lang_l4
    python align_lang.py --checkpoint=PE-Core-L14-336.pt --model=PE-Core-L14-336 --llama_dir=Llama3.2-1B \
        --llama_rope_scaling_factor=32 --train_jsonl=train.jsonl --val_jsonl=val.jsonl --device=cuda
    python evaluate.py --vqa --vqa_checkpoint=out/lang/vlm.pt   # held-out answer accuracy again (vqa_accuracy)
    python -m pytest -q tests/test_align_lang.py

Pieces, in the order they run:
  * Vision: the PE-core checkpoint's first N blocks (--vision_layers; default all but the last, as PE-Lang
    keeps 23 of L's 24 blocks and 47 of G's 50), patch tokens without the class token, no ln_post, pooling
    or projection. Stage 1 uses it frozen and as pretrained; stage 2 unfreezes it and, as the official
    stage 2 does, adds LayerScale (gamma 0.1, new parameters: PE core has none) and drop path 0.1.
  * Projector: Linear(W -> d) -> GELU -> Linear(d -> d), then 2x2 average pooling of the token grid.
  * LM: a Llama decoder written below (RMSNorm, RoPE, SwiGLU, causal GQA attention) that reads and writes
    Meta's original checkpoint format (consolidated.00.pth + params.json): `load_llama`, `save_llama`.
  * Training: stage 1 trains the projector only (vision and LM frozen; the frozen tower's tokens are computed
    once); stage 2 trains everything. The loss is next-token cross-entropy on the answer tokens only.
    Optimizer AdamW (the official one), linear warmup then cosine, per stage. Single process.
  * Outputs in --out_dir: vlm.pt (the whole model; `load_vlm`), pe_lang_tower.pt (the aligned tower as a
    state_dict in the official PE-Lang layout + its config: `pe_model.load_model(path)` rebuilds it) and
    pe_lang_tower.json (the config alone), metrics.json and metrics.md (held-out accuracy per stage and question
    type). `generate` decodes greedily, `vqa_accuracy` scores.

No pretrained LM exists offline, so by default the LM is trained here from scratch, on CLIP BPE tokens
(pe_model.get_tokenizer()) restricted to the ids its training texts use (ClipTokenizer). Stage 1 only makes
sense with an LM that already knows the language (a frozen random LM cannot be steered by the projector alone),
so a from-scratch LM first gets a short text-only "stage 0": the same questions and answers, with a text
description of the image ("3 emojis: a sheep, a seal and a hook.") where the image tokens will later be. It
stands in for Llama's pretraining and is skipped when --llama_dir gives a real one.

Data. Default: question answering on the embedded emoji data (data.py): single emoji (data.EmojiImageText:
"what is in the image?", "is there a dog face in the image?", "is it a sheep or a seal?", captions),
composed scenes (data.compose_scene: "how many emojis are there?") and emoji on a plain coloured background
("what colour is the background?"). Held-out images (the val renderings and scenes) and held-out phrasings
(the last phrasing of each question type is never trained on) are used for evaluation: exact match of the
greedy answer after normalisation (lower case, no punctuation or articles). Real data: JSONL files, one
{"image": path (relative to the file), "question": ..., "answer": ...} per line (--train_jsonl/--val_jsonl);
bad lines are skipped and counted.

Real Llama weights (e.g. Llama 3.2 1B from Meta, original format): --llama_dir=DIR loads params.json and
consolidated.00.pth, and the tokenizer.model beside them is read by Llama3Tokenizer (Llama 3's byte-level BPE,
written here: no tiktoken needed); the VLM checkpoint remembers the folder, so load_vlm finds the tokenizer
again. Llama 3.2 1B/3B need --llama_rope_scaling_factor=32 (their RoPE scaling factor is not in params.json).
An LM trained here with --lm_full_vocab and saved with `save_llama` loads back with the CLIP tokenizer as it is.
"""

import glob
import json
import math
import os
import re
import string
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import pe_model
from kernels.rope_attention import rope_apply
from train_clip import build_optimizer, lr_at


@dataclass
class LangConfig:
    checkpoint: str = ""  # PE-core checkpoint to start from; "" = the newest that `python train_clip.py` wrote
    model: str = ""  # official model name, for an official .pt (which stores no config): PE-Core-L14-336, ...
    out_dir: str = "out/lang"  # vlm.pt, pe_lang_tower.pt / .json, metrics.json
    device: str = "auto"  # auto = cuda if available, else cpu
    seed: int = 0
    # vision side (pe_architecture.md §8)
    vision_layers: int = 0  # keep blocks 0..N-1 of the core tower; 0 = all but the last (PE-Lang: 23/24, 47/50).
    #                         evaluate.py's best layer i (0-based block index) is --vision_layers=i+1
    pooling_ratio: int = 2  # r x r average pooling of the projected grid (PLM: 1 in stage 1, 2 later; one
    #                         value here, so the LM reads as many image tokens in both stages)
    ls_init_value: Optional[float] = 0.1  # LayerScale added to the tower in stage 2; none = no LayerScale
    drop_path: float = 0.1  # stochastic depth of the tower in stage 2
    # language model: a Llama-format checkpoint folder, or a small decoder trained from scratch
    llama_dir: str = ""  # folder with consolidated.00.pth + params.json + tokenizer.model (Meta's original format)
    llama_rope_scaling_factor: float = 0.0  # with use_scaled_rope: 0 = LlamaArgs' 8 (Llama 3.1); 32 for 3.2 1B/3B
    lm_dim: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2  # grouped-query attention: 2 key/value heads shared by 4 query heads
    lm_multiple_of: int = 32  # SwiGLU hidden size rounded up to a multiple of this (Meta's formula)
    lm_rope_theta: float = 500000.0  # Llama 3's RoPE base
    lm_full_vocab: bool = False  # all 49,408 CLIP ids rather than those of the training texts (see ClipTokenizer)
    # data: embedded emoji QA by default, JSONL files for real data
    train_jsonl: str = ""
    val_jsonl: str = ""
    num_classes: int = 20  # emoji classes of the embedded QA, spread over the core's training classes:
    class_pool: int = 0  # the class count the core was trained on; 0 = its checkpoint's (train_config), else 100
    train_images_per_class: int = 30  # single-emoji training images (data.EmojiImageText "train", epoch 0)
    val_images_per_class: int = 4  # held-out renderings (data.EmojiImageText "val")
    train_scenes: int = 300  # composed scenes with 1-4 emoji, for counting
    val_scenes: int = 60
    train_colour_images: int = 300  # an emoji on a plain background of a named colour
    val_colour_images: int = 60
    max_text_tokens: int = 64  # question + answer tokens; longer examples are cut and counted
    # training (AdamW, linear warmup then cosine to 10%, per stage)
    batch_size: int = 32
    lm_pretrain_steps: int = 300  # stage 0, text only, from-scratch LM only
    lr_lm_pretrain: float = 2e-3
    stage1_steps: int = 300  # projector only
    lr_stage1: float = 2e-3
    stage2_steps: int = 600  # everything
    lr_stage2: float = 5e-4
    warmup_steps: int = 30
    weight_decay: float = 0.05  # official PLM value
    grad_clip: float = 1.0
    # evaluation
    eval_batch_size: int = 64
    max_new_tokens: int = 24


# ---------------------------------------------------------------------------------------------------------
# The language model: Llama (Touvron et al. 2023; Llama 3, Dubey et al. 2024), with Meta's parameter names so
# that its original checkpoints load as they are: tok_embeddings, layers.{i}.attention.wq/wk/wv/wo,
# layers.{i}.feed_forward.w1/w2/w3, layers.{i}.attention_norm, layers.{i}.ffn_norm, norm, output.


@dataclass
class LlamaArgs:
    """The fields of Meta's params.json."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (no grouped-query attention)
    vocab_size: int = 49408
    multiple_of: int = 32
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 / 3.2 long-context frequency scaling
    rope_scaling_factor: float = 8.0  # not in Meta's params.json: 8 for Llama 3.1, 32 for Llama 3.2 1B/3B


PARAMS_IGNORED = ("max_seq_len", "max_batch_size")  # params.json fields with no effect on the weights' use


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32, as Meta's code does
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def llama_rope_angles(length, head_dim, theta, scaled=False, scale_factor=8.0, device=None):
    """(length, head_dim) angle table for rope_apply: position t x frequency theta^(-2i/head_dim), each angle
    twice, for the interleaved pairs (2i, 2i+1) of Meta's layout (its q/k weights expect exactly this pairing;
    the Hugging Face conversion permutes them into a half-split layout instead)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
    if scaled:  # Llama 3.1: keep high frequencies, divide low ones by the factor, blend in between
        low_freq_factor, high_freq_factor, old_context = 1.0, 4.0, 8192
        wavelength = 2 * math.pi / freqs
        smooth = ((old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
        freqs = (1 - smooth) * freqs / scale_factor + smooth * freqs
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs  # (L, head_dim/2)
    return angles.repeat_interleave(2, dim=-1).to(device)  # (L, head_dim)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        if args.dim % args.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"Llama: dim {args.dim}, n_heads {args.n_heads}, n_kv_heads {self.n_kv_heads} do not fit")
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, angles):
        batch, length, _ = x.shape
        # (B, L, H*hd) -> (B, H, L, hd)
        q = self.wq(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope_apply(q, angles), rope_apply(k, angles)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each k/v head serves n_heads/n_kv queries
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, hd)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden = 2/3 of 4 dim, times ffn_dim_multiplier, rounded up to a
    multiple of multiple_of (Meta's formula: Llama 3.2 1B gets 8192 for dim 2048)."""

    def __init__(self, args):
        super().__init__()
        hidden = int(2 * 4 * args.dim / 3)
        if args.ffn_dim_multiplier is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = args.multiple_of * math.ceil(hidden / args.multiple_of)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, angles):
        x = x + self.attention(self.attention_norm(x), angles)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # from-scratch init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2)
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(param, std=std)

    def forward_embeds(self, h):
        """Input embeddings (B, L, dim) -> final hidden states after the last norm (B, L, dim). Causal."""
        args = self.args
        angles = llama_rope_angles(h.shape[1], args.dim // args.n_heads, args.rope_theta, args.use_scaled_rope,
                                   args.rope_scaling_factor, h.device)
        for layer in self.layers:
            h = layer(h, angles)
        return self.norm(h)

    def forward(self, tokens):
        """Token ids (B, L) -> logits (B, L, vocab)."""
        return self.output(self.forward_embeds(self.tok_embeddings(tokens)))


def read_llama_params(path):
    """LlamaArgs from a params.json; an unknown field is an error naming it (it may change the architecture)."""
    with open(path) as f:
        params = json.load(f)
    known = {f.name for f in fields(LlamaArgs)}
    unknown = sorted(set(params) - known - set(PARAMS_IGNORED))
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; this decoder knows {sorted(known)}")
    return LlamaArgs(**{k: v for k, v in params.items() if k in known})


def load_llama(checkpoint_dir, rope_scaling_factor=None):
    """A Llama from Meta's original format: checkpoint_dir/params.json + consolidated.00.pth, read with
    torch.load(weights_only=True) and loaded strictly. Llama 2's params.json says vocab_size -1 (taken from
    the weights here). A checkpoint without output.weight (tied embeddings) gets tok_embeddings as output,
    said on stdout. Model-parallel checkpoints (several consolidated.*.pth, 70B and up) must be merged first.
    rope_scaling_factor overrides LlamaArgs' (set 32 for Llama 3.2 1B/3B)."""
    params_path = os.path.join(checkpoint_dir, "params.json")
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"--llama_dir={checkpoint_dir}: no params.json (Meta's original format has "
                                "params.json and consolidated.00.pth; Hugging Face folders are not read)")
    shards = sorted(glob.glob(os.path.join(checkpoint_dir, "consolidated.*.pth")))
    if len(shards) != 1:
        raise ValueError(f"--llama_dir={checkpoint_dir}: found {len(shards)} consolidated.*.pth files; one is "
                         "needed (merge model-parallel shards first)")
    args = read_llama_params(params_path)
    if rope_scaling_factor is not None:
        args.rope_scaling_factor = rope_scaling_factor
    state = pe_model.read_checkpoint_file(shards[0])
    state.pop("rope.freqs", None)  # the first Llama release stored its RoPE table; it is recomputed here
    if args.vocab_size <= 0:
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        print(f"{shards[0]}: no output.weight, using tok_embeddings.weight (tied embeddings)")
        state["output.weight"] = state["tok_embeddings.weight"]
    model = Llama(args)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{shards[0]} does not match {params_path}: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, wrong shape {wrong[:8]}")
    model.load_state_dict(state)  # strict; copies bf16 weights into the float32 parameters
    return model


def save_llama(model, checkpoint_dir):
    """Write `model` in Meta's original format: params.json + consolidated.00.pth (atomic writes)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    params = {k: v for k, v in asdict(model.args).items() if v is not None}
    if not params["use_scaled_rope"]:
        del params["use_scaled_rope"], params["rope_scaling_factor"]
    tmp = os.path.join(checkpoint_dir, ".params.json.tmp")
    with open(tmp, "w") as f:
        json.dump(params, f, indent=2)
    os.replace(tmp, os.path.join(checkpoint_dir, "params.json"))
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    pe_model.save_checkpoint(state, os.path.join(checkpoint_dir, "consolidated.00.pth"))


# ---------------------------------------------------------------------------------------------------------
# The vision side: a PE-core checkpoint cut to its first N blocks, in the layout of a PE-Lang tower.


def read_core_checkpoint(path, name=""):
    """(vision state_dict without the 'visual.' prefix, vision_cfg dict) of a PE-core checkpoint: ours (it
    stores its config) or an official .pt with its official name."""
    try:
        blob = pe_model.read_checkpoint_file(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--checkpoint={path}: {error}") from None
    config = blob.get("config") if isinstance(blob, dict) and isinstance(blob.get("config"), dict) else None
    if name:
        config = pe_model.model_config(name)
    if config is None:
        raise SystemExit(f"--checkpoint={path} stores no model config (an official file?): name it, e.g. "
                         "--model=PE-Core-L14-336")
    state = pe_model.read_state_dict(blob)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state, dict(config["vision_cfg"])


def build_vision_tower(state_dict, vision_cfg, layers, ls_init_value=None, drop_path=0.0, label="checkpoint"):
    """A PE-Lang-style tower: the first `layers` blocks of `vision_cfg`'s tower, no ln_post / pooling /
    projection, optional LayerScale and drop path; weights from `state_dict` (a core or lang tower).

    Loaded with pe_model's strict checks (truncate drops the deeper blocks, drop_head the head), with one
    deliberate exception: LayerScale gammas that the tower has and the checkpoint lacks are NEW parameters
    (the official stage 2 adds LayerScale to a core model that has none) and start at ls_init_value."""
    depth = sum(1 for k in state_dict if re.fullmatch(r"transformer\.resblocks\.\d+\.ln_1\.weight", k))
    if not 1 <= layers <= depth:
        raise SystemExit(f"--vision_layers={layers}: the checkpoint's tower has {depth} blocks (1..{depth})")
    cfg = dict(vision_cfg, layers=layers, ls_init_value=ls_init_value, drop_path=drop_path, pool_type="none",
               output_dim=None, use_ln_post=False)
    tower = pe_model.VisionTransformer(**{f.name: cfg[f.name] for f in fields(pe_model.PEConfig) if f.name in cfg})
    state = dict(state_dict)
    new_gammas = {k: v for k, v in tower.state_dict().items() if k.endswith(".gamma") and k not in state}
    state.update(new_gammas)  # the only keys allowed to be missing, set to their init value explicitly
    return pe_model.load_checkpoint(tower, state, strict=True, truncate=True, drop_head=True, name=label)


class MLPProjector(nn.Module):
    """Vision tokens (B, N, W) -> LM input embeddings (B, N / r^2, d): Linear -> GELU -> Linear, then r x r
    average pooling of the token grid (official MLPProjector, pooling_ratio r = 2 in PLM stages 2/3)."""

    def __init__(self, vision_width, lm_dim, pooling_ratio=2):
        super().__init__()
        self.pooling_ratio = pooling_ratio
        self.projector = nn.Sequential(nn.Linear(vision_width, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, tokens, grid_h, grid_w):
        x = self.projector(tokens)  # (B, gh*gw, W) -> (B, gh*gw, d)
        if self.pooling_ratio > 1:
            x = x.transpose(1, 2).unflatten(2, (grid_h, grid_w))  # (B, d, gh, gw)
            size = (max(1, grid_h // self.pooling_ratio), max(1, grid_w // self.pooling_ratio))
            x = F.adaptive_avg_pool2d(x, size).flatten(2).transpose(1, 2)  # (B, gh/r * gw/r, d)
        return x


class VLM(nn.Module):
    """Vision tower + projector + LM. The sequence is [BOS] [image tokens] [question] [answer] [EOS], as PLM
    places the image right after the begin-of-text token."""

    def __init__(self, vision, projector, lm):
        super().__init__()
        self.vision, self.projector, self.lm = vision, projector, lm

    def vision_tokens(self, images):
        """Images (B, 3, H, W) -> the tower's patch tokens (B, gh*gw, W): no class token, no ln_post."""
        return self.vision.forward_features(images, strip_cls_token=True)

    def encode_images(self, images, vision_tokens=None):
        """Images (B, 3, H, W) -> image embeddings for the LM (B, M, d), M = gh*gw / pooling_ratio^2.
        vision_tokens: the tower's tokens for these images if already computed (a frozen tower's are cached)."""
        tokens = self.vision_tokens(images) if vision_tokens is None else vision_tokens
        patch = self.vision.patch_size
        return self.projector(tokens, images.shape[-2] // patch, images.shape[-1] // patch)

    def hidden_states(self, input_ids, image_embeds=None):
        """Token ids (B, L) [+ image embeddings (B, M, d) placed after the first token] -> final hidden states
        (B, L, d) of the text positions: entry t has read input_ids[: t + 1] (and the image)."""
        embeds = self.lm.tok_embeddings(input_ids)  # (B, L, d)
        if image_embeds is None:
            return self.lm.forward_embeds(embeds)
        embeds = torch.cat([embeds[:, :1], image_embeds.to(embeds.dtype), embeds[:, 1:]], dim=1)  # (B, M+L, d)
        hidden = self.lm.forward_embeds(embeds)
        return torch.cat([hidden[:, :1], hidden[:, 1 + image_embeds.shape[1]:]], dim=1)  # (B, L, d)

    def forward(self, images, input_ids):
        """Logits (B, L, vocab) of the text positions."""
        return self.lm.output(self.hidden_states(input_ids, self.encode_images(images)))


def answer_loss(vlm, input_ids, targets, image_embeds=None):
    """Mean next-token cross-entropy over the positions whose target is an answer token (targets != -100);
    prompt and padding positions are not even projected to the vocabulary. image_embeds None: text only."""
    hidden = vlm.hidden_states(input_ids, image_embeds)
    keep = targets != -100
    logits = vlm.lm.output(hidden[keep]).float()  # (number of answer tokens, vocab)
    return F.cross_entropy(logits, targets[keep])


# ---------------------------------------------------------------------------------------------------------
# Tokens. The LM trained here uses CLIP's BPE (PE's own tokenizer; no other installs offline). A from-scratch LM
# only needs the BPE ids its training texts use: renumbering those (a few hundred on the embedded data, instead
# of 49,408) shrinks the output layer, the embeddings and their optimizer state ~100x, which is most of the
# cost of a step on a CPU. Ids outside that vocabulary (words of held-out phrasings) read as one unknown token.


class ClipTokenizer:
    """pe_model's CLIP BPE for a decoder. vocab: the list of CLIP ids the LM knows, LM id i = vocab[i], the
    first four being pad, begin (<|startoftext|>), end (<|endoftext|>) and unknown (-1); None = all 49,408 CLIP
    ids unchanged (begin, end and pad are then CLIP's own)."""

    def __init__(self, vocab=None):
        self.bpe, self.vocab = pe_model.get_tokenizer(), vocab
        self.cache = {}  # text -> ids: the training texts repeat, and BPE + ftfy cost ~1 ms a text
        if vocab is None:
            self.pad_id, self.bos_id, self.eos_id, self.unk_id = (pe_model.PAD_TOKEN_ID, pe_model.SOT_TOKEN_ID,
                                                                  pe_model.EOT_TOKEN_ID, None)
            self.vocab_size = self.bpe.vocab_size
        else:
            self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
            self.to_lm = {clip_id: i for i, clip_id in enumerate(vocab)}
            self.vocab_size = len(vocab)

    def encode(self, text):
        if text not in self.cache:
            ids = self.bpe.encode(text)
            self.cache[text] = ids if self.vocab is None else [self.to_lm.get(i, self.unk_id) for i in ids]
        return list(self.cache[text])

    def decode(self, ids):
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id, self.unk_id)]
        return self.bpe.decode(ids if self.vocab is None else [self.vocab[i] for i in ids]).strip()


def build_vocab(texts):
    """The vocab list of ClipTokenizer for a from-scratch LM: specials, then every CLIP id the texts use."""
    bpe = pe_model.get_tokenizer()
    used = sorted({i for text in texts for i in bpe.encode(text)})
    return [pe_model.PAD_TOKEN_ID, pe_model.SOT_TOKEN_ID, pe_model.EOT_TOKEN_ID, -1] + used


# Llama 3's tokenizer (Llama 3, 3.1, 3.2): a byte-level BPE whose tokenizer.model file lists every token as
# "base64(bytes) rank", one per line (128,000 of them), the rank being both the token id and the merge priority.
# Text is first split by the pre-tokenisation pattern below, then each piece's UTF-8 bytes are merged pairwise,
# always the adjacent pair whose concatenation has the lowest rank, until no adjacent pair is a token. 256
# special tokens follow the BPE ids. Written here from that description (the tiktoken format), so that a real
# Llama plugs in without a dependency.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                         "<|image|>"]  # then <|reserved_special_token_2|> ... up to 256 special tokens


class Llama3Tokenizer:
    """Llama 3's tokenizer from its tokenizer.model file (Meta's original download has it next to
    consolidated.00.pth). bos = <|begin_of_text|>, eos = <|end_of_text|>, pad = <|finetune_right_pad_id|>."""

    def __init__(self, path):
        import base64

        import regex  # \p{L} / \p{N} classes, as pe_model's CLIP tokenizer

        self.ranks = {}
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    self.ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{number}: not a 'base64 rank' line of a Llama 3 "
                                     "tokenizer.model") from None
        if sorted(self.ranks.values()) != list(range(len(self.ranks))):
            raise ValueError(f"{path}: the ranks are not 0..{len(self.ranks) - 1}, each once")
        if any(bytes([b]) not in self.ranks for b in range(256)):
            raise ValueError(f"{path}: not every single byte is a token (a byte-level BPE needs all 256)")
        self.tokens = {rank: token for token, rank in self.ranks.items()}
        names = LLAMA3_SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>"
                                         for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL_TOKENS))]
        self.special = {name: len(self.ranks) + i for i, name in enumerate(names)}
        self.bos_id, self.eos_id = self.special["<|begin_of_text|>"], self.special["<|end_of_text|>"]
        self.pad_id, self.unk_id = self.special["<|finetune_right_pad_id|>"], None
        self.vocab_size = len(self.ranks) + len(names)
        self.pattern = regex.compile(LLAMA3_PATTERN)
        self.cache = {}  # piece -> ids

    def _bpe(self, piece):
        """Token ids of one pre-token's bytes: merge the adjacent pair of lowest rank until none is a token."""
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            pairs = [(self.ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in self.ranks]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[part] for part in parts]

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(text):
            if piece not in self.cache:
                raw = piece.encode("utf-8")
                self.cache[piece] = [self.ranks[raw]] if raw in self.ranks else self._bpe(raw)
            ids += self.cache[piece]
        return ids

    def decode(self, ids):
        raw = b"".join(self.tokens[i] for i in ids if i in self.tokens)  # special tokens are dropped
        return raw.decode("utf-8", errors="replace").strip()


def make_tokenizer(lm_args, vocab=None, llama_dir=""):
    """The tokenizer for an LM: a real Llama's own (llama_dir/tokenizer.model), else CLIP's BPE (restricted to
    `vocab` for a from-scratch LM)."""
    tokenizer_path = os.path.join(llama_dir, "tokenizer.model") if llama_dir else ""
    if tokenizer_path and os.path.isfile(tokenizer_path):
        tokenizer = Llama3Tokenizer(tokenizer_path)
        if tokenizer.vocab_size != lm_args.vocab_size:
            raise SystemExit(f"{tokenizer_path}: {tokenizer.vocab_size} token ids (BPE + 256 special) but the LM has "
                             f"{lm_args.vocab_size}: not this model's tokenizer (Llama 3.x has 128,256)")
        return tokenizer
    if vocab is not None:
        if len(vocab) != lm_args.vocab_size:
            raise ValueError(f"the LM has {lm_args.vocab_size} token ids but its vocabulary lists {len(vocab)}")
        return ClipTokenizer(vocab)
    if lm_args.vocab_size != pe_model.get_tokenizer().vocab_size:
        raise SystemExit(f"the LM has a vocabulary of {lm_args.vocab_size}, not CLIP BPE's 49,408, and no tokenizer "
                         f"was found" + (f" at {tokenizer_path}" if tokenizer_path else "") + ": put Llama 3's "
                         "tokenizer.model in --llama_dir")
    return ClipTokenizer()


def encode_example(tokenizer, question, answer, max_tokens, context=None):
    """(input_ids, targets, cut): [BOS] question answer [EOS] as ids; targets = the next token at the answer
    positions and -100 elsewhere, so the loss ignores the prompt. context: text put before the question
    (stage 0 reads the image's description there, where the image tokens will be). cut: whether the example
    was shortened to max_tokens (the prompt first, keeping BOS + 3 tokens, then the answer)."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(question if context is None else f"{context} {question}")
    answer_ids = tokenizer.encode(answer) + [tokenizer.eos_id]
    cut = len(prompt) + len(answer_ids) > max_tokens
    if cut:
        prompt = prompt[: max(4, max_tokens - len(answer_ids))]
        answer_ids = answer_ids[: max_tokens - len(prompt)]
    return prompt + answer_ids, [-100] * (len(prompt) - 1) + answer_ids + [-100], cut


def pad_batch(rows, pad_value):
    length = max(len(r) for r in rows)
    return torch.tensor([r + [pad_value] * (length - len(r)) for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# Data: question answering on the embedded emoji data, or JSONL files.
# The last phrasing of each question type is held out, used only for evaluation: new sentences made of words
# the trained phrasings use (a from-scratch LM cannot know a word it never read; a real Llama could).

QUESTIONS = {
    "what": ["what is in the image?", "what does this picture show?", "what emoji is this?", "what is shown here?",
             "what is shown in this picture?"],
    "yesno": ["is there {a} in the image?", "does this picture show {a}?", "can you see {a} here?",
              "can you see {a} in this picture?"],
    "which": ["is it {a} or {b}?", "which is shown, {a} or {b}?", "does the image show {a} or {b}?",
              "which is in the picture, {a} or {b}?"],
    "count": ["how many emojis are there?", "how many emojis are in the image?", "how many things can you see?",
              "how many emojis can you see here?"],
    "colour": ["what colour is the background?", "what is the background colour?",
               "which colour is behind the emoji?", "which colour is the background?"],
    "caption": ["describe the image.", "write a caption for this picture.", "what is a good caption for it?"],
}
KINDS = {"single": ["what", "yesno", "which", "caption"], "scene": ["count", "yesno"], "colour": ["colour", "what"]}
EVAL_KINDS = {"single": ["what", "yesno", "which"], "scene": ["count", "yesno"], "colour": ["colour", "what"]}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (240, 240, 240)}


def colour_image(glyph, colour, size, generator):
    """An emoji over a plain background of a named colour (jittered by up to +-20 per channel)."""
    from PIL import Image

    rgb = tuple(int(min(255, max(0, c + torch.randint(-20, 21, (), generator=generator)))) for c in COLOURS[colour])
    image = Image.new("RGB", (size, size), rgb)
    glyph_size = max(4, round(size * (0.35 + 0.3 * torch.rand((), generator=generator).item())))
    center = [size * (0.3 + 0.4 * torch.rand((), generator=generator).item()) for _ in range(2)]
    data.paste_glyph(image, data.render_glyph(glyph, size), center, glyph_size)
    return image


def embedded_pool(cfg, split, image_size):
    """Images and what they show, for the embedded QA tasks: {"images": (N, 3, S, S), "records": [dict(type,
    names, colour, caption)], "class_names": [...]}. Val images are held-out renderings and scenes."""
    train = split == "train"
    per_class = cfg.train_images_per_class if train else cfg.val_images_per_class
    singles = data.EmojiImageText(split, num_classes=cfg.num_classes, images_per_class=per_class,
                                  canvas_size=image_size, seed=cfg.seed,
                                  class_pool=max(cfg.class_pool, cfg.num_classes) if cfg.class_pool else None)
    images, records = [], []
    for index in range(len(singles)):
        image, caption, label = singles[index]
        images.append(image)
        records.append({"type": "single", "names": [singles.class_names[label]], "colour": None, "caption": caption})
    for index in range(cfg.train_scenes if train else cfg.val_scenes):
        scene = data.compose_scene(data.seed_for(cfg.seed, "lang-scene", split, index), image_size, (1, 4),
                                   singles.classes)
        names = scene["names"]
        images.append(pe_model.preprocess_image(scene["image"], image_size))
        listed = ", ".join(data.with_article(n) for n in names)
        records.append({"type": "scene", "names": names, "colour": None,
                        "caption": f"{len(names)} emoji{'s' if len(names) > 1 else ''}: {listed}."})
    for index in range(cfg.train_colour_images if train else cfg.val_colour_images):
        generator = data.item_generator(cfg.seed, "lang-colour", split, index)
        label = int(torch.randint(cfg.num_classes, (), generator=generator))
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (), generator=generator))]
        image = colour_image(singles.glyphs[label], colour, image_size, generator)
        images.append(pe_model.preprocess_image(image, image_size))
        name = singles.class_names[label]
        records.append({"type": "colour", "names": [name], "colour": colour,
                        "caption": f"{data.with_article(name)} on a {colour} background."})
    return {"images": torch.stack(images), "records": records, "class_names": singles.class_names}


def make_question(record, kind, phrasing, class_names, generator):
    """(question, answer) of question type `kind` about an image record, with phrasing index `phrasing`."""
    template = QUESTIONS[kind][phrasing]
    names = record["names"]
    others = [n for n in class_names if n not in names]
    pick = lambda options: options[int(torch.randint(len(options), (), generator=generator))]  # noqa: E731
    if kind == "what":
        return template, names[0]
    if kind == "caption":
        return template, record["caption"]
    if kind == "count":
        return template, str(len(names))
    if kind == "colour":
        return template, record["colour"]
    if kind == "yesno":
        present = torch.rand((), generator=generator).item() < 0.5
        name = pick(names) if present else pick(others)
        return template.format(a=data.with_article(name)), "yes" if present else "no"
    if kind == "which":
        right, wrong = names[0], pick(others)
        first, second = (right, wrong) if torch.rand((), generator=generator).item() < 0.5 else (wrong, right)
        return template.format(a=data.with_article(first), b=data.with_article(second)), right
    raise ValueError(f"unknown question type {kind!r}")


def pool_texts(pool):
    """Every text the training questions, answers and descriptions of a pool are made of (for build_vocab).
    Held-out phrasings are left out: their new words stay unknown to a from-scratch LM."""
    texts = {record["caption"] for record in pool["records"]}
    texts |= {record[key] for record in pool["records"] if record["type"] == "jsonl" for key in ("question", "answer")}
    if pool["class_names"]:
        texts |= {template.format(a="", b="") for phrasings in QUESTIONS.values() for template in phrasings[:-1]}
        texts |= {data.with_article(name) for name in pool["class_names"]}
        texts |= set(COLOURS) | {str(n) for n in range(10)} | {"yes", "no"}
    return sorted(texts)


class ImageFiles:
    """Images read from files when a batch needs them (real datasets do not fit in memory as tensors);
    indexed like a tensor of images: files[indices] -> (len(indices), 3, S, S)."""

    def __init__(self, paths, image_size):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as image:
                return pe_model.preprocess_image(image, self.image_size)
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"{self.paths[index]}: cannot decode the image ({error})") from error

    def __getitem__(self, indices):
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        elif isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return torch.stack([self.load(i) for i in indices])


def jsonl_pool(path, image_size):
    """Image files and fixed question/answer pairs from a JSONL file, one {"image": path relative to the file,
    "question": ..., "answer": ...} per line. Bad lines (malformed JSON, a missing field, an image that does
    not exist or whose header cannot be read) are skipped and counted in the returned BadSamples."""
    from PIL import Image

    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such JSONL file")
    bad = data.BadSamples(os.path.basename(path))
    paths, records = [], []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            key = f"{path}:{line_number}"
            try:
                item = json.loads(line)
                question, answer = str(item["question"]), str(item["answer"])
                image_path = os.path.join(os.path.dirname(os.path.abspath(path)), item["image"])
            except (ValueError, KeyError, TypeError) as error:
                bad.add("malformed_line", key, str(error))
                continue
            try:
                with Image.open(image_path):  # reads the header only; pixels are decoded per batch
                    pass
            except (OSError, ValueError, SyntaxError) as error:
                bad.add("bad_image", key, str(error))
                continue
            paths.append(image_path)
            records.append({"type": "jsonl", "question": question, "answer": answer, "caption": ""})
    if not records:
        raise SystemExit(f"{path}: no usable line ({bad.report()}); each line is "
                         '{"image": path, "question": ..., "answer": ...}')
    return {"images": ImageFiles(paths, image_size), "records": records, "class_names": [], "bad": bad}


def eval_examples(pool):
    """Deterministic held-out questions, one per image: [(image index, question, answer, kind, held_out)].
    Question types rotate per image type; every second question uses the held-out phrasing."""
    examples, seen = [], {}
    generator = data.item_generator("lang-eval-questions")
    for index, record in enumerate(pool["records"]):
        if record["type"] == "jsonl":
            examples.append((index, record["question"], record["answer"], "jsonl", False))
            continue
        count = seen.get(record["type"], 0)
        seen[record["type"]] = count + 1
        kinds = EVAL_KINDS[record["type"]]
        kind = kinds[count % len(kinds)]
        held_out = (count // len(kinds)) % 2 == 1
        phrasing = len(QUESTIONS[kind]) - 1 if held_out else count % (len(QUESTIONS[kind]) - 1)
        question, answer = make_question(record, kind, phrasing, pool["class_names"], generator)
        examples.append((index, question, answer, kind, held_out))
    return examples


def sample_batch(pool, batch_size, generator, tokenizer, max_tokens, text_only=False):
    """A random training batch: (image indices into the pool (B,), input_ids (B, L), targets (B, L), number cut).
    Each image gets a random question type and a random trained (not held-out) phrasing; text_only puts the
    image's description in place of the image (stage 0)."""
    indices = torch.randint(len(pool["images"]), (batch_size,), generator=generator)
    rows, target_rows, cut_count = [], [], 0
    for index in indices.tolist():
        record = pool["records"][index]
        if record["type"] == "jsonl":
            question, answer = record["question"], record["answer"]
        else:
            kinds = KINDS[record["type"]]
            kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
            phrasing = int(torch.randint(len(QUESTIONS[kind]) - 1, (), generator=generator))
            question, answer = make_question(record, kind, phrasing, pool["class_names"], generator)
        ids, targets, cut = encode_example(tokenizer, question, answer, max_tokens,
                                           record["caption"] if text_only else None)
        rows.append(ids)
        target_rows.append(targets)
        cut_count += cut
    return indices, pad_batch(rows, tokenizer.pad_id), pad_batch(target_rows, -100), cut_count


# ---------------------------------------------------------------------------------------------------------
# Training: one function runs every stage; which parameters train is the only difference between stages.


def set_trainable(vlm, stage):
    """Stage 0: the LM (text only). Stage 1: the projector only (vision and LM frozen, as in PLM's warm-up).
    Stage 2: everything. Frozen parts run in eval mode (no drop path)."""
    train_parts = {0: ("lm",), 1: ("projector",), 2: ("vision", "projector", "lm")}[stage]
    for name in ("vision", "projector", "lm"):
        module = getattr(vlm, name)
        module.requires_grad_(name in train_parts)
        module.train(name in train_parts)


@torch.no_grad()
def cached_vision_tokens(vlm, images, device, batch_size=64):
    """The frozen tower's tokens for every image (N, gh*gw, W), computed once for stage 1 (no augmentation,
    so they never change), which makes a stage-1 step cost only the projector and the LM. Used when they fit
    in 1 GiB (the embedded data: 36 MB); otherwise stage 1 runs the frozen tower every step."""
    vlm.vision.eval()
    return torch.cat([vlm.vision_tokens(images[i : i + batch_size].to(device)).float()
                      for i in range(0, len(images), batch_size)])


def train_stage(vlm, pool, cfg, stage, steps, lr, tokenizer, device):
    """Run one stage for `steps` steps; returns the list of losses."""
    set_trainable(vlm, stage)
    tower = vlm.vision
    cache_bytes = len(pool["images"]) * (tower.image_size // tower.patch_size) ** 2 * tower.width * 4
    cache = cached_vision_tokens(vlm, pool["images"], device) if stage == 1 and cache_bytes < 2**30 else None
    # AdamW as the official PLM; train_clip's decay exclusions (norms, biases, gammas, position embeddings)
    optimizer = build_optimizer(vlm, "adamw", lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, steps // 5 + 1)
    generator = data.item_generator(cfg.seed, "lang-batches", stage)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses, cut_total = [], 0
    names = {0: "stage 0 (LM, text only)", 1: "stage 1 (projector)", 2: "stage 2 (all)"}
    bar = tqdm(range(steps), desc=names[stage], dynamic_ncols=True)
    for step in bar:
        indices, input_ids, targets, cut = sample_batch(pool, cfg.batch_size, generator, tokenizer,
                                                        cfg.max_text_tokens, text_only=stage == 0)
        cut_total += cut
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, min_lr=0.1 * lr)  # warmup, cosine to 10%
        with autocast:
            image_embeds = None
            if stage > 0:
                images = pool["images"][indices].to(device)
                image_embeds = vlm.encode_images(images, cache[indices.to(device)] if cache is not None else None)
            loss = answer_loss(vlm, input_ids.to(device), targets.to(device), image_embeds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in vlm.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    if cut_total:
        print(f"{names[stage]}: {cut_total} examples cut to --max_text_tokens={cfg.max_text_tokens}")
    vlm.eval()
    return losses


def add_layerscale(vlm, ls_init_value, drop_path):
    """The official stage 2 tower: the same weights plus new LayerScale gammas (ls_init_value) and drop path."""
    tower = vlm.vision
    device = next(tower.parameters()).device
    state = {k: v.cpu() for k, v in tower.state_dict().items()}
    vlm.vision = build_vision_tower(state, asdict(tower.config), tower.layers, ls_init_value, drop_path,
                                    label="stage-1 tower").to(device)


# ---------------------------------------------------------------------------------------------------------
# Greedy decoding and answer accuracy.


@torch.no_grad()
def generate(vlm, tokenizer, images, questions, max_new_tokens=24):
    """Greedy answers (strings) to one question per image. Prompts of equal length are decoded together
    (right after the prompt, so no padding enters the causal context); each step re-runs the sequence."""
    vlm.eval()
    device = next(vlm.parameters()).device
    image_embeds = vlm.encode_images(images.to(device))  # (B, M, d), computed once
    prompts = [[tokenizer.bos_id] + tokenizer.encode(q) for q in questions]
    answers = [None] * len(questions)
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows], device=device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            hidden = vlm.hidden_states(ids, image_embeds[rows])[:, -1]  # (b, d): the last position
            next_ids = vlm.lm.output(hidden).argmax(dim=-1)
            next_ids[finished] = tokenizer.pad_id
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == tokenizer.eos_id
            if finished.all():
                break
        for row, i in enumerate(rows):
            new = ids[row, len(prompts[i]):].tolist()
            answers[i] = tokenizer.decode(new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new)
    return answers


def normalize_answer(text):
    """VQA-style normalisation: lower case, punctuation and articles removed, spaces collapsed."""
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_accuracy(vlm, tokenizer, pool, batch_size=64, max_new_tokens=24, max_samples=None):
    """Exact-match accuracy of greedy answers to the questions of eval_examples (held-out images): overall, per
    question type, with trained and with held-out phrasings; plus a few examples."""
    examples = eval_examples(pool)[:max_samples]
    correct, by_kind, held, trained = [], {}, [], []
    shown = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        images = pool["images"][[e[0] for e in chunk]]
        predictions = generate(vlm, tokenizer, images, [e[1] for e in chunk], max_new_tokens)
        for (_, question, answer, kind, held_out), prediction in zip(chunk, predictions):
            ok = normalize_answer(prediction) == normalize_answer(answer)
            correct.append(ok)
            by_kind.setdefault(kind, []).append(ok)
            (held if held_out else trained).append(ok)
            if len(shown) < 6:
                shown.append(f"{question} -> {prediction!r} (truth {answer!r})")
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"accuracy": mean(correct), "num_questions": len(correct),
            "per_kind": {k: mean(v) for k, v in sorted(by_kind.items())},
            "trained_phrasing_accuracy": mean(trained) if trained else None,
            "held_out_phrasing_accuracy": mean(held) if held else None, "examples": shown}


# ---------------------------------------------------------------------------------------------------------
# Saving and loading.


def save_vlm(vlm, path, cfg, metrics, vocab=None):
    """The whole model with what rebuilds it; 'model' holds the VLM state_dict (vision., projector., lm.);
    'vocab' the LM's CLIP ids (ClipTokenizer) or None for the full CLIP vocabulary."""
    pe_model.save_checkpoint({
        "vocab": vocab,
        "model": vlm.state_dict(),
        "vision_config": pe_model.get_config(vlm.vision),
        "llama_params": asdict(vlm.lm.args),
        "projector": {"vision_width": vlm.vision.width, "lm_dim": vlm.lm.args.dim,
                      "pooling_ratio": vlm.projector.pooling_ratio},
        "lang_config": asdict(cfg),
        "metrics": metrics,
    }, path)


def load_vlm(path, device="cpu"):
    """A VLM written by save_vlm, in eval mode; its training config is `vlm.lang_config` (a dict) and its
    tokenizer `vlm.tokenizer`."""
    blob = pe_model.read_checkpoint_file(path)
    if not isinstance(blob, dict) or "llama_params" not in blob:
        raise ValueError(f"{path} is not a VLM checkpoint of align_lang.py (no 'llama_params')")
    vision = pe_model.build_model(blob["vision_config"])
    lm = Llama(LlamaArgs(**blob["llama_params"]))
    projector = MLPProjector(**blob["projector"])
    vlm = VLM(vision, projector, lm)
    vlm.load_state_dict(blob["model"])  # strict
    vlm.lang_config = blob["lang_config"]
    vlm.tokenizer = make_tokenizer(lm.args, blob.get("vocab"), blob["lang_config"].get("llama_dir", ""))
    return vlm.to(device).eval()


def export_pe_lang_tower(vision, path):
    """The aligned tower alone, as the official PE-Lang checkpoints are: a VisionTransformer state_dict (keys
    conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.{i}.*.ls_{1,2}.gamma, ...), plus
    its config (PE-Lang style: pool none, no ln_post, no projection, LayerScale; drop path 0 for inference)
    so that pe_model.load_model(path) rebuilds it. The config is also written as JSON next to it."""
    config = pe_model.get_config(vision)
    config["vision_cfg"]["drop_path"] = 0.0
    state = {k: v.detach().cpu().clone() for k, v in vision.state_dict().items()}
    pe_model.save_checkpoint({"model": state, "config": config}, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(config, f, indent=2)
    return config


def vqa_accuracy(checkpoint_path, split="val", jsonl=None, max_samples=None, batch_size=64, device="cpu"):
    """Held-out answer accuracy (exact match after normalisation) of a VLM checkpoint, for evaluate.py.
    The embedded held-out set is rebuilt from the checkpoint's own config (same classes and seeds); a JSONL
    file ({"image", "question", "answer"} per line) replaces it. Returns the dict of answer_accuracy."""
    vlm = load_vlm(checkpoint_path, device)
    cfg = LangConfig(**{k: v for k, v in vlm.lang_config.items() if k in {f.name for f in fields(LangConfig)}})
    image_size = vlm.vision.image_size
    pool = jsonl_pool(jsonl, image_size) if jsonl else embedded_pool(cfg, split, image_size)
    return answer_accuracy(vlm, vlm.tokenizer, pool, batch_size, cfg.max_new_tokens, max_samples)


# ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = pe_model.parse_config(LangConfig(), argv)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    started = time.time()

    checkpoint = pe_model.resolve_checkpoint(cfg.checkpoint or None)
    if not cfg.class_pool:  # ask about classes the core has seen (saved with the VLM: evaluate.py's VQA reuses it)
        cfg.class_pool = data.trained_class_count(pe_model.checkpoint_train_config(checkpoint))
    core_state, core_vision_cfg = read_core_checkpoint(checkpoint, cfg.model)
    core_depth = core_vision_cfg["layers"]
    layers = cfg.vision_layers or max(1, core_depth - 1)
    vision = build_vision_tower(core_state, core_vision_cfg, layers, label=checkpoint)  # stage 1: as pretrained
    lm = None
    if cfg.llama_dir:
        try:
            lm = load_llama(cfg.llama_dir, cfg.llama_rope_scaling_factor or None)
        except (OSError, ValueError) as error:
            raise SystemExit(str(error)) from None

    image_size = vision.image_size
    if cfg.train_jsonl:
        train_pool = jsonl_pool(cfg.train_jsonl, image_size)
        val_pool = jsonl_pool(cfg.val_jsonl, image_size) if cfg.val_jsonl else None
        for pool in (train_pool, val_pool):
            if pool is not None:
                print(pool["bad"].report())
    else:
        train_pool, val_pool = embedded_pool(cfg, "train", image_size), embedded_pool(cfg, "val", image_size)
    print(f"data: {len(train_pool['records'])} training images, "
          f"{len(val_pool['records']) if val_pool else 0} held-out images ({time.time() - started:.0f} s)")

    vocab = None
    if lm is None:
        vocab = None if cfg.lm_full_vocab else build_vocab(pool_texts(train_pool))
        lm = Llama(LlamaArgs(dim=cfg.lm_dim, n_layers=cfg.lm_layers, n_heads=cfg.lm_heads, n_kv_heads=cfg.lm_kv_heads,
                             vocab_size=len(vocab) if vocab else pe_model.get_tokenizer().vocab_size,
                             multiple_of=cfg.lm_multiple_of, rope_theta=cfg.lm_rope_theta))
    tokenizer = make_tokenizer(lm.args, vocab, cfg.llama_dir)
    vlm = VLM(vision, MLPProjector(vision.width, lm.args.dim, cfg.pooling_ratio), lm).to(device)
    print(f"vision: {checkpoint}, first {layers} of {core_depth} blocks (width {vision.width}); LM: "
          f"{'Llama from ' + cfg.llama_dir if cfg.llama_dir else 'from scratch'}, dim {lm.args.dim}, "
          f"{lm.args.n_layers} layers, vocabulary {lm.args.vocab_size}, "
          f"{sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters")

    def evaluate_now(name):
        if val_pool is None:
            return None
        result = answer_accuracy(vlm, tokenizer, val_pool, cfg.eval_batch_size, cfg.max_new_tokens)
        print(f"{name}: held-out answer accuracy {result['accuracy']:.3f} on {result['num_questions']} questions "
              f"{ {k: round(v, 3) for k, v in result['per_kind'].items()} }, held-out phrasings "
              f"{result['held_out_phrasing_accuracy']}")
        return result

    def run_stage(stage, steps, lr):
        if steps <= 0:  # e.g. --stage2_steps=0: stage 1 alone, the frozen-feature language probe of §3
            return None
        losses = train_stage(vlm, train_pool, cfg, stage, steps, lr, tokenizer, device)
        return sum(losses[-20:]) / len(losses[-20:])

    metrics = {"checkpoint": checkpoint, "vision_layers": layers, "core_depth": core_depth}
    if not cfg.llama_dir:
        metrics["stage0_final_loss"] = run_stage(0, cfg.lm_pretrain_steps, cfg.lr_lm_pretrain)
    metrics["stage1_final_loss"] = run_stage(1, cfg.stage1_steps, cfg.lr_stage1)
    metrics["stage1"] = evaluate_now("after stage 1")
    if cfg.stage2_steps > 0:
        add_layerscale(vlm, cfg.ls_init_value, cfg.drop_path)
        metrics["stage2_final_loss"] = run_stage(2, cfg.stage2_steps, cfg.lr_stage2)
        metrics["stage2"] = evaluate_now("after stage 2")
    metrics["final"] = metrics.get("stage2") or metrics["stage1"]
    metrics["minutes"] = (time.time() - started) / 60

    os.makedirs(cfg.out_dir, exist_ok=True)
    vlm_path, tower_path = os.path.join(cfg.out_dir, "vlm.pt"), os.path.join(cfg.out_dir, "pe_lang_tower.pt")
    save_vlm(vlm, vlm_path, cfg, metrics, vocab)
    export_pe_lang_tower(vlm.vision, tower_path)
    with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    table = accuracy_table(metrics)
    with open(os.path.join(cfg.out_dir, "metrics.md"), "w") as f:
        f.write(f"# align_lang.py: {checkpoint}, first {layers} of {core_depth} blocks\n\n" + table + "\n")
    print(f"wrote {vlm_path} (load_vlm), {tower_path} (pe_model.load_model), metrics.json and metrics.md "
          f"in {metrics['minutes']:.1f} min")
    if metrics["final"] is not None:
        print(table)
        print("e.g.")
        for line in metrics["final"]["examples"]:
            print("  " + line)


def accuracy_table(metrics):
    """Held-out answer accuracy after each stage, overall, on held-out phrasings and per question type, as a
    markdown table."""
    stages = [name for name in ("stage1", "stage2") if metrics.get(name)]
    kinds = sorted({kind for name in stages for kind in metrics[name]["per_kind"]})
    lines = ["| after | accuracy % | held-out phrasings % | " + " | ".join(kinds) + " |",
             "|---" * (3 + len(kinds)) + "|"]
    for name in stages:
        result = metrics[name]
        held = result["held_out_phrasing_accuracy"]
        cells = [f"{100 * result['per_kind'].get(kind, float('nan')):.1f}" for kind in kinds]
        lines.append(f"| {name.replace('stage', 'stage ')} | {100 * result['accuracy']:.1f} | "
                     f"{'-' if held is None else f'{100 * held:.1f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
