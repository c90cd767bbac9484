"""The unit-sequence decoder: walks NNR units, joins partial data, keeps the decoder state.

The decoder state (design.md) is the only mutable thing that lives across units: the parser state
(profile, active MPS / LPS), a pending partial-data sequence, and, for update chains, the last
integer tensor and significance history of every parameter (temporal context adaptation, HDSP).
"""

from .errors import NNCError
from .payload import PayloadContext, decode_ndu_payload
from .tables import NNR_AGG, NNR_NDU
from .units import MAX_TENSOR_ELEMENTS, ParserState, nnr_unit_size, parse_unit


class _Partial:
    """An NDU split over units with partial_data_counter N, N-1, ..., 1 (6.4.3.1)."""

    def __init__(self, unit, header):
        self.unit = unit
        self.header = header
        self.chunks = []
        self.expected = unit.partial_data_counter
        self.size = 0


class Decoder:
    """Decodes NNR units one at a time; state carries over between units and between calls.

    ``topology`` optionally maps tensor names to dimensions for NDUs that do not carry them.
    ``max_tensor_elements`` refuses (NNCError) a tensor whose header claims more elements, before
    anything is allocated for it; ``max_partial_bytes`` bounds a joined partial-data sequence.
    """

    def __init__(self, topology=None, max_partial_bytes=1 << 31, max_tensor_elements=MAX_TENSOR_ELEMENTS):
        self.parser = ParserState(topology, max_tensor_elements)
        self.bases = {}
        self.history = {}
        self.max_partial_bytes = max_partial_bytes
        self._partial = None
        # Handed to every payload (PayloadContext): CPython output buffers and a block-row runner.
        self.output = None
        self.runner = None

    # --- whole buffers -------------------------------------------------------------------------
    def decode(self, data):
        """Decode every unit in ``data``; returns a list of (name, shape, values) in stream order."""
        out = []
        for offset, end in unit_spans(data):
            for name, dims, values, _ in self.decode_unit(data, offset, end):
                out.append((name, tuple(dims), values))
        self.finish()
        return out

    @property
    def in_partial_data(self):
        """True while a partial-data sequence is open (units with lower counters must follow)."""
        return self._partial is not None

    def finish(self):
        """Check that no partial-data sequence is left open (the stream ended inside it)."""
        if self._partial is not None:
            p = self._partial
            self._partial = None
            raise NNCError("stream ends inside a partial-data sequence for %s (counter at %d, 1 expected last)"
                           % (", ".join(p.unit.names), p.expected + 1), p.unit.offset, "partial_data_counter")

    # --- one unit ------------------------------------------------------------------------------
    def decode_unit(self, data, offset, end):
        """Decode the complete NNR unit data[offset:end]; returns (name, dims, values, levels) tuples."""
        unit = parse_unit(data, offset, end, self.parser)
        out = []
        self._walk(data, unit, lambda job: out.extend(job.run()))
        return out

    def plan_unit(self, data, offset, end):
        """Parse the complete NNR unit data[offset:end] (joining partial data) without decoding payloads.

        Returns the PayloadJob of every NDU payload the unit completes, in stream order. Running them in
        order gives what decode_unit() returns; jobs may also run concurrently, each after the earlier
        jobs it shares an update-chain name with (PayloadJob.chain_names).
        """
        unit = parse_unit(data, offset, end, self.parser)
        jobs = []
        self._walk(data, unit, jobs.append)
        return jobs

    def _walk(self, data, unit, sink):
        if unit.nnr_unit_type == NNR_AGG:
            if self._partial is not None:
                self._interrupted(unit)
            for child in unit.units:
                self._walk(data, child, sink)
            return
        if unit.nnr_unit_type != NNR_NDU:
            if self._partial is not None:
                self._interrupted(unit)
            if unit.nnr_unit_type > NNR_AGG:
                return  # Table 3: reserved and unspecified units are ignored, counter and all
            if unit.partial_data_counter > 0:
                raise NNCError("partial_data_counter %d on a %s unit is not supported"
                               % (unit.partial_data_counter, unit.type_name), unit.offset, "partial_data_counter")
            return
        if unit.partial_data_counter > 0:
            self._join(data, unit, sink)
            return
        if self._partial is not None:
            self._interrupted(unit)
        sink(self._payload(unit, data, unit.payload_start, unit.payload_end))

    def _interrupted(self, unit):
        p = self._partial
        self._partial = None
        raise NNCError("partial-data sequence for %s interrupted by a %s unit before its counter reached 1"
                       % (", ".join(p.unit.names), unit.type_name), unit.offset, "partial_data_counter")

    def _join(self, data, unit, sink):
        # The NDU header repeats in every partial unit: compare its bytes after the counter.
        header = bytes(data[unit.offset + _size_bytes(data, unit.offset) + 2:unit.payload_start])
        p = self._partial
        if p is None:
            p = self._partial = _Partial(unit, header)
        else:
            if unit.partial_data_counter != p.expected:
                self._partial = None
                raise NNCError("partial_data_counter is %d, %d expected" % (unit.partial_data_counter, p.expected),
                               unit.offset, "partial_data_counter")
            if header != p.header:
                self._partial = None
                raise NNCError("partial unit for %s carries a different NDU header than the first part"
                               % ", ".join(unit.names), unit.offset, "nnr_compressed_data_unit_header")
        p.size += unit.payload_end - unit.payload_start
        if p.size > self.max_partial_bytes:
            self._partial = None
            raise NNCError("partial-data sequence exceeds %d bytes" % self.max_partial_bytes, unit.offset,
                           "partial_data_counter")
        p.chunks.append(bytes(data[unit.payload_start:unit.payload_end]))
        p.expected = unit.partial_data_counter - 1
        if p.expected > 0:
            return
        self._partial = None
        joined = b"".join(p.chunks)
        sink(self._payload(p.unit, joined, 0, len(joined)))

    def _payload(self, unit, data, start, end):
        ctx = PayloadContext(unit.general_profile_idc, unit.QpDensity, unit.QuantizationParameter)
        if unit.parent_signalling:
            # Update chains: keep each parameter's integer tensor for TCA and its history for HDSP.
            ctx.bases = self.bases
            ctx.history = self.history
        ctx.output = self.output
        ctx.runner = self.runner
        return PayloadJob(unit, data, start, end, ctx)


class PayloadJob:
    """One parsed NDU payload, ready to decode (clause 7.3); run() returns its (name, dims, values,
    levels) tuples.

    ``chain_names`` is empty for an independent payload. A payload of an update chain (parent
    signalling: TCA bases and HDSP history, 6.6 / 6.7) reads and writes the decoder state under these
    names, so it must run after every earlier job that shares one of them.
    """

    def __init__(self, unit, data, start, end, ctx):
        self.unit = unit
        self.data = data
        self.start = start
        self.end = end
        self.ctx = ctx
        names = unit.names
        chain = ()
        if ctx.bases is not None:
            chain = list(names)
            if len(names) > 1:
                chain.append("|".join(names))  # the key payload.py uses for a combined tensor
        self.chain_names = chain

    def run(self):
        unit = self.unit
        try:
            return decode_ndu_payload(unit.ndu, unit.names, self.data, self.start, self.end, self.ctx)
        except NNCError as exc:
            if exc.offset is not None and self.data is not None and self.start == 0 and unit.partial_data_counter:
                exc.args = (exc.args[0] + " in the joined partial data of the NDU at byte %d" % unit.offset,)
            raise


def unit_spans(data):
    """Yield (offset, end) of each NNR unit in a whole buffer, checking nnr_unit_size against its end."""
    offset = 0
    end = len(data)
    while offset < end:
        size = nnr_unit_size(data, offset, end)[0]
        if offset + size > end:
            raise NNCError("nnr_unit_size %d runs past the end of the data (%d bytes left)"
                           % (size, end - offset), offset, "nnr_unit_size")
        yield offset, offset + size
        offset += size


def _size_bytes(data, offset):
    return 4 if data[offset] & 0x80 else 2


def decode(data, topology=None):
    """Decode a whole NNR bitstream: a list of (name, shape, values) in stream order.

    ``values`` is an array('f') (float32) or array('i') (int32) in row-major order.
    """
    return Decoder(topology).decode(data)
