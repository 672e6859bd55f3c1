"""The one error type every command turns into a clear one-line message."""


class FedcbirError(Exception):
    """A user-facing error: bad input, a damaged file, a wrong setting.

    Commands catch it at the top and print ``error: <message>`` with a
    non-zero exit, never a traceback.
    """

    exit_code = 2
