"""Test-time adaptation (AnoCLIP+, SPEC section 5) without autograd.

Read in this order:

* ``config``: :class:`TTAConfig` (the settings), :class:`AdamWState`, :class:`TTAResult`, and the
  names of the ``tta.onnx`` graph's inputs and outputs;
* ``adapter``: the method itself, i.e. the adapter forward, the loss, its hand-derived gradients
  and the unrolled loop, written once for both the array loop and the ONNX graph;
* ``optim``: AdamW as ``torch.optim.AdamW`` applies it;
* ``loop``: :class:`TTAAdapter`, the loop on numpy (CPU) or cupy (GPU) arrays with the optimiser
  state kept between images, and the seeded draws of parameters and noise;
* ``onnx_runner``: :class:`OnnxTTARunner`, the same loop as ``tta.onnx`` through onnxruntime.
"""

from ..scoring import array_namespace
from .adapter import adapter_forward, loss_and_grads
from .config import (
    DEFAULT_SEED,
    TTA_GRAPH_FORMAT_VERSION,
    TTA_GRAPH_INPUTS,
    TTA_GRAPH_OUTPUTS,
    TTA_METADATA_PREFIX,
    AdamWState,
    AdapterKind,
    TTAConfig,
    TTAResult,
)
from .loop import TTAAdapter, draw_initial_params, draw_noise
from .onnx_runner import OnnxTTARunner
from .optim import adamw_step, adamw_update

__all__ = [
    "AdapterKind",
    "AdamWState",
    "DEFAULT_SEED",
    "OnnxTTARunner",
    "TTA_GRAPH_FORMAT_VERSION",
    "TTA_GRAPH_INPUTS",
    "TTA_GRAPH_OUTPUTS",
    "TTA_METADATA_PREFIX",
    "TTAAdapter",
    "TTAConfig",
    "TTAResult",
    "adamw_step",
    "adamw_update",
    "adapter_forward",
    "array_namespace",
    "draw_initial_params",
    "draw_noise",
    "loss_and_grads",
]
