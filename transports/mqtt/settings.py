"""Where the broker is and how to reach it (``BrokerSettings``), the protocol's topics (``topics``,
``Topics``) and defaults, and what the publisher and the device side both use: the logger and
``_ranges``. The protocol is described in ``transports.mqtt``.
"""

import logging
import uuid
from urllib.parse import unquote, urlsplit

from .. import envelope

log = logging.getLogger("nnc_edge.mqtt")
# paho-mqtt's own messages (socket errors, ...): our warnings already say when a connection is lost.
paho_log = logging.getLogger("nnc_edge.mqtt.paho")

DEFAULT_PREFIX = "nnc"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 10
MIN_MESSAGE_BYTES = 256
DEFAULT_GAP_TIMEOUT = 30.0
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


# --- connection settings ------------------------------------------------------------------------
class BrokerSettings:
    """Where and how to connect: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``
    (TLS, port 8883 by default), with the options mosquitto_sub and aiomqtt use: ``username``,
    ``password``, ``cafile`` (CA certificates; implies TLS), ``cert``/``key`` (client certificate),
    ``insecure`` (no check of the server's host name), ``client_id``, ``keepalive``, ``timeout``
    (seconds for each MQTT operation)."""

    def __init__(self, url, username=None, password=None, cafile=None, cert=None, key=None, insecure=False,
                 client_id=None, keepalive=30, timeout=20.0):
        parts = urlsplit(url if "://" in url else "mqtt://" + url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("broker URL %r: the scheme must be mqtt:// or mqtts://" % url)
        if not parts.hostname:
            raise ValueError("broker URL %r has no host" % url)
        if parts.path not in ("", "/"):
            raise ValueError("broker URL %r: no path expected after host:port" % url)
        if (cert is None) != (key is None):
            raise ValueError("--cert and --key go together")
        self.tls = parts.scheme in ("mqtts", "ssl") or cafile is not None or cert is not None
        self.host = parts.hostname
        try:
            self.port = parts.port or (DEFAULT_TLS_PORT if self.tls else DEFAULT_PORT)
        except ValueError:
            raise ValueError("broker URL %r has an invalid port" % url)
        self.username = username if username is not None else (unquote(parts.username) if parts.username else None)
        self.password = password if password is not None else (unquote(parts.password) if parts.password else None)
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")
        self.cafile = cafile
        self.cert = cert
        self.key = key
        self.insecure = insecure
        self.client_id = client_id
        self.keepalive = keepalive
        self.timeout = timeout

    def __repr__(self):
        return "%s://%s:%d" % ("mqtts" if self.tls else "mqtt", self.host, self.port)

    def client(self, role="client", inflight=20, identifier=None, will=None):
        """A new aiomqtt.Client (``async with`` connects it) for up to ``inflight`` calls at once.
        ``identifier`` replaces the client id, ``will`` = (topic, payload) is a retained QoS 1 last will."""
        import aiomqtt  # on first use: `import transports.mqtt` stays light
        tls = None
        if self.tls:
            tls = aiomqtt.TLSParameters(ca_certs=self.cafile, certfile=self.cert, keyfile=self.key)
        identifier = identifier or self.client_id or "nnc-edge-%s-%s" % (role, uuid.uuid4().hex[:12])
        if will is not None:
            will = aiomqtt.Will(will[0], will[1], qos=1, retain=True)
        client = aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                identifier=identifier, clean_session=True, keepalive=self.keepalive, logger=paho_log,
                                timeout=self.timeout, tls_params=tls, tls_insecure=self.insecure if self.tls else None,
                                max_inflight_messages=inflight, will=will)
        client.pending_calls_threshold = inflight + 4  # aiomqtt warns above this many calls in flight
        return client


# --- topics ---------------------------------------------------------------------------------------
def topics(prefix, model):
    envelope.check_model_name(model)
    if not prefix or "+" in prefix or "#" in prefix:
        raise ValueError("invalid topic prefix %r" % prefix)
    return Topics(prefix, model)


class Topics:
    def __init__(self, prefix, model):
        self.base = "%s/%s" % (prefix, model)
        self.status = self.base + "/status"

    def data(self, seq, index):
        return "%s/seq/%d/%d" % (self.base, seq, index)

    def publication(self, seq):
        return "%s/seq/%d/+" % (self.base, seq)

    def parse_data(self, topic):
        """(seq, index) of a data topic, or None unless both are written as the publisher writes them."""
        head = self.base + "/seq/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            return None
        seq = _topic_number(parts[0], 0xFFFFFFFF)
        index = _topic_number(parts[1], envelope.MAX_COUNT - 1)
        if seq is None or index is None:
            return None
        return seq, index


def _topic_number(text, largest):
    """The number a topic level spells in ASCII digits without leading zeros, None for anything else
    (str.isdigit() also takes "²", which int() refuses, and int() takes " 7" and "7_0")."""
    if not text or len(text) > len(str(largest)) or (text[0] == "0" and text != "0"):
        return None
    for c in text:
        if not "0" <= c <= "9":
            return None
    value = int(text)
    return value if value <= largest else None


def _ranges(indices):
    """Message indices for a log line: "0, 3-5" (the publisher's and the device's messages)."""
    out = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in out) or "none"
