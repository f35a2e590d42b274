"""Mix Transformer (MiT-B0 … B5), the hierarchical encoder of SegFormer (Xie et al., "SegFormer: Simple and
Efficient Design for Semantic Segmentation with Transformers", NeurIPS 2021), as in the official code
github.com/NVlabs/SegFormer ``mmseg/models/backbones/mix_transformer.py`` (DAFormer's copy is the same network).

Exactly as official:

* four stages; each starts with an overlapping patch embedding (conv 7x7 stride 4, then 3x3 stride 2, padding
  k // 2, LayerNorm), runs ``depths[i]`` transformer blocks and a final LayerNorm, and returns its tokens as
  an N×C×H×W map (strides 4, 8, 16, 32);
* block: pre-norm efficient self-attention (keys and values from the tokens reduced by a conv with kernel =
  stride = ``sr_ratio``, 8/4/2/1, then LayerNorm; one ``kv`` Linear; q/kv with bias; scale head_dim^-0.5) and
  a Mix-FFN (Linear, depth-wise 3x3 conv, GELU, Linear), each residual with stochastic depth; drop-path rates
  rise linearly from 0 to ``drop_path_rate`` (0.1) over all blocks; dropout 0;
* LayerNorm eps: 1e-6 for the blocks' ``norm1``/``norm2`` and the stages' ``norm1``..``norm4`` (the variants'
  ``norm_layer``), PyTorch's 1e-5 for the patch embeddings' and the attention's reduction norms (official:
  plain ``nn.LayerNorm`` there). (Hugging Face's port uses 1e-5 everywhere: its outputs differ slightly.)
* initialisation: Linear trunc-normal std 0.02, bias 0; LayerNorm 1 / 0; conv normal(0, sqrt(2 / fan_out)),
  fan_out = k·k·out / groups, bias 0;
* module names are the official ones (``patch_embed1``.., ``block1``.., ``norm1``..), so state-dict keys are
  the keys of the official ImageNet files ``mit_b0.pth`` … ``mit_b5.pth``.

Added here (no parameters, no change of keys or values): ``stage1``..``stage4`` identities on each stage's
N×C×H×W output, for forward hooks (DAFormer's ImageNet feature distance uses ``stage4``); ``checkpointing``,
activation checkpointing of every block in training. The stage maps are made contiguous in the input's memory
format (official: ``.contiguous()``; a channels-last input keeps channels-last maps, fewer copies).

:func:`load_mit_weights` loads an ImageNet encoder file in the NVlabs layout (``mit_bX.pth``) or the Hugging
Face layout (``nvidia/mit-bX``: ``model.safetensors`` or ``pytorch_model.bin``), strictly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rtda.models.pretrained import PretrainedWeightsError, file_state_dict, key_mismatches
from rtda.run.errors import ConfigValueError

#: the official ``mit_b0`` … ``mit_b5`` classes: embedding dims, heads, blocks per stage, MLP ratios
MIT_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "b0": {"embed_dims": (32, 64, 160, 256), "num_heads": (1, 2, 5, 8), "depths": (2, 2, 2, 2), "mlp_ratios": (4, 4, 4, 4)},
    "b1": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (2, 2, 2, 2), "mlp_ratios": (4, 4, 4, 4)},
    "b2": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 4, 6, 3), "mlp_ratios": (4, 4, 4, 4)},
    "b3": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 4, 18, 3), "mlp_ratios": (4, 4, 4, 4)},
    "b4": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 8, 27, 3), "mlp_ratios": (4, 4, 4, 4)},
    "b5": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 6, 40, 3), "mlp_ratios": (4, 4, 4, 4)},
}
SR_RATIOS = (8, 4, 2, 1)
BLOCK_NORM_EPS = 1e-6  # the variants' norm_layer = partial(nn.LayerNorm, eps=1e-6)

#: where the ImageNet files come from (the SegFormer README, "Training")
MIT_DOWNLOAD = ("the ImageNet-1K MiT weights linked in github.com/NVlabs/SegFormer's README (Training): "
                "Google Drive https://drive.google.com/drive/folders/1b7bwrInTW4VLEm27YawHOAMSMikga2Ia or OneDrive "
                "https://connecthkuhk-my.sharepoint.com/:f:/g/personal/xieenze_connect_hku_hk/"
                "EvOn3l1WyM5JpnMQFSEO5b8B7vrHw9kDaJGII-3N9KNhrg")


def mit_variant(variant: str) -> str:
    """``"b0"`` … ``"b5"`` (also accepts ``"mit_b0"``, ``"MiT-B0"``); a ConfigValueError otherwise."""
    name = str(variant).lower().replace("mit", "").strip("-_ ")
    if name not in MIT_VARIANTS:
        raise ConfigValueError(f"model.variant={variant!r}: expected one of {sorted(MIT_VARIANTS)}")
    return name


def pretrained_hint(variant: str) -> str:
    """What to download for ``pretrained=true`` and how to pass it."""
    return (f"MiT-{variant.upper()} has no weights registry: download mit_{variant}.pth ({MIT_DOWNLOAD}) or "
            f"model.safetensors of nvidia/mit-{variant} (https://huggingface.co/nvidia/mit-{variant}) and pass "
            f"model.pretrained=/path/to/mit_{variant}.pth (or /path/to/model.safetensors)")


# --- modules (official names) -------------------------------------------------------------------------------


def _init_official(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)  # timm's trunc_normal_: bounds ±2 (absolute), as here
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``, else scale it by
    1 / (1 - p) (timm's DropPath, which the official code uses)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.drop_prob = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class DWConv(nn.Module):
    """Depth-wise 3x3 conv on the token map (Mix-FFN's positional information)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, _, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Mix-FFN: fc1, depth-wise conv, GELU, fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Efficient self-attention: keys and values from the tokens spatially reduced by ``sr_ratio``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ConfigValueError(f"MiT attention: dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # official: default eps 1e-5

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, tokens, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(n, tokens, heads, c // heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(n, c, h, w)).reshape(n, c, -1).transpose(1, 2)
            x = self.norm(x)
        kv = self.kv(x).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(n, tokens, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float = 0.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class OverlapPatchEmbed(nn.Module):
    """Conv k x k with stride s and padding k // 2, then LayerNorm over the tokens."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # official: default eps 1e-5

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a channels-last N×C×H×W tensor, else ``contiguous_format``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class MixVisionTransformer(nn.Module):
    """MiT encoder: ``forward(x)`` returns the four stage maps [N×C1×H/4×W/4, …, N×C4×H/32×W/32].

    Args:
        variant: ``"b0"`` … ``"b5"`` (:data:`MIT_VARIANTS`).
        drop_path_rate: stochastic depth of the last block (official 0.1), linear from 0 over all blocks.
        checkpointing: activation checkpointing of every transformer block in training (saves memory,
            recomputes the blocks in the backward pass; same outputs and gradients).
    """

    def __init__(self, variant: str = "b0", drop_path_rate: float = 0.1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, qkv_bias: bool = True, checkpointing: bool = False, in_chans: int = 3):
        super().__init__()
        self.variant = mit_variant(variant)
        spec = MIT_VARIANTS[self.variant]
        dims, heads, depths, ratios = spec["embed_dims"], spec["num_heads"], spec["depths"], spec["mlp_ratios"]
        self.embed_dims = dims
        self.depths = depths
        self.checkpointing = bool(checkpointing)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        first = 0
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(7 if i == 0 else 3, 4 if i == 0 else 2,
                                                                   in_chans if i == 0 else dims[i - 1], dims[i]))
        for i in range(4):
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dims[i], heads[i], ratios[i], SR_RATIOS[i], rates[first + j], qkv_bias, drop_rate, attn_drop_rate)
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=BLOCK_NORM_EPS))
            setattr(self, f"stage{i + 1}", nn.Identity())  # hook point: the stage's N×C×H×W output
            first += depths[i]
        self.apply(_init_official)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = x.shape[0]
        fmt = memory_format_of(x)
        outs = []
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = checkpoint(blk, x, h, w, use_reentrant=False) if recompute else blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = getattr(self, f"stage{i}")(x.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=fmt))
            outs.append(x)
        return outs


# --- ImageNet weights ----------------------------------------------------------------------------------------

#: Hugging Face ``nvidia/mit-b*`` names (after ``segformer.encoder.``) -> NVlabs names; ``{s}`` stage (0-based
#: in HF), ``{b}`` block. Key and value (HF) are the two halves of the official ``kv`` (key first).
_HF_TO_NV = [
    (r"patch_embeddings\.(\d+)\.proj\.(.+)", "patch_embed{s}.proj.{0}"),
    (r"patch_embeddings\.(\d+)\.layer_norm\.(.+)", "patch_embed{s}.norm.{0}"),
    (r"block\.(\d+)\.(\d+)\.layer_norm_1\.(.+)", "block{s}.{b}.norm1.{0}"),
    (r"block\.(\d+)\.(\d+)\.layer_norm_2\.(.+)", "block{s}.{b}.norm2.{0}"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.query\.(.+)", "block{s}.{b}.attn.q.{0}"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.key\.(.+)", "block{s}.{b}.attn.kv.{0}#key"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.value\.(.+)", "block{s}.{b}.attn.kv.{0}#value"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.sr\.(.+)", "block{s}.{b}.attn.sr.{0}"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.(.+)", "block{s}.{b}.attn.norm.{0}"),
    (r"block\.(\d+)\.(\d+)\.attention\.output\.dense\.(.+)", "block{s}.{b}.attn.proj.{0}"),
    (r"block\.(\d+)\.(\d+)\.mlp\.dense1\.(.+)", "block{s}.{b}.mlp.fc1.{0}"),
    (r"block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", "block{s}.{b}.mlp.dwconv.dwconv.{0}"),
    (r"block\.(\d+)\.(\d+)\.mlp\.dense2\.(.+)", "block{s}.{b}.mlp.fc2.{0}"),
    (r"layer_norm\.(\d+)\.(.+)", "norm{s}.{0}"),
]
#: the ImageNet classifiers, not built by the encoder: dropped when loading
NV_CLASSIFIER = ("head.",)
HF_CLASSIFIER = ("classifier.",)


def _hf_name(key: str) -> str | None:
    """The NVlabs name of an HF encoder key (without ``segformer.encoder.``), ``#key``/``#value`` marking the
    halves of ``kv``; None if it is no MiT key."""
    for pattern, target in _HF_TO_NV:
        m = re.fullmatch(pattern, key)
        if m:
            groups = m.groups()
            stage = int(groups[0]) + 1
            if target.startswith("block"):
                return target.format(groups[2], s=stage, b=groups[1])
            return target.format(groups[1], s=stage)
    return None


def hf_to_nvlabs(state: dict) -> tuple[dict, list[str]]:
    """An HF ``nvidia/mit-b*`` state dict in NVlabs names (key and value concatenated into ``kv``). Returns
    (mapped state, the file's keys that are neither MiT encoder keys nor its classifier)."""
    mapped, halves, foreign = {}, {}, []
    for key, value in state.items():
        bare = key.removeprefix("segformer.")
        if bare.startswith(HF_CLASSIFIER):
            continue
        name = _hf_name(bare.removeprefix("encoder.")) if bare.startswith("encoder.") else None
        if name is None:
            foreign.append(key)
        elif "#" in name:
            base, part = name.split("#")
            halves.setdefault(base, {})[part] = value
        else:
            mapped[name] = value
    for base, parts in halves.items():
        if set(parts) == {"key", "value"}:  # one half alone leaves kv missing: reported as such
            mapped[base] = torch.cat([parts["key"], parts["value"]], dim=0)
    return mapped, foreign


def nvlabs_to_hf(state: dict, prefix: str = "segformer.encoder.") -> dict:
    """The inverse of :func:`hf_to_nvlabs` (the Hugging Face conversion script's ``rename_keys`` +
    ``read_in_k_v``): NVlabs MiT names -> HF names, ``kv`` split into key and value."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(.+)", key)
        if m:
            out[f"{prefix}patch_embeddings.{int(m[1]) - 1}.{'proj' if m[2] == 'proj' else 'layer_norm'}.{m[3]}"] = value
            continue
        m = re.fullmatch(r"norm(\d)\.(.+)", key)
        if m:
            out[f"{prefix}layer_norm.{int(m[1]) - 1}.{m[2]}"] = value
            continue
        m = re.fullmatch(r"block(\d)\.(\d+)\.(.+)", key)
        if not m:
            raise KeyError(f"not a MiT key: {key}")
        head = f"{prefix}block.{int(m[1]) - 1}.{m[2]}."
        rest = m[3]
        if rest.startswith("attn.kv."):
            half = value.shape[0] // 2
            out[head + "attention.self.key." + rest[8:]] = value[:half]
            out[head + "attention.self.value." + rest[8:]] = value[half:]
            continue
        for nv, hf in (("norm1.", "layer_norm_1."), ("norm2.", "layer_norm_2."), ("attn.q.", "attention.self.query."),
                       ("attn.sr.", "attention.self.sr."), ("attn.norm.", "attention.self.layer_norm."),
                       ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "mlp.dense1."),
                       ("mlp.fc2.", "mlp.dense2."), ("mlp.dwconv.", "mlp.dwconv.")):
            if rest.startswith(nv):
                out[head + hf + rest[len(nv):]] = value
                break
        else:
            raise KeyError(f"not a MiT key: {key}")
    return out


def _guess_variant(state: dict) -> str | None:
    """The MiT variant an NVlabs-named state dict holds (by stage-1 width and blocks per stage), if any."""
    first = state.get("patch_embed1.proj.weight")
    if first is None:
        return None
    depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"block{i}.")}) for i in range(1, 5))
    for name, spec in MIT_VARIANTS.items():
        if spec["embed_dims"][0] == first.shape[0] and spec["depths"] == depths:
            return name
    return None


def is_hf_layout(state: dict) -> bool:
    return any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.")) for k in state)


def load_mit_weights(encoder: MixVisionTransformer, path: str | Path, state: dict | None = None) -> str:
    """Initialise ``encoder`` from an ImageNet MiT file, strictly; returns the layout (``"nvlabs"``/``"hf"``).

    NVlabs (``mit_bX.pth``): the official names, the classifier ``head.*`` dropped. Hugging Face
    (``nvidia/mit-bX``, ``.safetensors`` or ``.bin``): ``segformer.encoder.*`` mapped to the official names,
    key + value concatenated into ``kv``, ``classifier.*`` dropped. A missing, unexpected or wrongly shaped
    tensor (e.g. another variant's file) is one PretrainedWeightsError naming the file and keys of both sides.
    """
    source = str(path)
    state = file_state_dict(path) if state is None else state
    variant = f"MiT-{encoder.variant.upper()}"
    if any(k.startswith("decode_head.") for k in state):
        if is_hf_layout(state):
            raise PretrainedWeightsError(
                f"{source} is a Hugging Face SegFormer segmentation model (segformer.encoder.* + decode_head.*): "
                f"rtda maps Hugging Face names for the ImageNet encoder only, not for a decode_head. Download "
                f"model.safetensors of nvidia/mit-{encoder.variant} (the ImageNet encoder) or mit_{encoder.variant}.pth, "
                f"or the NVlabs/mmsegmentation checkpoint of the whole network")
        raise PretrainedWeightsError(
            f"{source} is a whole mmsegmentation checkpoint (backbone.* + decode_head.*), not an ImageNet {variant} "
            f"encoder file: pass it to the segmentation network (model.pretrained of segformer/daformer), or use "
            f"mit_{encoder.variant}.pth")
    layout = "hf" if is_hf_layout(state) else "nvlabs"
    if layout == "hf":
        mapped, foreign = hf_to_nvlabs(state)
    else:
        if state and all(k.startswith("backbone.") for k in state):  # an encoder saved from an EncoderDecoder
            state = {k.removeprefix("backbone."): v for k, v in state.items()}
        mapped = {k: v for k, v in state.items() if not k.startswith(NV_CLASSIFIER)}
        foreign = []
    own = encoder.state_dict()
    problems = key_mismatches(own, {**mapped, **dict.fromkeys(foreign)})  # unmapped names count as unexpected
    if problems:
        guess = _guess_variant(mapped)
        if guess is not None and guess != encoder.variant:
            problems.append(f"the file holds MiT-{guess.upper()}, the network is {variant} "
                            f"(use mit_{encoder.variant}.pth, or model.variant={guess})")
        names = "Hugging Face names, mapped" if layout == "hf" else "official NVlabs names"
        raise PretrainedWeightsError(
            f"{source} does not fit the {variant} encoder ({names}): {'; '.join(problems)}. "
            f"File keys e.g. {sorted(state)[:3]}; network keys e.g. {sorted(own)[:3]}; "
            f"the classifier {list(HF_CLASSIFIER if layout == 'hf' else NV_CLASSIFIER)} is dropped")
    encoder.load_state_dict(mapped, strict=True)
    return layout


__all__ = ["MIT_VARIANTS", "SR_RATIOS", "MixVisionTransformer", "hf_to_nvlabs", "load_mit_weights", "memory_format_of",
           "mit_variant", "nvlabs_to_hf", "pretrained_hint"]
