# MicroPython: nnc_device.agent driven by micropython-lib's umqtt.simple itself (/lib/umqtt/simple.py,
# as pip downloads it), over a socket object this script provides: FakeBroker speaks the MQTT 3.1.1
# wire protocol of a broker that keeps retained messages (CONNECT/CONNACK with the last will,
# SUBSCRIBE/SUBACK then the retained messages at QoS 1, PUBLISH, PUBACK, PINGREQ, DISCONNECT).
#
#   node run.mjs umqtt_agent.py DATA_DIR DEVICE_ID
#
# DATA_DIR/retained.json lists [topic, file] of the retained messages to start with (the status and
# the publications); DATA_DIR/key.pem is the trusted key. Prints the CONNECT the broker saw, every
# report, then "TENSOR name sha256" per stored tensor and "DONE"; exits 1 if the agent stalls.
import hashlib
import json
import sys


class FakeBroker:
    """The socket umqtt.simple writes to and reads from: packets the client writes are parsed when
    complete; what the broker sends waits in ``out``."""

    def __init__(self, retained):
        self.retained = retained  # topic -> payload
        self.inbuf = b""
        self.out = b""
        self.filters = []
        self.blocking = True
        self.connect_fields = None
        self.published = []  # (topic, payload, retain, qos) from the client

    # -- the socket API umqtt.simple uses --
    def connect(self, addr):
        pass

    def setblocking(self, flag):
        self.blocking = flag

    def write(self, buf, n=None):
        if isinstance(buf, str):  # umqtt.simple writes the client id and topics as given; sockets take str
            buf = buf.encode()
        data = bytes(buf[:n] if n is not None else buf)
        self.inbuf += data
        self._parse()
        return len(data)

    def read(self, n):
        if not self.out:
            if not self.blocking:
                return None
            raise OSError("the client waits for bytes the broker will never send")
        data, self.out = self.out[:n], self.out[n:]
        return data

    def close(self):
        pass

    # -- the broker --
    def _parse(self):
        while len(self.inbuf) >= 2:
            size, shift, i = 0, 0, 1
            while True:
                if i >= len(self.inbuf):
                    return
                b = self.inbuf[i]
                size |= (b & 0x7F) << shift
                shift += 7
                i += 1
                if not b & 0x80:
                    break
            if len(self.inbuf) < i + size:
                return
            head, body = self.inbuf[0], self.inbuf[i:i + size]
            self.inbuf = self.inbuf[i + size:]
            self._packet(head, body)

    def _packet(self, head, body):
        kind = head >> 4
        if kind == 1:
            self._connect(body)
            self.out += b"\x20\x02\x00\x00"
        elif kind == 8:
            pid = body[0:2]
            n = (body[2] << 8) | body[3]
            topic = body[4:4 + n].decode()
            self.filters.append(topic)
            self.out += b"\x90\x03" + pid + b"\x01"
            for t in sorted(self.retained):
                if matches(topic, t):
                    self._send(t, self.retained[t], True)
        elif kind == 3:
            n = (body[0] << 8) | body[1]
            topic = body[2:2 + n].decode()
            qos = (head >> 1) & 3
            payload = body[2 + n + (2 if qos else 0):]
            retain = head & 1
            self.published.append((topic, payload, retain, qos))
            if retain:
                self.retained[topic] = payload
            if qos:
                self.out += b"\x40\x02" + body[2 + n:4 + n]
            for f in self.filters:
                if matches(f, topic):
                    self._send(topic, payload, False)
                    break
        elif kind == 12:
            self.out += b"\xd0\x00"

    def _connect(self, body):
        flags = body[7]
        pos = 10
        fields = []
        while pos < len(body):
            n = (body[pos] << 8) | body[pos + 1]
            fields.append(body[pos + 2:pos + 2 + n])
            pos += 2 + n
        self.connect_fields = (flags, fields)

    def _send(self, topic, payload, retain):
        t = topic.encode()
        rest = len(t) + 2 + 2 + len(payload)
        header = bytearray([0x32 | (1 if retain else 0)])
        while True:
            b = rest & 0x7F
            rest >>= 7
            header.append(b | (0x80 if rest else 0))
            if not rest:
                break
        self.out += bytes(header) + bytes([len(t) >> 8, len(t) & 0xFF]) + t + b"\x00\x01" + payload


def matches(pattern, topic):
    p, t = pattern.split("/"), topic.split("/")
    return len(p) == len(t) and all(a == "+" or a == b for a, b in zip(p, t))


class _SocketModule:
    """usocket for umqtt.simple: its socket() is the test's FakeBroker."""

    def __init__(self, broker):
        self.broker = broker

    def socket(self):
        return self.broker

    def getaddrinfo(self, host, port):
        return [(2, 1, 0, "", (host, port))]


data, device_id = sys.argv[1], sys.argv[2]
with open(data + "/retained.json") as f:
    retained = {}
    for topic, name in json.load(f):
        with open(data + "/" + name, "rb") as m:
            retained[topic] = m.read()
broker = FakeBroker(retained)
sys.modules["usocket"] = _SocketModule(broker)

from umqtt.simple import MQTTClient  # noqa: E402  (after usocket is the test's)
from nnc_device.agent import Agent, client_id  # noqa: E402
from nnc_device.store import read_index  # noqa: E402

with open(data + "/key.pem") as f:
    key = f.read()
client = MQTTClient(client_id(device_id), "broker.invalid", keepalive=60)
agent = Agent(client, "kws", "/store", device_id, trusted_keys=[key], log=None)
agent.start()
flags, fields = broker.connect_fields
print("CONNECT", json.dumps({"flags": flags, "fields": [bytes(x).decode() for x in fields]}))
idle = 0
seen = 0
while idle < 50:
    idle = 0 if agent.step() else idle + 1
    for topic, payload, retain, qos in broker.published[seen:]:
        print("REPORT", topic, retain, qos, bytes(payload).decode())
    seen = len(broker.published)
index = read_index("/store")
for t in index["tensors"]:
    with open("/store/" + t["file"], "rb") as f:
        print("TENSOR", t["name"], "".join("%02x" % b for b in hashlib.sha256(f.read()).digest()))
print("DONE", json.dumps(index["meta"]))
