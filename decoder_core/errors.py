"""The one exception type for bad or unsupported input."""


class NNCError(ValueError):
    """Raised for any NNR bitstream that cannot be decoded.

    ``offset`` is the byte offset in the input where the problem was found (or None) and
    ``element`` names the syntax element or structure being read.
    """

    def __init__(self, message, offset=None, element=None):
        self.offset = offset
        self.element = element
        where = []
        if element:
            where.append(element)
        if offset is not None:
            where.append("at byte %d" % offset)
        if where:
            message = "%s (%s)" % (message, ", ".join(where))
        ValueError.__init__(self, message)
