"""The one record (docs/records.md): every kind of record checked against docs/record.schema.json;
predict and stream on the same frames give the same records; what the remote client sends and what
it makes of the server's answers.

The server side is exercised without Triton: :class:`Wire` plays Triton's HTTP transport, turning
the client's ``InferInput`` tensors into their bytes on the wire and back into the requests
:class:`~anoclip.runtime.serving.model.AnoclipModel` answers (tests/test_serve.py runs the real server).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from fakes import defect_frame, normal_frame, write_clip
from services import Subscriber, mosquitto, mosquitto_broker, wait_until  # noqa: F401 (fixtures)

from anoclip.runtime.cli import cli
from anoclip.runtime.detector import Detector
from anoclip.runtime.records import SCHEMA, make_record

RECORD_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "record.schema.json").read_text())
# What differs between two runs over the same frames by nature: where and when a frame came from,
# which run scored it and how long each stage took.
PER_RUN = {"source", "frame", "captured", "run", "timings_ms"}


def check(record: dict) -> dict:
    """``record`` as JSON text carries it, checked against the schema."""
    record = json.loads(json.dumps(record, allow_nan=False))
    jsonschema.Draft202012Validator(RECORD_SCHEMA).validate(record)
    return record


def test_the_schema_file_is_this_version():
    jsonschema.Draft202012Validator.check_schema(RECORD_SCHEMA)
    assert RECORD_SCHEMA["properties"]["schema"]["const"] == SCHEMA == "anoclip.record/2"
    with pytest.raises(jsonschema.ValidationError):  # no private fields
        check({**_predicted(), "source_index": 0})


def _predicted(threshold: float | None = None, pixel: float | None = None) -> dict:
    from anoclip.runtime.detector import Result
    from anoclip.runtime.decision import ClassThreshold, decide

    amap = np.linspace(0.2, 0.8, 64, dtype=np.float32).reshape(8, 8)
    result = Result(0.6, amap, amap, np.zeros((1, 4), np.float32), "bottle", (8, 8), 1)
    result.threshold = ClassThreshold.in_force(None, threshold, pixel)
    result.anomalous, result.regions = decide(result.score, amap, result.threshold)
    return make_record(result, "a.png")


def test_records_with_and_without_a_decision():
    undecided = check(_predicted())
    assert (undecided["anomalous"], undecided["threshold"], undecided["threshold_origin"], undecided["regions"]) == \
        (None, None, None, [])
    decided = check(_predicted(0.5, 0.7))
    assert decided["anomalous"] is True and decided["threshold_origin"] == "override"
    assert decided["regions"] and decided["regions"][0]["area"] == int((_map_values() > 0.7).sum())


def _map_values() -> np.ndarray:
    return np.linspace(0.2, 0.8, 64, dtype=np.float32).reshape(8, 8)


# ----------------------------------------------------------------------------------------------
# predict and stream on the same frames


def _frames(folder: Path, count: int = 20) -> tuple[Path, Path]:
    """A video of ``count`` frames (a red square from frame 12 on) and a folder of the same frames
    as PNG files, taken from the decoded video (so both hold the same pixels)."""
    video = write_clip(folder / "line.avi", count, defect_from=12, size=(72, 96))
    images = folder / "images"
    images.mkdir()
    capture = cv2.VideoCapture(str(video))
    for i in range(count):
        ok, frame = capture.read()
        assert ok, i
        cv2.imwrite(str(images / f"frame{i:03d}.png"), frame)
    capture.release()
    return video, images


def _invoke(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_predict_and_stream_give_the_same_records(tiny_artifacts, tmp_path, mosquitto_broker):  # noqa: F811
    """predict on a folder and stream on a video of the same frames; predict on the video and stream
    on the folder: the same records, but for where, when and in which run each frame was scored."""
    video, images = _frames(tmp_path)
    detector = Detector.load(tiny_artifacts, backend="cpu")
    scores = [detector.predict(str(p), "bottle").score for p in sorted(images.iterdir())]
    maxima = [float(detector.predict(str(p), "bottle").anomaly_map_full.max()) for p in sorted(images.iterdir())]
    # thresholds inside the range the frames give, so that the decisions and regions differ between frames
    threshold, pixel = f"{np.median(scores):.9g}", f"{np.median(maxima):.9g}"
    decision = ("--threshold", threshold, "--pixel-threshold", pixel)
    _invoke("predict", "--artifacts", str(tiny_artifacts), "--backend", "cpu", "--class", "bottle",
            "--out", str(tmp_path / "predicted"), *decision, str(images))
    subscriber = Subscriber(mosquitto_broker, "anoclip/+/events")
    try:
        _invoke("stream", "--artifacts", str(tiny_artifacts), "--backend", "cpu", "--source", str(video),
                "--class", "bottle", "--events", str(tmp_path / "events.jsonl"), "--save-dir", str(tmp_path / "saved"),
                "--mqtt", mosquitto_broker, "--topic", "anoclip/{source}/events", "--stats-interval", "0", *decision)
        wait_until(lambda: len(subscriber.messages) >= 20, what="20 MQTT payloads")
    finally:
        subscriber.close()
    predicted = [check(json.loads(line)) for line in (tmp_path / "predicted" / "results.jsonl").read_text().splitlines()]
    streamed = [check(json.loads(line)) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    payloads = [check(payload) for _, payload in subscriber.messages]
    assert [p["frame"] for p in payloads][:20] == list(range(20))
    assert payloads[:20] == streamed  # MQTT carries the events file's records
    assert len(predicted) == len(streamed) == 20
    assert {r["anomalous"] for r in streamed} == {True, False} and any(r["regions"] for r in streamed)
    files = {"overlay", "map", "map_shape"}  # written by predict; streams save maps of anomalous frames only
    for i, (mine, theirs) in enumerate(zip(predicted, streamed)):
        assert Path(mine["source"]).name == f"frame{i:03d}.png" and theirs["source"] == "line.avi"
        assert theirs["frame"] == i and mine["frame"] == 0
        assert set(mine) - files == set(theirs)
        assert {k: v for k, v in mine.items() if k not in PER_RUN | files} == \
            {k: v for k, v in theirs.items() if k not in PER_RUN}, i
        if theirs["anomalous"]:
            saved = np.load(tmp_path / "saved" / f"0-line.avi_{i:08d}_map.npy")
            assert np.array_equal(saved, np.load(mine["map"]))  # the same maps, to the bit

    # predict on the video (the finite case of the same pipeline), stream on the folder (the same reader)
    _invoke("predict", "--artifacts", str(tiny_artifacts), "--backend", "cpu", "--class", "bottle",
            "--out", str(tmp_path / "video"), *decision, str(video))
    _invoke("stream", "--artifacts", str(tiny_artifacts), "--backend", "cpu", "--source", str(images),
            "--class", "bottle", "--events", str(tmp_path / "folder.jsonl"), "--stats-interval", "0", *decision)
    from_video = [check(json.loads(line)) for line in (tmp_path / "video" / "results.jsonl").read_text().splitlines()]
    from_folder = [check(json.loads(line)) for line in (tmp_path / "folder.jsonl").read_text().splitlines()]
    by_nature = {"source", "captured", "run", "timings_ms"}
    assert [r["frame"] for r in from_video] == list(range(20)) and {r["source"] for r in from_video} == {str(video)}
    assert [Path(r["map"]).name for r in from_video] == [f"line_{i:06d}_map.npy" for i in range(20)]
    for i, (mine, theirs) in enumerate(zip(from_video, streamed)):
        assert set(mine) - files == set(theirs)
        assert {k: v for k, v in mine.items() if k not in by_nature | files} == \
            {k: v for k, v in theirs.items() if k not in by_nature}, i
    assert len(from_folder) == 20  # the folder's files, in order, each the source of its record
    for i, (mine, theirs) in enumerate(zip(predicted, from_folder)):
        assert theirs["source"] == mine["source"] and theirs["frame"] == 0
        assert {k: v for k, v in mine.items() if k not in by_nature | files} == \
            {k: v for k, v in theirs.items() if k not in by_nature}, i


# ----------------------------------------------------------------------------------------------
# The remote client: encoded bytes on the wire, the server's decision in its records


class Wire:
    """Triton's HTTP transport in the test process: the client's tensors are serialised as
    tritonclient sends them (``sent`` keeps the payload size of each request) and answered by
    ``model`` (an AnoclipModel) from the bytes alone."""

    def __init__(self, model):
        self.model = model
        self.sent: list[tuple[str, dict[str, int]]] = []

    def infer(self, name, tensors, outputs=None, **_):
        from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

        data, sizes = {}, {}
        for tensor in tensors:
            raw = tensor._get_binary_data()  # what goes on the wire for this input
            sizes[tensor.name()] = len(raw)
            if tensor.datatype() == "BYTES":
                array = deserialize_bytes_tensor(raw)
            else:
                array = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype()))
            data[tensor.name()] = array.reshape(tensor.shape())
        self.sent.append((name, sizes))
        request = _Request(data)
        answer = self.model.infer_encoded([request]) if name == "anoclip" else self.model.infer_frames([request])
        return _Answer(answer[0])

    def close(self):
        pass


class _Request(dict):
    @property
    def data(self) -> dict:
        return self


class _Answer:
    def __init__(self, outputs: dict):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs[name]


def _remote(detector, monkeypatch):
    from anoclip.runtime.serving.client import RemoteDetector
    from anoclip.runtime.serving.model import AnoclipModel

    model = AnoclipModel(detector)
    wire = Wire(model)
    remote = RemoteDetector(["http://127.0.0.1:9"])
    monkeypatch.setattr(remote.pool, "_client", lambda server, proto: wire)
    remote._info = json.loads(json.dumps(model.info()))
    return remote, wire


def test_a_large_jpeg_goes_to_the_server_as_its_encoded_bytes(tiny_artifacts, tmp_path, monkeypatch):
    pytest.importorskip("tritonclient.http")
    height, width = 3000, 4000
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], axis=-1).astype(np.uint8)
    path = tmp_path / "large.jpg"
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    jpeg = path.stat().st_size
    remote, wire = _remote(Detector.load(tiny_artifacts, backend="cpu"), monkeypatch)
    result = remote.predict(str(path), "bottle")
    (model, sizes), = wire.sent
    # the file itself: its bytes and the 4-byte length of Triton's BYTES encoding
    assert model == "anoclip" and sizes["image"] == jpeg + 4
    assert jpeg < 4_000_000 < height * width * 3 == 36_000_000
    assert result.image_size == (height, width) and result.anomaly_map_full.shape == (height, width)
    print(f"\n{width}x{height} JPEG: {sizes['image']} bytes on the wire; as decoded pixels: {height * width * 3}")
    remote.predict(cv2.imread(str(path))[:, :, ::-1], "bottle")  # an array: the raw-frame model
    assert wire.sent[-1][0] == "anoclip_frame" and wire.sent[-1][1]["frame"] == height * width * 3


def test_remote_records_are_the_servers_decision_and_equal_local_ones(tiny_artifacts, tmp_path, monkeypatch):
    pytest.importorskip("tritonclient.http")
    local = Detector.load(tiny_artifacts, backend="cpu")
    remote, wire = _remote(Detector.load(tiny_artifacts, backend="cpu"), monkeypatch)
    frames = [normal_frame(i, (60, 140))[:, :, ::-1] for i in range(2)] + [defect_frame(3, (90, 90))[:, :, ::-1]]
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"f{i}.png")
        cv2.imwrite(str(paths[-1]), frame[:, :, ::-1])
    scores = [local.predict(frame, "bottle").score for frame in frames]
    override = (float(np.median(scores)), 0.0)  # every pixel is above 0: one region, the whole frame
    for detector in (local, remote):
        detector.threshold_override = override
    for path in paths:
        mine, theirs = local.predict(str(path), ["bottle", "carpet"]), remote.predict(str(path), ["bottle", "carpet"])
        for cls in ("bottle", "carpet"):
            a, b = check(make_record(mine.by_class[cls], str(path))), check(make_record(theirs.by_class[cls], str(path)))
            assert b["anomalous"] is not None and b["regions"] == [{"box": [0, 0, *mine.image_size[::-1]],
                                                                     "area": mine.image_size[0] * mine.image_size[1]}]
            assert abs(a.pop("score") - b.pop("score")) <= 1e-6
            for key in ("map_max", "map_mean"):
                assert abs(a.pop(key) - b.pop(key)) <= 1e-6
            a.pop("timings_ms"), b.pop("timings_ms")
            assert a == b  # the decision, thresholds and their origin included
            assert float(np.abs(mine.by_class[cls].anomaly_map_full - theirs.by_class[cls].anomaly_map_full).max()) <= 1e-6
    assert all(sizes["image_threshold"] == 8 and sizes["pixel_threshold"] == 8 for _, sizes in wire.sent)
    remote.threshold_override = (None, None)  # the servers' own (none calibrated here): undecided
    record = check(make_record(remote.predict(str(paths[0]), "bottle"), str(paths[0])))
    assert (record["anomalous"], record["threshold"], record["regions"]) == (None, None, [])
    assert "image_threshold" not in wire.sent[-1][1]


def test_a_reconnected_stream_resets_its_adapter_state_on_the_server(tiny_artifacts, monkeypatch):
    pytest.importorskip("tritonclient.http")
    server = Detector.load(tiny_artifacts, backend="cpu", tta=True)
    remote, wire = _remote(server, monkeypatch)
    frame = normal_frame(0, (64, 64))[:, :, ::-1]
    first = remote.predict_batch([frame], "bottle", tta_keys=["cam0"])[0]
    remote.predict_batch([frame], "bottle", tta_keys=["cam0"])  # the state moved on
    assert ("bottle", remote.tta, "cam0") in server._adapters
    remote.reset_tta("bottle", "cam0")
    again = remote.predict_batch([frame], "bottle", tta_keys=["cam0"])[0]
    assert [sorted(sizes) for _, sizes in wire.sent][-1] == ["class", "frame", "reset", "stream"]
    assert "reset" not in wire.sent[-2][1]
    # afresh: the same maps as the stream's first frame (the adapter's draws are seeded per state)
    assert np.array_equal(again.anomaly_map, first.anomaly_map)


def test_the_servers_map_smoothing_is_honoured_by_the_client(tiny_artifacts, monkeypatch):
    pytest.importorskip("tritonclient.http")
    local = Detector.load(tiny_artifacts, backend="cpu", smoothing_sigma=1.5)
    remote, _ = _remote(Detector.load(tiny_artifacts, backend="cpu", smoothing_sigma=1.5), monkeypatch)
    for size in ((64, 64), (48, 160)):  # one tile, and a frame cut into tiles
        frame = normal_frame(2, size)[:, :, ::-1]
        mine, theirs = remote.predict(frame, "bottle"), local.predict(frame, "bottle")
        assert theirs.tiles == (1 if size[0] == size[1] else 4)
        for name in ("anomaly_map", "anomaly_map_full"):
            assert float(np.abs(getattr(mine, name) - getattr(theirs, name)).max()) <= 1e-6, (size, name)
        plain = Detector.load(tiny_artifacts, backend="cpu").predict(frame, "bottle")
        assert float(np.abs(plain.anomaly_map_full - mine.anomaly_map_full).max()) > 1e-5  # smoothed: not the plain map


def test_smoothing_is_an_option_of_predict(tiny_artifacts, tmp_path):
    frame = normal_frame(1, (64, 64))
    cv2.imwrite(str(tmp_path / "a.png"), frame)
    _invoke("predict", "--artifacts", str(tiny_artifacts), "--backend", "cpu", "--class", "bottle",
            "--smoothing-sigma", "2", "--out", str(tmp_path / "out"), str(tmp_path / "a.png"))
    record = check(json.loads((tmp_path / "out" / "results.jsonl").read_text()))
    expected = Detector.load(tiny_artifacts, backend="cpu", smoothing_sigma=2.0).predict(frame[:, :, ::-1], "bottle")
    assert np.allclose(np.load(record["map"]), expected.anomaly_map_full, atol=1e-6)
