"""``fedprune-profiles``: list the shipped device profiles or show one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from fedprune import __version__
from fedprune.device_profiles.catalog import available, load
from fedprune.device_profiles.errors import ProfileError
from fedprune.device_profiles.profile import DeviceProfile, ProfileValue

PROG = "fedprune-profiles"
_COLUMNS = ("NAME", "ARCH", "MEMORY", "PRECISION", "TRAINER")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0, or 2 after printing a one-line error to stderr."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "list":
            print(_table([load(name) for name in available()]))
        else:
            profile = load(args.profile)
            print(json.dumps(profile.to_dict(), indent=2) if args.json else _toml(profile))
    except ProfileError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Device profiles describe the hardware limits and training settings of an "
        "edge device; fedprune uses them to size models, payloads and local training.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("list", help="table of the profiles shipped with fedprune")
    show = commands.add_parser(
        "show",
        help="print one profile's fields",
        description="Print a profile as TOML; save and edit the output to make your own profile "
        "(its 'name' must equal the new file's name without '.toml').",
    )
    show.add_argument("profile", metavar="NAME_OR_PATH", help="shipped name or path to a .toml")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    return parser


def _table(profiles: list[DeviceProfile]) -> str:
    rows = [_COLUMNS] + [
        (p.name, p.arch.value, f"{p.memory_mb} MB", p.precision.value, p.trainer.value)
        for p in profiles
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _toml(profile: DeviceProfile) -> str:
    return "\n".join(f"{key} = {_toml_value(value)}" for key, value in profile.to_dict().items())


def _toml_value(value: ProfileValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)
