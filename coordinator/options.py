"""A run's options on the command line and in config files, made from their one description: the
fields of :class:`~fedprune.coordinator.config.RunConfig` and its ``ScheduleConfig``
(``config.option``). Each field is a flag (``--round-timeout``; its ``flag`` where it has another
name), a key of config.toml (the field's name; the schedule's in its ``[schedule]`` table) and an
attribute of the parsed arguments (the field's name), so that what a run writes is what it reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedprune.coordinator.config import RunConfig, ScheduleConfig
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.options import load_toml

__all__ = ["COORDINATOR_ONLY", "add_run_arguments", "config_from", "read_run_config"]

COORDINATOR_ONLY = ("min_clients", "join_timeout", "heldout")
"""Options of fedprune-coordinator that fedprune-demo sets itself."""

_RUN_TYPES = typing.get_type_hints(RunConfig)
_SCHEDULE_TYPES = typing.get_type_hints(ScheduleConfig)


def _options() -> list[tuple[dataclasses.Field[Any], type]]:
    """Every option, the run's then its schedule's, with its type (the broker's excepted:
    ``protocol.options.add_broker_arguments`` makes those for every command)."""
    run = [(f, _RUN_TYPES[f.name]) for f in dataclasses.fields(RunConfig) if "help" in f.metadata]
    schedule = [(f, _SCHEDULE_TYPES[f.name]) for f in dataclasses.fields(ScheduleConfig)]
    return run + schedule


def add_run_arguments(
    p: argparse.ArgumentParser,
    only: Iterable[str] | None = None,
    *,
    exclude: Iterable[str] = (),
) -> None:
    """Add the run's options (those named in ``only``, else all but ``exclude``) to ``p``."""
    wanted, unwanted = None if only is None else set(only), set(exclude)
    for f, kind in _options():
        if (wanted is not None and f.name not in wanted) or f.name in unwanted:
            continue
        meta = f.metadata
        flag = "--" + (meta["flag"] or f.name).replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        choices = meta["choices"] or None
        default = f.default
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            choices = [member.value for member in kind if member.value]
            default = default.value
        p.add_argument(
            flag,
            dest=f.name,
            type=str if choices else kind,
            choices=choices,
            default=default,
            metavar=meta["metavar"] or (None if choices else meta["flag"].upper() or None),
            help=meta["help"],
        )


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's config.toml (what every run writes into its directory) as argparse defaults.
    ``overwrite`` is not taken from it: replacing a run is asked for each time."""
    table = load_toml(path)
    schedule = table.pop("schedule", {})
    if not isinstance(schedule, dict):
        raise ConfigError(f"{path}: schedule must be a table")
    types = {
        **{f.name: _RUN_TYPES[f.name] for f in dataclasses.fields(RunConfig)},
        **_SCHEDULE_TYPES,
    }
    del types["schedule"]
    defaults = {}
    for key, value in [*table.items(), *schedule.items()]:
        if key not in types:
            raise ConfigError(f"{path}: unknown key {key!r}")
        wanted = str if issubclass(types[key], StrEnum) else types[key]
        if not (type(value) is wanted or wanted is float and type(value) is int):
            raise ConfigError(f"{path}: {key} must be {wanted.__name__}, got {value!r}")
        if key != "overwrite":
            defaults[key] = value
    return defaults


def config_from(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """A validated ``RunConfig`` from the options ``args`` has (the others keep their
    defaults), with ``overrides`` on top."""

    def given(fields: tuple[dataclasses.Field[Any], ...]) -> dict[str, Any]:
        return {
            f.name: getattr(args, f.name) for f in fields if getattr(args, f.name, None) is not None
        }

    values = given(dataclasses.fields(RunConfig))
    values["schedule"] = ScheduleConfig(**given(dataclasses.fields(ScheduleConfig)))
    values.update(overrides)
    return RunConfig(**values)
