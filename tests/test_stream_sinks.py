"""The web view and MQTT sinks, driven with FrameEvents, against real clients: urllib and raw
sockets, headless Chromium, a Mosquitto broker and a paho subscriber."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
from fakes import defect_frame, normal_frame
from services import Subscriber, chromium, free_port, mosquitto, mosquitto_broker, wait_until  # noqa: F401 (fixtures)

from anoclip.runtime.decision import ClassThreshold
from anoclip.runtime.detector import Result
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.stream.events import FrameEvent
from anoclip.runtime.stream.web import WebView

WEB_LOG = "anoclip.runtime.stream.web"
MQTT_LOG = "anoclip.runtime.stream.mqtt"
VIEW_COPY = "/tmp/anoclip-webview.png"


def make_event(index: int, source: str = "cam0", defect: bool = False) -> FrameEvent:
    """A frame with its index drawn on it, so that consecutive frames differ."""
    frame = (defect_frame if defect else normal_frame)(index).copy()
    cv2.putText(frame, f"#{index}", (4, 122), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    score = 0.9 if defect else 0.1
    amap = np.zeros(frame.shape[:2], np.float32)
    result = Result(score=score, anomaly_map=amap, anomaly_map_full=amap, patch_probabilities=np.zeros((1, 4), np.float32),
                    cls="bottle", image_size=frame.shape[:2], tiles=1, threshold=ClassThreshold(0.5, None, "override"),
                    anomalous=defect)
    return FrameEvent(source=source, frame_index=index, captured=time.time(), result=result,
                      latency_ms={"model": 1.5, "total": 3.25}, frame=frame, annotated=frame)


class EventWriter(threading.Thread):
    """Writes events to a sink at ``fps`` from its own thread (as the pipeline's sink thread does)."""

    def __init__(self, sink, fps: float = 10.0, sources: tuple[str, ...] = ("cam0",)):
        super().__init__(daemon=True)
        self.sink, self.period, self.sources = sink, 1.0 / fps, sources
        self.written = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for number, source in enumerate(self.sources):
                self.sink.write(make_event(self.written, source, defect=number % 2 == 1))
            self.written += 1
            self.halt.wait(self.period)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class StreamClient:
    """A raw client of ``/stream/<index>.mjpg``, reading one JPEG part at a time."""

    def __init__(self, view: WebView, index: int = 0):
        self.socket = socket.create_connection(("127.0.0.1", view.port), timeout=5)
        self.socket.sendall(f"GET /stream/{index}.mjpg HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.reader = self.socket.makefile("rb")
        status = self.reader.readline()
        assert status.split()[1] == b"200", status
        headers = self._headers()
        assert headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
        assert headers["cache-control"] == "no-store"

    def _headers(self) -> dict[str, str]:
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return headers

    def read_part(self) -> bytes:
        """The next JPEG of the stream; EOFError when the server ended it."""
        line = self.reader.readline()
        if line == b"":
            raise EOFError("stream ended")
        assert line == b"--frame\r\n", line
        headers = self._headers()
        assert headers["content-type"] == "image/jpeg"
        jpeg = self.reader.read(int(headers["content-length"]))
        assert self.reader.read(2) == b"\r\n"
        return jpeg

    def close(self) -> None:
        self.reader.close()
        self.socket.close()


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "process_request" in t.name]


@pytest.fixture
def view():
    web = WebView("127.0.0.1:0", ["cam0"])
    yield web
    web.close()


# -- web view: HTTP ----------------------------------------------------------------------------------

def test_web_view_routes(view):
    assert view.url == f"http://127.0.0.1:{view.port}/" and view.port > 0
    status, headers, body = get(view.url)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html") and headers["Cache-Control"] == "no-store"
    assert 'src="/stream/0.mjpg"' in page and "/stats.json" in page and "cam0" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained

    status, _, _ = get(view.url + "snapshot/0.jpg")
    assert status == 503  # no frame yet

    view.write(make_event(0))
    view.write(make_event(1, defect=True))
    view.update_stats({"fps": 9.5, "dropped": {"cam0": 2}})
    view.update_stats({"latency_ms": 12.0})

    status, headers, body = get(view.url + "snapshot/0.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["Cache-Control"] == "no-store"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (128, 128, 3)
    red = image[45:75, 55:85].mean(axis=(0, 1))  # inside the defect square of frame 1
    assert red[2] > 200 and red[0] < 60

    status, headers, body = get(view.url + "stats.json")
    stats = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    (source,) = stats["sources"]
    assert source["name"] == "cam0" and source["frames"] == 2
    expected = json.loads(json.dumps(make_event(1, defect=True).record()))
    assert source["last"] == expected | {"captured": source["last"]["captured"]}
    assert source["last"]["frame"] == 1 and source["last"]["score"] == 0.9 and source["last"]["anomalous"] is True
    assert stats["pipeline"] == {"fps": 9.5, "dropped": {"cam0": 2}, "latency_ms": 12.0}

    for path in ("stream/1.mjpg", "snapshot/1.jpg", "stream/0.jpg", "snapshot/0.mjpg", "stream/x.mjpg", "nothing",
                 "../../etc/passwd", "stats.json/x", "index.htm",
                 "stream/" + "9" * 5000 + ".mjpg"):
        assert get(view.url + path)[0] == 404, path


def test_web_view_adds_sources_it_first_sees_in_write(view):
    view.write(make_event(0, source="late"))
    stats = json.loads(get(view.url + "stats.json")[2])
    assert [s["name"] for s in stats["sources"]] == ["cam0", "late"]
    assert get(view.url + "snapshot/1.jpg")[0] == 200
    assert 'src="/stream/1.mjpg"' in get(view.url)[2].decode()


def test_web_view_streams_distinct_frames_and_close_ends_clients(caplog):
    caplog.set_level(logging.DEBUG, logger=WEB_LOG)
    web = WebView("127.0.0.1:0", ["cam0"])
    writer = EventWriter(web, fps=25)
    writer.start()
    try:
        client = StreamClient(web)
        parts = [client.read_part() for _ in range(4)]
        frames = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in parts]
        assert all(f is not None and f.shape == (128, 128, 3) for f in frames)
        assert len(set(parts)) >= 2, "the stream repeated one frame"

        gone = StreamClient(web)  # a client that leaves while frames keep coming
        gone.read_part()
        gone.close()
        time.sleep(0.5)
        assert client.read_part()  # the other client is unaffected
    finally:
        writer.stop()
    started = time.monotonic()
    web.close()
    client.socket.settimeout(3)
    with pytest.raises(EOFError):
        while True:
            client.read_part()
    assert time.monotonic() - started < 3, "close() did not end the open stream promptly"
    client.close()
    wait_until(lambda: not stream_threads(), timeout=5, what="the stream handler threads to end")
    problems = [r for r in caplog.records if r.name == WEB_LOG and r.levelno >= logging.WARNING]
    assert not problems, [r.getMessage() for r in problems]
    assert not web._thread.is_alive()


def test_web_view_close_wakes_a_client_waiting_for_its_first_frame():
    web = WebView("127.0.0.1:0", ["idle"])
    client = StreamClient(web)
    time.sleep(0.2)
    web.close()
    client.socket.settimeout(3)
    with pytest.raises(EOFError):
        client.read_part()
    client.close()
    wait_until(lambda: not stream_threads(), timeout=5, what="the stream handler thread to end")


def test_web_view_address_errors(view, caplog):
    with pytest.raises(AnoclipError) as taken:
        WebView(f"127.0.0.1:{view.port}", ["cam0"])
    message = str(taken.value)
    assert "\n" not in message and str(view.port) in message and "port 0" in message
    for address in ("nonsense", "127.0.0.1:http", "127.0.0.1:70000", ":8080"):
        with pytest.raises(AnoclipError, match="HOST:PORT"):
            WebView(address)
    with pytest.raises(AnoclipError, match="cannot serve the web view on no-such-host.invalid:0"):
        WebView("no-such-host.invalid:0")
    with pytest.raises(AnoclipError, match="quality"):
        WebView("127.0.0.1:0", quality=0)

    caplog.set_level(logging.WARNING, logger=WEB_LOG)
    exposed = WebView("0.0.0.0:0", ["cam0"])
    exposed.close()
    assert any("no authentication" in r.getMessage() for r in caplog.records)


# -- web view: a real browser -----------------------------------------------------------------------

def test_web_view_in_headless_chromium(chromium, tmp_path):  # noqa: F811 (the fixture)
    web = WebView("127.0.0.1:0", ["line-1", "line-2"])
    writer = EventWriter(web, fps=10, sources=("line-1", "line-2"))
    writer.start()
    stats_js = "fetch('/stats.json', {cache: 'no-store'}).then(r => r.json())"
    try:
        web.update_stats({"fps": 10.0, "dropped": 0})
        page = chromium.open(web.url, 1024, 768)
        page.wait_for("[0, 1].every(i => document.getElementById('view' + i).naturalWidth > 0)")
        page.wait_for("document.getElementById('stats').textContent.includes('frames')")
        box = page.element_box("#view0")
        stats_1 = page.evaluate(stats_js)
        panel_1 = page.evaluate("document.getElementById('stats').textContent")
        time.sleep(1.0)
        first = page.screenshot(tmp_path / "webview-1.png")
        web.update_stats({"fps": 9.8, "dropped": 1})
        time.sleep(1.5)
        second = page.screenshot(tmp_path / "webview-2.png")
        stats_2 = page.evaluate(stats_js)
        panel_2 = page.evaluate("document.getElementById('stats').textContent")
    finally:
        writer.stop()
        web.close()
    shutil.copyfile(tmp_path / "webview-2.png", VIEW_COPY)
    print(f"screenshots: {tmp_path / 'webview-1.png'} {tmp_path / 'webview-2.png'} (copy: {VIEW_COPY})")

    shots = [cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) for png in (first, second)]
    assert shots[0].shape == shots[1].shape == (768, 1024, 3)
    x, y, w, h = box
    assert w > 100 and h > 100
    regions = [shot[y:y + h, x:x + w].astype(np.int16) for shot in shots]
    assert regions[0].std() > 10, "the stream image region is blank"
    assert np.abs(regions[0] - regions[1]).mean() > 1.0, "the stream image did not change between screenshots"

    frames = [{s["name"]: s["frames"] for s in stats["sources"]} for stats in (stats_1, stats_2)]
    assert frames[1]["line-1"] > frames[0]["line-1"] and frames[1]["line-2"] > frames[0]["line-2"]
    assert stats_2["pipeline"] == {"fps": 9.8, "dropped": 1}
    assert panel_1 != panel_2 and "line-1: frames" in panel_2 and "fps: 9.800" in panel_2


# -- MQTT -------------------------------------------------------------------------------------------

@pytest.fixture
def subscriber(mosquitto_broker):  # noqa: F811 (the fixture)
    pytest.importorskip("paho.mqtt.client")
    client = Subscriber(mosquitto_broker, "anoclip/+/events")
    yield client
    client.close()


def first_occurrences(values: list[int]) -> list[int]:
    """QoS 1 is at least once: drop repeats, keep the order of first arrival."""
    seen: set[int] = set()
    return [v for v in values if not (v in seen or seen.add(v))]


def test_mqtt_sink_publishes_every_record_in_order(mosquitto_broker, subscriber):  # noqa: F811
    from anoclip.runtime.stream.mqtt import MqttSink

    sink = MqttSink(mosquitto_broker, "anoclip/{source}/events")
    wait_until(lambda: sink.connected, what="the sink to connect")
    events = [make_event(i, defect=i % 7 == 3) for i in range(60)]
    for event in events:
        sink.write(event)
    sink.close()
    assert sink.published == 60 and sink.failed == 0 and sink.reconnects == 0 and sink.pending == 0
    wait_until(lambda: len(subscriber.messages) >= 60, what="60 records at the subscriber")
    assert {topic for topic, _ in subscriber.messages} == {"anoclip/cam0/events"}
    assert [record for _, record in subscriber.messages] == [json.loads(json.dumps(e.record())) for e in events]


def test_mqtt_sink_reconnects_after_a_broker_restart(mosquitto, subscriber, caplog):  # noqa: F811
    from anoclip.runtime.stream.mqtt import MqttSink

    caplog.set_level(logging.INFO, logger=MQTT_LOG)
    sink = MqttSink(mosquitto.url, "anoclip/{source}/events", client_id="anoclip-test-sink")
    wait_until(lambda: sink.connected, what="the sink to connect")
    for i in range(20):
        sink.write(make_event(i))
    wait_until(lambda: len(subscriber.messages) >= 20, what="the first 20 records")
    assert subscriber.frames() == list(range(20))

    mosquitto.stop()
    wait_until(lambda: not sink.connected, what="the sink to notice the broker is gone")
    for i in range(20, 30):  # written while the broker is down: queued by paho
        sink.write(make_event(i))
        time.sleep(0.15)  # 1.5 s down: at least one reconnect attempt fails
    assert sink.pending >= 10
    mosquitto.start()
    wait_until(lambda: sink.reconnects == 1 and sink.connected, timeout=40, what="the sink to reconnect")
    wait_until(lambda: subscriber.subscriptions >= 2, timeout=20, what="the subscriber to subscribe again")
    for i in range(30, 60):
        sink.write(make_event(i))
    sink.close()

    assert sink.reconnects == 1 and sink.failed == 0 and sink.pending == 0
    assert sink.published == 60, "the broker acknowledged every record, the queued ones after the reconnect"
    wait_until(lambda: 59 in subscriber.frames(), what="the last record at the subscriber")
    received = first_occurrences(subscriber.frames())
    assert received == sorted(received), f"records out of order: {received}"
    assert set(range(20)) | set(range(30, 60)) <= set(received) <= set(range(60))
    logged = [r.getMessage() for r in caplog.records if r.name == MQTT_LOG]
    assert sum("lost MQTT broker" in m for m in logged) == 1, logged
    assert sum("cannot reach MQTT broker" in m for m in logged) <= 1, logged  # once per state, not per attempt
    assert sum("reconnected to MQTT broker" in m for m in logged) == 1, logged


def test_mqtt_broker_never_up_counts_every_event_lost_and_closes_at_once(caplog):
    pytest.importorskip("paho.mqtt.client")
    from anoclip.runtime.stream.mqtt import MqttSink

    caplog.set_level(logging.INFO, logger=MQTT_LOG)
    sink = MqttSink(f"mqtt://127.0.0.1:{free_port()}", "anoclip/events", close_timeout_s=10.0)
    for i in range(3):
        sink.write(make_event(i))
    time.sleep(1.5)  # paho tries at 0 and 1 s meanwhile
    started = time.monotonic()
    sink.close()  # never reached: no acknowledgement can come, so the close timeout is not waited out
    assert time.monotonic() - started < 2
    assert sink.published == 0 and sink.failed == 3 and not sink.connected
    assert sink.counts()["written"] == 0 and sink.counts()["lost"] == 3
    logged = [r.getMessage() for r in caplog.records if r.name == MQTT_LOG]
    assert any("3 MQTT events are lost: the broker" in m and "was never reached" in m for m in logged), logged
    assert sum("cannot reach MQTT broker" in m for m in logged) == 1, logged  # once, not per attempt


def test_mqtt_sink_counts_what_a_full_queue_drops(caplog):
    pytest.importorskip("paho.mqtt.client")
    from anoclip.runtime.stream.mqtt import MqttSink

    caplog.set_level(logging.INFO, logger=MQTT_LOG)
    sink = MqttSink(f"mqtt://127.0.0.1:{free_port()}", "anoclip/events", max_queued=5, close_timeout_s=0.5)
    for i in range(12):
        sink.write(make_event(i))
    sink.close()
    assert sink.failed == 12 and sink.published == 0  # 7 refused at once, 5 unacknowledged at close
    dropping = [r for r in caplog.records if "being dropped" in r.getMessage()]
    assert len(dropping) == 1, "the full queue is logged once, not per message"


@pytest.mark.parametrize("url", ["http://broker:1883", "broker:1883", "mqtt://", "mqtt://broker:99999",
                                 "mqtt://broker:port", "mqtt://broker/anoclip/events", "ws://user:s3cret@broker"])
def test_mqtt_sink_bad_url(url):
    from anoclip.runtime.stream.mqtt import MqttSink

    with pytest.raises(AnoclipError) as error:
        MqttSink(url, "anoclip/events")
    message = str(error.value)
    assert "\n" not in message and "mqtt://host[:port]" in message and "s3cret" not in message


def test_mqtt_url_forms():
    from anoclip.runtime.stream.mqtt import parse_mqtt_url

    plain = parse_mqtt_url("mqtt://broker.local")
    assert (plain.host, plain.port, plain.tls, plain.username) == ("broker.local", 1883, False, None)
    secure = parse_mqtt_url("MQTTS://ann:p%40ss@10.0.0.2:9999/")
    assert (secure.host, secure.port, secure.tls) == ("10.0.0.2", 9999, True)
    assert (secure.username, secure.password) == ("ann", "p@ss")
    assert parse_mqtt_url("mqtts://broker").port == 8883 and "p@ss" not in str(secure)


def test_mqtt_sink_bad_topic_and_qos():
    from anoclip.runtime.stream.mqtt import MqttSink

    for topic in ("", "anoclip/+/events", "anoclip/#"):
        with pytest.raises(AnoclipError, match="topic"):
            MqttSink("mqtt://127.0.0.1:1", topic)
    with pytest.raises(AnoclipError, match="QoS"):
        MqttSink("mqtt://127.0.0.1:1", "anoclip/events", qos=3)


def test_mqtt_sink_without_paho(monkeypatch):
    from anoclip.runtime.stream.mqtt import MqttSink

    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)
    with pytest.raises(AnoclipError) as error:
        MqttSink("mqtt://127.0.0.1:1883", "anoclip/events")
    assert str(error.value) == "`--mqtt` needs paho-mqtt; install it with `pip install 'anoclip[mqtt]'`"


def test_sink_modules_import_without_paho():
    code = ("import sys; sys.modules['paho'] = None\n"
            "import anoclip.runtime.stream.mqtt, anoclip.runtime.stream.web\n"
            "assert 'paho.mqtt.client' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
