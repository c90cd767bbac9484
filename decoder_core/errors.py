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
        super().__init__(message)

    def __str__(self):
        # Messages are reworded by assigning exc.args; on MicroPython that sets a plain attribute
        # and the native exception keeps the old text, so str() reads args here (same on CPython).
        return str(self.args[0])


class Incomplete(NNCError):
    """A header parsed from the first bytes of an NNR unit needs more of them (streaming: wait for
    more input and parse again). Never raised once the whole unit is there."""


def move_offset(exc, offset):
    """Give ``exc`` (an NNCError) the offset ``offset``, rewriting the "(element, at byte N)" its
    message ends with. Returns False, changing nothing, when the message was reworded since."""
    where = []
    if exc.element:
        where.append(exc.element)
    where.append("at byte %d" % exc.offset)
    suffix = " (%s)" % ", ".join(where)
    message = exc.args[0]
    if not message.endswith(suffix):
        return False
    where[-1] = "at byte %d" % offset
    exc.args = (message[:-len(suffix)] + " (%s)" % ", ".join(where),)
    exc.offset = offset
    return True
