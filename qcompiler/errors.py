"""User-facing errors: one line that names the file, node or tensor and says what to do."""


class QCompileError(Exception):
    """An error caused by the user's input (model, calibration data, options).

    The CLI prints ``qcompile: error: <message>`` and exits with code 2. The message names
    the offending file / node / tensor and, where possible, what to do about it.
    """

    exit_code = 2


class PassError(QCompileError):
    """A pass failed its preconditions or its rewrite; the message names the pass."""


class InternalError(Exception):
    """A bug in qcompile, not in the user's input: the CLI prints one line naming the pass (and the
    node it was working on, where known), exits with code 1 and shows the traceback with ``--debug``.
    The original exception is chained as ``__cause__``."""

    exit_code = 1

    def __init__(self, message: str, pass_name: str | None = None, node: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


class MissingDependencyError(QCompileError):
    """A command needs an optional dependency that is not installed: names it and the extra to install."""

    def __init__(self, command: str, module: str, extra: str):
        super().__init__(f"{command} needs the optional dependency '{module}', which is not installed; "
                         f"install it with: pip install -e \".[{extra}]\" (or pip install \"qcompile[{extra}]\")")


def require(module: str, command: str, extra: str = "export"):
    """Import an optional dependency, or raise one line naming it and the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(command, module, extra) from None
