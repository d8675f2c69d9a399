"""The native TensorRT backend (``--backend tensorrt-native``): the folder's prebuilt engine
(``anoclip build-engine``) run with TensorRT's runtime and cuda-python buffers and streams.

No PyTorch, no onnxruntime: TensorRT deserialises the plan, cuda-python allocates pinned host and
device buffers and a stream; tensors are bound by name and ``execute_async_v3`` runs the batch.
The engine's sidecar is checked against this machine (TensorRT release, GPU) before the plan is
deserialised. tensorrt and cuda-python are imported only when the backend is created.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from ..engine import EngineSidecar
from ..errors import AnoclipError, BackendError
from ..gpu import choose_engine, probe_gpu
from ..vocabulary import PRECISION_MODELS, VISUAL, model_precision
from .batching import run_in_chunks
from .onnxruntime import EMBEDDINGS

log = logging.getLogger(__name__)

INSTALL_TENSORRT = ("install TensorRT's Python package (`pip install tensorrt` on a desktop GPU; on a Jetson it comes "
                    "with JetPack: `sudo apt install python3-libnvinfer`)")
INSTALL_CUDA = "install cuda-python (`pip install cuda-python`; match its major version to your CUDA, 12 on JetPack 6)"


def import_tensorrt():
    """The tensorrt module; one BackendError line naming what to install when it is missing."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the package is there, its libraries are not
        raise BackendError(f"the tensorrt-native backend needs TensorRT ({exc}); {INSTALL_TENSORRT}") from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6, 13.x) or, on older
    releases, ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise BackendError(f"the tensorrt-native backend needs cuda-python ({exc}); {INSTALL_CUDA}") from None
    return runtime


class Cuda:
    """The CUDA runtime calls the backend makes, each one's error code checked."""

    def __init__(self, runtime=None):
        self.rt = runtime if runtime is not None else import_cudart()

    def check(self, what: str, result):
        """``result`` of a cuda-python call is (error, values...): the values, or a one-line BackendError."""
        result = result if isinstance(result, tuple) else (result,)
        error, values = result[0], result[1:]
        if int(getattr(error, "value", error)) != 0:
            raise BackendError(f"CUDA {what} failed: {self.error_name(error)}; check the GPU, its driver and that "
                               "cuda-python matches the installed CUDA")
        return values[0] if len(values) == 1 else (values or None)

    def error_name(self, error) -> str:
        try:
            name = self.rt.cudaGetErrorName(error)[1]
        except Exception:  # noqa: BLE001 - the name is only for the message
            name = None
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name or str(error)

    def device_count(self) -> int:
        return int(self.check("cudaGetDeviceCount", self.rt.cudaGetDeviceCount()))

    @staticmethod
    def handle(obj) -> int:
        """The address behind a cuda-python object such as a stream, as TensorRT takes it:
        ``cuda.bindings.utils.get_cuda_native_handle`` (cuda-python >= 12.9.1, where ``int()`` of
        the object is deprecated), else ``int()``."""
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            return int(obj)
        return int(get_cuda_native_handle(obj))


class _Buffer:
    """One I/O tensor: pinned host memory viewed as a numpy array, and device memory of the same size."""

    def __init__(self, cuda: Cuda, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.cuda, self.name, self.dtype = cuda, name, np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.host_ptr = self.device_ptr = 0
        self.host_ptr = int(cuda.check("cudaMallocHost", cuda.rt.cudaMallocHost(self.nbytes)))
        try:
            self.device_ptr = int(cuda.check("cudaMalloc", cuda.rt.cudaMalloc(self.nbytes)))
        except BaseException:
            self.free()
            raise
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype).reshape(shape)

    def free(self) -> None:
        if self.device_ptr:
            self.cuda.check("cudaFree", self.cuda.rt.cudaFree(self.device_ptr))
            self.device_ptr = 0
        if self.host_ptr:
            self.host = None
            self.cuda.check("cudaFreeHost", self.cuda.rt.cudaFreeHost(self.host_ptr))
            self.host_ptr = 0


class EngineRunner:
    """A deserialised plan with one execution context, its buffers (sized for the largest batch of
    its profile) and one CUDA stream. ``run`` takes any batch size: larger batches run in chunks."""

    def __init__(self, plan: bytes, trt=None, cuda: Cuda | None = None, device: int = 0, shown: str = "the engine",
                 expected: tuple[str, ...] = EMBEDDINGS):
        self.expected = tuple(expected)  # the outputs the engine must have
        self.trt = trt if trt is not None else import_tensorrt()
        self.cuda = cuda if cuda is not None else Cuda()
        self.buffers: dict[str, _Buffer] = {}
        self.stream = None
        self.cuda.check("cudaSetDevice", self.cuda.rt.cudaSetDevice(device))
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        if self.runtime is None:
            raise BackendError("TensorRT could not create its runtime (see its log above)")
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialise {shown} (its log above says why); rebuild it with "
                               "`anoclip build-engine`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {shown} (out of GPU memory?)")
        try:
            self._bind(shown)
        except BaseException:
            self.close()
            raise

    def _bind(self, shown: str) -> None:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or any(o not in self.outputs for o in self.expected):
            raise BackendError(f"{shown} has inputs {inputs} and outputs {self.outputs}; expected one image input and "
                               f"{', '.join(self.expected)}: rebuild it from the folder's model")
        self.input = inputs[0]
        shape = tuple(engine.get_tensor_shape(self.input))
        self.sample_shape = shape[1:]
        if shape[0] == -1:
            low, _, high = engine.get_tensor_profile_shape(self.input, 0)
            self.min_batch, self.max_batch, self.dynamic = int(low[0]), int(high[0]), True
        else:
            self.min_batch = self.max_batch = int(shape[0])
            self.dynamic = False
        if not self.context.set_input_shape(self.input, (self.max_batch, *self.sample_shape)):
            raise BackendError(f"TensorRT refused batch {self.max_batch} for {shown}")
        for name in names:
            dims = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in dims):
                raise BackendError(f"TensorRT left the shape of {name} unresolved ({dims}) in {shown}")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self.buffers[name] = _Buffer(self.cuda, name, dims, dtype)
            if not self.context.set_tensor_address(name, self.buffers[name].device_ptr):
                raise BackendError(f"TensorRT refused the buffer of {name} in {shown}")
        self.stream = self.cuda.check("cudaStreamCreate", self.cuda.rt.cudaStreamCreate())

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output (float32) for ``batch`` [N, C, H, W], in chunks the profile accepts."""
        if self.stream is None:
            raise BackendError("the TensorRT engine was closed")
        batch = np.asarray(batch)
        if tuple(batch.shape[1:]) != tuple(self.sample_shape):
            raise BackendError(f"the engine takes images of shape {self.sample_shape}, got {tuple(batch.shape[1:])}")
        return run_in_chunks(self._run_chunk, batch, self.max_batch, self.min_batch)

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        rt, check = self.cuda.rt, self.cuda.check
        size = chunk.shape[0]  # min_batch <= size <= max_batch
        if not self.context.set_input_shape(self.input, (size, *self.sample_shape)):
            raise BackendError(f"TensorRT refused batch {size}")
        source = self.buffers[self.input]
        source.host[:size] = chunk
        to_device, to_host = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        used = source.nbytes // self.max_batch * size
        check("cudaMemcpyAsync", rt.cudaMemcpyAsync(source.device_ptr, source.host_ptr, used, to_device, self.stream))
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise BackendError("TensorRT failed to run the engine (its log above says why)")
        shapes = {}
        for name in self.outputs:
            out = self.buffers[name]
            shapes[name] = tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shapes[name])) * out.dtype.itemsize
            check("cudaMemcpyAsync", rt.cudaMemcpyAsync(out.host_ptr, out.device_ptr, nbytes, to_host, self.stream))
        check("cudaStreamSynchronize", rt.cudaStreamSynchronize(self.stream))
        result = {}
        for name in self.outputs:
            flat = self.buffers[name].host.reshape(-1)[: int(np.prod(shapes[name]))]
            result[name] = flat.reshape(shapes[name]).astype(np.float32, copy=True)
        return result

    def close(self) -> None:
        """Free every buffer and destroy the stream (safe to call twice)."""
        errors = []
        for buffer in self.buffers.values():
            try:
                buffer.free()
            except AnoclipError as exc:
                errors.append(exc)
        self.buffers = {}
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                self.cuda.check("cudaStreamDestroy", self.cuda.rt.cudaStreamDestroy(stream))
            except AnoclipError as exc:
                errors.append(exc)
        self.context = self.engine = None
        if errors:
            log.warning("releasing the TensorRT engine's CUDA resources: %s", errors[0])

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class TensorRTBackend:
    """The folder's TensorRT engine of ``precision``, run natively.

    ``artifacts``: the folder as ``load_artifacts`` opened it (its ``verify`` setting holds for the
    engine files too); ``model``: the model the detector runs (engines exist for ``visual``: of any
    precision, built from ``visual``, ``visual_fp16`` or ``visual_int8``). The engine is the one whose
    sidecar says ``precision`` (default: the model's own), built from a model file the folder still
    holds, with this TensorRT release for this GPU.
    """

    name = "tensorrt-native"

    @classmethod
    def for_model(cls, artifacts, model: str, backend: str = "tensorrt-native", precision: str | None = None,
                  **options) -> "TensorRTBackend":
        del backend
        return cls(artifacts, model, precision=precision, **options)

    def __init__(self, artifacts, model: str = VISUAL, precision: str | None = None, device: int = 0,
                 threads: int | None = None, outputs: tuple[str, ...] = EMBEDDINGS):
        del threads  # the CPU thread count is onnxruntime's option
        folder = artifacts.folder
        if model not in PRECISION_MODELS.values():
            raise BackendError(f"the tensorrt-native backend runs engines of the visual model, not of {model}; use "
                               "--model visual and choose the engine with --precision")
        precision = precision or model_precision(model)
        trt = import_tensorrt()
        cuda = Cuda()
        gpu = probe_gpu(device)
        self.sidecar: EngineSidecar = choose_engine(artifacts.engines(), precision, engine_sources(artifacts),
                                                    trt.__version__, gpu, folder)
        plan = artifacts.engine_plan(self.sidecar)
        self.path = folder / self.sidecar.engine
        self.runner = EngineRunner(plan, trt, cuda, device, str(self.path), outputs)
        self.precision = self.sidecar.precision
        self.batch_size = None if self.runner.dynamic else self.runner.max_batch
        self.providers = None  # no onnxruntime providers: a TTA graph runs on onnxruntime's CPU provider
        self.tensorrt_version = trt.__version__

    def describe(self) -> str:
        s = self.sidecar
        return (f"TensorRT {self.tensorrt_version} native [{s.precision}, batch {s.profile.min}-{s.profile.max}, "
                f"{s.gpu_name}, {self.path.name}]")

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(np.ascontiguousarray(batch, dtype=np.float32))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self.run_all(batch)
        return outs["image_embeds"], outs["patch_embeds"]

    def close(self) -> None:
        self.runner.close()


def engine_sources(artifacts) -> dict[str, str]:
    """Model -> sha256 of its file now, for the models an engine may be built from that are the
    folder's current ones (a reduced-precision model made from an older visual model is not)."""
    sources = {}
    for model in PRECISION_MODELS.values():
        if model in artifacts.manifest.models:
            try:
                artifacts.check_source(model)
            except AnoclipError:
                continue
            sources[model] = artifacts.model_sha256(model)
    return sources
