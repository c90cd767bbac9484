"""The host's NNC encoder: tensors in, an NNR bitstream out, mirroring decoder_core module by module.

* ``encoding``: ``encode`` and the stateful ``Encoder`` (update chains), the public API that
  ``nnc_edge.encode`` / ``nnc_edge.Encoder`` re-export; it plans the stream and codes each NDU.
* ``quantize`` (+ ``_trellis.pyx``): quantization to levels (uniform, dependent quantization,
  codebooks), the inverse of ``decoder_core.payload.reconstruct``.
* ``cabac_encoder`` (+ ``_cabac_encoder.pyx``, ``_cabac_tables``): DeepCABAC entropy coding, the mirror
  of ``decoder_core.deepcabac``.
* ``unitwriter`` / ``bitwriter``: NNR units and their bits, the mirrors of ``decoder_core.units`` and
  ``decoder_core.bitreader``.

The ``_*.pyx`` twins are optional and chosen automatically when built; they write the same bytes.

Imports: decoder_core, numpy and ``nnc_edge.modelio`` / ``nnc_edge.parallel``; never ``transports``
(the transports import the encoder's unit writer, not the other way round) and nothing of the CLI.
This file imports nothing: devices load ``unitwriter`` (through ``nnc_edge.updates``) without the rest.
"""
