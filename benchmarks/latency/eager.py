"""The PyTorch baselines a user would otherwise run: open_clip's own model, eager.

* :func:`authors_vv` - AnoCLIP's V-V computation as SPEC section 2 states it, written plainly over
  open_clip's own modules: in every block the standard attention and MLP run on all tokens, and
  the V-V attention comes from the same input projection and is accumulated into its own stream.
  Unlike :class:`anoclip.export.vv.VVVisual` it takes no shortcut in the last block.
* open_clip's ``model.encode_image``: plain CLIP.

torch is imported inside the functions, so this module imports on a device without it.
"""

from __future__ import annotations

from pathlib import Path


def load_reference(backbone: str, pretrained: str, model_config: str | Path | None = None, seed: int = 0):
    """The open_clip model as ``anoclip-export`` loads it (``seed`` makes random weights repeat)."""
    import torch

    from anoclip.export.model import load_model, register_model_config

    if model_config:
        register_model_config(model_config)
    torch.manual_seed(seed)
    return load_model(backbone, pretrained)


def authors_vv(visual, image):
    """(image token [B,D], V-V patch tokens [B,M,D]) of an open_clip ``VisionTransformer``; neither
    is normalised. ``image`` is a float tensor [B,3,H,W], already normalised."""
    import torch
    import torch.nn.functional as F

    x = visual.conv1(image).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    z = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    vt = z
    for block in visual.transformer.resblocks:
        attn = block.attn
        h = block.ln_1(z)  # from the standard stream
        q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
                   for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
        scale = q.shape[-1] ** -0.5
        a_ori = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        a_vv = torch.softmax(v @ v.transpose(-2, -1) * scale, dim=-1) @ v
        z = z + block.ls_1(attn.out_proj(a_ori.transpose(1, 2).flatten(2)))
        z = z + block.ls_2(block.mlp(block.ln_2(z)))
        vt = vt + attn.out_proj(a_vv.transpose(1, 2).flatten(2))  # no MLP, no LayerNorm
    return visual.ln_post(z[:, 0]) @ visual.proj, visual.ln_post(vt[:, 1:]) @ visual.proj


def eager_runners(loaded) -> dict[str, object]:
    """``{"vv": fn, "clip": fn}``: numpy batch in, outputs out, under ``torch.no_grad``."""
    import torch

    model = loaded.model.eval()

    def vv(batch):
        with torch.no_grad():
            return authors_vv(model.visual, torch.from_numpy(batch))

    def clip(batch):
        with torch.no_grad():
            return model.encode_image(torch.from_numpy(batch))

    return {"vv": vv, "clip": clip}


def vv_parity(loaded, batch, onnx_patch_embeds: dict[str, object]) -> dict[str, float]:
    """Max abs difference of :func:`authors_vv`'s patch tokens from ``VVVisual``'s and from each
    ONNX model's ``patch_embeds`` given (name -> array), and of its image token from ``encode_image``."""
    import numpy as np
    import torch

    from anoclip.export.vv import VVVisual

    runners = eager_runners(loaded)
    image_token, tokens = (t.numpy() for t in runners["vv"](batch))
    with torch.no_grad():
        reference = VVVisual(loaded.model.visual)(torch.from_numpy(batch))[1].numpy()
    diffs = {"V-V tokens vs VVVisual (PyTorch)": float(np.abs(tokens - reference).max())}
    diffs.update({f"V-V tokens vs {name}": float(np.abs(tokens - np.asarray(value)).max()) for name, value in onnx_patch_embeds.items()})
    diffs["image token vs encode_image"] = float(np.abs(image_token - runners["clip"](batch).numpy()).max())
    return diffs
