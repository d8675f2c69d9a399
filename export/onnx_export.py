"""Tracing the V-V visual tower to ONNX and checking the graph against the PyTorch reference."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anoclip.runtime.artifacts import ModelEntry
from anoclip.runtime.plumbing import atomic_path, quiet_loggers
from anoclip.runtime.errors import AnoclipError

from .vv import VVVisual

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# float32 ONNX Runtime vs PyTorch on the same weights: differences come from summation order only,
# about 1e-6 relative on embeddings of unit-scale values; 1e-4 absolute leaves ample margin while
# catching any real mismatch (a wrong head split or a missing bias moves values by > 1e-2).
DEFAULT_ATOL = 1e-4


def trace_to_onnx(module: torch.nn.Module, example: tuple, path: Path, input_names: list[str],
                  output_names: list[str], opset: int, dynamic_shapes: dict | None, dynamic_batch: bool) -> None:
    """Trace ``module`` on ``example`` with torch.onnx's exporter (dynamo) and write the checked graph
    to ``path`` atomically, its batch axis named when dynamic; the exporter's chatter silenced."""
    import onnx

    with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, None, dynamo=True, input_names=input_names, output_names=output_names,
            opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
        )
        model = program.model_proto
        got = {o.domain: o.version for o in model.opset_import}.get("")
        if got != opset:
            raise AnoclipError(f"the exporter produced opset {got}, not {opset}; pass --opset {got}")
        model.producer_name = "anoclip-export"
        _name_batch_axis(model, dynamic_batch)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))


def export_onnx(module: VVVisual, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False) -> ModelEntry:
    """Trace ``module`` to ``path`` (written atomically) and return its manifest entry."""
    geometry = module.geometry
    height, width = geometry.image_size
    dummy = torch.zeros(1, 3, height, width)
    dynamic_shapes = {"image": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    path = Path(path)
    trace_to_onnx(module, (dummy,), path, ["image"], module.output_names, opset, dynamic_shapes, dynamic_batch)
    batch = -1 if dynamic_batch else 1
    gh, gw = geometry.grid
    outputs = {"image_embeds": [batch, geometry.embed_dim]}
    for name in module.output_names[1:]:
        outputs[name] = [batch, gh * gw, geometry.embed_dim]
    return ModelEntry(
        file=path.name,
        inputs={"image": [batch, 3, height, width]},
        outputs=outputs,
        patch_tokens="qkv" if module.patch_outputs == "qkv" else "vv",
        vv_blocks=None if module.patch_outputs == "qkv" else module.vv_blocks,
        opset=opset,
    )


def _name_batch_axis(model, dynamic: bool) -> None:
    """Give the dynamic batch axis one readable name on every input and output."""
    if not dynamic:
        return
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"


@dataclass
class ParityReport:
    """ONNX Runtime vs PyTorch on the same inputs, per output."""

    max_abs_diff: dict[str, float]
    min_cosine: dict[str, float]
    atol: float

    @property
    def ok(self) -> bool:
        return all(v <= self.atol for v in self.max_abs_diff.values())

    def lines(self) -> list[str]:
        return [f"{name}: max abs diff {self.max_abs_diff[name]:.2e}, min cosine {self.min_cosine[name]:.8f}"
                for name in self.max_abs_diff]


def check_parity(module: VVVisual, onnx_path: str | os.PathLike, *, samples: int = 3, seed: int = 0,
                 atol: float = DEFAULT_ATOL, batch: int = 1) -> ParityReport:
    """Run a few normalised-range inputs through ONNX Runtime (CPU) and the PyTorch module."""
    from anoclip.runtime.backends import OnnxRuntimeBackend
    from anoclip.runtime.fidelity import agreement

    backend = OnnxRuntimeBackend(onnx_path, providers="cpu")
    height, width = module.geometry.image_size
    generator = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}
    cosines: dict[str, float] = {}
    for _ in range(samples):
        image = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            reference = module(image)
        got = backend.run_all(image.numpy())
        for name, ref in zip(module.output_names, reference):
            one = agreement(ref.numpy(), got[name], name)
            diffs[name] = max(diffs.get(name, 0.0), one.max_abs)
            cosines[name] = min(cosines.get(name, 1.0), float(np.min(one.cosines)))
    return ParityReport(diffs, cosines, atol)
