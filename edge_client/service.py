"""The systemd unit that runs ``fedprune-client`` as a service (``--systemd-unit`` prints it)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from string import Template

DEFAULT_CONFIG = Path("/etc/fedprune/device.toml")

UNIT = Template("""\
# fedprune-client as a service: written by `fedprune-client --systemd-unit`.
# Install: docs/raspberry-pi.md. Stop: `systemctl stop fedprune-client` (SIGTERM: the device
# says offline to the broker and exits 0). A bad config (exit 2) is not restarted.
[Unit]
Description=fedprune edge client (federated training on this device's private data)
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User=fedprune
Group=fedprune
ExecStart=$command
WorkingDirectory=/var/lib/fedprune
StateDirectory=fedprune
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=10
RestartPreventExitStatus=2
KillSignal=SIGTERM
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
""")


def unit(config: Path) -> str:
    """The unit for this installation: this Python (its virtual environment) and ``config``,
    serving every run (``--forever``); models and caches go to the state directory."""
    command = [sys.executable, "-m", "fedprune.edge_client", "--config", str(config), "--forever"]
    return UNIT.substitute(command=shlex.join(command))
