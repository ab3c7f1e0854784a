"""Finding and reading profile files: the ones shipped in this package and a user's own."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from fedprune.device_profiles.errors import ProfileError
from fedprune.device_profiles.profile import DeviceProfile

_PACKAGE = __name__.rpartition(".")[0]  # this package, wherever it is installed
_SUFFIX = ".toml"

DEFAULT_PROFILE = "generic-x86-64"
"""The profile every command assumes when none is named: a plain 64-bit PC."""


def available() -> list[str]:
    """Names of the shipped profiles, sorted."""
    files = resources.files(_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(_SUFFIX) for f in files if f.name.endswith(_SUFFIX))


def load(name_or_path: str) -> DeviceProfile:
    """Load a shipped profile by name (``"raspberry-pi-4"``) or a user's file by path.

    An argument ending in ``.toml`` or containing a directory separator is a path; anything else
    is a shipped name. The profile's ``name`` field must equal the file's stem.
    """
    path = Path(name_or_path)
    if path.suffix == _SUFFIX or path.name != name_or_path:
        return _parse(name_or_path, path.stem, _read(path, name_or_path))
    if name_or_path not in available():
        known = ", ".join(available())
        raise ProfileError(f"unknown device profile {name_or_path!r} (known: {known})")
    resource = resources.files(_PACKAGE) / (name_or_path + _SUFFIX)
    return _parse(str(resource), name_or_path, resource.read_bytes())


def _read(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ProfileError(f"profile {label}: no such file") from exc
    except OSError as exc:
        raise ProfileError(f"profile {label}: cannot read: {exc.strerror or exc}") from exc


def _parse(label: str, stem: str, data: bytes) -> DeviceProfile:
    """Decode, parse and validate one profile file; ``label`` names it in every error."""
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {label}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {label}: invalid TOML: {exc}") from exc
    try:
        profile = DeviceProfile.from_dict(table)
    except ProfileError as exc:
        raise ProfileError(f"profile {label}: {exc}") from exc
    if profile.name != stem:
        raise ProfileError(
            f"profile {label}: field 'name' must equal the file name {stem!r}, got {profile.name!r}"
        )
    return profile
