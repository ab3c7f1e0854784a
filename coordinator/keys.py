"""The devices' verify keys (``--device-keys``), read again while the run goes on.

``fedprune-provision add`` writes a device's ``<id>.pub`` into the folder and ``revoke`` deletes
it. The coordinator looks at the folder every few seconds, and at once on SIGHUP, and takes the
keys anew when anything changed: a revoked device is no longer selected, and whatever it sends is
dropped (no trusted key signed it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from fedprune.protocol.errors import ConfigError
from fedprune.protocol.signing import Trust

log = logging.getLogger("fedprune.coordinator")

CHECK_SECONDS = 2.0
"""How often the folder is looked at for added or removed keys."""


class DeviceKeys:
    """The verify keys in ``folder``, as :attr:`trust`."""

    def __init__(self, folder: str | Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = Path(folder)
        self.trust = Trust.from_folder(self.folder)
        self._clock = clock
        self._stamp = self._look()
        self._checked = clock()
        self._requested = False

    def request(self) -> None:
        """Read the keys again at the next :meth:`reload` (a SIGHUP handler calls this)."""
        self._requested = True

    def reload(self) -> set[str] | None:
        """Read the keys again if that was asked for or the folder changed: the devices whose key
        is gone; ``None`` when nothing was read (not due, unchanged, or unreadable: the keys in
        use are kept, and the log says why)."""
        if not self._requested and self._clock() - self._checked < CHECK_SECONDS:
            return None
        self._checked = self._clock()
        stamp = self._look()
        if not self._requested and stamp == self._stamp:
            return None
        self._requested, self._stamp = False, stamp
        try:
            trust = Trust.from_folder(self.folder)
        except (ConfigError, OSError) as exc:
            log.error("kept the devices' verify keys in use: %s", exc)
            return None
        gone = set(self.trust.keys) - set(trust.keys)
        added = set(trust.keys) - set(self.trust.keys)
        self.trust = trust
        log.warning(
            "read the devices' verify keys again from %s: %d device(s), %d added, %d revoked%s",
            self.folder,
            len(trust.keys),
            len(added),
            len(gone),
            f" ({', '.join(sorted(gone))})" if gone else "",
        )
        return gone

    def _look(self) -> tuple[int, ...]:
        """What changes when a key file is added, removed or replaced."""
        try:
            return (
                os.stat(self.folder).st_mtime_ns,
                *sorted(entry.stat().st_mtime_ns for entry in os.scandir(self.folder)),
            )
        except OSError:
            return ()
