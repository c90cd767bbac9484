"""The unit-sequence decoder: walks NNR units, joins partial data, keeps the decoder state.

The decoder state (design.md) is the only mutable thing that lives across units: the parser state
(profile, active MPS / LPS), a pending partial-data sequence, and, for update chains, the last
integer tensor and significance history of every parameter (temporal context adaptation, HDSP).
"""

from .errors import NNCError
from .limits import exceeded, resolve
from .payload import PayloadContext, decode_ndu_payload, decoded_elements
from .tables import NNR_AGG, NNR_NDU
from .units import ParserState, nnr_unit_size, parse_unit


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

    ``topology`` is the out-of-band topology (see ParserState): a dict tensor name -> dimensions for
    NDUs that do not carry them, or a list of (name, dimensions) pairs that also resolves indexed
    references (topology_elem_id_index) when the stream carries no NNR_TPL_REFLIST.
    ``limits`` (decoder_core.Limits) bounds what a bitstream may make the decoder allocate or do;
    anything beyond raises LimitError (an NNCError) before the work. ``max_tensor_elements`` and
    ``max_partial_bytes`` (the joined payload of a partial-data sequence; default
    ``limits.max_unit_size``) override single limits.
    """

    def __init__(self, topology=None, max_partial_bytes=None, max_tensor_elements=None, limits=None):
        limits = resolve(limits)
        if max_tensor_elements is not None:
            limits = limits.replace(max_tensor_elements=max_tensor_elements)
        self.parser = ParserState(topology, limits)
        self.bases = {}
        self.history = {}
        self.max_partial_bytes = max_partial_bytes
        self.decoded_bytes = 0  # tensor bytes decoded since the stream began (Limits.max_decoded_bytes)
        self._partial = None
        # Handed to every payload (PayloadContext): CPython output buffers and a block-row runner.
        self.output = None
        self.runner = None

    @property
    def limits(self):
        return self.parser.limits

    def set_limits(self, limits):
        """Use other Limits from the next unit on."""
        self.parser.limits = resolve(limits)

    # --- whole buffers -------------------------------------------------------------------------
    def decode(self, data):
        """Decode every unit in ``data``; returns a list of (name, shape, values) in stream order."""
        self.decoded_bytes = 0
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
        """End of a stream: check that no partial-data sequence is left open (the stream ended inside
        it). The count of decoded bytes for Limits.max_decoded_bytes starts again."""
        self.decoded_bytes = 0
        if self._partial is not None:
            p = self._partial
            self._partial = None
            raise NNCError("stream ends inside a partial-data sequence for %s (counter at %d, 1 expected last)"
                           % (", ".join(p.unit.names), p.expected + 1), p.unit.offset, "partial_data_counter")

    # --- one unit ------------------------------------------------------------------------------
    def decode_unit(self, data, offset, end):
        """Decode the complete NNR unit data[offset:end]; returns (name, dims, values, levels) tuples."""
        unit = self._parse(data, offset, end)
        out = []
        self._walk(data, unit, lambda job: out.extend(job.run()))
        return out

    def plan_unit(self, data, offset, end):
        """Parse the complete NNR unit data[offset:end] (joining partial data) without decoding payloads.

        Returns the PayloadJob of every NDU payload the unit completes, in stream order. Running them in
        order gives what decode_unit() returns; jobs may also run concurrently, each after the earlier
        jobs it shares an update-chain name with (PayloadJob.chain_names).
        """
        unit = self._parse(data, offset, end)
        jobs = []
        self._walk(data, unit, jobs.append)
        return jobs

    def _parse(self, data, offset, end):
        limit = self.parser.limits.max_unit_size
        if end - offset > limit:
            raise exceeded("max_unit_size", "NNR unit of %d bytes" % (end - offset), limit, offset, "nnr_unit_size")
        return parse_unit(data, offset, end, self.parser)

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
        p = self.continue_partial(data, unit)
        p.chunks.append(bytes(data[unit.payload_start:unit.payload_end]))
        if p.expected > 0:
            return
        joined = b"".join(p.chunks)
        sink(self._payload(p.unit, joined, 0, len(joined)))

    def continue_partial(self, data, unit):
        """Take the NDU ``unit`` (partial_data_counter > 0, parsed from ``data``) into the open
        partial-data sequence (6.4.3.1), or open one with it; returns the sequence, whose ``expected``
        counter is 0 once this unit ended it (it is then closed)."""
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
        limit = self.max_partial_bytes if self.max_partial_bytes is not None else self.parser.limits.max_unit_size
        if p.size > limit:
            self._partial = None
            raise exceeded("max_unit_size", "partial-data sequence of %d payload bytes" % p.size, limit, unit.offset,
                           "partial_data_counter")
        p.expected = unit.partial_data_counter - 1
        if p.expected == 0:
            self._partial = None
        return p

    def _payload(self, unit, data, start, end):
        return PayloadJob(unit, data, start, end, self.payload_context(unit))

    def payload_context(self, unit, reuse=None):
        """What decoding the payload of NDU ``unit`` takes from the decoder state (PayloadContext).
        Its tensor bytes are counted against Limits.max_decoded_bytes here, before anything is
        allocated for them. ``reuse``: a PayloadContext no longer used, set anew instead of made."""
        limits = self.parser.limits
        self.decoded_bytes += 4 * decoded_elements(unit.ndu)
        if self.decoded_bytes > limits.max_decoded_bytes:
            raise exceeded("max_decoded_bytes", "%d bytes of tensors in this stream" % self.decoded_bytes,
                           limits.max_decoded_bytes, unit.offset, "nnr_compressed_data_unit_payload")
        if reuse is None:
            ctx = PayloadContext(unit.general_profile_idc, unit.QpDensity, unit.QuantizationParameter)
        else:
            ctx = reuse
            ctx.__init__(unit.general_profile_idc, unit.QpDensity, unit.QuantizationParameter)
        ctx.max_bins = limits.max_bins_per_tensor
        if unit.parent_signalling:
            # Update chains: keep each parameter's integer tensor for TCA and its history for HDSP.
            ctx.bases = self.bases
            ctx.history = self.history
        ctx.output = self.output
        ctx.runner = self.runner
        return ctx


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


def decode(data, topology=None, limits=None):
    """Decode a whole NNR bitstream: a list of (name, shape, values) in stream order.

    ``values`` is an array('f') (float32) or array('i') (int32) in row-major order. ``limits``: see
    decoder_core.Limits.
    """
    return Decoder(topology, limits=limits).decode(data)
