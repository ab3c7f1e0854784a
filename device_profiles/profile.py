"""What fedprune needs to know about one kind of edge device, validated on construction."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from fedprune.device_profiles.errors import ProfileError

ProfileValue = str | int | float | bool
"""A value as it appears in a profile file or in :meth:`DeviceProfile.to_dict`."""


class Arch(enum.StrEnum):
    """CPU architecture the device runs, which decides the wheels and delegates available."""

    AARCH64 = "aarch64"
    X86_64 = "x86_64"


class Precision(enum.StrEnum):
    """Numeric precision of the TFLite model exported for the device."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    DYNAMIC_INT8 = "dynamic_int8"
    FULL_INT8 = "full_int8"


class Trainer(enum.StrEnum):
    """Which implementation runs local training on the device."""

    KERAS = "keras"
    LITERT = "litert"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Hardware limits and training settings for one kind of device.

    ``max_model_bytes`` bounds the exported model, ``max_payload_bytes`` one MQTT message (larger
    updates are chunked), and ``accuracy_tolerance`` the accuracy an export may lose against the
    Keras model before it is rejected. ``latency_budget_ms`` (LiteRT, one image, the profile's
    cores) and ``size_budget_bytes`` (the .tflite file) are targets, not limits: the export
    reports whether it meets them (0 = no budget).
    """

    name: str
    description: str
    arch: Arch
    memory_mb: int
    cores: int
    precision: Precision
    sparse_format: bool
    max_model_bytes: int
    max_payload_bytes: int
    uplink_kbps: int
    trainer: Trainer
    local_epochs: int
    batch_size: int
    accuracy_tolerance: float
    latency_budget_ms: float = 0.0
    size_budget_bytes: int = 0

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        _check_text("description", self.description)
        # Enum fields also accept their string values, so plain configs construct directly.
        for field_name, kind in _ENUM_FIELDS.items():
            member = _parse_member(field_name, kind, getattr(self, field_name))
            object.__setattr__(self, field_name, member)
        if not isinstance(self.sparse_format, bool):
            raise ProfileError(_expected("sparse_format", "a boolean", self.sparse_format))
        for field_name, minimum in _INT_MINIMUMS.items():
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                bound = "> 0" if minimum == 1 else f">= {minimum}"
                raise ProfileError(_expected(field_name, f"an integer {bound}", value))
        tolerance = self.accuracy_tolerance
        if (
            not isinstance(tolerance, int | float)
            or isinstance(tolerance, bool)
            or not 0.0 <= tolerance <= 1.0
        ):
            raise ProfileError(_expected("accuracy_tolerance", "a number in [0, 1]", tolerance))
        object.__setattr__(self, "accuracy_tolerance", float(tolerance))
        budget = self.latency_budget_ms
        if not isinstance(budget, int | float) or isinstance(budget, bool) or not budget >= 0:
            raise ProfileError(_expected("latency_budget_ms", "a number >= 0", budget))
        object.__setattr__(self, "latency_budget_ms", float(budget))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DeviceProfile:
        """Build a profile from plain values (as read from TOML); unknown or missing keys fail."""
        unknown = sorted(data.keys() - _FIELD_NAMES)
        if unknown:
            raise ProfileError(
                f"field {unknown[0]!r} is not a profile field, got {_show(data[unknown[0]])}"
            )
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ProfileError(f"field {missing[0]!r} is missing")
        values: dict[str, Any] = dict(data)
        return cls(**values)

    def to_dict(self) -> dict[str, ProfileValue]:
        """Plain values in field order, enums as their strings; the inverse of :meth:`from_dict`."""
        result: dict[str, ProfileValue] = {}
        for name in _FIELD_ORDER:
            value = getattr(self, name)
            result[name] = value.value if isinstance(value, enum.Enum) else value
        return result


_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "arch": Arch,
    "precision": Precision,
    "trainer": Trainer,
}
_INT_MINIMUMS: dict[str, int] = {
    "memory_mb": 1,
    "cores": 1,
    "max_model_bytes": 1,
    "max_payload_bytes": 1024,
    "uplink_kbps": 1,
    "local_epochs": 1,
    "batch_size": 1,
    "size_budget_bytes": 0,
}
_FIELD_ORDER: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DeviceProfile))
_REQUIRED: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DeviceProfile) if f.default is dataclasses.MISSING
)
_FIELD_NAMES: frozenset[str] = frozenset(_FIELD_ORDER)


def _check_text(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(_expected(field_name, "a non-empty string", value))


def _parse_member(field_name: str, kind: type[enum.Enum], value: object) -> enum.Enum:
    for member in kind:
        if value == member.value or value is member:
            return member
    raise ProfileError(_expected(field_name, _choices(kind), value))


def _choices(kind: type[enum.Enum]) -> str:
    return "one of " + ", ".join(repr(member.value) for member in kind)


def _expected(field_name: str, what: str, value: object) -> str:
    return f"field {field_name!r} must be {what}, got {_show(value)}"


def _show(value: object, limit: int = 60) -> str:
    """``repr`` of a bad value, shortened so an error message stays one readable line."""
    text = repr(value.value) if isinstance(value, enum.Enum) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
