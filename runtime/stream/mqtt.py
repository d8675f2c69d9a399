"""Publish every frame's event record to an MQTT broker (paho-mqtt 2, imported only when used)."""

from __future__ import annotations

import json
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ..errors import AnoclipError
from .events import FrameEvent, Sink
from .sources import split_url

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MISSING_PAHO = "`--mqtt` needs paho-mqtt; install it with `pip install 'anoclip[mqtt]'`"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never shows the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> BrokerAddress:
    """``mqtt://[user:password@]host[:port]`` (port 1883) or ``mqtts://...`` (port 8883, TLS)."""
    parts = split_url(url.strip(), "MQTT")
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # the URL less its credentials
    usage = "give mqtt://host[:port] or mqtts://host[:port], optionally with user:password@ before the host"
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise AnoclipError(f"unsupported MQTT URL {shown!r}: {usage}")
    try:
        port = parts.port
    except ValueError:
        raise AnoclipError(f"bad port in MQTT URL {shown!r}: {usage}") from None
    if not parts.hostname:
        raise AnoclipError(f"MQTT URL {shown!r} names no broker host: {usage}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise AnoclipError(f"MQTT URL {shown!r} has a path or query: {usage}, and give the topic separately")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(parts.hostname, port or DEFAULT_PORTS[scheme], scheme == "mqtts", username, password)


def _topic_part(name: str) -> str:
    """A source name as one topic level: no separators, no wildcards."""
    return "".join("_" if ch in "/+#" else ch for ch in name) or "_"


def _import_paho() -> tuple[Any, Any]:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise AnoclipError(MISSING_PAHO) from None
    try:
        from paho.mqtt.enums import CallbackAPIVersion
    except ImportError:
        raise AnoclipError("`--mqtt` needs paho-mqtt 2 or newer; upgrade it with "
                           "`pip install --upgrade 'anoclip[mqtt]'`") from None
    return mqtt, CallbackAPIVersion


class MqttSink(Sink):
    """Publishes ``json.dumps(event.record())`` for every frame to ``topic`` (``{source}`` in it is
    replaced by the source name, with ``/ + #`` turned into ``_``).

    Connecting happens in paho's network thread (``connect_async`` + ``loop_start``), so a broker that
    is down at start does not stop the stream: paho retries with a back-off from 1 s to 30 s, and
    reconnects the same way whenever the connection is lost. Each change of connection state is
    logged once, not once per message; :attr:`reconnects` counts the connections after the first.

    Delivery, honestly: QoS 1 means at least once *to the broker*, as long as this process lives.
    Messages written while the broker is unreachable wait in paho's queue (at most ``max_queued``;
    beyond that new ones are dropped, logged and counted in :attr:`failed`) and go out, in order,
    after the reconnect, together with any message whose acknowledgement the lost connection ate
    (those may then arrive twice). The broker passes a message on only to the subscriptions it has
    when the message arrives: a subscriber that is itself still reconnecting after a broker restart
    can miss the queued ones, and a broker without persistence forgets what it had not delivered
    when it stops. What is guaranteed: every message written while the connection is up and
    acknowledged before :meth:`close` returns has reached the broker, in the order written.

    :attr:`published` counts messages the broker acknowledged (sent, for QoS 0); :attr:`failed`
    those paho refused and those still unacknowledged when :meth:`close` gave up after
    ``close_timeout_s`` seconds, or at once when the broker was never reached during the run (there
    is then no connection whose acknowledgements could still come). In the stream's accounting
    ``written`` is ``published`` and ``lost`` is ``failed``.
    """

    name = "mqtt"
    draws = False
    takes_errors = True

    def __init__(self, url: str, topic: str, client_id: str | None = None, qos: int = 1, *,
                 max_queued: int = 10000, close_timeout_s: float = 10.0, keepalive: int = 30):
        self.broker = parse_mqtt_url(url)
        if not topic or any(ch in topic.replace("{source}", "") for ch in "+#\0"):
            raise AnoclipError(f"bad MQTT topic {topic!r}: give a topic without wildcards (+ #), "
                               "e.g. anoclip/{source}/events")
        if qos not in (0, 1, 2):
            raise AnoclipError(f"bad MQTT QoS {qos!r}: give 0, 1 or 2")
        mqtt, api_version = _import_paho()
        self.topic = topic
        self.qos = qos
        self.close_timeout_s = close_timeout_s
        # MQTT 3.1.1 brokers need only accept client ids of up to 23 characters: 20 here.
        self.client_id = client_id or f"anoclip-{secrets.token_hex(6)}"
        self._mqtt = mqtt
        self._done = threading.Condition()  # guards the counters below; notified on every acknowledgement
        self._accepted = self._published = self._failed = self._reconnects = 0
        self._connected = self._ever_connected = self._closing = self._closed = False
        self._state = "starting"
        self._refusing = False

        client = mqtt.Client(callback_api_version=api_version.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv311)
        if self.broker.tls:
            client.tls_set()  # the system's CA certificates
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(max_queued)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self.max_queued = max_queued
        client.connect_async(self.broker.host, self.broker.port, keepalive=keepalive)
        client.loop_start()
        log.info("publishing events to %s, topic %s, QoS %d", self.broker, topic, qos)

    # -- counters ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """At one instant: ``published`` (acknowledged for QoS 1 and 2, sent for QoS 0), ``failed``
        (refused when the queue was full, or unacknowledged when :meth:`close` gave up),
        ``reconnects`` (connections after the first, each after a lost one) and ``pending`` (handed
        to paho, not yet acknowledged)."""
        with self._done:
            failed = self._failed + self.lost  # lost: events the pipeline could not hand over (a failing write)
            return {"written": self._published, "lost": failed, "published": self._published, "failed": failed,
                    "reconnects": self._reconnects, "pending": max(0, self._accepted - self._published)}

    published = property(lambda self: self.counts()["published"])
    failed = property(lambda self: self.counts()["failed"])
    reconnects = property(lambda self: self.counts()["reconnects"])
    pending = property(lambda self: self.counts()["pending"])

    @property
    def connected(self) -> bool:
        return self._connected

    # -- the sink ---------------------------------------------------------------------------------

    def write(self, event: FrameEvent) -> None:
        if self._closed:
            return
        topic = self.topic.replace("{source}", _topic_part(event.source))
        info = self._client.publish(topic, json.dumps(event.record()), qos=self.qos)
        rc = info.rc
        queued = rc == self._mqtt.MQTT_ERR_SUCCESS or (rc == self._mqtt.MQTT_ERR_NO_CONN and self.qos > 0)
        with self._done:
            if queued:
                self._accepted += 1
            else:
                self._failed += 1
            refusing, self._refusing = self._refusing, not queued
        if not queued and not refusing:
            log.warning("MQTT events are being dropped (%s; %d queued while %s): counting them until "
                        "paho takes messages again", self._mqtt.error_string(rc), self.pending, self.broker)
        elif queued and refusing:
            log.info("MQTT events are queued again; %d dropped so far", self.failed)

    def close(self) -> None:
        """Wait up to ``close_timeout_s`` for unacknowledged messages, then disconnect and stop paho's thread."""
        if self._closed:
            return
        self._closed = True
        reached = self._ever_connected
        with self._done:
            if reached:
                self._done.wait_for(lambda: self._published >= self._accepted, timeout=self.close_timeout_s)
            unacknowledged = max(0, self._accepted - self._published)
            self._failed += unacknowledged
        if unacknowledged and not reached:
            log.warning("%d MQTT events are lost: the broker %s was never reached", unacknowledged, self.broker)
        elif unacknowledged:
            log.warning("%d MQTT events were not acknowledged by %s within %.0f s and are lost",
                        unacknowledged, self.broker, self.close_timeout_s)
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        log.info("MQTT sink closed: %d events published, %d failed, %d reconnects",
                 self.published, self.failed, self.reconnects)

    # -- paho callbacks (paho's network thread) ----------------------------------------------------

    def _set_state(self, state: str, level: int, message: str, *args: Any) -> None:
        if state != self._state:
            self._state = state
            log.log(level, message, *args)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connected = False
            self._set_state(f"refused {reason_code}", logging.WARNING,
                            "MQTT broker %s refused the connection (%s); retrying", self.broker, reason_code)
            return
        self._connected = True
        if self._ever_connected:
            with self._done:
                self._reconnects += 1
            self._set_state("connected", logging.INFO, "reconnected to MQTT broker %s", self.broker)
        else:
            self._ever_connected = True
            self._set_state("connected", logging.INFO, "connected to MQTT broker %s", self.broker)

    def _on_connect_fail(self, client, userdata) -> None:
        self._connected = False
        self._set_state("unreachable", logging.WARNING,
                        "cannot reach MQTT broker %s; retrying every 1-30 s, events are queued meanwhile", self.broker)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected = False
        if self._closing:
            self._set_state("closed", logging.DEBUG, "disconnected from MQTT broker %s", self.broker)
        else:
            self._set_state("lost", logging.WARNING,
                            "lost MQTT broker %s (%s); reconnecting, events are queued meanwhile",
                            self.broker, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._done:
            self._published += 1
            self._done.notify_all()
