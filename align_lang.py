"""
align_lang.py: language alignment (PE lang, paper §4): a PE-core vision tower cut at its best language layer, a
projector and a Llama-style decoder, trained by next-token prediction on answers in the two stages of the official PLM
recipe (facebookresearch/perception_models, apps/plm); the tower is then exported alone, in the official PE-Lang layout.

  * Vision: the core's first N blocks (default all but the last, as PE-Lang keeps 23 of L's 24 and 47 of G's
    50), patch tokens, headless; frozen in stage 1, trained in stage 2 with new LayerScale 0.1, drop path 0.1.
  * Projector: Linear(W -> d) -> GELU -> Linear(d -> d), 2x2 average pooling. LM: Llama (Meta's format).
  * Loss: -sum_t log p(a_t | image, question, a_<t) over the answer tokens a; AdamW, warmup + cosine per stage.
No pretrained LM installs offline, so by default the LM is trained here from scratch on CLIP BPE tokens, after
a text-only stage 0 (the image's description in its place) standing in for Llama's pretraining: a frozen
random LM cannot be steered by a projector. Data: questions about the embedded emoji data, scored on held-out
images and phrasings by exact match, or JSONL files of {"image": path relative to the file, "question", "answer"}.

    python align_lang.py                                     # embedded emoji QA (newest out/clip checkpoint)
    python align_lang.py --checkpoint=out/clip/final.pt --vision_layers=4 --out_dir=out/lang_l4
    python align_lang.py --checkpoint=PE-Core-L14-336.pt --model=PE-Core-L14-336 --llama_dir=Llama3.2-1B \
        --llama_rope_scaling_factor=32 --train_jsonl=train.jsonl --val_jsonl=val.jsonl --device=cuda
    python evaluate.py --vqa --vqa_checkpoint=out/lang/vlm.pt   # held-out answer accuracy (vqa_accuracy)

Writes into --out_dir (default out/lang): vlm.pt (load_vlm), pe_lang_tower.pt + .json (pe_model.load_model),
metrics.json + metrics.md (held-out accuracy per stage and question type). Plug-ins: vqa_accuracy (evaluate.py),
--captioner=align_lang:make_captioner and --summarizer=align_lang:make_summarizer (video_engine.py).
"""

import base64
import glob
import json
import math
import os
import re
import string
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import pe_model
import training
from kernels.rope_attention import rope_apply


@dataclass
class LangConfig:
    checkpoint: str = ""  # PE-core checkpoint to start from; "" = the newest that `python train_clip.py` wrote
    model: str = ""  # official model name, for an official .pt (which stores no config): PE-Core-L14-336, ...
    out_dir: str = "out/lang"
    device: str = "auto"  # auto = cuda if available, else cpu
    seed: int = 0
    # vision side (§4; PLM's stages 1 and 2)
    vision_layers: int = 0  # blocks 0..N-1 of the core; 0 = all but the last; evaluate.py's best layer i is N = i+1
    pooling_ratio: int = 2  # r x r pooling of the projected grid (PLM: 1 in stage 1, 2 later; one value here)
    ls_init_value: Optional[float] = 0.1  # LayerScale added to the tower in stage 2; none = no LayerScale
    drop_path: float = 0.1  # stochastic depth of the tower in stage 2
    # language model: a Llama-format checkpoint folder, or a small decoder trained from scratch
    llama_dir: str = ""  # consolidated.00.pth + params.json + tokenizer.model (Meta's original format)
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
    num_classes: int = 20  # emoji classes of the embedded QA, spread over the core's training classes
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
    eval_batch_size: int = 64
    max_new_tokens: int = 24


RULES = training.positive("pooling_ratio", "lm_dim", "lm_layers", "lm_heads", "lm_kv_heads", "lm_multiple_of",
                          "num_classes", "max_text_tokens", "max_new_tokens")  # besides training.RULES


# ---------------------------------------------------------------------------------------------------------
# The LM: Llama (Touvron et al. 2023; Dubey et al. 2024) with Meta's parameter names, so its checkpoints load.
@dataclass
class LlamaArgs:  # the fields of Meta's params.json
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


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32, as Meta's code does
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def llama_rope_angles(length, head_dim, theta, scaled=False, scale_factor=8.0, device=None):
    """(length, head_dim) angles t x theta^(-2i/head_dim), each twice: Meta's interleaved pairs (2i, 2i+1)."""
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
        q, k, v = (w(x).view(batch, length, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = rope_apply(q, angles), rope_apply(k, angles)  # (B, H, L, hd)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each k/v head serves n_heads/n_kv queries
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, hd)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x), hidden 2/3 of 4 dim (x ffn_dim_multiplier) rounded up to multiple_of."""

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
        self.attention, self.feed_forward = Attention(args), FeedForward(args)
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)

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
        angles = llama_rope_angles(h.shape[1], self.args.dim // self.args.n_heads, self.args.rope_theta,
                                   self.args.use_scaled_rope, self.args.rope_scaling_factor, h.device)
        for layer in self.layers:
            h = layer(h, angles)
        return self.norm(h)

    def forward(self, tokens):
        """Token ids (B, L) -> logits (B, L, vocab)."""
        return self.output(self.forward_embeds(self.tok_embeddings(tokens)))


def load_llama(checkpoint_dir, rope_scaling_factor=None):
    """A Llama from Meta's original format (params.json + consolidated.00.pth), loaded strictly."""
    params_path = os.path.join(checkpoint_dir, "params.json")
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"--llama_dir={checkpoint_dir}: no params.json (Meta's format, not Hugging Face's)")
    shards = sorted(glob.glob(os.path.join(checkpoint_dir, "consolidated.*.pth")))
    if len(shards) != 1:
        raise ValueError(f"--llama_dir={checkpoint_dir}: {len(shards)} consolidated.*.pth; merge them into one")
    with open(params_path) as f:
        params = json.load(f)
    known = {f.name for f in fields(LlamaArgs)}
    unknown = sorted(set(params) - known - {"max_seq_len", "max_batch_size"})  # it may change the architecture
    if unknown:
        raise ValueError(f"{params_path}: unknown fields {unknown}; this decoder knows {sorted(known)}")
    args = LlamaArgs(**{k: v for k, v in params.items() if k in known})
    if rope_scaling_factor is not None:
        args.rope_scaling_factor = rope_scaling_factor
    state = pe_model.read_checkpoint_file(shards[0])
    state.pop("rope.freqs", None)  # the first Llama release stored its RoPE table; it is recomputed here
    if args.vocab_size <= 0:  # Llama 2's params.json
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    if "output.weight" not in state and "tok_embeddings.weight" in state:  # tied embeddings (Llama 3.2 1B/3B)
        print(f"{shards[0]}: no output.weight, using tok_embeddings.weight (tied embeddings)")
        state["output.weight"] = state["tok_embeddings.weight"]
    model = Llama(args)
    try:
        model.load_state_dict(state)  # strict; copies bf16 weights into the float32 parameters
    except RuntimeError as error:  # it lists the missing, unexpected and wrongly-shaped keys
        raise ValueError(f"{shards[0]} does not match {params_path}: {error}") from None
    return model


def save_llama(model, checkpoint_dir):
    """Write `model` in Meta's original format: params.json + consolidated.00.pth (atomic writes)."""
    params = {k: v for k, v in asdict(model.args).items() if v is not None}
    if not params["use_scaled_rope"]:
        del params["use_scaled_rope"], params["rope_scaling_factor"]
    training.write_json(os.path.join(checkpoint_dir, "params.json"), params)
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    pe_model.save_checkpoint(state, os.path.join(checkpoint_dir, "consolidated.00.pth"))


def read_core_checkpoint(path, name=""):
    """(vision state_dict, vision_cfg) of a PE-core checkpoint: ours, or an official .pt with its name."""
    try:
        blob = pe_model.read_checkpoint_file(path)
        config = pe_model.checkpoint_config(blob, name or None, f"--checkpoint={path}")
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from None
    state = pe_model.read_state_dict(blob)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state, dict(config["vision_cfg"])


def build_vision_tower(state_dict, vision_cfg, layers, ls_init_value=None, drop_path=0.0, label="checkpoint"):
    """A PE-Lang-style tower: the first `layers` blocks, headless, loaded strictly from `state_dict` except for
    LayerScale gammas it lacks: NEW parameters (PLM's stage 2 adds LayerScale to a core), at ls_init_value."""
    depth = sum(1 for k in state_dict if re.fullmatch(r"transformer\.resblocks\.\d+\.ln_1\.weight", k))
    if not 1 <= layers <= depth:
        raise SystemExit(f"--vision_layers={layers}: the checkpoint's tower has {depth} blocks (1..{depth})")
    config = pe_model.headless_config(vision_cfg, layers=layers, ls_init_value=ls_init_value, drop_path=drop_path)
    tower = pe_model.build_model({"model_class": "VisionTransformer", "vision_cfg": config})
    new = {k: v for k, v in tower.state_dict().items() if k.endswith(".gamma") and k not in state_dict}
    return pe_model.load_checkpoint(tower, state_dict | new, strict=True, truncate=True, drop_head=True, name=label)


class MLPProjector(nn.Module):
    """Vision tokens (B, N, W) -> LM embeddings (B, N / r^2, d): PLM's MLPProjector, then r x r average pooling."""

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
    """Vision tower + projector + LM, on [BOS] [image tokens] [question] [answer] [EOS] as PLM."""

    def __init__(self, vision, projector, lm):
        super().__init__()
        self.vision, self.projector, self.lm = vision, projector, lm

    def vision_tokens(self, images):  # (B, 3, H, W) -> patch tokens (B, gh*gw, W), no class token, no ln_post
        return self.vision.forward_features(images, strip_cls_token=True)

    def encode_images(self, images, vision_tokens=None):
        """Images (B, 3, H, W) -> LM embeddings (B, gh*gw / r^2, d); vision_tokens: the tower's, if computed."""
        tokens = self.vision_tokens(images) if vision_tokens is None else vision_tokens
        return self.projector(tokens, *(size // self.vision.patch_size for size in images.shape[-2:]))

    def hidden_states(self, input_ids, image_embeds=None):
        """Token ids (B, L) [+ image embeddings (B, M, d) after the first] -> text positions' states (B, L, d)."""
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
    """Mean next-token cross-entropy over the answer positions (targets != -100) only; image_embeds None: text."""
    hidden, keep = vlm.hidden_states(input_ids, image_embeds), targets != -100
    return F.cross_entropy(vlm.lm.output(hidden[keep]).float(), targets[keep])


# ---------------------------------------------------------------------------------------------------------
# Tokens. The LM trained here reads CLIP's BPE renumbered to the ids its texts use (a few hundred, not 49,408:
# a far smaller output layer, most of a CPU step's cost); other ids (held-out words) read as one unknown token.
class ClipTokenizer:
    """CLIP BPE for a decoder; vocab: LM id i = CLIP id vocab[i] (pad, begin, end, unknown first), None = all."""

    def __init__(self, vocab=None):
        self.bpe, self.vocab, self.cache = pe_model.get_tokenizer(), vocab, {}  # cache: the training texts repeat
        clip_specials = (pe_model.PAD_TOKEN_ID, pe_model.SOT_TOKEN_ID, pe_model.EOT_TOKEN_ID, None)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = clip_specials if vocab is None else (0, 1, 2, 3)
        self.to_lm = {clip_id: i for i, clip_id in enumerate(vocab or ())}
        self.vocab_size = self.bpe.vocab_size if vocab is None else len(vocab)

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
    used = sorted({i for text in texts for i in pe_model.get_tokenizer().encode(text)})
    return [pe_model.PAD_TOKEN_ID, pe_model.SOT_TOKEN_ID, pe_model.EOT_TOKEN_ID, -1] + used


# Llama 3's tokenizer (the tiktoken format, written here: no dependency): tokenizer.model lists each token as
# "base64(bytes) rank", the rank its id and merge priority; a text is split by this pattern, each piece merged
# by _bpe. 256 special tokens follow: <|begin_of_text|>, <|end_of_text|>, two reserved, <|finetune_right_pad_id|>...
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


class Llama3Tokenizer:
    """Llama 3's tokenizer from its tokenizer.model (beside consolidated.00.pth in Meta's download)."""

    def __init__(self, path):
        import regex  # \p{L} / \p{N} classes, as pe_model's CLIP tokenizer
        self.ranks = {}
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    if line.strip():
                        token, rank = line.split()
                        self.ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{number}: not a 'base64 rank' line (Llama 3's tokenizer.model)") from None
        if sorted(self.ranks.values()) != list(range(len(self.ranks))):
            raise ValueError(f"{path}: the ranks are not 0..{len(self.ranks) - 1}, each once")
        if any(bytes([b]) not in self.ranks for b in range(256)):
            raise ValueError(f"{path}: not every single byte is a token (a byte-level BPE needs all 256)")
        self.tokens = {rank: token for token, rank in self.ranks.items()}  # no special ids: decode drops them
        first_special = len(self.ranks)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = first_special, first_special + 1, first_special + 4, None
        self.vocab_size = first_special + 256
        self.pattern, self.cache = regex.compile(LLAMA3_PATTERN), {}  # cache: piece -> ids

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
        pieces = self.pattern.findall(text)
        for piece in set(pieces) - self.cache.keys():
            raw = piece.encode("utf-8")
            self.cache[piece] = [self.ranks[raw]] if raw in self.ranks else self._bpe(raw)
        return [i for piece in pieces for i in self.cache[piece]]

    def decode(self, ids):
        return b"".join(self.tokens[i] for i in ids if i in self.tokens).decode("utf-8", errors="replace").strip()


def make_tokenizer(lm_args, vocab=None, llama_dir=""):
    """A real Llama's own tokenizer (llama_dir/tokenizer.model), else CLIP's BPE (restricted to `vocab`)."""
    path = os.path.join(llama_dir, "tokenizer.model") if llama_dir else ""
    found = path and os.path.isfile(path)
    tokenizer = Llama3Tokenizer(path) if found else ClipTokenizer(vocab)
    if tokenizer.vocab_size != lm_args.vocab_size:
        raise SystemExit(f"the LM has {lm_args.vocab_size} token ids, its tokenizer ({path if found else 'CLIP BPE'}) "
                         f"{tokenizer.vocab_size}: put the LM's tokenizer.model (Llama 3.x: 128,256) in --llama_dir")
    return tokenizer


def encode_example(tokenizer, question, answer, max_tokens, context=None):
    """(input_ids, targets, cut): [BOS] [context] question answer [EOS], targets -100 but on the answer; cut:
    shortened to max_tokens (the prompt first, keeping BOS + 3 tokens, then the answer)."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(question if context is None else f"{context} {question}")
    answer_ids = tokenizer.encode(answer) + [tokenizer.eos_id]
    cut = len(prompt) + len(answer_ids) > max_tokens
    prompt = prompt[: max(4, max_tokens - len(answer_ids))]  # both cuts are no-ops when it fits
    answer_ids = answer_ids[: max_tokens - len(prompt)]
    return prompt + answer_ids, [-100] * (len(prompt) - 1) + answer_ids + [-100], cut


# ---------------------------------------------------------------------------------------------------------
# Data: embedded emoji QA or JSONL files. Each type's last phrasing is held out: new sentences of trained words.
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
EVAL_KINDS = {**KINDS, "single": ["what", "yesno", "which"]}  # captions are not scored
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (240, 240, 240)}


def embedded_pool(cfg, split, image_size):
    """{"images": (N, 3, S, S), "records": [dict(type, names, colour, caption)], "class_names"} of a split."""
    train = split == "train"
    singles = data.EmojiImageText(split, num_classes=cfg.num_classes, canvas_size=image_size, seed=cfg.seed,
                                  images_per_class=cfg.train_images_per_class if train else cfg.val_images_per_class,
                                  class_pool=max(cfg.class_pool, cfg.num_classes) if cfg.class_pool else None)
    images, records = [], []
    for index in range(len(singles)):
        image, caption, label = singles[index]
        images.append(image)
        records.append({"type": "single", "names": [singles.class_names[label]], "colour": None, "caption": caption})
    for index in range(cfg.train_scenes if train else cfg.val_scenes):
        scene = data.compose_scene(data.seed_for(cfg.seed, "lang-scene", split, index), image_size, (1, 4),
                                   singles.classes)
        names, listed = scene["names"], ", ".join(data.with_article(n) for n in scene["names"])
        images.append(pe_model.preprocess_image(scene["image"], image_size))
        records.append({"type": "scene", "names": names, "colour": None,
                        "caption": f"{len(names)} emoji{'s' if len(names) > 1 else ''}: {listed}."})
    for index in range(cfg.train_colour_images if train else cfg.val_colour_images):
        generator = data.item_generator(cfg.seed, "lang-colour", split, index)
        label = int(torch.randint(cfg.num_classes, (), generator=generator))
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (), generator=generator))]
        rgb = [int(min(255, max(0, c + torch.randint(-20, 21, (), generator=generator)))) for c in COLOURS[colour]]
        image = Image.new("RGB", (image_size, image_size), tuple(rgb))  # a plain background, +-20 per channel
        glyph_size = max(4, round(image_size * (0.35 + 0.3 * torch.rand((), generator=generator).item())))
        center = [image_size * (0.3 + 0.4 * torch.rand((), generator=generator).item()) for _ in range(2)]
        data.paste_glyph(image, data.render_glyph(singles.glyphs[label], image_size), center, glyph_size)
        images.append(pe_model.preprocess_image(image, image_size))
        name = singles.class_names[label]
        records.append({"type": "colour", "names": [name], "colour": colour,
                        "caption": f"{data.with_article(name)} on a {colour} background."})
    return {"images": torch.stack(images), "records": records, "class_names": singles.class_names}


def make_question(record, kind, phrasing, class_names, generator):
    """(question, answer) of question type `kind` about an image record, with phrasing index `phrasing`."""
    template, names = QUESTIONS[kind][phrasing], record["names"]
    others = [n for n in class_names if n not in names]
    pick = lambda options: options[int(torch.randint(len(options), (), generator=generator))]  # noqa: E731
    if kind in ("what", "caption", "count", "colour"):
        return template, {"what": names[0], "caption": record["caption"], "count": str(len(names)),
                          "colour": record["colour"]}[kind]
    if kind == "yesno":
        present = torch.rand((), generator=generator).item() < 0.5
        return template.format(a=data.with_article(pick(names if present else others))), "yes" if present else "no"
    if kind == "which":
        right, wrong = names[0], pick(others)
        first, second = (right, wrong) if torch.rand((), generator=generator).item() < 0.5 else (wrong, right)
        return template.format(a=data.with_article(first), b=data.with_article(second)), right
    raise ValueError(f"unknown question type {kind!r}")


def pool_texts(pool):
    """Every text of a pool's training questions, answers and descriptions (for build_vocab)."""
    texts = {record["caption"] for record in pool["records"]}
    texts |= {record[key] for record in pool["records"] if record["type"] == "jsonl" for key in ("question", "answer")}
    if pool["class_names"]:
        texts |= {template.format(a="", b="") for phrasings in QUESTIONS.values() for template in phrasings[:-1]}
        texts |= {data.with_article(name) for name in pool["class_names"]}
        texts |= set(COLOURS) | {str(n) for n in range(10)} | {"yes", "no"}
    return sorted(texts)


class ImageFiles(list):
    """Image paths, decoded when a batch needs them: files[indices] -> (n, 3, S, S) (real data outgrows memory)."""

    def __init__(self, paths, image_size):
        super().__init__(paths)
        self.image_size = image_size

    def load(self, index):
        path = list.__getitem__(self, index)
        try:
            with Image.open(path) as image:
                return pe_model.preprocess_image(image, self.image_size)
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"{path}: cannot decode the image ({error})") from error

    def __getitem__(self, indices):
        indices = range(len(self))[indices] if isinstance(indices, slice) else indices
        return torch.stack([self.load(int(i)) for i in indices])


def jsonl_pool(path, image_size):
    """Images and questions from a JSONL file of {"image", "question", "answer"}; bad lines (malformed, an image
    whose header cannot be read) are skipped and counted in the returned BadSamples."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such JSONL file")
    bad, paths, records = data.BadSamples(os.path.basename(path)), [], []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                question, answer = str(item["question"]), str(item["answer"])
                image_path = os.path.join(os.path.dirname(os.path.abspath(path)), item["image"])
            except (ValueError, KeyError, TypeError) as error:
                bad.add("malformed_line", f"{path}:{line_number}", str(error))
                continue
            try:
                Image.open(image_path).close()  # reads the header only; pixels are decoded per batch
            except (OSError, ValueError, SyntaxError) as error:
                bad.add("bad_image", f"{path}:{line_number}", str(error))
                continue
            paths.append(image_path)
            records.append({"type": "jsonl", "question": question, "answer": answer, "caption": ""})
    if not records:
        raise SystemExit(f'{path}: no usable line ({bad.report()}); each line is {{"image": path, "question": ..., '
                         '"answer": ...}')
    return {"images": ImageFiles(paths, image_size), "records": records, "class_names": [], "bad": bad}


def eval_examples(pool):
    """One held-out question per image, [(index, question, answer, kind, held_out)]: every second one phrased anew."""
    examples, seen, generator = [], {}, data.item_generator("lang-eval-questions")
    for index, record in enumerate(pool["records"]):
        if record["type"] == "jsonl":
            examples.append((index, record["question"], record["answer"], "jsonl", False))
            continue
        count = seen[record["type"]] = seen.get(record["type"], -1) + 1
        kinds = EVAL_KINDS[record["type"]]
        kind, held_out = kinds[count % len(kinds)], (count // len(kinds)) % 2 == 1
        phrasing = len(QUESTIONS[kind]) - 1 if held_out else count % (len(QUESTIONS[kind]) - 1)
        examples.append((index, *make_question(record, kind, phrasing, pool["class_names"], generator), kind, held_out))
    return examples


def sample_batch(pool, batch_size, generator, tokenizer, max_tokens, text_only=False):
    """(image indices (B,), input_ids, targets (B, L), number cut): random images, question types and trained
    phrasings; text_only: the image's description in its place (stage 0)."""
    indices = torch.randint(len(pool["images"]), (batch_size,), generator=generator)
    encoded = []
    for index in indices.tolist():
        record = pool["records"][index]
        question, answer = record.get("question"), record.get("answer")  # a JSONL record's own
        if record["type"] != "jsonl":
            kinds = KINDS[record["type"]]
            kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
            phrasing = int(torch.randint(len(QUESTIONS[kind]) - 1, (), generator=generator))
            question, answer = make_question(record, kind, phrasing, pool["class_names"], generator)
        encoded.append(encode_example(tokenizer, question, answer, max_tokens,
                                      record["caption"] if text_only else None))
    rows, target_rows, cuts = zip(*encoded)
    length = max(map(len, rows))
    return (indices, torch.tensor([r + [tokenizer.pad_id] * (length - len(r)) for r in rows]),
            torch.tensor([t + [-100] * (length - len(t)) for t in target_rows]), sum(cuts))


# ---------------------------------------------------------------------------------------------------------
# Training (one function runs every stage), greedy decoding, answer accuracy, saving and loading.
def train_stage(vlm, pool, cfg, stage, steps, lr, tokenizer, device):
    """Run one stage for `steps` steps; returns the list of losses. Stage 0 trains the LM (text only), stage 1
    the projector (vision and LM frozen, as PLM's warm-up), stage 2 everything; frozen parts run in eval mode."""
    trained = {0: ("lm",), 1: ("projector",), 2: ("vision", "projector", "lm")}[stage]
    for part in ("vision", "projector", "lm"):
        getattr(vlm, part).requires_grad_(part in trained).train(part in trained)
    tower, images, cache = vlm.vision, pool["images"], None
    if stage == 1 and len(images) * (tower.image_size // tower.patch_size) ** 2 * tower.width * 4 < 2**30:
        with torch.no_grad():  # the frozen tower's tokens, once (no augmentation), when they fit in 1 GiB
            cache = torch.cat([vlm.vision_tokens(images[i : i + 64].to(device)).float()
                               for i in range(0, len(images), 64)])
    # AdamW as the official PLM, without decay on norms, biases, gammas and position embeddings
    optimizer = training.build_optimizer(vlm, "adamw", lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, steps // 5 + 1)
    generator = data.item_generator(cfg.seed, "lang-batches", stage)
    losses, cut_total, name = [], 0, {0: "stage 0 (LM, text only)", 1: "stage 1 (projector)", 2: "stage 2 (all)"}[stage]
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        indices, input_ids, targets, cut = sample_batch(pool, cfg.batch_size, generator, tokenizer,
                                                        cfg.max_text_tokens, text_only=stage == 0)
        cut_total += cut
        training.set_lr(optimizer, training.lr_at(step, steps, lr, warmup, min_lr=0.1 * lr))  # cosine to 10%
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            image_embeds = None if stage == 0 else vlm.encode_images(
                pool["images"][indices].to(device), None if cache is None else cache[indices.to(device)])
            loss = answer_loss(vlm, input_ids.to(device), targets.to(device), image_embeds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in vlm.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    if cut_total:
        print(f"{name}: {cut_total} examples cut to --max_text_tokens={cfg.max_text_tokens}")
    vlm.eval()
    return losses


def add_layerscale(vlm, ls_init_value, drop_path):
    """PLM's stage 2 tower: the same weights plus new LayerScale gammas (ls_init_value) and drop path."""
    tower, device = vlm.vision, next(vlm.vision.parameters()).device
    vlm.vision = build_vision_tower({k: v.cpu() for k, v in tower.state_dict().items()}, asdict(tower.config),
                                    tower.layers, ls_init_value, drop_path, label="stage-1 tower").to(device)


@torch.no_grad()
def generate(vlm, tokenizer, images, questions, max_new_tokens=24):
    """Greedy answers to one question per image; prompts of equal length decode together (no padding)."""
    vlm.eval()
    device = next(vlm.parameters()).device
    image_embeds = vlm.encode_images(images.to(device))  # (B, M, d), computed once
    prompts = [[tokenizer.bos_id] + tokenizer.encode(q) for q in questions]
    answers, by_length = [None] * len(questions), {}
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


def answer_accuracy(vlm, tokenizer, pool, batch_size=64, max_new_tokens=24, max_samples=None):
    """Exact-match accuracy of greedy answers to eval_examples: overall, per type, per phrasing; a few examples."""
    examples = eval_examples(pool)[:max_samples]
    punctuation = str.maketrans({c: " " for c in string.punctuation})  # VQA-style: lower case, no articles
    normalize = lambda text: " ".join(w for w in text.lower().translate(punctuation).split()  # noqa: E731
                                      if w not in ("a", "an", "the"))
    correct, by_kind, held, trained, shown = [], {}, [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        predictions = generate(vlm, tokenizer, pool["images"][[e[0] for e in chunk]], [e[1] for e in chunk],
                               max_new_tokens)
        for (_, question, answer, kind, held_out), prediction in zip(chunk, predictions):
            ok = normalize(prediction) == normalize(answer)
            correct.append(ok)
            by_kind.setdefault(kind, []).append(ok)
            (held if held_out else trained).append(ok)
            if len(shown) < 6:
                shown.append(f"{question} -> {prediction!r} (truth {answer!r})")
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"accuracy": mean(correct), "num_questions": len(correct), "per_kind": {k: mean(v) for k, v in
            sorted(by_kind.items())}, "trained_phrasing_accuracy": mean(trained) if trained else None,
            "held_out_phrasing_accuracy": mean(held) if held else None, "examples": shown}


def save_vlm(vlm, path, cfg, metrics, vocab=None):
    """The whole model with what rebuilds it; 'vocab': the LM's CLIP ids (None: all of CLIP's)."""
    pe_model.save_checkpoint({
        "vocab": vocab, "model": vlm.state_dict(), "vision_config": pe_model.get_config(vlm.vision),
        "llama_params": asdict(vlm.lm.args), "projector": {"vision_width": vlm.vision.width, "lm_dim": vlm.lm.args.dim,
                                                           "pooling_ratio": vlm.projector.pooling_ratio},
        "lang_config": asdict(cfg), "metrics": metrics}, path)


def load_vlm(path, device="cpu"):
    """A VLM written by save_vlm, in eval mode, with `vlm.lang_config` (a dict) and `vlm.tokenizer`."""
    blob = pe_model.read_checkpoint_file(path)
    if not isinstance(blob, dict) or "llama_params" not in blob:
        raise ValueError(f"{path} is not a VLM checkpoint of align_lang.py (no 'llama_params')")
    lm = Llama(LlamaArgs(**blob["llama_params"]))
    vlm = VLM(pe_model.build_model(blob["vision_config"]), MLPProjector(**blob["projector"]), lm)
    vlm.load_state_dict(blob["model"])  # strict
    vlm.lang_config = blob["lang_config"]
    vlm.tokenizer = make_tokenizer(lm.args, blob.get("vocab"), blob["lang_config"].get("llama_dir", ""))
    return vlm.to(device).eval()


def vqa_accuracy(checkpoint_path, split="val", jsonl=None, max_samples=None, batch_size=64, device="cpu"):
    """evaluate.py's VQA plug-in: answer_accuracy of a VLM checkpoint on the embedded held-out set rebuilt from
    its own config (same classes and seeds) or on a JSONL file."""
    vlm = load_vlm(checkpoint_path, device)
    cfg = LangConfig(**{k: v for k, v in vlm.lang_config.items() if k in {f.name for f in fields(LangConfig)}})
    pool = jsonl_pool(jsonl, vlm.vision.image_size) if jsonl else embedded_pool(cfg, split, vlm.vision.image_size)
    return answer_accuracy(vlm, vlm.tokenizer, pool, batch_size, cfg.max_new_tokens, max_samples)


# ---------------------------------------------------------------------------------------------------------
# video_engine.py's plug-ins (§2.2: PLM captions, Llama 3.2 summarises): fn(checkpoint, device) -> a callable
# whose `.name` the engine's records keep (a record is redone when it changes).
def contact_sheet(frames):
    """(T, H, W, 3) uint8 -> (1, H, W, 3): the frames tiled on a ceil(sqrt(T))-wide grid, shrunk to one frame."""
    count, height, width = frames.shape[:3]
    columns = math.ceil(math.sqrt(count))
    sheet = Image.new("RGB", (columns * width, math.ceil(count / columns) * height))
    for t, frame in enumerate(frames):
        sheet.paste(Image.fromarray(frame.numpy(), "RGB"), ((t % columns) * width, (t // columns) * height))
    return torch.from_numpy(np.asarray(sheet.resize((width, height), Image.BILINEAR)).copy())[None]


def make_captioner(checkpoint, device="cpu"):
    """--captioner=align_lang:make_captioner: frames (T, H, W, 3) uint8 -> "describe the image."'s answer; a clip
    is shown as a contact sheet (generate takes one image; PLM reads the frames' tokens in sequence)."""
    vlm = load_vlm(checkpoint, device=device)

    def captioner(frames):
        image = frames if len(frames) == 1 else contact_sheet(frames)
        pixels = pe_model.preprocess_image(Image.fromarray(image[0].numpy(), "RGB"), vlm.vision.image_size)[None]
        return generate(vlm, vlm.tokenizer, pixels, ["describe the image."])[0].strip()

    captioner.name = f"align_lang:{os.path.abspath(checkpoint)}"
    return captioner


SUMMARY_PROMPT = ("Here are captions of frames of one video, a caption of the whole video and its metadata. "
                  "Write one sentence describing the video.\nFrame captions: {frames}\nVideo caption: {video}\n"
                  "Metadata: {metadata}\nSummary:")  # ours: the paper does not give its prompt


def make_summarizer(checkpoint, device="cpu"):
    """--summarizer=align_lang:make_summarizer: (frame_captions, video_caption, metadata) -> one caption."""
    vlm = load_vlm(checkpoint, device=device)
    blank = torch.zeros(1, 3, vlm.vision.image_size, vlm.vision.image_size)  # mid-grey: the text alone, as §2.2's LLM

    def summarizer(frame_captions, video_caption, metadata=None):
        prompt = SUMMARY_PROMPT.format(frames="; ".join(frame_captions), video=video_caption,
                                       metadata=json.dumps(metadata or {}, ensure_ascii=False))
        return generate(vlm, vlm.tokenizer, blank, [prompt])[0].strip() or video_caption

    summarizer.name = f"align_lang:{os.path.abspath(checkpoint)}"
    return summarizer


def main(argv=None):
    cfg = training.parse_config(LangConfig(), argv, RULES)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    checkpoint = training.resolve_checkpoint(cfg.checkpoint or None)
    if not cfg.class_pool:  # ask about classes the core has seen (saved with the VLM: evaluate.py's VQA reuses it)
        cfg.class_pool = data.trained_class_count(training.checkpoint_train_config(checkpoint))
    core_state, core_vision_cfg = read_core_checkpoint(checkpoint, cfg.model)
    core_depth = core_vision_cfg["layers"]
    layers = cfg.vision_layers or max(1, core_depth - 1)
    vision = build_vision_tower(core_state, core_vision_cfg, layers, label=checkpoint)  # stage 1: as pretrained
    if cfg.llama_dir:
        try:
            lm = load_llama(cfg.llama_dir, cfg.llama_rope_scaling_factor or None)
        except (OSError, ValueError) as error:
            raise SystemExit(str(error)) from None
    size = vision.image_size
    if cfg.train_jsonl:  # bad lines are skipped and reported
        train_pool, val_pool = (jsonl_pool(path, size) if path else None for path in (cfg.train_jsonl, cfg.val_jsonl))
        print("\n".join(pool["bad"].report() for pool in (train_pool, val_pool) if pool))
    else:
        train_pool, val_pool = embedded_pool(cfg, "train", size), embedded_pool(cfg, "val", size)
    print(f"data: {len(train_pool['records'])} training images, "
          f"{len(val_pool['records']) if val_pool else 0} held-out images ({time.time() - started:.0f} s)")
    vocab = None if cfg.llama_dir or cfg.lm_full_vocab else build_vocab(pool_texts(train_pool))
    if not cfg.llama_dir:
        lm = Llama(LlamaArgs(dim=cfg.lm_dim, n_layers=cfg.lm_layers, n_heads=cfg.lm_heads, n_kv_heads=cfg.lm_kv_heads,
                             vocab_size=len(vocab) if vocab else pe_model.get_tokenizer().vocab_size,
                             multiple_of=cfg.lm_multiple_of, rope_theta=cfg.lm_rope_theta))
    tokenizer = make_tokenizer(lm.args, vocab, cfg.llama_dir)
    vlm = VLM(vision, MLPProjector(vision.width, lm.args.dim, cfg.pooling_ratio), lm).to(device)
    print(f"vision: {checkpoint}, first {layers} of {core_depth} blocks (width {vision.width}); LM: "
          f"{'Llama from ' + cfg.llama_dir if cfg.llama_dir else 'from scratch'}, dim {lm.args.dim}, "
          f"{lm.args.n_layers} layers, vocabulary {lm.args.vocab_size}, "
          f"{sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters")
    metrics = {"checkpoint": checkpoint, "vision_layers": layers, "core_depth": core_depth}
    for stage, steps, lr in ((0, cfg.lm_pretrain_steps, cfg.lr_lm_pretrain), (1, cfg.stage1_steps, cfg.lr_stage1),
                             (2, cfg.stage2_steps, cfg.lr_stage2)):
        if stage == 0 and cfg.llama_dir or stage == 2 and steps <= 0:
            continue  # a real Llama needs no stage 0; --stage2_steps=0: stage 1 alone, §3's frozen-feature probe
        if stage == 2:
            add_layerscale(vlm, cfg.ls_init_value, cfg.drop_path)
        losses = train_stage(vlm, train_pool, cfg, stage, steps, lr, tokenizer, device) if steps > 0 else None
        metrics[f"stage{stage}_final_loss"] = sum(losses[-20:]) / len(losses[-20:]) if losses else None
        if stage > 0:
            result = metrics[f"stage{stage}"] = val_pool and answer_accuracy(
                vlm, tokenizer, val_pool, cfg.eval_batch_size, cfg.max_new_tokens)
            if result:
                print(f"after stage {stage}: held-out answer accuracy {result['accuracy']:.3f} on "
                      f"{result['num_questions']} questions { {k: round(v, 3) for k, v in result['per_kind'].items()} }"
                      f", held-out phrasings {result['held_out_phrasing_accuracy']}")
    metrics.update(final=metrics.get("stage2") or metrics["stage1"], minutes=(time.time() - started) / 60)
    vlm_path, tower_path = os.path.join(cfg.out_dir, "vlm.pt"), os.path.join(cfg.out_dir, "pe_lang_tower.pt")
    save_vlm(vlm, vlm_path, cfg, metrics, vocab)
    pe_model.export_tower(vlm.vision, tower_path)  # PE-Lang style: headless, LayerScale, drop path off
    training.write_json(os.path.join(cfg.out_dir, "metrics.json"), metrics)
    table = accuracy_table(metrics)
    pe_model.atomic_write(os.path.join(cfg.out_dir, "metrics.md"),
                          f"# align_lang.py: {checkpoint}, first {layers} of {core_depth} blocks\n\n{table}\n")
    print(f"wrote {vlm_path} (load_vlm), {tower_path} (pe_model.load_model), metrics.json and metrics.md "
          f"in {metrics['minutes']:.1f} min")
    if metrics["final"] is not None:
        print(table + "\ne.g.\n" + "\n".join("  " + line for line in metrics["final"]["examples"]))


def accuracy_table(metrics):
    """Held-out answer accuracy (%) after each stage: overall, on held-out phrasings, per question type."""
    stages = [name for name in ("stage1", "stage2") if metrics.get(name)]
    kinds = sorted({kind for name in stages for kind in metrics[name]["per_kind"]})
    percent = lambda value: None if value is None else 100 * value  # noqa: E731
    rows = [[name.replace("stage", "stage "), percent(metrics[name]["accuracy"]),
             percent(metrics[name]["held_out_phrasing_accuracy"])]
            + [percent(metrics[name]["per_kind"].get(kind)) for kind in kinds] for name in stages]
    return training.markdown_table(["after", "accuracy %", "held-out phrasings %"] + kinds, rows)


if __name__ == "__main__":
    main()
