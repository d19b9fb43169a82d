"""Every error esr expects, in one tree: the command line prints any
EsrError as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations


def one_line(message: str) -> str:
    """message with every control character escaped: what it echoes from
    input (a path, a name) can neither act on a terminal nor add a line."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class EsrError(Exception):
    """An error with a message fit for the user, on one line."""


class UsageError(EsrError):
    """Bad command-line arguments."""


class ConfigError(EsrError):
    """The config file is unreadable or invalid; the message names the key."""


class DataDirError(EsrError):
    """The data directory, or a session id in it, is unusable."""


class LoadError(EsrError):
    """The kernel side could not be set up: root, tracefs, the BPF programs."""


class ProbeError(LoadError):
    """libbpf could not load, attach or read the BPF programs."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno


class BatchError(EsrError):
    """A batch of raw records is damaged: a length points past its end."""


class SessionError(EsrError):
    """A session cannot be opened or closed."""


class RegistryFull(SessionError):
    """Every session slot is taken."""


class RecordingError(EsrError):
    """A recording is damaged; the message says where and what is intact."""


class ControlError(EsrError):
    """Talking to the daemon over the control socket failed."""


class DaemonUnavailable(ControlError):
    """No daemon answers on the socket."""


class DaemonError(EsrError):
    """The daemon cannot start."""


class SealError(EsrError):
    """A key is unusable, or a recording and its seals disagree: the message
    says what is missing or forged."""


class PamSetupError(EsrError):
    """The PAM configuration could not be changed."""


class BenchError(EsrError):
    """The benchmark cannot run, or a consumer failed."""
