"""`anoclip serve` on a real Triton Inference Server (loopback) and RemoteDetector as its client:
the same results as a local Detector, batching under concurrent load, failover between servers,
errors per request, thresholds, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError, ImageError, UnknownClassError
from anoclip.runtime.decision import ClassThreshold, decide

from conftest import copy_artifacts
from services import wait_until
from services_triton import serve_process, serve_python, start_server  # noqa: F401 (fixtures)

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from anoclip.runtime.serving import FRAME_MODEL, MODEL  # noqa: E402
from anoclip.runtime.serving.client import RemoteDetector  # noqa: E402

TOLERANCE = 1e-6


def frames(count: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def assert_same(remote, local) -> None:
    assert remote.cls == local.cls and remote.tiles == local.tiles and remote.image_size == local.image_size
    assert abs(remote.score - local.score) <= TOLERANCE
    for name in ("anomaly_map", "anomaly_map_full", "patch_probabilities"):
        a, b = getattr(remote, name), getattr(local, name)
        assert a.shape == b.shape, name
        assert float(np.abs(a - b).max()) <= TOLERANCE, name


@pytest.fixture(scope="module")
def server(serve_python, tiny_artifacts, tmp_path_factory):
    """One server for the module: batches of up to 8, a request waits up to 20 ms for others."""
    process = serve_process(serve_python, tiny_artifacts, tmp_path_factory.mktemp("serve"),
                            "--max-batch", "8", "--max-queue-delay-us", "20000")
    try:
        process.start()
    except AnoclipError as exc:
        pytest.skip(f"the Triton Inference Server did not start here: {exc}")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local(tiny_artifacts) -> Detector:
    return Detector.load(tiny_artifacts, backend="cpu", threads=1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_remote_results_equal_local_ones(server, local, tmp_path, protocol):
    remote = RemoteDetector([server.http_url if protocol == "http" else server.grpc_url])
    assert remote.classes == local.classes and remote.info["grid"] == list(local.grid)
    square = frames(1, seed=1, size=(90, 90))[0]  # one tile
    wide = frames(1, seed=2, size=(60, 200))[0]  # tiled (aspect 3.3)
    for name, image in (("square", square), ("wide", wide)):
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), image[:, :, ::-1])
        expected = local.predict(image, "bottle")
        assert expected.tiles == (1 if name == "square" else 4)
        assert_same(remote.predict(image, "bottle"), expected)  # raw frame: anoclip_frame
        assert_same(remote.predict(str(path), "bottle"), local.predict(str(path), "bottle"))  # encoded: anoclip
        assert_same(remote.predict(path.read_bytes(), "bottle"), expected)
    for remote_result, image in zip(remote.predict_batch([square, wide, square], "carpet"), [square, wide, square]):
        assert_same(remote_result, local.predict(image, "carpet"))
        assert remote_result.timings["model"] > 0 and remote_result.timings["request"] > 0  # read by the stream


def test_concurrent_clients_are_all_answered_and_batched(server, local):
    images = frames(10, seed=3)
    classes = ("bottle", "carpet")  # batches mix classes: the server runs each class's images together
    expected = {cls: [local.predict(image, cls) for image in images] for cls in classes}
    remote = RemoteDetector([server.grpc_url, server.http_url])
    before_requests = server.metric("nv_inference_request_success", FRAME_MODEL)
    before_runs = server.metric("nv_inference_exec_count", FRAME_MODEL)
    answered = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(50):
            which, cls = (index * 50 + k) % len(images), classes[(index + k) % 2]
            result = remote.predict(images[which], cls)
            assert_same(result, expected[cls][which])
            with lock:
                answered.append((index, k))

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(client, i) for i in range(8)]:
            future.result()
    assert sorted(answered) == [(i, k) for i in range(8) for k in range(50)]
    # Triton's own counters: 400 requests in fewer model runs, so some runs batched several requests
    requests = server.metric("nv_inference_request_success", FRAME_MODEL) - before_requests
    runs = server.metric("nv_inference_exec_count", FRAME_MODEL) - before_runs
    assert requests == 400
    assert runs < requests, f"{requests} requests in {runs} model runs: nothing was batched"


def test_bad_requests_fail_alone_and_are_not_retried(server, local):
    # the same server under two URLs: a retry would show as a second request in its counters
    remote = RemoteDetector([server.http_url, server.grpc_url])
    image = frames(1, seed=4)[0]
    before = server.metric("nv_inference_request_success", MODEL)
    with pytest.raises(ImageError, match="cannot decode the image bytes"):
        remote.predict(b"these bytes are not an image", "bottle")
    assert server.metric("nv_inference_request_success", MODEL) - before == 1
    with pytest.raises(UnknownClassError, match="class 'teapot' is not in the prompt weights"):
        remote.predict(image, "teapot")
    assert all(s.down_until == 0.0 for s in remote.servers)
    # bad and good requests in flight together (so in the same batches): only the bad ones fail
    good, bad = [], []
    with ThreadPoolExecutor(8) as pool:
        futures = [(i % 3 == 0, pool.submit(remote.predict, b"\x89PNG garbage" if i % 3 == 0 else image, "bottle"))
                   for i in range(24)]
        for is_bad, future in futures:
            (bad if is_bad else good).append(future.exception() if is_bad else future.result())
    assert len(bad) == 8 and all(isinstance(e, ImageError) for e in bad)
    for result in good:
        assert_same(result, local.predict(image, "bottle"))
    assert server.answers()


def test_failover_answers_every_frame_exactly_once(server, start_server, tiny_artifacts, local):
    second = start_server(tiny_artifacts, "--max-batch", "4", "--instances", "2")
    images = frames(8, seed=5)
    expected = [local.predict(image, "bottle") for image in images]
    remote = RemoteDetector([second.http_url, server.grpc_url], timeout=10.0, backoff=60.0)
    answers: dict[int, list] = {i: [] for i in range(200)}
    lock = threading.Lock()

    def send(index: int) -> None:
        result = remote.predict(images[index % len(images)], "bottle")
        with lock:
            answers[index].append(result)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, i) for i in range(200)]
        wait_until(lambda: sum(len(a) for a in answers.values()) >= 40, timeout=60, what="40 answers")
        second.kill()  # SIGKILL the second server's process group mid-run
        for future in futures:
            future.result()
    assert all(len(found) == 1 for found in answers.values())
    for index, (result,) in answers.items():
        assert_same(result, expected[index % len(images)])
    wait_until(lambda: not second.group_alive(), timeout=30, what="the killed server's processes to be gone")
    assert not second.answers()
    assert remote.servers[0].down_until > time.monotonic()  # skipped for the backoff period
    # only when no server answers does a request fail, naming each server's error
    with pytest.raises(AnoclipError, match="no server answered"):
        RemoteDetector([second.http_url], timeout=5.0).predict(images[0], "bottle")


def test_sigterm_answers_batches_in_flight_while_clients_move_on(server, start_server, tiny_artifacts, local):
    second = start_server(tiny_artifacts)
    images = frames(4, seed=9)
    expected = [local.predict(image, "carpet") for image in images]
    remote = RemoteDetector([second.grpc_url, server.http_url], backoff=60.0)
    answered = []

    def send(index: int) -> None:
        result = remote.predict(images[index % 4], "carpet")
        assert_same(result, expected[index % 4])
        answered.append(index)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, i) for i in range(150)]
        wait_until(lambda: len(answered) >= 30, timeout=60, what="30 answers")
        second.process.send_signal(signal.SIGTERM)
        for future in futures:
            future.result()  # none failed: refused requests went to the other server
    assert sorted(answered) == list(range(150))
    assert_stops_cleanly(second, None)


def assert_stops_cleanly(process, sig: int | None) -> None:
    """``anoclip serve`` exits 0 on ``sig`` (None: sent already), with Triton and its model stubs,
    and no traceback."""
    assert (process.process.wait(60) if sig is None else process.signal(sig)) == 0
    stderr = process.stderr_path.read_text()  # ours; Triton's log is on stdout
    assert stderr.endswith("\nstopped\n") and "Traceback" not in stderr
    wait_until(lambda: not process.group_alive(), timeout=30, what="Triton and its stubs to exit")
    assert not process.answers()


def test_thresholds_decide_as_local_ones_and_sigterm_stops(start_server, tiny_artifacts, tmp_path):
    from anoclip.calibration.threshold import ThresholdSettings, calibrate_threshold

    folder = copy_artifacts(tiny_artifacts, tmp_path / "artifacts")
    calibrate_threshold(Detector.load(folder, backend="cpu"), "bottle", frames(12, seed=6),
                        ThresholdSettings(quantile=0.5, pixel_quantile=0.9))
    local = Detector.load(folder, backend="cpu")
    process = start_server(folder)
    remote = RemoteDetector([process.grpc_url])
    assert remote.threshold_for("bottle") == local.threshold_for("bottle") is not None
    assert remote.threshold_for("bottle", image=0.7) == local.threshold_for("bottle", image=0.7)
    assert remote.threshold_for("carpet") is None and local.threshold_for("carpet") is None
    assert remote.threshold_for("carpet", pixel=0.5) == ClassThreshold(None, 0.5, "override")
    threshold = local.threshold_for("bottle")
    decisions = []
    for image in frames(12, seed=7):
        mine, theirs = remote.predict(image, "bottle"), local.predict(image, "bottle")
        # the server's decision, as the client received it, is the local one
        assert (mine.threshold, mine.anomalous, mine.regions) == (theirs.threshold, theirs.anomalous, theirs.regions)
        decision = decide(theirs.score, theirs.anomaly_map_full, threshold)
        assert (theirs.anomalous, theirs.regions) == decision
        decisions.append(decision[0])
        # the decision the server answers itself, for clients other than RemoteDetector
        inputs = [("frame", image[None], "UINT8"), ("class", np.array([[b"bottle"]], dtype=object), "BYTES")]
        out = remote.pool.call(FRAME_MODEL, inputs, ("anomalous", "threshold"))
        assert out["anomalous"][0, 0] == int(decision[0])
        assert np.allclose(out["threshold"][0], [threshold.image, threshold.pixel])
    assert True in decisions and False in decisions  # the threshold splits these frames
    remote.threshold_override = local.threshold_override = (0.7, 0.0)  # the user's, sent with each request
    for image in frames(3, seed=9):
        mine, theirs = remote.predict(image, "bottle"), local.predict(image, "bottle")
        assert mine.threshold == theirs.threshold == ClassThreshold(0.7, 0.0, "override")
        assert (mine.anomalous, mine.regions) == (theirs.anomalous, theirs.regions) != (None, [])
    assert_stops_cleanly(process, signal.SIGTERM)


def test_tta_states_per_stream_match_local_ones_and_sigint_stops(start_server, tiny_artifacts):
    from anoclip.runtime.tta import TTAConfig

    process = start_server(tiny_artifacts, "--tta", "--tta-steps", "2", "--seed", "3")
    local = Detector.load(tiny_artifacts, backend="cpu", tta=TTAConfig(steps=2, seed=3))
    remote = RemoteDetector([process.http_url])
    assert remote.tta == local.tta
    images = frames(6, seed=8)
    keys = ["cam-a", "cam-b", "cam-a", "cam-a", "cam-b", "cam-b"]
    # in order: each stream's adapter state moves on with its frames
    for mine, theirs in zip(remote.predict_batch(images[:3], "bottle", tta_keys=keys[:3]),
                            local.predict_batch(images[:3], "bottle", tta_keys=keys[:3])):
        assert_same(mine, theirs)
    for image, key in zip(images[3:], keys[3:]):
        assert_same(remote.predict_batch([image], "bottle", tta_keys=[key])[0],
                    local.predict_batch([image], "bottle", tta_keys=[key])[0])
    # a stream that reconnects starts afresh on the server as it does locally
    remote.reset_tta("bottle", "cam-a")
    local.reset_tta("bottle", "cam-a")
    assert_same(remote.predict_batch([images[0]], "bottle", tta_keys=["cam-a"])[0],
                local.predict_batch([images[0]], "bottle", tta_keys=["cam-a"])[0])
    with pytest.raises(AnoclipError, match="TTA settings"):
        remote.predict(images[0], "bottle", tta=False)
    assert_stops_cleanly(process, signal.SIGINT)


def test_serve_command_errors_are_one_line(serve_python, tiny_artifacts, tmp_path):
    import socket
    import subprocess

    from conftest import one_error_line, run_cli
    from services import free_port

    def serve(python, *args):
        return subprocess.run([str(python), "-c", "from anoclip.runtime.cli import main; main()", "serve", *args],
                              capture_output=True, text=True, timeout=120)

    done = serve(serve_python, "--artifacts", str(tmp_path / "missing"))
    assert done.returncode == 1 and "does not exist" in one_error_line(done.stderr)
    done = serve(serve_python, "--artifacts", str(tiny_artifacts), "--classes", "bottle,teapot")
    assert done.returncode == 1 and "class 'teapot'" in one_error_line(done.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(serve_python, "--artifacts", str(tiny_artifacts), "--http-port", str(free_port()),
                     "--grpc-port", str(port), "--metrics-port", str(free_port()))
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in one_error_line(done.stderr)
    done = serve(serve_python, "--artifacts", str(tiny_artifacts), "--tta", "--instances", "2")
    assert done.returncode == 2 and "--instances 1" in done.stderr
    # an environment without PyTriton (the tests' own) says what to install
    try:
        import pytriton  # noqa: F401
    except ImportError:
        done = run_cli("serve", "--artifacts", str(tiny_artifacts))
        assert done.returncode == 1 and "pip install 'anoclip[serve]'" in one_error_line(done.stderr)


def test_client_side_imports_neither_torch_nor_pytriton():
    import subprocess
    import sys

    code = ("import sys, anoclip.runtime.serving.client, anoclip.benchmarks.serve_process, anoclip.benchmarks.serve_environment, "
            "tritonclient.http, tritonclient.grpc; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip', 'onnx', 'pytriton'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_serve_benchmark_runs(serve_python, tiny_artifacts):
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "anoclip.benchmarks.serve_throughput", "--artifacts", str(tiny_artifacts),
                           "--requests", "8", "--clients", "1,2", "--size", "64x48", "--threads", "1",
                           "--server-python", str(serve_python), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [row["clients"] for row in result["served"]] == [1, 2]
    assert all(row["requests"] == 8 and row["per_second"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
               for row in result["served"] + [result["local"]])
    assert result["overhead_ms"] == result["served"][0]["p50_ms"] - result["local"]["p50_ms"]


def test_several_classes_in_one_call_match_local(server, local):
    image = frames(1, seed=10)[0]
    remote = RemoteDetector([server.http_url])
    for cls in (["carpet", "bottle"], "all"):
        mine, theirs = remote.predict(image, cls), local.predict(image, cls)
        assert list(mine.by_class) == list(theirs.by_class)
        for name in theirs.by_class:
            assert_same(mine.by_class[name], theirs.by_class[name])
    with pytest.raises(UnknownClassError):
        remote.predict(image, ["bottle", "teapot"])


def test_predict_and_stream_commands_run_on_the_servers(server, local, tiny_artifacts, tmp_path):
    import json

    from conftest import one_error_line, run_cli
    from fakes import write_clip

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(frames(2, seed=5, size=(80, 120))):
        cv2.imwrite(str(images / f"part{i}.png"), image[:, :, ::-1])
    runs = {}
    for where in ("local", "remote"):
        target = ("--artifacts", str(tiny_artifacts), "--backend", "cpu") if where == "local" else (
            "--server", server.grpc_url, "--server", server.http_url)
        proc = run_cli("predict", *target, "--class", "bottle,carpet", "--out", str(tmp_path / where),
                       "--threshold", "0.5", "--pixel-threshold", "0.0", str(images))
        assert proc.returncode == 0, proc.stderr
        runs[where] = [json.loads(line) for line in (tmp_path / where / "results.jsonl").read_text().splitlines()]
    assert len(runs["remote"]) == 4
    per_run = {"run", "captured", "timings_ms", "overlay", "map"}
    for mine, theirs in zip(runs["remote"], runs["local"]):
        for key in ("score", "map_max", "map_mean"):
            assert abs(mine.pop(key) - theirs.pop(key)) <= TOLERANCE
        assert np.abs(np.load(mine["map"]) - np.load(theirs["map"])).max() <= TOLERANCE
        # the same record, the decision (made on the server) included
        assert {k: v for k, v in mine.items() if k not in per_run} == {k: v for k, v in theirs.items() if k not in per_run}
        assert mine["anomalous"] is not None and mine["regions"]
    proc = run_cli("predict", "--server", server.http_url, "--tta", "--class", "bottle", str(images))
    assert proc.returncode == 2 and "--tta set up a local model" in proc.stderr
    proc = run_cli("predict", "--class", "bottle", str(images))
    assert proc.returncode == 2 and "--artifacts DIR" in proc.stderr and "--server URL" in proc.stderr

    clip = write_clip(tmp_path / "clip.avi", 12, defect_from=6)
    proc = run_cli("stream", "--server", server.grpc_url, "--source", str(clip), "--class", "bottle",
                   "--events", str(tmp_path / "events.jsonl"))
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["frame"] for e in events] == list(range(12))
    capture = cv2.VideoCapture(str(clip))
    for event in events[:3]:
        ok, bgr = capture.read()
        assert ok and abs(event["score"] - local.predict(bgr[:, :, ::-1], "bottle").score) <= TOLERANCE
    proc = run_cli("stream", "--server", server.grpc_url, "--source", str(clip), "--class", "nope")
    assert proc.returncode == 1 and "nope" in one_error_line(proc.stderr)


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_serve_sweeps_what_a_killed_server_left_says_when_loaded_and_refuses_huge_raw_frames(
        serve_python, tiny_artifacts, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    import tritonclient.http as http

    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="pyt-"))  # short: the workspace holds Unix sockets (108 characters at most)
    monkeypatch.setenv("PYTRITON_HOME", str(home))  # the servers' workspaces (inherited by them)
    dead = _dead_pid()
    stale_workspace, stale_region = home / f"anoclip-serve-{dead}-0badc0de", Path(f"/dev/shm/pytrtion{dead}-0badc0de")
    stale_workspace.mkdir()
    stale_region.write_bytes(b"\0" * 4096)

    first = serve_process(serve_python, tiny_artifacts, tmp_path, "--max-pixels", "10000")
    try:
        first.start()
    except AnoclipError as exc:
        pytest.skip(f"the Triton Inference Server did not start here: {exc}")
    try:
        assert "models loaded; serving" in first.stderr_path.read_text()
        assert not stale_workspace.exists() and not stale_region.exists()  # swept at start
        pid = first.process.pid
        assert [p.name.split("-")[2] for p in home.iterdir()] == [str(pid)]  # its own workspace

        # a raw frame above --max-pixels: an error of that request (not a 500), the next one answered
        client = http.InferenceServerClient(first.http_url.split("://")[1])

        error, score = infer_frame(client, np.zeros((200, 300, 3), np.uint8))
        assert error == ("ImageError: the frame is 300x200, above the server's --max-pixels 10000; send it scaled "
                         "down, or start the server with a larger --max-pixels") and np.isnan(score)
        assert infer_frame(client, np.zeros((64, 64, 3), np.uint8))[0] == ""
        remote = RemoteDetector([first.http_url])
        before = first.metric("nv_inference_request_success", FRAME_MODEL)
        with pytest.raises(ImageError, match="above the servers' --max-pixels 10000"):
            remote.predict(np.zeros((200, 300, 3), np.uint8), "bottle")  # refused here: never sent
        assert first.metric("nv_inference_request_success", FRAME_MODEL) == before
        client.close()
    finally:
        first.kill()  # SIGKILL: nothing of it cleans up
    wait_until(lambda: not first.group_alive(), timeout=30, what="the killed server to be gone")
    assert list(home.glob(f"anoclip-serve-{pid}-*"))  # what it left

    second = serve_process(serve_python, tiny_artifacts, tmp_path)
    second.start()
    assert not list(home.glob(f"anoclip-serve-{pid}-*")) and not list(Path("/dev/shm").glob(f"pytrtion{pid}-*"))
    own = second.process.pid
    assert_stops_cleanly(second, signal.SIGTERM)
    assert not list(home.glob(f"anoclip-serve-{own}-*")) and not list(Path("/dev/shm").glob(f"pytrtion{own}-*"))
    assert os.path.isdir(home)
    shutil.rmtree(home, ignore_errors=True)


class _LoadingPool:
    """A stand-in for the servers: answers "unknown model" (Triton before the models are loaded)
    ``loading`` times, then the description."""

    def __init__(self, loading: int, message: str = "[400] Request for unknown model: 'anoclip_info' is not found"):
        self.loading, self.message, self.calls = loading, message, 0

    def call(self, model, inputs, outputs, backoff=True):
        from anoclip.runtime.serving.transport import LOADING, ServersUnavailable

        self.calls += 1
        if self.calls <= self.loading:
            raise ServersUnavailable(f"no server answered: http://127.0.0.1:1: {self.message}",
                                     bool(LOADING.search(self.message)))
        return {"info": np.array([b'{"classes": ["bottle"]}'], dtype=object)}


def test_clients_wait_a_bounded_time_for_a_server_still_loading(monkeypatch):
    remote = RemoteDetector(["http://127.0.0.1:1"], start_wait=10.0)
    remote.pool = _LoadingPool(loading=2)
    started = time.monotonic()
    assert remote.classes == ["bottle"] and remote.pool.calls == 3
    assert 1.5 < time.monotonic() - started < 5  # asked again every second

    remote = RemoteDetector(["http://127.0.0.1:1"], start_wait=1.5)
    remote.pool = _LoadingPool(loading=100)
    started = time.monotonic()
    with pytest.raises(AnoclipError, match="no server answered"):
        remote.classes
    assert time.monotonic() - started < 4  # bounded

    remote = RemoteDetector(["http://127.0.0.1:1"], start_wait=10.0)
    remote.pool = _LoadingPool(loading=100, message="ConnectionRefusedError: [Errno 111] Connection refused")
    with pytest.raises(AnoclipError, match="Connection refused"):
        remote.classes  # nothing there: not waited for
    assert remote.pool.calls == 1


def _mapped_shm_bytes(pid: int, prefix: str) -> int:
    """Bytes in use (st_blocks) of the /dev/shm files whose name starts with ``prefix`` that process
    ``pid`` maps."""
    import os

    names = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].strip().startswith(f"/dev/shm/{prefix}"):
                names.add(fields[5].strip())
    return sum(os.stat(name).st_blocks * 512 for name in names if os.path.exists(name))


def test_an_oversized_raw_frame_is_refused_and_its_shared_memory_given_back(start_server, tiny_artifacts):
    """A 6000x6000 frame (108 MB) to a server of --max-pixels 1000000: an error of that request, the
    next frame answered, and PyTriton's tensor store (the psm_* files the server's Python process
    maps) does not keep the 108 MB: before, it held the largest request's pages until the server
    stopped. Triton's own python-backend region keeps its copy (no request-size limit in the Triton
    PyTriton 0.7 bundles), so the bound is on the tensor store, not on the whole process group."""
    import tritonclient.http as http

    try:
        server = start_server(tiny_artifacts, "--max-pixels", "1000000")
    except AnoclipError as exc:
        pytest.skip(f"the Triton Inference Server did not start here: {exc}")
    client = http.InferenceServerClient(server.http_url.split("://")[1], network_timeout=120, connection_timeout=120)

    try:
        huge = np.full((6000, 6000, 3), 7, np.uint8)
        error, score = infer_frame(client, huge)
        assert error.startswith("ImageError: the frame is 6000x6000, above the server's --max-pixels 1000000")
        assert np.isnan(score)
        held = _mapped_shm_bytes(server.process.pid, "psm_")
        assert held < 16 * 2**20, f"the tensor store holds {held / 2**20:.0f} MB after the refusal"
        error, score = infer_frame(client, np.zeros((64, 64, 3), np.uint8))
        assert error == "" and np.isfinite(score)
    finally:
        client.close()


def infer_frame(client, frame: np.ndarray) -> tuple[str, float]:
    """(error, score) of one raw RGB frame sent to the served frame model for class bottle."""
    import tritonclient.http as http

    inputs = [http.InferInput("frame", [1, *frame.shape], "UINT8"), http.InferInput("class", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(frame[None])
    inputs[1].set_data_from_numpy(np.array([[b"bottle"]], dtype=object))
    out = client.infer(FRAME_MODEL, inputs, outputs=[http.InferRequestedOutput("error"),
                                                     http.InferRequestedOutput("score")])
    return bytes(out.as_numpy("error").reshape(-1)[0]).decode(), float(out.as_numpy("score").reshape(-1)[0])
