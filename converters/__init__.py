"""Coordinator-side export: strip pruning wrappers, convert tf_keras models to TFLite, and verify
the result under LiteRT before it is shipped to devices.

Names are re-exported lazily, so ``converters.cli`` can set TensorFlow's log level before
TensorFlow is first imported. ``strip`` is not re-exported: once imported, the submodule
``converters.strip`` shadows any package attribute of that name; use ``converters.strip.strip``.
``Precision`` is :class:`device_profiles.Precision` itself, re-exported for convenience.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedprune.converters.export import (
        ExportReport,
        export_model,
        export_profiles,
        export_run,
        resolve_profile,
    )
    from fedprune.converters.strip import kernel_sparsity, load_keras
    from fedprune.converters.tflite import parse_precision, to_tflite
    from fedprune.converters.trainable import build_trainable
    from fedprune.converters.verify import (
        evaluate_keras,
        evaluate_tflite,
        latency_ms,
        latency_percentiles_ms,
    )
    from fedprune.device_profiles import Precision

__all__ = [
    "ExportReport",
    "Precision",
    "build_trainable",
    "evaluate_keras",
    "evaluate_tflite",
    "export_model",
    "export_profiles",
    "export_run",
    "kernel_sparsity",
    "latency_ms",
    "latency_percentiles_ms",
    "load_keras",
    "parse_precision",
    "resolve_profile",
    "to_tflite",
]

_HOME = {
    "ExportReport": "report",
    "export_model": "export",
    "export_profiles": "export",
    "export_run": "export",
    "resolve_profile": "export",
    "kernel_sparsity": "strip",
    "load_keras": "strip",
    "Precision": "tflite",
    "parse_precision": "tflite",
    "to_tflite": "tflite",
    "build_trainable": "trainable",
    "evaluate_keras": "verify",
    "evaluate_tflite": "verify",
    "latency_ms": "verify",
    "latency_percentiles_ms": "verify",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedprune.converters.{_HOME[name]}"), name)
