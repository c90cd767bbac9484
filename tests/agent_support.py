"""What the device-agent tests share: a model with a real update chain (signed publications of it, as
``nnc-edge publish --signing-key`` makes them) and an in-process broker with umqtt.simple's client API.
"""

import os

import numpy as np

import nnc_edge
from nnc_edge import signing, updates
from transports import envelope, report

MODEL = "kws"


def drift(model, rng, scale=0.05):
    return {k: (v + (rng.normal(size=v.shape) * scale).astype(np.float32) if v.dtype == np.float32 else v)
            for k, v in model.items()}


def chain(full, steps, state_dir, seed=11):
    """The full model's bitstream and ``steps`` updates of a real chain (TCA/HDSP state carried):
    [(bitstream, the model the device computes), ...], the full model first."""
    model = nnc_edge.decode(full)
    out = [(full, model)]
    rng = np.random.default_rng(seed)
    residual = os.path.join(str(state_dir), "chain.state")
    for _ in range(steps):
        data, model = updates.encode_update(model, drift(model, rng), residual=residual, return_model=True)
        out.append((data, model))
    return out


def publications(bitstreams, key, body_bytes, model=MODEL):
    """Signed publications of a chain (versions 1 ..): [(Status after it, [message payloads])]."""
    from transports.mqtt import split_bitstream
    out = []
    digest = envelope.NO_DIGEST
    counts = []
    for seq, data in enumerate(bitstreams, 1):
        kind = envelope.FULL if seq == 1 else envelope.UPDATE
        parent = envelope.NO_DIGEST if seq == 1 else digest
        sign = signing.envelope_signer(key)
        bodies = split_bitstream(data, body_bytes)
        digest, payloads = envelope.messages(model, kind, seq, bodies, seq - 1, parent,
                                             ext=lambda d, s=seq, p=parent: sign(model, s, p, d))
        counts.append(len(payloads))
        out.append((envelope.Status(model, seq, digest, 1, counts), payloads))
    return out


def data_topic(model, seq, index, prefix="nnc"):
    return "%s/%s/seq/%d/%d" % (prefix, model, seq, index)


class Broker:
    """Retained messages and subscriptions, as mosquitto keeps them for QoS 1 (in order)."""

    def __init__(self):
        self.retained = {}
        self.clients = []

    def publish(self, topic, payload, retain=True):
        if retain:
            if payload:
                self.retained[topic] = bytes(payload)
            else:
                self.retained.pop(topic, None)
        for c in self.clients:
            if c.connected and any(_matches(f, topic) for f in c.filters):
                c.inbox.append((topic, bytes(payload)))

    def publish_status(self, status, model=MODEL):
        self.publish(report.status_topic("nnc", model), status.payload())

    def publish_messages(self, seq, payloads, model=MODEL):
        for i, p in enumerate(payloads):
            self.publish(data_topic(model, seq, i), p)

    def report(self, device_id, model=MODEL):
        return report.parse_report(self.retained[report.report_topic("nnc", model, device_id)])

    def drop(self, client):
        """The connection breaks without a DISCONNECT: the broker publishes the last will."""
        client.connected = False
        if client.will is not None:
            self.publish(client.will[0], client.will[1], client.will[2])


def _matches(pattern, topic):
    p, t = pattern.split("/"), topic.split("/")
    return len(p) == len(t) and all(a == "+" or a == b for a, b in zip(p, t))


class Client:
    """umqtt.simple.MQTTClient's API on a Broker (topics and messages come as bytes, as umqtt gives them)."""

    def __init__(self, broker, client_id):
        self.broker = broker
        self.client_id = client_id
        self.filters = []
        self.inbox = []
        self.cb = None
        self.will = None
        self.connected = False
        self.keepalive = 0
        broker.clients.append(self)

    def set_callback(self, f):
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        self.will = (topic, msg, retain)

    def connect(self, clean_session=True):
        self.connected = True
        self.filters = []
        self.inbox = []

    def subscribe(self, topic, qos=0):
        assert self.cb is not None
        if isinstance(topic, bytes):
            topic = topic.decode()
        if topic not in self.filters:
            self.filters.append(topic)
        for t, p in sorted(self.broker.retained.items(), key=lambda tp: _order(tp[0])):
            if _matches(topic, t):
                self.inbox.append((t, p))

    def publish(self, topic, msg, retain=False, qos=0):
        self.broker.publish(topic.decode() if isinstance(topic, bytes) else topic, msg, retain)

    def check_msg(self):
        if self.inbox:
            topic, payload = self.inbox.pop(0)
            self.cb(topic.encode(), payload)


def _order(topic):
    parts = topic.split("/")
    return [int(p) if p.isdigit() else p for p in parts]
