"""What a sealed signing key costs a device: the process's peak memory and the time to open it.

    .venv/bin/python benchmarks/sealed_key.py

Imports what fedprune-client imports, then loads a plain and a sealed signing key (Argon2id,
19 MiB, 2 passes), printing the peak resident memory (ru_maxrss) before and after each.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import fedprune.edge_client.cli  # noqa: F401  (what a device has loaded when it opens its key)
from fedprune.protocol.signing import load_signing_key, new_keypair, seal

PASSPHRASE = {"FEDPRUNE_KEY_PASSPHRASE": "a passphrase for the benchmark"}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain, sealed = Path(tmp) / "plain.key", Path(tmp) / "sealed.key"
        new_keypair(plain, Path(tmp) / "plain.pub")
        new_keypair(sealed, Path(tmp) / "sealed.pub")
        before = peak_mb()
        load_signing_key(plain)
        print(f"plain key: peak {before:.1f} -> {peak_mb():.1f} MB")
        seal(sealed, PASSPHRASE)  # (the operator does this once, elsewhere)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            load_signing_key(sealed, PASSPHRASE)
            times.append(time.perf_counter() - started)
        print(
            f"sealed key: peak {before:.1f} -> {peak_mb():.1f} MB,"
            f" opened in {sorted(times)[2]:.3f} s (median of 5)"
        )


if __name__ == "__main__":
    main()
