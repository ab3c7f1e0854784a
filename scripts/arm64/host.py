"""Host-side helpers for scripts/arm64.sh (run with the host's Python 3.11, never under qemu).

    host.py requirements          the ARM site's requirements, one per line, from pyproject.toml
    host.py check-wheels DIR      every binary wheel in DIR is aarch64; ai-edge-litert is the pin
    host.py unpack WHEELS SITE    unzip every wheel in WHEELS into SITE (a new directory)
    host.py build-models OUT      TFLite models for tests/edge_client, built with TensorFlow

Standard library only, except build-models, which runs the BUILD script of
tests/edge_client/conftest.py in a subprocess of this interpreter (it needs TensorFlow).
"""

from __future__ import annotations

import hashlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Test-only packages for the ARM site, taken by name from the "dev" extra.
TEST_PACKAGES = ("pytest", "hypothesis")


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def requirements() -> list[str]:
    """The ``edge``, ``zstd`` and ``monitor`` extras (what a device installs, and the monitor a Pi
    may run) plus pytest and hypothesis, as pip specifiers (for Python 3.11: no markers)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    light = dict.fromkeys(
        r.split(";")[0].strip()
        for r in extras["edge"] + extras["zstd"] + extras["monitor"]
        if not r.startswith("fedprune")
    )
    dev = [r for r in extras["dev"] if _name(r) in TEST_PACKAGES]
    return [*light, *dev]


def check_wheels(folder: Path) -> list[str]:
    """Problems with the downloaded wheels (empty if none)."""
    problems = []
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        platform_tag = wheel.stem.rsplit("-", 1)[-1]
        if platform_tag != "any" and "aarch64" not in platform_tag:
            problems.append(f"{wheel.name}: not an aarch64 wheel")
    pins = [r for r in requirements() if _name(r) == "ai-edge-litert" and "==" in r]
    for pin in pins:
        want = pin.split("==", 1)[1].strip()
        litert = [w.name for w in wheels if w.name.startswith("ai_edge_litert-")]
        if [n.split("-")[1] for n in litert] != [want]:
            problems.append(
                f"expected one ai_edge_litert {want} wheel, got {litert or 'none'}"
                " (pip falls back to 1.4.0 when only old manylinux tags are allowed)"
            )
    if not wheels:
        problems.append(f"{folder}: no wheels")
    return problems


def unpack(wheels: Path, site: Path) -> None:
    site.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                # Wheels that install scripts or headers (``*.data/``) would need pip's logic.
                if name.split("/", 1)[0].endswith(".data"):
                    raise SystemExit(f"{wheel.name}: has {name}; unpack cannot place .data files")
            archive.extractall(site)


def build_models(out: Path) -> None:
    """tests/edge_client's models (float32/, int8/, digits.npz) in ``out``, reused if current."""
    conftest = runpy.run_path(str(ROOT / "tests" / "edge_client" / "conftest.py"))
    build, n_test = conftest["BUILD"], int(conftest["N_TEST"])
    stamp = hashlib.sha256(f"{build}\n{n_test}".encode()).hexdigest()
    if (out / ".stamp").is_file() and (out / ".stamp").read_text() == stamp:
        return
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-c", build, str(partial), str(n_test)],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"building the test models failed:\n{done.stderr[-3000:]}")
    (partial / ".stamp").write_text(stamp)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def main(argv: list[str]) -> int:
    match argv:
        case ["requirements"]:
            print("\n".join(requirements()))
        case ["check-wheels", folder]:
            problems = check_wheels(Path(folder))
            for problem in problems:
                print(f"arm64: {problem}", file=sys.stderr)
            return 1 if problems else 0
        case ["unpack", wheels, site]:
            unpack(Path(wheels), Path(site))
        case ["build-models", out]:
            build_models(Path(out))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
