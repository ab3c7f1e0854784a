"""``python -m device_profiles`` runs the ``fedprune-profiles`` command."""

from __future__ import annotations

import sys

from fedprune.device_profiles.cli import main

sys.exit(main())
