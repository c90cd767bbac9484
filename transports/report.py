"""Device reports, the last will, client ids and the staged-rollout wave: one definition for every
device (``nnc_device.agent`` on a microcontroller, the CPython receiver) and for the host that reads
them. Portable like ``transports.envelope`` (MicroPython and CPython; ``json`` and ``hashlib`` only,
nothing of ``nnc_edge``).

Topics, for model M under prefix P (``transports.mqtt`` has the protocol)::

    P/M/status          the retained status (transports.envelope)
    P/M/seq/S/I         message I of the publication that makes version S
    P/M/devices/D       the retained report of device D (this module)

The report is a JSON object, published retained at QoS 1 on every change::

    {"v": 1, "id": "board-7", "seq": 4, "digest": "<hex>", "state": "current", "target": null,
     "error": null, "time": 1733540000,
     "applied": {"seq": 4, "kind": "update", "bytes": 5120, "seconds": 1.8}}

``seq``/``digest``: the version the device has (0 and null: none); ``target``: the version it is
fetching (null when it fetches nothing); ``error``: why the last publication failed or was refused
(null once one applies); ``time``: the device's clock (``time.time()``: seconds since its epoch,
which on a board without a set clock is not the Unix one); ``applied``: the last publication it
applied and how long it took from its first message to the commit. ``state`` is one of STATES:

* ``current``: the device has the version the status announces (or the newest of its wave);
* ``downloading``: messages of a publication are arriving (and are decoded as they come);
* ``applying``: the last message is in; the new model is being checked and committed;
* ``failed``: a publication failed for a local reason (storage, memory); it is retried;
* ``rejected``: a publication was refused for what it is (signature, replay, wrong base, corrupt);
* ``rolled-back``: a health check failed and the previous model was put back (devices that run one);
* ``waiting``: a newer version exists, but the device is not in its rollout wave.

The last will (``will_payload``), set at connect, replaces the report with ``{"v": 1, "id": D,
"state": "offline"}`` when the device goes away without disconnecting.

The staged rollout is recorded in the retained status as ``"rollout": {"from": S, "percent": P,
"devices": [ID, ...], "halted": true}`` (``percent``, ``devices`` and ``halted`` each optional):
versions S and later are for the devices in the wave only, those listed by id and those whose
``bucket`` (a stable hash of the id: the first 4 bytes of SHA-256 of its UTF-8, big-endian, modulo
10000) is below P * 100. Widening
the wave keeps every device that was in it. A device outside the wave stays on its version (it
still fetches versions before S) and reports ``waiting``. ``halted`` (set when too many devices of
the wave failed: ``nnc-edge rollout --max-failures``) stops the wave: no device takes a version from
S on any more, those that have one keep it. No ``rollout`` (or null): every device.
"""

import hashlib
import json

from decoder_core.errors import NNCError

from .envelope import _check_nesting, check_model_name, digest_hex, excerpt

REPORT_VERSION = 1
CURRENT = "current"
DOWNLOADING = "downloading"
APPLYING = "applying"
FAILED = "failed"
REJECTED = "rejected"
ROLLED_BACK = "rolled-back"
WAITING = "waiting"
OFFLINE = "offline"
STATES = (CURRENT, DOWNLOADING, APPLYING, FAILED, REJECTED, ROLLED_BACK, WAITING)
MAX_ERROR_CHARS = 200
# A report is about 300 bytes and nests two levels ({"applied": {...}}); anything far larger or
# deeper is not one, and whoever may publish to the broker may send it.
MAX_REPORT_BYTES = 4096
MAX_REPORT_DEPTH = 2
BUCKETS = 10000
MAX_WAVE_DEVICES = 1000  # a list longer than this belongs in percent; bounds what a device parses
CLIENT_ID_PREFIX = "nnc-edge-"


def check_device_id(device_id):
    """The device id as UTF-8 bytes; ValueError unless it can be one MQTT topic level (the rules of
    a model name)."""
    try:
        return check_model_name(device_id)
    except ValueError as exc:
        raise ValueError(str(exc).replace("model name", "device id"))


def client_id(device_id):
    """The MQTT client id of a device: stable, so the broker (and an ACL keyed on it) knows it, and
    a reconnecting device takes over its own session instead of adding one."""
    check_device_id(device_id)
    return CLIENT_ID_PREFIX + device_id


def status_topic(prefix, model):
    return "%s/%s/status" % (prefix, model)


def data_filter(prefix, model, seq):
    return "%s/%s/seq/%d/+" % (prefix, model, seq)


def report_topic(prefix, model, device_id):
    check_device_id(device_id)
    return "%s/%s/devices/%s" % (prefix, model, device_id)


def report_payload(device_id, state, seq=0, digest=None, target=None, error=None, time=None, applied=None):
    """The report as JSON bytes. ``digest``: bytes or None; ``applied``: (seq, kind, bytes, seconds)
    or None; ``error`` is cut to MAX_ERROR_CHARS (it may quote what a message carried)."""
    if state not in STATES:
        raise ValueError("state must be one of %s" % ", ".join(STATES))
    report = {"v": REPORT_VERSION, "id": device_id, "seq": seq, "digest": digest_hex(digest) if digest else None,
              "state": state, "target": target,
              "error": None if error is None else excerpt(error, MAX_ERROR_CHARS, quote=False),
              "time": time, "applied": None}
    if applied is not None:
        report["applied"] = {"seq": applied[0], "kind": applied[1], "bytes": applied[2],
                             "seconds": round(applied[3], 3)}
    return json.dumps(report).encode("utf-8")


def will_payload(device_id):
    return json.dumps({"v": REPORT_VERSION, "id": device_id, "state": OFFLINE}).encode("utf-8")


def parse_report(payload):
    """A report or last will as a dict, checked for ``v``, ``id``, ``state`` and the types of
    ``seq``, ``target``, ``error`` and ``time``; NNCError otherwise (a report comes from anyone who
    may publish to the broker: its size and nesting are checked before it is parsed)."""
    if len(payload) > MAX_REPORT_BYTES:
        raise NNCError("device report of %d bytes, more than %d" % (len(payload), MAX_REPORT_BYTES), None, "report")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeError:
        raise NNCError("device report is not UTF-8", None, "report")
    _check_nesting(text, MAX_REPORT_DEPTH, "device report")
    try:
        obj = json.loads(text)
    except ValueError:
        raise NNCError("device report is not JSON: %s" % excerpt(payload), None, "report")
    if not isinstance(obj, dict) or obj.get("v") != REPORT_VERSION or not isinstance(obj.get("id"), str):
        raise NNCError("not a version %d device report: %s" % (REPORT_VERSION, excerpt(payload)), None, "report")
    if obj.get("state") not in STATES + (OFFLINE,):
        raise NNCError("device report state %s is unknown" % excerpt(obj.get("state")), None, "report state")
    for name, types in (("seq", (int,)), ("target", (int,)), ("time", (int, float)), ("error", (str,))):
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise NNCError("device report %s has the wrong type: %s" % (name, excerpt(value)), None, "report " + name)
    return obj


# --- the staged-rollout wave ------------------------------------------------------------------------
def bucket(device_id):
    """The device's place in 0 .. BUCKETS - 1, the same on every host and board."""
    h = hashlib.sha256(check_device_id(device_id)).digest()
    return ((h[0] << 24) | (h[1] << 16) | (h[2] << 8) | h[3]) % BUCKETS


def rollout_field(first_seq, percent=None, devices=None, halted=False):
    """The status's ``rollout`` value (a dict) for a wave of versions from ``first_seq`` on."""
    wave = {"from": first_seq}
    if percent is not None:
        wave["percent"] = percent
    if devices is not None:
        wave["devices"] = sorted(devices)
    if halted:
        wave["halted"] = True
    return parse_rollout(wave)


def parse_rollout(value):
    """The checked ``rollout`` of a status (None: no wave); NNCError when it is malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise NNCError("status rollout must be an object or null", None, "status rollout")
    first = value.get("from")
    if not isinstance(first, int) or isinstance(first, bool) or first < 1:
        raise NNCError("status rollout from must be a version >= 1, not %s" % excerpt(first), None,
                       "status rollout")
    percent = value.get("percent", 0)
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
        raise NNCError("status rollout percent must be a number in 0 .. 100", None, "status rollout")
    devices = value.get("devices", [])
    if (not isinstance(devices, list) or len(devices) > MAX_WAVE_DEVICES
            or not all(isinstance(d, str) for d in devices)):
        raise NNCError("status rollout devices must be a list of at most %d ids" % MAX_WAVE_DEVICES, None,
                       "status rollout")
    if not isinstance(value.get("halted", False), bool):
        raise NNCError("status rollout halted must be true or false", None, "status rollout")
    return value


def in_wave(device_id, rollout):
    """True when the wave includes this device (always without a wave), halted or not. A device
    without an id (None) has no bucket: only a wave of 100 percent includes it."""
    if rollout is None:
        return True
    if device_id is None:
        return rollout.get("percent", 0) >= 100
    return device_id in rollout.get("devices", ()) or bucket(device_id) < rollout.get("percent", 0) * (BUCKETS // 100)


def highest_version(device_id, rollout, announced):
    """The newest version this device may take when the status announces ``announced``."""
    if rollout is None or (in_wave(device_id, rollout) and not rollout.get("halted")):
        return announced
    return min(announced, rollout["from"] - 1)
