"""Hide TensorFlow's and LiteRT's C++ log lines, which ``TF_CPP_MIN_LOG_LEVEL`` does not reach.

In TF 2.21 the oneDNN notice is logged by absl before it is initialised, and LiteRT announces
every XNNPACK delegate it creates, so both reach stderr whatever the log level; only a
file-descriptor redirect keeps them out of a command's output and its one-line errors. Standard
library only: the device's commands use it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_NOISE = re.compile(
    r"absl::InitializeLog\(\)|oneDNN custom operations|cpu_feature_guard"
    r"|To enable the following instructions|could not find cuda drivers"
    r"|fully_quantize: \d+, inference_type:"  # printed by the int8 calibrator on every conversion
    r"|Created TensorFlow Lite XNNPACK delegate for CPU"
)


@contextlib.contextmanager
def native_log_filtered() -> Iterator[None]:
    """Capture file descriptor 2 for the block, then replay every line that is not known noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _NOISE.search(line)))
