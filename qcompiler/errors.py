"""User-facing errors: one line that names the file, node or tensor and says what to do."""


class QCompileError(Exception):
    """An error caused by the user's input (model, calibration data, options).

    The CLI prints ``qcompile: error: <message>`` and exits with code 2. The message names
    the offending file / node / tensor and, where possible, what to do about it.
    """

    exit_code = 2


class PassError(QCompileError):
    """A pass failed its preconditions or its rewrite; the message names the pass."""
