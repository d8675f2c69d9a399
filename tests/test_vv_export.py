"""The V-V module against an independent per-head computation, and ONNX Runtime against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from anoclip.export.onnx_export import check_parity, export_onnx  # noqa: E402
from anoclip.export.vv import UnsupportedBackbone, VVVisual  # noqa: E402
from anoclip.runtime.backends import OnnxRuntimeBackend  # noqa: E402

# ONNX Runtime and PyTorch run the same float32 arithmetic in another order; embeddings of the real
# architecture differ by a few 1e-6. 1e-4 is the bound the export itself enforces.
PARITY_ATOL = 1e-4


def naive_vv(visual, image: torch.Tensor, vv_blocks: int | None = None):
    """SPEC section 2 written out head by head with open_clip's own modules, as an independent reference."""
    x = visual.conv1(image).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    z = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
    blocks = list(visual.transformer.resblocks)
    first = len(blocks) - (vv_blocks or len(blocks))
    vt = None
    for index, block in enumerate(blocks):
        if index == first:
            vt = z.clone()
        attn = block.attn
        heads = attn.num_heads
        width = z.shape[-1]
        d = width // heads
        h = block.ln_1(z)
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = h @ w[:width].T + b[:width]
        k = h @ w[width : 2 * width].T + b[width : 2 * width]
        v = h @ w[2 * width :].T + b[2 * width :]
        ori_heads, vv_heads = [], []
        for i in range(heads):
            sl = slice(i * d, (i + 1) * d)
            qi, ki, vi = q[..., sl], k[..., sl], v[..., sl]
            ori_heads.append(torch.softmax(qi @ ki.transpose(1, 2) / d**0.5, -1) @ vi)
            vv_heads.append(torch.softmax(vi @ vi.transpose(1, 2) / d**0.5, -1) @ vi)
        a_ori = attn.out_proj(torch.cat(ori_heads, -1))
        a_vv = attn.out_proj(torch.cat(vv_heads, -1))
        z = z + a_ori
        z = z + block.mlp(block.ln_2(z))
        if vt is not None:
            vt = vt + a_vv
    image_embeds = visual.ln_post(z[:, 0]) @ visual.proj
    patch_embeds = visual.ln_post(vt[:, 1:]) @ visual.proj
    qkv_embeds = visual.ln_post(z[:, 1:]) @ visual.proj
    return image_embeds, patch_embeds, qkv_embeds


@pytest.mark.parametrize("vv_blocks", [None, 1])
def test_vv_module_matches_per_head_reference(tiny_model, vv_blocks):
    visual = tiny_model.model.visual
    image = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    module = VVVisual(visual, vv_blocks=vv_blocks, patch_outputs="both")
    with torch.no_grad():
        got = module(image)
        ref = naive_vv(visual, image, vv_blocks)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_global_and_qkv_tokens_match_open_clip(tiny_model):
    visual = tiny_model.model.visual
    image = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        image_embeds, qkv = VVVisual(visual, patch_outputs="qkv")(image)
        pooled = tiny_model.model.encode_image(image)
        visual.output_tokens = True
        try:
            _, tokens = visual(image)
        finally:
            visual.output_tokens = False
    torch.testing.assert_close(image_embeds, pooled, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(qkv, tokens @ visual.proj, atol=1e-6, rtol=1e-6)


def test_vv_blocks_out_of_range(tiny_model):
    with pytest.raises(ValueError, match="between 1 and 2"):
        VVVisual(tiny_model.model.visual, vv_blocks=3)


def test_unsupported_tower_is_refused():
    with pytest.raises(UnsupportedBackbone, match="not an open_clip VisionTransformer"):
        VVVisual(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("dynamic_batch,batch", [(False, 1), (True, 3)])
def test_tiny_onnx_matches_pytorch(tiny_model, tmp_path, dynamic_batch, batch):
    import onnx

    module = VVVisual(tiny_model.model.visual, patch_outputs="both")
    entry = export_onnx(module, tmp_path / "visual.onnx", dynamic_batch=dynamic_batch)
    report = check_parity(module, tmp_path / "visual.onnx", batch=batch, atol=PARITY_ATOL)
    assert report.ok, report.lines()
    assert set(report.max_abs_diff) == {"image_embeds", "patch_embeds", "qkv_patch_embeds"}
    graph = onnx.load(str(tmp_path / "visual.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "LayerNormalization" in ops
    # 2 blocks x 2 + ln_pre + ln_post (on the class token, the V-V tokens and the QKV tokens)
    assert sum(n.op_type == "LayerNormalization" for n in graph.graph.node) >= 2 * 2 + 2
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    assert entry.inputs["image"][0] == (-1 if dynamic_batch else 1)
    assert [o.name for o in graph.graph.output] == ["image_embeds", "patch_embeds", "qkv_patch_embeds"]


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """ViT-B-16-plus-240 with random weights (pretrained weights cannot be downloaded here)."""
    from anoclip.export.model import load_model

    torch.manual_seed(0)
    loaded = load_model("ViT-B-16-plus-240", "none")
    module = VVVisual(loaded.model.visual)
    path = tmp_path_factory.mktemp("real") / "visual.onnx"
    entry = export_onnx(module, path)
    return loaded, module, path, entry


def test_real_architecture_geometry(real_export):
    _, module, _, entry = real_export
    g = module.geometry
    assert (g.image_size, g.grid, g.width, g.layers, g.heads, g.embed_dim) == ((240, 240), (15, 15), 896, 12, 14, 640)
    assert entry.outputs == {"image_embeds": [1, 640], "patch_embeds": [1, 225, 640]}


def test_real_architecture_onnx_matches_pytorch(real_export):
    _, module, path, _ = real_export
    report = check_parity(module, path, samples=2, atol=PARITY_ATOL)
    print("\n".join(report.lines()))
    assert report.max_abs_diff["patch_embeds"] <= PARITY_ATOL
    assert report.max_abs_diff["image_embeds"] <= PARITY_ATOL
    assert min(report.min_cosine.values()) > 0.999999


def test_real_architecture_maps_match_torch_reference(real_export, rgb_image):
    """Runtime maps (preprocess + ORT + numpy scoring) vs PIL/torchvision + the PyTorch module + torch scoring."""
    from torch_reference import torch_anomaly_map, torchvision_preprocess

    from anoclip.runtime import preprocess, scoring

    loaded, module, path, _ = real_export
    text = torch.nn.functional.normalize(torch.randn(2, 640, generator=torch.Generator().manual_seed(3)), dim=-1)
    batch, _ = preprocess.preprocess(rgb_image, (240, 240), loaded.mean, loaded.std)
    _, patches = OnnxRuntimeBackend(path, providers="cpu").run(batch)
    ours = scoring.anomaly_map(patches, text.numpy(), (15, 15), (240, 240))
    with torch.no_grad():
        ref_tokens = module(torchvision_preprocess(rgb_image, 240, loaded.mean, loaded.std))[1]
    ref = torch_anomaly_map(ref_tokens, text, (15, 15), (240, 240)).numpy()
    assert ours.shape == ref.shape == (1, 240, 240)
    assert np.max(np.abs(ours - ref)) <= 1e-5


def test_tiny_architecture_detector_maps_match_torch_reference(tiny_artifacts, tiny_model, rgb_image):
    """The whole runtime path on a second architecture (48x48 input, 3x3 grid, D=32) vs PyTorch."""
    from torch_reference import torch_abnormal_probability, torch_anomaly_map, torchvision_preprocess

    from anoclip.runtime.detector import Detector

    detector = Detector.load(tiny_artifacts, backend="cpu", tiling="never")
    text = detector.class_prompts("carpet").text_features
    result = detector.predict(rgb_image, "carpet")
    module = VVVisual(tiny_model.model.visual)
    with torch.no_grad():
        image_embeds, patches = module(torchvision_preprocess(rgb_image, 48, tiny_model.mean, tiny_model.std))
    ref_map = torch_anomaly_map(patches, torch.from_numpy(text), (3, 3), (48, 48))[0].numpy()
    ref_score = float(torch_abnormal_probability(image_embeds, torch.from_numpy(text))[0])
    assert result.anomaly_map.shape == (48, 48)
    assert np.max(np.abs(result.anomaly_map - ref_map)) <= 1e-5
    assert abs(result.score - ref_score) <= 1e-5
    ref_full = torch.nn.functional.interpolate(
        torch_anomaly_map(patches, torch.from_numpy(text), (3, 3), (3, 3))[None], size=rgb_image.shape[:2],
        mode="bilinear", align_corners=True)[0, 0].numpy()
    assert np.max(np.abs(result.anomaly_map_full - ref_full)) <= 1e-5
