"""A STAND-IN for TensorRT's Python API (``tensorrt``) and cuda-python's runtime bindings
(``cuda.bindings.runtime``), for tests on machines without a GPU. It is not TensorRT and proves
nothing about TensorRT's numbers, speed or operator support; it stands at the API boundary so that
the code on our side of it (build-engine, the sidecar, engine choice, the native backend's buffers,
streams and bindings, the CLI) runs end to end.

What it imitates, from TensorRT's documented Python API (10.3 and the 10.x -> 11.x migration guide):

* ``Builder`` / ``INetworkDefinition`` / ``OnnxParser.parse_from_file`` / ``IBuilderConfig`` /
  optimisation profiles / timing caches / ``build_serialized_network``. The parser reads the ONNX
  file's inputs, outputs and node types (LayerNormalization -> ``LayerType.NORMALIZATION``,
  Softmax -> ``LayerType.SOFTMAX``).
* Version rules: 10.x has the weak-typing APIs (``BuilderFlag.FP16``, ``INT8``,
  ``OBEY_PRECISION_CONSTRAINTS``, per-layer ``precision`` and ``set_output_type``); 11.x has none of
  them (the migration guide removes the precision flags; the per-layer setters are left out here as
  well, so that any weak-typing call fails loudly), every network is strongly typed and the
  ``STRONGLY_TYPED`` creation flag is accepted and ignored. A strongly typed network built with a
  precision flag fails, as TensorRT refuses that combination. A plan deserialises only with the
  major.minor.patch that built it.
* The "plan" is a JSON header plus the ONNX model's bytes; the "engine" runs a batch by handing it
  to onnxruntime's CPU session of that model, so its outputs are the model's (an fp16 build of an
  fp32 model therefore gives fp32 numbers here, unlike a real engine).
* ``cuda.bindings.runtime``: ``cudaMallocHost`` / ``cudaMalloc`` return addresses of real host
  memory (so the backend's ``ctypes`` views and ``cudaMemcpyAsync`` work), streams, error codes as
  ``(cudaError_t, value...)`` tuples, ``cudaGetErrorName``; ``cuda.bindings.utils``'s
  ``get_cuda_native_handle`` (the stream's address, which ``int()`` no longer should give).

Every call is appended to :attr:`StandIn.calls` as ``(name, detail)``, so tests can assert what was
called, with what, and what was not.
"""

from __future__ import annotations

import ctypes
import enum
import json
import re
import types
from dataclasses import dataclass, field

import numpy as np

PLAN_MAGIC = b"TENSORRT-STAND-IN-PLAN\n"


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


@dataclass
class StandIn:
    """One stand-in TensorRT release with its CUDA runtime; :meth:`modules` gives the modules to put
    into ``sys.modules`` (``tensorrt``, ``cuda``, ``cuda.bindings``, ``cuda.bindings.runtime``)."""

    version: str = "10.3.0.30"
    gpu_name: str = "Stand-in GPU (not a GPU)"
    compute_capability: str = "8.7"
    calls: list[tuple[str, object]] = field(default_factory=list)

    def __post_init__(self):
        self.major = _release(self.version)[0]
        self.trt = _tensorrt_module(self)
        self.cudart = _cudart_module(self)

    def record(self, name: str, detail: object = None) -> None:
        self.calls.append((name, detail))

    def called(self, name: str) -> list[object]:
        """The details of every call of ``name``."""
        return [detail for called, detail in self.calls if called == name]

    def modules(self) -> dict[str, types.ModuleType]:
        cuda = types.ModuleType("cuda")
        bindings = types.ModuleType("cuda.bindings")
        cuda.__path__, bindings.__path__ = [], []  # packages, as the real namespace is
        utils = types.ModuleType("cuda.bindings.utils")
        utils.__doc__ = "STAND-IN for cuda-python's cuda.bindings.utils (tests/tensorrt_standin.py)."

        def get_cuda_native_handle(obj):
            self.record("get_cuda_native_handle", type(obj).__name__)
            return obj.handle

        utils.get_cuda_native_handle = get_cuda_native_handle
        cuda.bindings, bindings.runtime, bindings.utils = bindings, self.cudart, utils
        return {"tensorrt": self.trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": self.cudart,
                "cuda.bindings.utils": utils}


# ----------------------------------------------------------------------------------------------
# tensorrt


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.BOOL: np.bool_}


class LayerType(enum.IntEnum):
    CONVOLUTION = 0
    MATRIX_MULTIPLY = 1
    ELEMENTWISE = 2
    SOFTMAX = 3
    NORMALIZATION = 4
    SHUFFLE = 5
    OTHER = 6


_LAYER_OF_OP = {"Conv": LayerType.CONVOLUTION, "MatMul": LayerType.MATRIX_MULTIPLY, "Gemm": LayerType.MATRIX_MULTIPLY,
                "Add": LayerType.ELEMENTWISE, "Mul": LayerType.ELEMENTWISE, "Softmax": LayerType.SOFTMAX,
                "LayerNormalization": LayerType.NORMALIZATION, "Reshape": LayerType.SHUFFLE,
                "Transpose": LayerType.SHUFFLE}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class _Flags10(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10


class _Flags11(enum.IntEnum):  # the precision flags are gone in 11.x
    TF32 = 7


_WEAK_FLAGS = {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}


def _tensorrt_module(standin: StandIn) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__doc__ = "STAND-IN for TensorRT's Python API (tests/tensorrt_standin.py); not TensorRT."
    trt.__version__ = standin.version
    trt.__file__ = __file__
    weak = standin.major < 11
    flags = _Flags10 if weak else _Flags11

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity=WARNING):
            self.severity = severity
            self.messages: list[str] = []

        def log(self, severity, message):
            standin.record("log", message)
            self.messages.append(message)

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype

    class Layer:
        def __init__(self, index, op_type, name):
            self.type = _LAYER_OF_OP.get(op_type, LayerType.OTHER)
            self.name = name or f"{op_type}_{index}"
            self.num_outputs = 1
            self._precision = DataType.FLOAT

        if weak:  # per-layer precision: weak typing, 10.x only here
            @property
            def precision(self):
                return self._precision

            @precision.setter
            def precision(self, value):
                standin.record("layer.precision", (self.name, DataType(value).name))
                self._precision = value

            def set_output_type(self, index, dtype):
                standin.record("layer.set_output_type", (self.name, index, DataType(dtype).name))

    class Network:
        def __init__(self, flags):
            strongly = bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            self.strongly_typed = strongly or not weak  # 11.x: always strongly typed
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.layers: list[Layer] = []
            self.model_bytes = b""

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_output(self, index):
            return self.outputs[index]

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, index):
            return self.layers[index]

    class ParserError:
        def __init__(self, text):
            self.text = text

        def code(self):
            return 1

        def desc(self):
            return self.text

        def node(self):
            return -1

        def node_name(self):
            return ""

        def node_operator(self):
            return ""

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

        def parse_from_file(self, path):
            import onnx

            standin.record("parse_from_file", path)
            try:
                model = onnx.load(path)
            except Exception as exc:  # noqa: BLE001 - reported as a parser error, as TensorRT does
                self.errors.append(ParserError(f"cannot read {path}: {exc}"))
                return False
            types_ = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF}
            initializers = {t.name for t in model.graph.initializer}

            def tensor(value):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                return Tensor(value.name, dims, types_.get(value.type.tensor_type.elem_type, DataType.FLOAT))

            self.network.inputs = [tensor(v) for v in model.graph.input if v.name not in initializers]
            self.network.outputs = [tensor(v) for v in model.graph.output]
            self.network.layers = [Layer(i, n.op_type, n.name) for i, n in enumerate(model.graph.node)]
            self.network.model_bytes = model.SerializeToString()
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            standin.record("profile.set_shape", (name, tuple(low), tuple(opt), tuple(high)))
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data) or b"stand-in timing cache"

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.flags = {flags.TF32} if "TF32" in flags.__members__ else set()
            self.profiles, self.pools, self.cache = [], {}, None

        def set_flag(self, flag):
            standin.record("config.set_flag", flags(flag).name)
            self.flags.add(flags(flag))

        def clear_flag(self, flag):
            standin.record("config.clear_flag", flags(flag).name)
            self.flags.discard(flags(flag))

        def get_flag(self, flag):
            return flags(flag) in self.flags

        def set_memory_pool_limit(self, pool, size):
            standin.record("config.set_memory_pool_limit", (MemoryPoolType(pool).name, size))
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            standin.record("config.create_timing_cache", len(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags_=0):
            standin.record("builder.create_network", int(flags_))
            return Network(int(flags_))

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            weak_flags = sorted(f.name for f in config.flags if f.name in _WEAK_FLAGS)
            standin.record("builder.build_serialized_network",
                           {"strongly_typed": network.strongly_typed, "flags": sorted(f.name for f in config.flags)})
            if network.strongly_typed and weak_flags:
                self.logger.log(Logger.ERROR, f"precision flags {weak_flags} are not allowed for strongly typed networks")
                return None
            (source,) = network.inputs
            dynamic = source.shape[0] == -1
            if dynamic and not config.profiles:
                self.logger.log(Logger.ERROR, "a network with dynamic shapes needs an optimisation profile")
                return None
            profile = (config.profiles[0].shapes[source.name] if dynamic
                       else (source.shape, source.shape, source.shape))
            header = {"tensorrt": standin.version, "input": source.name, "input_shape": list(source.shape),
                      "profile": [list(s) for s in profile],
                      "outputs": [[o.name, list(o.shape), int(o.dtype)] for o in network.outputs],
                      "fp16_flag": "FP16" in weak_flags, "strongly_typed": network.strongly_typed}
            return PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.model_bytes

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            plan = bytes(plan)
            standin.record("runtime.deserialize_cuda_engine", len(plan))
            if not plan.startswith(PLAN_MAGIC):
                self.logger.log(Logger.ERROR, "the plan is not a serialised engine")
                return None
            header_line, model = plan[len(PLAN_MAGIC):].split(b"\n", 1)
            header = json.loads(header_line)
            if _release(header["tensorrt"]) != _release(standin.version):
                self.logger.log(Logger.ERROR, f"the plan was built with TensorRT {header['tensorrt']}, this is "
                                              f"{standin.version}")
                return None
            return Engine(header, model)

    class Engine:
        def __init__(self, header, model):
            import onnxruntime as ort

            self.header = header
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.names = [header["input"]] + [name for name, _, _ in header["outputs"]]
            self.shapes = {header["input"]: tuple(header["input_shape"]),
                           **{name: tuple(shape) for name, shape, _ in header["outputs"]}}
            self.dtypes = {header["input"]: DataType.FLOAT,
                           **{name: DataType(dtype) for name, _, dtype in header["outputs"]}}

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == self.header["input"] else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_profile_shape(self, name, profile_index):
            assert name == self.header["input"] and profile_index == 0
            return tuple(tuple(s) for s in self.header["profile"])

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.batch, self.addresses, self._out_shapes = engine, None, {}, {}

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            ok = len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))
            standin.record("context.set_input_shape", (name, tuple(shape), ok))
            if ok:
                self.batch = tuple(shape)
            return ok

        def _outputs(self, batch):
            return dict(zip([o.name for o in self.engine.session.get_outputs()],
                            self.engine.session.run(None, {self.engine.header["input"]: batch})))

        def get_tensor_shape(self, name):
            if name == self.engine.header["input"]:
                return self.batch
            if self.batch not in self._out_shapes:  # what the model gives for this input shape
                outs = self._outputs(np.zeros(self.batch, np.float32))
                self._out_shapes[self.batch] = {k: v.shape for k, v in outs.items()}
            return self._out_shapes[self.batch][name]

        def set_tensor_address(self, name, address):
            standin.record("context.set_tensor_address", name)
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle):
            standin.record("context.execute_async_v3", (int(stream_handle), self.batch))
            standin.cudart.check_stream(int(stream_handle))
            source = self.engine.header["input"]
            count = int(np.prod(self.batch))
            batch = np.frombuffer((ctypes.c_float * count).from_address(self.addresses[source]),
                                  np.float32).reshape(self.batch).copy()
            for name, value in self._outputs(batch).items():
                value = np.ascontiguousarray(value, _NUMPY[self.engine.dtypes[name]])
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    def nptype(dtype):
        return _NUMPY[DataType(dtype)]

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.DataType, trt.LayerType, trt.TensorIOMode, trt.MemoryPoolType = DataType, LayerType, TensorIOMode, MemoryPoolType
    trt.NetworkDefinitionCreationFlag, trt.BuilderFlag = NetworkDefinitionCreationFlag, flags
    trt.float32, trt.float16, trt.int8, trt.int32 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32
    trt.nptype = nptype
    return trt


# ----------------------------------------------------------------------------------------------
# cuda.bindings.runtime


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStream_t:  # noqa: N801 - cuda-python's name
    """A stream; its address through ``cuda.bindings.utils.get_cuda_native_handle`` (``int()`` of it
    is deprecated since cuda-python 12.9.1, so the stand-in refuses it)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self):
        raise AssertionError("int(stream) is deprecated in cuda-python; use get_cuda_native_handle")


def _handle(stream) -> int:
    """A stream argument as cuda-python takes it: a ``cudaStream_t`` or its address."""
    return stream.handle if isinstance(stream, cudaStream_t) else int(stream)


def _cudart_module(standin: StandIn) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.__doc__ = "STAND-IN for cuda-python's runtime bindings (tests/tensorrt_standin.py); no GPU."
    ok = cudaError_t.cudaSuccess
    memory = {"host": {}, "device": {}}  # address -> ctypes buffer (real memory in this process)
    streams: set[int] = set()

    def allocate(kind, nbytes):
        buffer = (ctypes.c_ubyte * max(int(nbytes), 1))()
        address = ctypes.addressof(buffer)
        memory[kind][address] = buffer
        standin.record(f"cudaMalloc{'Host' if kind == 'host' else ''}", int(nbytes))
        return ok, address

    def free(kind, address):
        standin.record(f"cudaFree{'Host' if kind == 'host' else ''}", int(address))
        if memory[kind].pop(int(address), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def inside(kind, address, nbytes):
        return any(a <= address and address + nbytes <= a + ctypes.sizeof(b) for a, b in memory[kind].items())

    def memcpy_async(dst, src, nbytes, kind, stream):
        standin.record("cudaMemcpyAsync", (cudaMemcpyKind(kind).name, int(nbytes)))
        dst_kind, src_kind = {cudaMemcpyKind.cudaMemcpyHostToDevice: ("device", "host"),
                              cudaMemcpyKind.cudaMemcpyDeviceToHost: ("host", "device")}[cudaMemcpyKind(kind)]
        if _handle(stream) not in streams or not inside(dst_kind, int(dst), nbytes) or not inside(src_kind, int(src),
                                                                                                    nbytes):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (ok,)

    def stream_create():
        handle = 0x5000 + len(standin.called("cudaStreamCreate"))
        standin.record("cudaStreamCreate", handle)
        streams.add(handle)
        return ok, cudaStream_t(handle)

    def stream_call(name):
        def call(stream):
            standin.record(name, _handle(stream))
            if _handle(stream) not in streams:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            if name == "cudaStreamDestroy":
                streams.discard(_handle(stream))
            return (ok,)
        return call

    def check_stream(handle):
        assert handle in streams, f"execute_async_v3 on stream {handle:#x}, which was never created or is destroyed"

    rt.cudaError_t, rt.cudaMemcpyKind, rt.cudaStream_t = cudaError_t, cudaMemcpyKind, cudaStream_t
    rt.cudaGetErrorName = lambda error: (ok, cudaError_t(error).name.encode())
    rt.cudaGetDeviceCount = lambda: (ok, 1)
    rt.cudaSetDevice = lambda device: (ok,) if int(device) == 0 else (cudaError_t.cudaErrorInvalidValue,)
    rt.cudaMallocHost = lambda nbytes: allocate("host", nbytes)
    rt.cudaMalloc = lambda nbytes: allocate("device", nbytes)
    rt.cudaFreeHost = lambda address: free("host", address)
    rt.cudaFree = lambda address: free("device", address)
    rt.cudaMemcpyAsync = memcpy_async
    rt.cudaStreamCreate = stream_create
    rt.cudaStreamSynchronize = stream_call("cudaStreamSynchronize")
    rt.cudaStreamDestroy = stream_call("cudaStreamDestroy")
    rt.check_stream = check_stream
    rt.allocations = memory
    return rt
