"""One exception type for problems a user can act on.

Stages catch :class:`KdpipeError` and print its message as one paragraph
(what was wrong, where, what to do) without a traceback.
"""


class KdpipeError(Exception):
    """A problem in the user's input, data or artifacts, with a fix in the message."""
