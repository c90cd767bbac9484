"""MQTT delivery of NNR bitstreams on aiomqtt: a host publishes full models and updates, devices
receive them and keep their model current.

Topics, for a model named M under the prefix P (default ``nnc``):

* ``P/M/status``: retained, QoS 1, JSON (``transports.envelope.status_payload``): the current
  version (seq, digest), the retained chain (the last full model ``full_seq`` and the updates
  after it, with their message counts) and the publication under way, if any.
* ``P/M/seq/S/I``: retained, QoS 1: message I of the publication that makes version S, an
  envelope (``transports.envelope``) followed by whole NNR units. NDUs too large for one message
  are re-coded as partial-data units (6.4.3.1), so no message exceeds ``max_message_bytes``.

The broker is the store: the last full model and every update since stay retained, so a device
that was offline catches up by itself. Publishing a new full model clears the older chain.

Modules:

* ``settings``: ``BrokerSettings`` (URL, TLS, credentials), ``topics`` / ``Topics``, the defaults.
* ``publisher``: the host side, ``Publisher`` and ``split_bitstream`` (its protocol in the docstring).
* ``device``: the device side, ``Receiver``, and ``DeviceLog`` (log lines that name the device);
  ``model_store``: the model it keeps (``ModelStore``, with the previous model beside it,
  ``FullModelWriter``, ``UpdateWriter``, ``RestoreWriter``); ``health``: the ``HealthCheck`` run
  after each apply.
* ``connection``: ``run_receiver``, the device's connection loop, and the reconnecting (backoff)
  both sides share.
* ``fleet``: the fleet view, the devices' retained reports (``transports.report``) read back
  (``read_fleet``, ``wait_for``, ``Fleet``); imported as ``transports.mqtt.fleet``.
* ``rollout``: fleet operations on the host: widening (``change_wave``), watching (``watch``) and
  halting (``halt_wave``) a staged rollout's wave, and restoring an older version of the chain
  (``rollback``: ``Publisher.publish(..., restores=(seq, digest))``); imported as
  ``transports.mqtt.rollout``.

Everything public is importable from here (``from transports.mqtt import Publisher``). CPython only:
the envelopes themselves are ``transports.envelope``, which MicroPython loads without this package.
Imports decoder_core, ``transports.envelope`` and ``transports.chain_record``, and nnc_edge on first
use only (the unit writer to re-cut NDUs, the decoder and the update code on the device); aiomqtt is
imported when a connection is made, so importing this package stays light. Nothing may import the
CLI (``nnc_edge.cli``).
"""

from .connection import backoff_delays, is_mqtt_error, run_receiver
from .device import MAX_EVENTS, MAX_REASON_CHARS, MAX_REMEMBERED, DeviceLog, Receiver
from .health import DEFAULT_HEALTH_TIMEOUT, HealthCheck
from .model_store import FullModelWriter, ModelStore, RestoreWriter, UpdateWriter
from .publisher import (
    Compaction, MessageTooSmall, Publisher, PublishError, publish_packet_bytes, read_status, split_bitstream,
)
from .settings import (
    DEFAULT_GAP_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT, DEFAULT_PREFIX, DEFAULT_TLS_PORT, MIN_MESSAGE_BYTES,
    BrokerSettings, Topics, log, paho_log, topics,
)

__all__ = ["BrokerSettings", "Topics", "topics", "DEFAULT_PREFIX", "DEFAULT_MAX_MESSAGE_BYTES", "MIN_MESSAGE_BYTES",
           "DEFAULT_GAP_TIMEOUT", "DEFAULT_PORT", "DEFAULT_TLS_PORT", "Publisher", "PublishError", "MessageTooSmall",
           "Compaction", "split_bitstream", "publish_packet_bytes", "read_status", "Receiver", "ModelStore", "FullModelWriter",
           "UpdateWriter", "RestoreWriter", "HealthCheck", "DEFAULT_HEALTH_TIMEOUT", "DeviceLog", "MAX_REMEMBERED",
           "MAX_EVENTS", "MAX_REASON_CHARS", "run_receiver", "backoff_delays",
           "is_mqtt_error", "log", "paho_log"]
