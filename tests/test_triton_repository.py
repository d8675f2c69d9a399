"""`anoclip export-triton`: a model repository for stock Triton containers. Every config.pbtxt is
parsed with Triton's own ModelConfig protobuf schema (shipped in tritonclient) and checked against
the inputs and outputs of the ONNX file beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FUSED_CLASSES, artifact_file, copy_artifacts, one_error_line, run_cli

onnx = pytest.importorskip("onnx", reason="the graphs are read with onnx (export extra)")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="Triton's model-config schema comes with tritonclient (dev extra)")
from google.protobuf import text_format  # noqa: E402

from anoclip.runtime.artifacts import read_manifest  # noqa: E402
from anoclip.runtime.serving.model_repository import export_triton_command  # noqa: E402



def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(path: Path) -> tuple[dict, dict]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def shape(value):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

    def dtype(value):
        return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)

    return ({v.name: (dtype(v), shape(v)) for v in graph.input}, {v.name: (dtype(v), shape(v)) for v in graph.output})


def assert_config_matches_onnx(config, model: Path) -> None:
    """Names, data types and dims of the config against the ONNX graph (batch axis per max_batch_size)."""
    inputs, outputs = onnx_io(model)
    for declared, actual in ((config.input, inputs), (config.output, outputs)):
        assert sorted(t.name for t in declared) == sorted(actual)
        for tensor in declared:
            kind, shape = actual[tensor.name]
            assert model_config_pb2.DataType.Name(tensor.data_type) == "TYPE_" + {"FLOAT": "FP32"}[kind]
            if config.max_batch_size > 0:
                assert shape[0] == -1 and list(tensor.dims) == shape[1:], tensor.name
            else:
                assert list(tensor.dims) == shape, tensor.name


def test_fused_graph_repository(fused_artifacts, tmp_path):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(export_triton_command, ["--artifacts", str(fused_artifacts), "--out", str(repo),
                                                        "--max-batch", "8", "--instances", "2",
                                                        "--tensorrt-accelerator", "fp16"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in repo.iterdir()) == ["anoclip_fused"]
    model = repo / "anoclip_fused" / "1" / "model.onnx"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == hashlib.sha256(
        artifact_file(fused_artifacts, "fused").read_bytes()).hexdigest()
    config = parse_config(repo / "anoclip_fused" / "config.pbtxt")
    assert config.name == "anoclip_fused" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.instance_group[0].count == 2
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert_config_matches_onnx(config, model)
    scores = next(o for o in config.output if o.name == "scores")
    classes = (repo / "anoclip_fused" / scores.label_filename).read_text().split()
    assert classes == sorted(FUSED_CLASSES) == json.loads(config.parameters["anoclip.classes"].string_value)
    manifest = read_manifest(fused_artifacts)
    assert json.loads(config.parameters["anoclip.mean"].string_value) == list(manifest.mean)


def test_fixed_batch_visual_model_and_engine_plan(tiny_artifacts, tmp_path):
    from test_engines import _stored

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    record, _ = _stored(folder, precision="fp16", payload=b"placeholder plan bytes")
    repo = tmp_path / "repo"
    proc = run_cli("export-triton", "--artifacts", str(folder), "--out", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert "fixed batch of 1: no dynamic batching" in proc.stdout + proc.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["anoclip_visual", "anoclip_visual_trt_fp16"]
    config = parse_config(repo / "anoclip_visual" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert_config_matches_onnx(config, repo / "anoclip_visual" / "1" / "model.onnx")
    plan = parse_config(repo / "anoclip_visual_trt_fp16" / "config.pbtxt")
    assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 8  # the sidecar's profile: 1..8, dynamic
    assert (repo / "anoclip_visual_trt_fp16" / "1" / "model.plan").read_bytes() == b"placeholder plan bytes"
    inputs, outputs = onnx_io(artifact_file(folder, "visual"))
    assert {o.name: list(o.dims) for o in plan.output} == {n: s[1:] for n, (_, s) in outputs.items()}
    assert [list(i.dims) for i in plan.input] == [list(record.input_shape[1:])]
    assert plan.parameters["anoclip.gpu"].string_value == "Orin"


def test_existing_repository_is_kept_unless_forced(fused_artifacts, tmp_path):
    repo = tmp_path / "repo"
    (repo / "mine").mkdir(parents=True)
    proc = run_cli("export-triton", "--artifacts", str(fused_artifacts), "--out", str(repo))
    assert proc.returncode == 1 and "--force" in one_error_line(proc.stderr)
    assert [p.name for p in repo.iterdir()] == ["mine"]
    proc = run_cli("export-triton", "--artifacts", str(fused_artifacts), "--out", str(repo), "--force", "--model", "visual")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in repo.iterdir()] == ["anoclip_visual"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo-")]  # no staging left behind
    config = parse_config(repo / "anoclip_visual" / "config.pbtxt")
    assert config.max_batch_size == 8 and np.all([d > 0 for o in config.output for d in o.dims])
