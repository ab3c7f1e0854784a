"""The one exception this package raises."""

from __future__ import annotations


class ProfileError(ValueError):
    """A device profile is missing, unreadable or holds a bad value.

    The message is always one line naming the profile file, the field and the bad value, so a
    command-line program can print ``str(error)`` as it is.
    """
