"""Resource limits for decoding untrusted bitstreams: every bound the decoder enforces, in one place.

A device decodes bytes that came over a network. Each limit below is checked *before* the work or
the allocation it bounds, and exceeding one raises ``LimitError`` (an ``NNCError``) whose message
and ``limit`` attribute name it::

    from decoder_core import Decoder, Limits
    dec = Decoder(limits=Limits(max_tensor_elements=1 << 20))

The defaults suit a Raspberry Pi class device (512 MiB .. 8 GiB of RAM): they accept every real
model that fits such a device and refuse headers that would make it allocate or work without end.

==========================  ==============  ===============================================================
limit                       default         bounds
==========================  ==============  ===============================================================
``max_tensor_elements``     2**26 (64 Mi)   elements of one tensor (256 MiB as float32), from its header
``max_decoded_bytes``       2**30 (1 GiB)   decoded tensor bytes (4 per element) per stream: between two
                                            ``Decoder.finish()`` / ``StreamDecoder.close()`` calls
``max_unit_size``           2**26 (64 MiB)  bytes of one NNR unit (nnr_unit_size), and of the payload
                                            of a partial-data sequence once joined
``max_agg_nesting``         4               aggregate units (NNR_AGG) nested inside each other
``max_string_bytes``        65536           bytes of one st(v) string (names, ids)
``max_bins_per_tensor``     2**30           arithmetic-coded bins (context-coded and bypass) decoded for
                                            one tensor: the decoding work, whatever the header claims
==========================  ==============  ===============================================================

Fixed format bounds (not configurable; no conforming stream comes near them) are here as well:
``MAX_TENSOR_DIMENSIONS`` and ``MAX_LIST_ENTRIES``.

Pure Python for CPython and MicroPython.
"""

from .errors import NNCError

DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 26
DEFAULT_MAX_DECODED_BYTES = 1 << 30
DEFAULT_MAX_UNIT_SIZE = 1 << 26
DEFAULT_MAX_AGG_NESTING = 4
DEFAULT_MAX_STRING_BYTES = 65536
DEFAULT_MAX_BINS_PER_TENSOR = 1 << 30

# Format bounds: count_tensor_dimensions and similar counts, and list lengths read from a header.
MAX_TENSOR_DIMENSIONS = 16
MAX_LIST_ENTRIES = 1 << 16

NAMES = ("max_tensor_elements", "max_decoded_bytes", "max_unit_size", "max_agg_nesting", "max_string_bytes",
         "max_bins_per_tensor")


class LimitError(NNCError):
    """A bitstream that needs more than a configured limit allows; ``limit`` is the limit's name."""

    def __init__(self, message, offset=None, element=None, limit=None):
        NNCError.__init__(self, message, offset, element)
        self.limit = limit


def exceeded(limit, what, allowed, offset=None, element=None):
    """The LimitError for ``what`` (e.g. "tensor of 100 elements") beyond the limit named ``limit``."""
    return LimitError("%s exceeds the limit of %d (%s)" % (what, allowed, limit), offset, element, limit)


class Limits:
    """The resource limits of one decoder (see the module docstring); plain attributes, named as
    the keyword arguments. Use ``replace(**changes)`` for a modified copy."""

    def __init__(self, max_tensor_elements=DEFAULT_MAX_TENSOR_ELEMENTS, max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES,
                 max_unit_size=DEFAULT_MAX_UNIT_SIZE, max_agg_nesting=DEFAULT_MAX_AGG_NESTING,
                 max_string_bytes=DEFAULT_MAX_STRING_BYTES, max_bins_per_tensor=DEFAULT_MAX_BINS_PER_TENSOR):
        self.max_tensor_elements = _positive(max_tensor_elements, "max_tensor_elements")
        self.max_decoded_bytes = _positive(max_decoded_bytes, "max_decoded_bytes")
        self.max_unit_size = _positive(max_unit_size, "max_unit_size")
        self.max_agg_nesting = _positive(max_agg_nesting, "max_agg_nesting")
        self.max_string_bytes = _positive(max_string_bytes, "max_string_bytes")
        self.max_bins_per_tensor = _positive(max_bins_per_tensor, "max_bins_per_tensor")

    def replace(self, **changes):
        """A copy with some limits changed (ValueError for an unknown name)."""
        values = self.as_dict()
        for name in changes:
            if name not in values:
                raise ValueError("unknown limit %r (known: %s)" % (name, ", ".join(NAMES)))
            values[name] = changes[name]
        return Limits(**values)

    def as_dict(self):
        out = {}
        for name in NAMES:
            out[name] = getattr(self, name)
        return out

    def __eq__(self, other):
        return isinstance(other, Limits) and self.as_dict() == other.as_dict()

    def __repr__(self):
        return "Limits(%s)" % ", ".join("%s=%d" % (name, getattr(self, name)) for name in NAMES)


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("%s must be a positive integer, not %r" % (name, value))
    return value


DEFAULT = Limits()


def resolve(limits):
    """``limits`` itself, or the defaults for None."""
    if limits is None:
        return DEFAULT
    if not isinstance(limits, Limits):
        raise TypeError("limits must be a decoder_core.Limits, not %s" % type(limits).__name__)
    return limits
