"""The project's one exception tree.

    FedpruneError                  any error fedprune reports to a user (exit code 1 by default)
    ├── ConfigError                bad flags, profile, data file or model file (exit 2)
    ├── WireError                  a payload that cannot be decoded or fails its checksum
    │   ├── SignatureError         unsigned, wrongly signed, or signed by a key we do not trust
    │   ├── SenderError            sent as another sender than the topic's or the expected one
    │   ├── VersionError           a message in another major protocol version
    │   ├── ShapeError             a tensor payload that does not fit the model
    │   └── OversizeError          a payload larger than the transport allows
    ├── BrokerError                the broker cannot be reached or dropped us for good (exit 3)
    └── ModelError                 a model that cannot be loaded or run (exit 4)
        └── ExportError            a model that cannot be converted or fails verification

Third-party errors are caught at the boundary and re-raised as one of these
(``raise ... from exc``); the command-line programs print ``str(error)`` on one line and exit with
``error.exit_code``.
"""

from __future__ import annotations

import sys


class FedpruneError(Exception):
    """Root of every error fedprune raises on purpose."""

    exit_code = 1


class ConfigError(FedpruneError):
    """A user-supplied input (flag, profile, data file, model file) is unusable."""

    exit_code = 2


class WireError(FedpruneError):
    """A message cannot be decoded, has the wrong version or fails its checksum."""


class SignatureError(WireError):
    """A message whose signature is missing, wrong, or made with a key we do not trust."""


class ReplayError(SignatureError):
    """A message made for another run or coordinator session than the receiver's: a replay (its
    signature, if any, is genuine; the context it was signed for is not this one)."""


class SenderError(WireError):
    """A message sent as someone other than the one whose topic it is on (or who must send it)."""


class VersionError(WireError):
    """A message in a major protocol version we do not speak."""


class ShapeError(WireError):
    """A tensor payload whose tensors or value counts do not fit the model."""


class OversizeError(WireError):
    """A payload is larger than the configured maximum."""


class BrokerError(FedpruneError):
    """The MQTT broker is unreachable."""

    exit_code = 3


class ModelError(FedpruneError):
    """A model file cannot be loaded or run."""

    exit_code = 4


class ExportError(ModelError):
    """A model cannot be exported, or the export fails verification."""


def print_error(prog: str, error: Exception) -> int:
    """Print ``error`` as one ``prog: error: ...`` line on stderr; return its exit code.

    Our own errors carry their code; an OSError (a file or folder we cannot use) and any other
    user-input error (a ``ValueError`` such as ``ProfileError``) exit with 2.
    """
    if isinstance(error, OSError) and not isinstance(error, FedpruneError):
        text = f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
    else:
        text = str(error)
    print(f"{prog}: error: {text}", file=sys.stderr)
    return getattr(error, "exit_code", 2)
