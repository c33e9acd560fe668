"""The Perception Encoder (PE) model (Bolya et al. 2025, arXiv 2504.13181): vision and text towers, CLIP, tokenizer,
zero-shot prompt ensemble, preprocessing, building and loading. Written from the paper and the official code
(facebookresearch/perception_models, core/vision_encoder/pe.py), checked against its outputs (tests/fixtures, 1e-5
in float32). Official state_dict keys: official checkpoints load strict, ours load into the official code.

    import pe_model
    model = pe_model.CLIP.from_config("PE-Core-B16-224", checkpoint_path="PE-Core-B16-224.pt")  # strict
    image = pe_model.preprocess_image(PIL.Image.open("cat.jpg"), model.visual.image_size)[None]
    text = pe_model.tokenize(["a photo of a cat"], model.context_length)
    image_features, text_features, logit_scale = model(image, text)  # L2-normalised, exp(scale)
    tokens = model.visual.forward_features(image, layer_idx=-3)       # an intermediate layer's tokens
    every_layer = model.visual.forward_all_layers(image)              # all layers, one forward pass
"""

import gzip
import html
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.rope_attention import rope_angles_2d, rope_attention


# ---------------------------------------------------------------------------------------------------------
# Configs. Field names are the official PEConfig / PETextConfig constructor arguments, so a config dict from
# the official code (or from our checkpoints and fixtures) maps onto them one to one.
@dataclass
class PEConfig:
    """Vision tower (official `VisionTransformer` arguments)."""

    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: Optional[int]
    ls_init_value: Optional[float] = None  # LayerScale init; None = no LayerScale (and no `gamma` keys)
    drop_path: float = 0.0
    image_size: int = 224  # pretraining size: defines the stored position-embedding grid only
    use_abs_posemb: bool = True
    use_cls_token: bool = False
    use_rope2d: bool = True
    pool_type: str = "attn"  # "attn" | "tok" | "avg" | "none"
    attn_pooler_heads: int = 8
    use_ln_pre: bool = True
    use_ln_post: bool = True


@dataclass
class PETextConfig:
    """Text tower (official `TextTransformer` arguments)."""

    context_length: int = 32
    width: int = 512
    heads: int = 8
    layers: int = 12
    output_dim: int = 512
    mlp_ratio: float = 4.0
    vocab_size: int = 49408


G_MLP_RATIO = 8960 / 1536  # int(1536 * ratio) = 8960: PE-G's MLP width


def _core(patch, size, width, layers, heads, out, cls=True, ratio=4.0):
    return PEConfig(patch, width, layers, heads, ratio, out, image_size=size, use_cls_token=cls)


def _headless(patch, size, width, layers, heads, cls=True, ls=None, ratio=4.0):  # Lang / Spatial: tokens out
    return PEConfig(patch, width, layers, heads, ratio, None, ls_init_value=ls, image_size=size,
                    use_cls_token=cls, pool_type="none", use_ln_post=False)


# Every released config by its official name (official core/vision_encoder/config.py); Lang, Spatial: towers only.
VISION_CONFIGS = {
    "PE-Core-T16-384": _core(16, 384, 192, 12, 3, 512),
    "PE-Core-S16-384": _core(16, 384, 384, 12, 6, 512),
    "PE-Core-B16-224": _core(16, 224, 768, 12, 12, 1024),
    "PE-Core-L14-336": _core(14, 336, 1024, 24, 16, 1024),
    "PE-Core-G14-448": _core(14, 448, 1536, 50, 16, 1280, cls=False, ratio=G_MLP_RATIO),
    # PE-Lang keeps the first 23 of L's 24 blocks and 47 of G's 50 (the best language layers, §4)
    "PE-Lang-L14-448": _headless(14, 448, 1024, 23, 16, cls=True, ls=0.1),
    "PE-Lang-G14-448": _headless(14, 448, 1536, 47, 16, cls=False, ls=0.1, ratio=G_MLP_RATIO),
    "PE-Lang-L14-448-Tiling": _headless(14, 448, 1024, 23, 16, cls=True, ls=0.1),
    "PE-Lang-G14-448-Tiling": _headless(14, 448, 1536, 47, 16, cls=False, ls=0.1, ratio=G_MLP_RATIO),
    "PE-Spatial-T16-512": _headless(16, 512, 192, 12, 3),
    "PE-Spatial-S16-512": _headless(16, 512, 384, 12, 6),
    "PE-Spatial-B16-512": _headless(16, 512, 768, 12, 12),
    "PE-Spatial-L14-448": _headless(14, 448, 1024, 24, 16),
    "PE-Spatial-G14-448": _headless(14, 448, 1536, 50, 16, cls=False, ls=0.1, ratio=G_MLP_RATIO),
    # The stage scripts' defaults, trained on a CPU in minutes: the released architecture, narrower and shallower
    "PE-Core-Nano8-64": _core(8, 64, 128, 6, 4, 128),
    "PE-Core-Micro8-64": _core(8, 64, 192, 8, 6, 256),
    "PE-Core-NanoDeep8-64": _core(8, 64, 128, 12, 4, 128),  # Nano at twice the depth: the layer analysis of §3
}
TEXT_CONFIGS = {
    "PE-Core-T16-384": PETextConfig(32, 512, 8, 12, 512),
    "PE-Core-S16-384": PETextConfig(32, 512, 8, 12, 512),
    "PE-Core-B16-224": PETextConfig(32, 1024, 16, 24, 1024),
    "PE-Core-L14-336": PETextConfig(32, 1024, 16, 24, 1024),
    "PE-Core-G14-448": PETextConfig(72, 1280, 20, 24, 1280),
    "PE-Core-Nano8-64": PETextConfig(32, 128, 4, 4, 128),
    "PE-Core-Micro8-64": PETextConfig(32, 192, 6, 6, 256),
    "PE-Core-NanoDeep8-64": PETextConfig(32, 128, 4, 4, 128),
}
INIT_LOGIT_SCALE = math.log(1 / 0.07)


def model_config(name):
    """The config dict of a named model, in the format of the fixtures and of our checkpoints."""
    if name not in VISION_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(VISION_CONFIGS)}")
    text = ({"text_cfg": asdict(TEXT_CONFIGS[name]), "init_logit_scale": INIT_LOGIT_SCALE}
            if name in TEXT_CONFIGS else {})
    return {"model_class": "CLIP" if text else "VisionTransformer", "vision_cfg": asdict(VISION_CONFIGS[name]), **text}


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: OpenAI CLIP's byte-level BPE, which PE uses unchanged (the official tokenizer). The merges file
# ships in assets/ (MIT, see assets/LICENSE-bpe_simple_vocab.txt), so nothing is downloaded.
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN_ID, EOT_TOKEN_ID, PAD_TOKEN_ID = 49406, 49407, 0
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")  # ids 49406, 49407; official (open_clip), not <|startoftext|>


def _byte_to_unicode():
    """Map each of the 256 bytes to a printable unicode character, so BPE runs on strings without whitespace or
    control characters: printable latin-1 bytes to themselves, then the rest to 256 + n (the first 256 ids' order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class SimpleTokenizer:
    """CLIP's BPE tokenizer: clean text, split it with CLIP's pattern, then merge byte pairs by rank."""

    def __init__(self, bpe_path=BPE_PATH):
        import regex  # the \p{L} / \p{N} classes of the pattern need the `regex` module
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # the first line is a header; the vocabulary keeps 49152 - 256 - 2 merges (OpenAI's choice)
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {token: token for token in SPECIAL_TOKENS}
        # the special tokens (a text containing one encodes it as its id, as the official tokenizer does),
        # contractions, letter runs, single digits, runs of other non-space characters
        self.pattern = regex.compile(
            "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)
        self.vocab_size = len(vocab)  # 49408
        assert [self.encoder[t] for t in SPECIAL_TOKENS] == [SOT_TOKEN_ID, EOT_TOKEN_ID]

    @staticmethod
    def clean(text):
        import ftfy
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # twice: scraped text is often double-escaped
        return re.sub(r"\s+", " ", text).strip().lower()

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]  # the last symbol carries the end-of-word marker
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                pair = i < len(word) - 1 and (word[i], word[i + 1]) == best
                merged.append(word[i] + word[i + 1] if pair else word[i])
                i += 2 if pair else 1
            word = merged
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        """BPE ids of a text, without start and end tokens."""
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids):
        data = bytearray(self.byte_decoder[c] for c in "".join(self.decoder[int(i)] for i in ids))
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache(maxsize=1)
def get_tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=32):
    """Texts -> LongTensor (len(texts), context_length): [SOT] + BPE + [EOT], zero-padded; an over-long text
    is truncated and its last id forced to EOT, as the official tokenizer does. Context 32 (72 for G)."""
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN_ID] + get_tokenizer().encode(text) + [EOT_TOKEN_ID]
        ids = ids if len(ids) <= context_length else ids[: context_length - 1] + [EOT_TOKEN_ID]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def format_prompt(template, name):
    """A prompt from a template: the official benchmark's "{}" format ("a photo of a {}."), ours with {a} (the
    name with its article: "an apple") and {name}, or a callable name -> text."""
    if callable(template):
        return template(name)
    return template.format(name, a=f"{'an' if name[:1] in 'aeiou' else 'a'} {name}", name=name)


@torch.no_grad()
def zero_shot_classifier(model, class_names, templates, batch_size=256, device="cpu", encode_text=None):
    """The zero-shot classifier (C, D): per class, the renormalised mean of the normalised text embeddings of its name
    in every template (CLIP's prompt ensemble). encode_text(tokens) -> normalised features (a wrapped model's own)."""
    encode_text = encode_text or (lambda tokens: model.encode_text(tokens, normalize=True))
    tokens = tokenize([format_prompt(t, name) for name in class_names for t in templates], model.context_length)
    tokens = tokens[:, : max(1, int((tokens != PAD_TOKEN_ID).sum(dim=1).max()))]  # exact: the tower is causal
    features = torch.cat([encode_text(chunk.to(device)).float() for chunk in tokens.split(batch_size)])
    return F.normalize(features.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing (the official transforms): squash resize (aspect ratio not kept), bilinear, mean = std = 0.5.
def preprocess_image(image, image_size, center_crop=False):
    """PIL image -> (3, H, W) in [-1, 1], image_size an int or (H, W); center_crop: resize the short side, crop."""
    from PIL import Image
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = image.convert("RGB")
    if center_crop:
        scale = max(height / image.height, width / image.width)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.BILINEAR)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image.resize((width, height), Image.BILINEAR)  # PIL's bilinear antialiases when shrinking
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def sample_frame_indices(total_frames, num_frames=8):
    """The official video demo's frames int(i * total / T), i < T: exactly T, repeated in a shorter video."""
    if total_frames <= 0:
        raise ValueError(f"cannot sample frames from a video with {total_frames} frames")
    return [int(i * total_frames / num_frames) for i in range(num_frames)]


# ---------------------------------------------------------------------------------------------------------
# Building blocks. Attribute names reproduce the official state_dict keys.
class LayerScale(nn.Module):
    def __init__(self, width, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p (training only)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head attention with one fused q/k/v projection (nn.MultiheadAttention's keys: in_proj_weight (3W, W),
    in_proj_bias, out_proj): vision blocks (2D RoPE), text blocks (causal), attention pooling (a probe's query)."""

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, rope_angles=None, causal=False, query=None):
        width = x.shape[-1]  # x: (B, N, W) tokens; query: (B, M, W), or None for self-attention
        if query is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            (w_q, w_kv), (b_q, b_kv) = (p.split([width, 2 * width]) for p in (self.in_proj_weight, self.in_proj_bias))
            q = F.linear(query, w_q, b_q)
            k, v = F.linear(x, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, W/H)
        out = (rope_attention(q, k, v, rope_angles) if rope_angles is not None  # Triton on CUDA, rotate + SDPA on CPU
               else F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, H, M, W/H) -> (B, M, W)


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()  # exact (erf) GELU, as the official act_layer
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x)))."""

    def __init__(self, width, heads, mlp_ratio=4.0, ls_init_value=None, drop_path=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = MLP(width, int(width * mlp_ratio))  # int() truncates: G's 1536 * 8960/1536 = 8960
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope_angles=None, causal=False):
        x = x + self.drop_path(self.ls_1(self.attn(self.ln_1(x), rope_angles=rope_angles, causal=causal)))
        return x + self.drop_path(self.ls_2(self.mlp(self.ln_2(x))))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, ls_init_value=None, drop_path=0.0):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, drop_path) for _ in range(layers))
        self.grad_checkpointing = False  # recompute each block's activations in the backward (saves memory)

    def run_block(self, index, x, rope_angles=None, causal=False):
        block = self.resblocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, rope_angles, causal, use_reentrant=False)
        return block(x, rope_angles=rope_angles, causal=causal)

    def forward(self, x, rope_angles=None, causal=False, stop_after=None):
        for i in range(len(self.resblocks) if stop_after is None else stop_after + 1):
            x = self.run_block(i, x, rope_angles, causal)
        return x


class AttentionPooling(nn.Module):
    """A learned probe attends over all tokens (no residual), then a residual MLP of ratio 4 (official code)."""

    def __init__(self, width, heads, num_probe=1, mlp_ratio=4.0):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, num_probe, width))
        self.attn = Attention(width, heads)
        self.layernorm = nn.LayerNorm(width, eps=1e-5)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x):
        x = self.attn(x, query=self.probe.expand(x.shape[0], -1, -1))  # (B, N, W) -> (B, 1, W)
        return x + self.mlp(self.layernorm(x))


# ---------------------------------------------------------------------------------------------------------
# Vision tower (official `VisionTransformer`).
class VisionTransformer(nn.Module):
    def __init__(self, patch_size, width, layers, heads, mlp_ratio, output_dim=None, ls_init_value=None,
                 drop_path=0.0, image_size=224, use_abs_posemb=True, use_cls_token=False, use_rope2d=True,
                 pool_type="attn", attn_pooler_heads=8, use_ln_pre=True, use_ln_post=True):
        super().__init__()
        if pool_type not in ("attn", "tok", "avg", "none"):
            raise ValueError(f"pool_type must be attn, tok, avg or none, not {pool_type!r}")
        self.config = PEConfig(patch_size, width, layers, heads, mlp_ratio, output_dim, ls_init_value, drop_path,
                               image_size, use_abs_posemb, use_cls_token, use_rope2d, pool_type,
                               attn_pooler_heads, use_ln_pre, use_ln_post)
        self.patch_size, self.width, self.heads, self.image_size = patch_size, width, heads, image_size
        self.output_dim, self.pool_type, self.use_cls_token = output_dim, pool_type, use_cls_token
        self.use_rope2d = use_rope2d
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        if use_cls_token:
            self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.posemb_grid = image_size // patch_size
        if use_abs_posemb:
            self.positional_embedding = nn.Parameter(scale * torch.randn(use_cls_token + self.posemb_grid**2, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-5) if use_ln_pre else nn.Identity()
        self.transformer = Transformer(width, layers, heads, mlp_ratio, ls_init_value, drop_path)
        self.ln_post = nn.LayerNorm(width, eps=1e-5) if use_ln_post else nn.Identity()
        if pool_type == "attn":
            self.attn_pool = AttentionPooling(width, attn_pooler_heads)
        if output_dim is not None:
            self.proj = nn.Parameter(scale * torch.randn(width, output_dim))  # (in, out): used as x @ proj

    @property
    def layers(self):
        return len(self.transformer.resblocks)

    @classmethod
    def from_config(cls, name, checkpoint_path=None, **load_kwargs):
        """A named vision tower (a Core name gives its tower), with weights from `checkpoint_path` if given."""
        model = cls(**model_config(name)["vision_cfg"])
        return load_checkpoint(model, checkpoint_path, **load_kwargs) if checkpoint_path is not None else model

    def truncate(self, layer_idx):
        """Keep blocks 0..layer_idx (official semantics; PE-Lang towers are built this way)."""
        keep = (self.layers + layer_idx) % self.layers + 1
        self.transformer.resblocks = self.transformer.resblocks[:keep]
        self.config.layers = keep

    def interpolated_posemb(self, grid_h, grid_w):
        """The position embedding (N, W) at a (grid_h, grid_w) grid: resized bilinearly (no antialias), cls row kept."""
        posemb = self.positional_embedding
        if (grid_h, grid_w) == (self.posemb_grid, self.posemb_grid):
            return posemb
        cls_row, grid = (posemb[:1], posemb[1:]) if self.use_cls_token else (posemb[:0], posemb)
        grid = grid.reshape(1, self.posemb_grid, self.posemb_grid, -1).permute(0, 3, 1, 2)  # (1, W, g0, g0)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return torch.cat([cls_row, grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])

    def embed(self, x, patch_mask=None):
        """Images (B, 3, H, W) -> tokens entering block 0 (B, N, W), RoPE angles (N, head_dim). patch_mask (B, gh*gw)
        bool: masked patches enter as zero pixels would (conv1 has no bias): their position embedding alone (§2.1)."""
        x = self.conv1(x)  # (B, W, gh, gw); remainder pixels past the last full patch are dropped
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, W), row-major
        if patch_mask is not None:
            x = x.masked_fill(patch_mask.to(x.device).view(x.shape[0], -1, 1), 0.0)
        if self.use_cls_token:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        if hasattr(self, "positional_embedding"):
            x = x + self.interpolated_posemb(grid_h, grid_w).to(x.dtype)
        angles = self.rope_table(grid_h, grid_w, x.device) if self.use_rope2d else None
        return self.ln_pre(x), angles

    def rope_table(self, grid_h, grid_w, device):
        """A grid's RoPE angles (N, head_dim), built once per device for every block and forward (16 grids kept)."""
        key = (grid_h, grid_w, self.width // self.heads, self.use_cls_token, torch.device(device))
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # a traced table must not outlive its trace
            return rope_angles_2d(*key[:4], device=key[4])
        tables = self.__dict__.setdefault("_rope_tables", {})
        if key not in tables:
            if len(tables) >= 16:
                tables.pop(next(iter(tables)))
            with torch.inference_mode(False):  # a normal tensor, one that a later training step can save for backward
                tables[key] = rope_angles_2d(*key[:4], device=key[4])
        return tables[key]

    def _finish(self, x, norm, strip_cls_token):
        x = self.ln_post(x) if norm else x
        return x[:, 1:] if strip_cls_token and self.use_cls_token else x

    def forward_features(self, x, norm=False, layer_idx=-1, strip_cls_token=False, patch_mask=None):
        """Tokens (B, N, W) after block `layer_idx` (0-based, -1 the last); norm: ln_post; patch_mask: see embed."""
        x, angles = self.embed(x, patch_mask)
        x = self.transformer(x, angles, stop_after=(self.layers + layer_idx) % self.layers)
        return self._finish(x, norm, strip_cls_token)

    def forward_all_layers(self, x, norm=False, strip_cls_token=False):
        """Every block's tokens from ONE forward pass (layer-wise probing; the official API needs one pass per layer):
        `layers` tensors (B, N, W), entry i = forward_features(x, layer_idx=i, norm=..., strip_cls_token=...)."""
        x, angles = self.embed(x)
        outputs = []
        for i in range(self.layers):
            x = self.transformer.run_block(i, x, angles)
            outputs.append(self._finish(x, norm, strip_cls_token))
        return outputs

    def pool(self, x):
        """ln_post'ed tokens (B, N, W) -> the tower's output: pooled and projected (B, D), or all tokens."""
        if self.pool_type == "attn":
            x = self.attn_pool(x).squeeze(1)
        elif self.pool_type == "tok":
            x = x[:, 0]
        elif self.pool_type == "avg":
            x = x.mean(dim=1)
        return x @ self.proj if self.output_dim is not None else x

    def forward(self, x, **kwargs):
        return self.pool(self.forward_features(x, norm=True, **kwargs))


# ---------------------------------------------------------------------------------------------------------
# Text tower (official `TextTransformer`): causal, no RoPE, no LayerScale; pooled at the highest token id (the
# end-of-text token), projected by a raw (W_t, D) matrix.
class TextTransformer(nn.Module):
    def __init__(self, context_length=32, width=512, heads=8, layers=12, output_dim=512, mlp_ratio=4.0,
                 vocab_size=49408):
        super().__init__()
        self.text_config = PETextConfig(context_length, width, heads, layers, output_dim, mlp_ratio, vocab_size)
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        # left uninitialised by the official code; initialised here as open_clip does (std 0.01, W_t^-0.5)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_text_tokens(self, text):
        """Token ids (B, L <= context_length) -> the states after ln_final (B, L, W_t)."""
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than context_length {self.context_length}")
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        return self.ln_final(self.transformer(x, causal=True))

    def encode_text(self, text, normalize=False):
        x = self.encode_text_tokens(text)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection  # EOT: highest id
        return F.normalize(x, dim=-1) if normalize else x


class CLIP(TextTransformer):
    """Vision tower `visual` + text tower (its keys at the top level, as in the official code) + logit_scale."""

    def __init__(self, vision_cfg, text_cfg, init_logit_scale=INIT_LOGIT_SCALE):
        super().__init__(**(asdict(text_cfg) if isinstance(text_cfg, PETextConfig) else text_cfg))
        self.visual = VisionTransformer(**(asdict(vision_cfg) if isinstance(vision_cfg, PEConfig) else vision_cfg))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.image_size = self.visual.image_size

    @classmethod
    def from_config(cls, name, checkpoint_path=None, **load_kwargs):
        """A named PE-Core CLIP model; weights from `checkpoint_path` (an official .pt or ours) if given."""
        if name not in TEXT_CONFIGS:
            raise ValueError(f"{name!r} is not a CLIP model; CLIP models: {', '.join(TEXT_CONFIGS)}")
        model = cls(VISION_CONFIGS[name], TEXT_CONFIGS[name])
        return load_checkpoint(model, checkpoint_path, **load_kwargs) if checkpoint_path is not None else model

    def encode_image(self, image, normalize=False):
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_video(self, video, normalize=False):
        """Video (B, T, 3, H, W) -> (B, D): the mean of its frames' embeddings (§2.2), normalised ones if normalize
        (the mean is not renormalised: official semantics)."""
        x = self.encode_image(video.flatten(0, 1), normalize=normalize)  # (B*T, D)
        return x.unflatten(0, video.shape[:2]).mean(dim=1)

    def forward(self, image=None, text=None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


# ---------------------------------------------------------------------------------------------------------
# Building and loading.
def build_model(name_or_config):
    """A model from an official name or a config dict ({"model_class", "vision_cfg", "text_cfg", ...})."""
    config = model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if not isinstance(config, dict) or "vision_cfg" not in config:
        raise ValueError("a model config is a dict with 'model_class' and 'vision_cfg' (and 'text_cfg' for CLIP)")
    vision_cfg = {f.name: config["vision_cfg"][f.name] for f in fields(PEConfig) if f.name in config["vision_cfg"]}
    model_class = config.get("model_class", "CLIP" if "text_cfg" in config else "VisionTransformer")
    if model_class == "CLIP":
        return CLIP(vision_cfg, config["text_cfg"], config.get("init_logit_scale", INIT_LOGIT_SCALE))
    if model_class == "VisionTransformer":
        return VisionTransformer(**vision_cfg)
    raise ValueError(f"model_class must be 'CLIP' or 'VisionTransformer', not {model_class!r}")


def get_config(model):
    """The config dict of a built model (what build_model takes back; our checkpoints store it)."""
    if isinstance(model, CLIP):
        return {"model_class": "CLIP", "vision_cfg": asdict(model.visual.config),
                "text_cfg": asdict(model.text_config), "init_logit_scale": INIT_LOGIT_SCALE}
    return {"model_class": "VisionTransformer", "vision_cfg": asdict(model.config)}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and wrongly-shaped key."""


def read_checkpoint_file(path):
    """torch.load(path, weights_only=True) or safetensors onto the CPU; one short error if missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if str(path).endswith(".safetensors"):  # timm's and the hub's format; ours stores its config as metadata
        with _optional("safetensors.torch", "safetensors").safe_open(path, "pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        return {"model": state, "config": json.loads(meta["config"])} if "config" in meta else state
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds (UnpicklingError, RuntimeError, EOFError, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
        if "weights only" in reason.lower() or "weights_only" in reason:  # never suggest unpickling it instead
            reason = "damaged, or it holds objects beyond tensors and plain containers, which are never unpickled"
        raise ValueError(f"checkpoint {path}: cannot be read as a torch checkpoint ({reason})") from error


def read_state_dict(source):
    """The state dict of a path or dict: bare, or under "state_dict" / "weights" / "model" (ours), no "module."."""
    state_dict = read_checkpoint_file(source) if isinstance(source, (str, os.PathLike)) else source
    for wrapper in ("state_dict", "weights", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("checkpoint holds no state dict of tensors (looked at the top level and under "
                         "'state_dict', 'weights' and 'model')")
    return {k.replace("module.", ""): v for k, v in state_dict.items()}


def _optional(module, package):  # an optional dependency, or one ImportError saying how to install it
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"this needs {package}: pip install {package}") from None


# Vision tower keys as (official, timm) heads, swapped either way (the longest matching head; block keys after
# `blocks.N.`); open_clip holds timm's tower under `visual.trunk.` and the official text tower under `text.`.
TIMM_NAMES = [pair.split("=") for pair in """conv1.=patch_embed.proj. class_embedding=cls_token
    positional_embedding=pos_embed ln_pre.=norm_pre. ln_post.=norm. proj=head.weight attn_pool.probe=attn_pool.latent
    attn_pool.layernorm.=attn_pool.norm. attn_pool.attn.out_proj.=attn_pool.proj. attn_pool.mlp.c_fc.=attn_pool.mlp.fc1.
    attn_pool.mlp.c_proj.=attn_pool.mlp.fc2.""".split()]
TIMM_BLOCK_NAMES = [pair.split("=") for pair in """ln_1.=norm1. ln_2.=norm2. ls_1.gamma=gamma_1 ls_2.gamma=gamma_2
    attn.in_proj_=attn.qkv. attn.out_proj.=attn.proj. mlp.c_fc.=mlp.fc1. mlp.c_proj.=mlp.fc2.""".split()]
TIMM_RESHAPE = {"class_embedding": lambda v: v.reshape(1, 1, -1), "cls_token": lambda v: v.reshape(-1), "proj": torch.t,
                "positional_embedding": lambda v: v[None], "pos_embed": lambda v: v[0], "head.weight": torch.t}


def _swap(key, table, to_timm):
    heads = [(a, b) if to_timm else (b, a) for a, b in table]
    a, b = max([h for h in heads if key.startswith(h[0])] or [("", "")], key=lambda h: len(h[0]))
    return b + key[len(a):]


def _timm_vision(sd, to_timm):
    """A tower's state dict, official -> timm or back; timm's pool has q + kv, its head a bias (zero, dropped)."""
    out = {"head.bias": sd["proj"].new_zeros(sd["proj"].shape[1])} if to_timm and "proj" in sd else {}
    for k, v in sd.items():
        block = re.match(r"(transformer\.resblocks|blocks)\.(\d+)\.(.*)", k)
        pool = re.fullmatch(r"attn_pool\.(attn\.in_proj_|q\.|kv\.)(weight|bias)", k)
        if to_timm and pool:
            out[f"attn_pool.q.{pool[2]}"], out[f"attn_pool.kv.{pool[2]}"] = v.split([len(v) // 3, len(v) * 2 // 3])
        elif pool and pool[1] == "q.":  # back: q and kv fused again
            out[f"attn_pool.attn.in_proj_{pool[2]}"] = torch.cat([v, sd.get(f"attn_pool.kv.{pool[2]}", v[:0])])
        elif (pool and f"attn_pool.q.{pool[2]}" in sd) or (k == "head.bias" and not to_timm and not v.any()):
            continue
        elif block:
            out[f"{'blocks' if to_timm else 'transformer.resblocks'}.{block[2]}."
                f"{_swap(block[3], TIMM_BLOCK_NAMES, to_timm)}"] = v
        else:
            out[_swap(k, TIMM_NAMES, to_timm)] = TIMM_RESHAPE.get(k, lambda t: t)(v)
    return out


def detect_layout(state_dict):
    """"open_clip" (keys under `visual.trunk.` / `text.`), "timm" (`patch_embed.`, `blocks.`) or "official"."""
    return ("open_clip" if any(k.startswith(("visual.trunk.", "text.")) for k in state_dict) else
            "timm" if any(k.startswith(("patch_embed.", "blocks.")) for k in state_dict) else "official")


def convert_state_dict(state_dict, to="official"):
    """A state dict in any layout (detect_layout) -> `to`: "official", "timm" (the vision tower, as
    timm.create_model("vit_pe_core_tiny_patch16_384") loads it strict) or "open_clip" (open_clip's PE-Core-*)."""
    if to not in ("official", "timm", "open_clip"):
        raise ValueError(f"to must be 'official', 'timm' or 'open_clip', not {to!r}")
    sd, layout = dict(state_dict), detect_layout(state_dict)
    if layout == "timm":
        sd = _timm_vision(sd, False)
    elif layout == "open_clip":
        trunk = _timm_vision({k[13:]: v for k, v in sd.items() if k.startswith("visual.trunk.")}, False)
        sd = {**{f"visual.{k}": v for k, v in trunk.items()},
              **{k[5:] if k.startswith("text.") else k: v for k, v in sd.items() if not k.startswith("visual.trunk.")}}
    if to == "official":
        return sd
    clip = any(k.startswith("visual.") for k in sd)
    tower = _timm_vision({k[7:]: v for k, v in sd.items() if k.startswith("visual.")} if clip else sd, True)
    if to == "timm":
        return tower
    text = {k if k == "logit_scale" else f"text.{k}": v for k, v in sd.items() if clip and not k.startswith("visual.")}
    return {**{f"visual.trunk.{k}": v for k, v in tower.items()}, **text}


def load_checkpoint(model, source, strict=True, truncate=False, drop_head=False, name=None):
    """Load a path or state dict in any layout (official, timm's `vit_pe_*` tower, open_clip's `PE-Core-*` CLIP;
    .pt / .pth / .bin / .safetensors) into `model` and return it; a CLIP checkpoint loads into a bare tower, a tower
    into a CLIP's `visual`. (At other resolutions timm rescales RoPE positions and resizes bicubically, so its outputs
    differ from the official code's, which we follow.) truncate=True drops blocks the model lacks (PE-Lang keeps a
    Core's first N); drop_head=True drops ln_post / attn_pool / proj weights it lacks. Any other mismatch raises one
    CheckpointMismatchError listing every key that is missing, unexpected or wrongly shaped; strict=False loads
    what fits."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "state dict")
    state_dict = read_state_dict(source)
    layout = detect_layout(state_dict)
    if isinstance(model, CLIP) and (layout == "timm" or "conv1.weight" in state_dict):  # a vision tower alone
        load_checkpoint(model.visual, state_dict, strict, truncate, drop_head, label)
        return model
    state_dict, label = convert_state_dict(state_dict), f"{label} ({layout} layout)"
    if isinstance(model, VisionTransformer) and any(k.startswith("visual.") for k in state_dict):
        state_dict = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    own = model.state_dict()
    prefix = "visual." if isinstance(model, CLIP) else ""
    if truncate:
        block = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        depth = (model.visual if isinstance(model, CLIP) else model).layers
        state_dict = {k: v for k, v in state_dict.items() if not ((m := block.match(k)) and int(m[1]) >= depth)}
    head = tuple(prefix + h for h in ("ln_post.", "attn_pool.", "proj"))
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(head)}
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    wrong_shape = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                         for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    if strict and (missing or unexpected or wrong_shape):
        lines = [f"checkpoint {label} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title} keys ({len(keys)}): {shown}")
        if any(".resblocks." in k for k in unexpected) and not truncate:
            lines.append("  (a deeper checkpoint into a truncated tower: pass truncate=True)")
        if any(k.startswith(head) for k in unexpected):
            lines.append("  (head weights the tower does not have: pass drop_head=True)")
        lines.append("  is the model config the checkpoint's? Known configs: " + ", ".join(VISION_CONFIGS))
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}, strict=False)
    return model


def atomic_write(path, payload):
    """Write `payload` (str, bytes or a function of a binary file) to a temporary file beside `path`, then rename it:
    a crash never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            payload(f) if callable(payload) else f.write(payload.encode() if isinstance(payload, str) else payload)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(obj, path):
    """torch.save, atomically; a .safetensors path takes a state dict or our {"model", "config"} (config: metadata)."""
    if not str(path).endswith(".safetensors"):
        return atomic_write(path, lambda f: torch.save(obj, f))
    state = {k: v.detach().cpu().contiguous().clone() for k, v in read_state_dict(obj).items()}  # unshared
    meta = {"config": json.dumps(obj["config"])} if isinstance(obj.get("config"), dict) else None
    atomic_write(path, _optional("safetensors.torch", "safetensors").save(state, meta))


def checkpoint_config(blob, name=None, label="checkpoint"):
    """The model config of a checkpoint (a path or its loaded dict): the official `name`'s if given (official
    files store none), else the one our checkpoints store. ValueError naming the file when neither exists."""
    if name:
        return model_config(name)
    blob = read_checkpoint_file(blob) if isinstance(blob, (str, os.PathLike)) else blob
    if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
        return blob["config"]
    raise ValueError(f"{label} stores no model config (an official file?): name the model, e.g. "
                     "--model=PE-Core-B16-224")


def load_model(checkpoint=None, name=None):
    """A model built and loaded from one of our checkpoints (they store their config) or an official file and its
    official `name` (found in the file name if not given: official files store no config)."""
    if checkpoint is None:
        if name is None:
            raise ValueError("give a checkpoint path, a model name, or both")
        return build_model(name)
    blob = read_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if name is None and not (isinstance(blob, dict) and isinstance(blob.get("config"), dict)):
        name = official_name(str(checkpoint)) if isinstance(checkpoint, (str, os.PathLike)) else None
    model = build_model(checkpoint_config(blob, name, f"checkpoint {checkpoint}"))
    return load_checkpoint(model, blob, name=str(checkpoint))


def official_name(text):
    """The longest official config name in `text` (a file name, a repo, a hub cache path), or None."""
    return max([n for n in VISION_CONFIGS if n in text] or [None], key=lambda n: len(n or ""))


def hub_download(name, **hub_kwargs):
    """A hub file's local path via huggingface_hub's cache (HF_HUB_OFFLINE, HF_HOME; cache_dir, local_files_only,
    revision...): facebook/<name>/<name>.pt for an official name (as the official code), or OWNER/REPO[/FILE]."""
    parts = (name if "/" in name else f"facebook/{name}").split("/")
    return _optional("huggingface_hub", "huggingface_hub").hf_hub_download(
        "/".join(parts[:2]), "/".join(parts[2:]) or f"{parts[1]}.pt", **hub_kwargs)


def from_pretrained(name, **hub_kwargs):
    """A model from the hub by its official name ("PE-Core-L14-336") or "REPO[/FILE]" (hub_download)."""
    return load_model(path := hub_download(name, **hub_kwargs), official_name(name) or official_name(path))


def headless_config(vision_cfg, **changes):
    """A PE-Lang / PE-Spatial style vision config: tokens out (no ln_post, pooling or projection)."""
    return {**vision_cfg, "pool_type": "none", "output_dim": None, "use_ln_post": False, **changes}


def export_tower(tower, path, **extra):
    """Save a vision tower alone, as the official PE-Lang / PE-Spatial files: its state_dict, its config with drop
    path off (load_model(path) rebuilds it; also written as JSON beside it) and the `extra` entries (metrics...)."""
    config = get_config(tower)
    config["vision_cfg"]["drop_path"] = 0.0
    state = {k: v.detach().cpu().clone() for k, v in tower.state_dict().items()}
    save_checkpoint({"model": state, "config": config, **extra}, path)
    atomic_write(os.path.splitext(path)[0] + ".json", json.dumps(config, indent=2))
    return config
