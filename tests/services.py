"""Real programs for tests: a Mosquitto broker and headless Chromium, each skipped when not installed.

Use the fixtures by importing them into a test module (pytest then finds them there)::

    from services import chromium, mosquitto, mosquitto_broker  # noqa: F401 (fixtures)

- ``mosquitto_broker``: the URL ``"mqtt://127.0.0.1:PORT"`` of a broker started for the test;
- ``mosquitto``: the :class:`Mosquitto` behind it, to ``stop()``/``start()``/``restart()`` it on the
  same port (reconnect tests) and to read its log;
- ``chromium``: a :class:`Chromium` driven through the DevTools protocol: ``chromium.open(url)``
  gives a :class:`Page` with ``evaluate``, ``screenshot`` and ``element_box``;
- :class:`Subscriber`: an MQTT client that keeps every record it receives on a topic.

Chromium is driven over ``--remote-debugging-pipe`` (file descriptors 3 and 4, messages ended by a NUL
byte), so no websocket client is needed; ``--screenshot`` cannot be used for pages with an MJPEG image,
which never finish loading.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "mosquitto")
CHROMIUM_PATHS = ("/usr/bin/chromium", "chromium", "chromium-browser")


def find_program(candidates: tuple[str, ...]) -> str | None:
    for candidate in candidates:
        if os.path.isabs(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
        elif found := shutil.which(candidate):
            return found
    return None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, process: subprocess.Popen | None = None,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test with ``what`` when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _stop(process: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


# -- Mosquitto --------------------------------------------------------------------------------------

class Mosquitto:
    """A Mosquitto broker on a fixed loopback port, anonymous, without persistence."""

    def __init__(self, program: str, folder: Path, port: int | None = None):
        self.program = program
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.config = folder / "mosquitto.conf"
        self.log_path = folder / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to the mosquitto user
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([self.program, "-c", str(self.config)], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        wait_for_port(self.port, timeout, self.process)

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the broker, stay down ``down_s`` seconds, start it again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def mosquitto(tmp_path) -> Iterator[Mosquitto]:
    """A running Mosquitto broker on a free loopback port (stopped at the end)."""
    program = find_program(MOSQUITTO_PATHS)
    if program is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    broker = Mosquitto(program, folder)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_broker(mosquitto) -> str:
    """The URL ``mqtt://127.0.0.1:PORT`` of a running Mosquitto broker."""
    return mosquitto.url


# -- Chromium -----------------------------------------------------------------------------------------

class DevToolsError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium driven through the DevTools protocol over a pipe."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
             "--disable-backgrounding-occluded-windows", "--disable-dev-shm-usage", "--mute-audio")

    def __init__(self, program: str, folder: Path):
        self.folder = folder
        self.log_path = folder / "chromium.log"
        profile = folder / "profile"
        profile.mkdir(parents=True)
        # The browser reads commands from fd 3 and writes replies to fd 4: the pipe ends are moved to
        # high numbers first, then the shell puts them in place before it becomes Chromium.
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        script = f'exec 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-; exec "$@"'
        command = [program, *self.FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(["/bin/bash", "-c", script, "bash", *command],
                                            pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log)
        os.close(child_in)
        os.close(child_out)
        self._lock = threading.Lock()
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="chromium-devtools", daemon=True)
        self._reader.start()
        self.send("Browser.getVersion", timeout=30)  # waits until the browser answers

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            message_id = self._next_id
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._arrived:
            if not self._arrived.wait_for(lambda: message_id in self._replies or self.process.poll() is not None,
                                          timeout=timeout):
                raise DevToolsError(f"{method}: no reply from Chromium within {timeout} s")
            reply = self._replies.pop(message_id, None)
        if reply is None:
            raise DevToolsError(f"{method}: Chromium exited ({self.process.returncode}); see {self.log_path}")
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, width: int = 1024, height: int = 768) -> Page:
        """A new tab of ``width`` x ``height`` CSS pixels (scale 1) navigated to ``url``."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        page.send("Page.navigate", {"url": url})
        # Parsed is enough: a page with an MJPEG image never reaches the load event.
        page.wait_for(f"location.href === {json.dumps(url)} && document.readyState !== 'loading'")
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except DevToolsError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                _stop(self.process)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._arrived:
                        self._replies[message["id"]] = message
                        self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()


class Page:
    """One tab: run JavaScript, take screenshots, find elements."""

    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.send(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The JSON value of a JavaScript expression (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           timeout)
        if "exceptionDetails" in result:
            raise DevToolsError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate ``expression`` until it is truthy (an exception counts as false); its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                raise DevToolsError(f"{expression!r} still falsy after {timeout} s")
            time.sleep(0.1)

    def screenshot(self, path: Path | None = None) -> bytes:
        """The visible page as PNG bytes (also written to ``path`` when given)."""
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def element_box(self, selector: str) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the first element matching ``selector``, in screenshot pixels."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
        return tuple(int(round(v)) for v in box)


@pytest.fixture
def chromium(tmp_path) -> Iterator[Chromium]:
    """Headless Chromium with a fresh profile under ``tmp_path`` (closed at the end)."""
    program = find_program(CHROMIUM_PATHS)
    if program is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    folder = tmp_path / "chromium"
    folder.mkdir()
    browser = Chromium(program, folder)
    try:
        yield browser
    finally:
        browser.close()


class Subscriber:
    """A paho client that subscribes (again after each reconnect) and keeps every record it receives."""

    def __init__(self, url: str, topic: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, port = url.removeprefix("mqtt://").split(":")
        self.topic = topic
        self.messages: list[tuple[str, dict]] = []
        self.subscriptions = 0
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-subscriber-{secrets.token_hex(4)}", protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = self._subscribed
        self.client.on_message = lambda client, userdata, msg: self.messages.append((msg.topic,
                                                                                      json.loads(msg.payload)))
        self.client.connect_async(host, int(port))
        self.client.loop_start()
        wait_until(lambda: self.subscriptions >= 1, what="the test subscriber to subscribe")

    def _subscribed(self, *args) -> None:
        self.subscriptions += 1

    def frames(self) -> list[int]:
        return [record["frame"] for _, record in list(self.messages)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
