"""Device profiles: what fedprune needs to know about each kind of edge device.

A profile is a flat TOML file validated into a frozen :class:`DeviceProfile`. Profiles for common
boards ship inside this package (see :func:`available`); :func:`load` also reads a user's file.
Every problem is reported as a one-line :class:`ProfileError`.
"""

from __future__ import annotations

from fedprune.device_profiles.catalog import DEFAULT_PROFILE, available, load
from fedprune.device_profiles.errors import ProfileError
from fedprune.device_profiles.profile import Arch, DeviceProfile, Precision, Trainer

__all__ = [
    "DEFAULT_PROFILE",
    "Arch",
    "DeviceProfile",
    "Precision",
    "ProfileError",
    "Trainer",
    "available",
    "load",
]
