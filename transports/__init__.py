"""Sources of NNR bytes for the decoder (files, MQTT, sockets) and, on the host, publishers.

* ``envelope``: the MQTT delivery format (message envelopes, the retained status, reassembly),
  ``report``: device reports and the staged-rollout wave, ``ed25519``: signature verification.
  They are portable pure Python that MicroPython runs: they import the standard library's
  ``struct``, ``hashlib`` and ``json``, ``decoder_core.errors`` and each other only, nothing of
  ``nnc_edge`` and nothing of ``transports.mqtt``.
* ``file``: files as async byte sources (CPython).
* ``mqtt/``: MQTT delivery on aiomqtt (CPython): the publisher, the device's receiver and store.
* ``chain_record``: the publishing host's record of what it published (CPython).

This file imports nothing, so that a device loads ``transports.envelope``, ``transports.report`` or
``transports.ed25519`` without the rest. The CPython modules import ``nnc_edge`` on first use only,
never at module level.
"""
