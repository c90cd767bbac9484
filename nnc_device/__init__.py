"""nnc-edge on the device: what a board or a Raspberry Pi runs to keep its model current.

``nnc_device.store`` is the tensor store: it streams an NNC bitstream (a whole model or an
incremental update) into files, one raw little-endian file per tensor plus an index that an
inference runtime loads or memory-maps, committed atomically on any filesystem MicroPython has, in
memory that follows one slice of a tensor rather than the tensor (README "Device store").
``nnc_device.record`` reads an update's identity record and computes the model digest.
``nnc_device.agent`` is the device agent: it keeps the model current over MQTT with an
umqtt.simple-style client (the protocol of ``nnc-edge receive``, signatures, reports, the rollout
wave), writing through the store (README "On a microcontroller").

Everything here runs on MicroPython as well as CPython: it uses only ``decoder_core``, the portable
``transports`` modules (envelope, report, ed25519; the agent only) and modules both have (``array``,
``struct``, ``os``, ``json``, ``hashlib``, ``binascii``, ``time``). It must not import ``nnc_edge``
(the CPython side, which needs numpy), numpy, or CPython-only modules (``typing``, ``dataclasses``,
``pathlib``, ``os.path`` ...). Nothing is imported here, so that ``import nnc_device.record`` does
not load the decoder.
"""
