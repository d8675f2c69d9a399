"""The V-V (value-value) visual tower: the PyTorch reference every other backend is checked against.

The module is built from the weights of an open_clip ``VisionTransformer``. It reads module
parameters (``conv1``, ``class_embedding``, ``positional_embedding``, the layer norms, each block's
``attn.in_proj_weight`` / ``attn.in_proj_bias`` / ``attn.out_proj``, ``mlp``, ``ls_1`` / ``ls_2``,
``proj``) and writes the attention itself; the fused input projection it reads is that of
``nn.MultiheadAttention``, so every block's attention must be one (:func:`tower_geometry` refuses
other attention classes; open_clip releases after 3.3.0 replace it, hence ``open_clip_torch<3.4``).

Forward (SPEC section 2): the standard CLIP stream ``Z`` runs unchanged and gives the global image
token; beside it the stream ``Vt`` accumulates, per rewritten block, the output projection of
``softmax(v vᵀ / sqrt(d)) v`` where ``v`` comes from the standard stream's ``ln_1``. ``Vt`` has no
MLP and no LayerNorm of its own; the final ``Vt`` goes through ``ln_post`` and ``proj``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PatchOutputs = Literal["vv", "qkv", "both"]


class UnsupportedBackbone(ValueError):
    """The open_clip model cannot be rewritten with the V-V path."""


@dataclass(frozen=True)
class TowerGeometry:
    """Dimensions read off an open_clip visual tower."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    width: int
    layers: int
    heads: int
    embed_dim: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def tower_geometry(visual: nn.Module) -> TowerGeometry:
    """Read every dimension from the open_clip visual tower; raise for towers we cannot rewrite."""
    name = type(visual).__name__
    required = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    missing = [a for a in required if not hasattr(visual, a)]
    if missing:
        raise UnsupportedBackbone(
            f"visual tower {name} is not an open_clip VisionTransformer (no {', '.join(missing)}); "
            "choose a plain open_clip ViT such as ViT-B-16-plus-240, ViT-B-16 or ViT-L-14"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedBackbone(f"visual tower {name} uses attentional pooling (CoCa-style); choose a plain ViT")
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type != "tok":
        raise UnsupportedBackbone(
            f"visual tower pools with '{pool_type}', the V-V export needs the class token ('tok'); choose a plain ViT"
        )
    if visual.proj is None:
        raise UnsupportedBackbone("visual tower has no output projection; choose a plain ViT")
    blocks = list(visual.transformer.resblocks)
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise UnsupportedBackbone(
                f"block {i} attention is {type(attn).__name__}, not a fused-projection multi-head attention; "
                "the V-V rewrite supports plain open_clip ViTs"
            )
        if hasattr(block, "ln_1_kv") or not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            raise UnsupportedBackbone(f"block {i} uses extra attention norms; the V-V rewrite supports plain ViTs")
    width = visual.conv1.out_channels
    heads = blocks[0].attn.num_heads
    patch = _pair(visual.conv1.kernel_size)
    image_size = _pair(getattr(visual, "image_size", None) or visual.grid_size[0] * patch[0])
    grid = (image_size[0] // patch[0], image_size[1] // patch[1])
    if visual.positional_embedding.shape[0] != grid[0] * grid[1] + 1:
        raise UnsupportedBackbone("positional embedding does not match one class token plus the patch grid")
    return TowerGeometry(
        image_size=image_size,
        patch_size=patch,
        grid=grid,
        width=width,
        layers=len(blocks),
        heads=heads,
        embed_dim=int(visual.proj.shape[1]),
    )


class VVVisual(nn.Module):
    """open_clip visual tower with the V-V path.

    Args:
        visual: the open_clip ``VisionTransformer`` whose weights are used (shared, not copied).
        vv_blocks: rewrite only the last ``vv_blocks`` blocks (``None``: all of them; 1 is the
            paper's "V-V attention (last layer)" ablation).
        patch_outputs: ``"vv"`` returns (image_embeds, patch_embeds); ``"qkv"`` returns
            (image_embeds, patch_embeds = the QKV tokens), the plain-CLIP baseline ``ln_post(Z[:,1:]) @ proj``;
            ``"both"`` returns all three.

    Patch outputs are not normalised; the image embedding is the standard CLS token through
    ``ln_post`` and ``proj`` (not normalised either).
    """

    def __init__(self, visual: nn.Module, vv_blocks: int | None = None, patch_outputs: PatchOutputs = "vv"):
        super().__init__()
        self.geometry = tower_geometry(visual)
        layers = self.geometry.layers
        if vv_blocks is None:
            vv_blocks = layers
        if not 1 <= vv_blocks <= layers:
            raise ValueError(f"vv_blocks must be between 1 and {layers}, got {vv_blocks}")
        if patch_outputs not in ("vv", "qkv", "both"):
            raise ValueError(f"patch_outputs must be 'vv', 'qkv' or 'both', got {patch_outputs!r}")
        self.vv_blocks = vv_blocks
        self.patch_outputs = patch_outputs
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.blocks = nn.ModuleList(visual.transformer.resblocks)
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.eval()

    @property
    def output_names(self) -> list[str]:
        """Graph output names: the main patch output is always ``patch_embeds`` (V-V tokens, or the
        QKV tokens for the plain-CLIP model); with ``both``, the QKV tokens follow as ``qkv_patch_embeds``."""
        return {"vv": ["image_embeds", "patch_embeds"], "qkv": ["image_embeds", "patch_embeds"],
                "both": ["image_embeds", "patch_embeds", "qkv_patch_embeds"]}[self.patch_outputs]

    def _embed(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image)
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def forward(self, image: torch.Tensor):
        z = self._embed(image)
        vt = None
        first_vv = self.geometry.layers - self.vv_blocks
        scale = self.geometry.head_dim ** -0.5
        need_all_tokens = self.patch_outputs in ("qkv", "both")
        last = self.geometry.layers - 1
        for index, block in enumerate(self.blocks):
            if index == first_vv:
                vt = z
            attn = block.attn
            h = block.ln_1(z)
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
            qkv = qkv.unflatten(-1, (3, self.geometry.heads, self.geometry.head_dim)).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, T, head_dim] each
            # After the last block only the class token of the standard stream is read (unless
            # the plain-CLIP patch tokens are asked for), so the last block runs its query and
            # MLP on that token alone: the result is identical and the work is smaller.
            cls_only = index == last and not need_all_tokens
            if cls_only:
                q, z = q[:, :, :1], z[:, :1]
            a_ori = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v
            z = z + block.ls_1(attn.out_proj(self._merge(a_ori)))
            z = z + block.ls_2(block.mlp(block.ln_2(z)))
            if vt is not None:
                a_vv = torch.softmax((v * scale) @ v.transpose(-2, -1), dim=-1) @ v
                vt = vt + attn.out_proj(self._merge(a_vv))
        outputs = [self.ln_post(z[:, 0]) @ self.proj]
        if self.patch_outputs in ("vv", "both"):
            outputs.append(self.ln_post(vt[:, 1:]) @ self.proj)
        if self.patch_outputs in ("qkv", "both"):
            outputs.append(self.ln_post(z[:, 1:]) @ self.proj)
        return tuple(outputs)
