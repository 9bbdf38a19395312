"""A quiet start: TensorFlow's native start-up lines off the first screen.

TensorFlow's C++ code writes lines such as "Could not find cuda drivers on
your machine" and "failed call to cuInit" straight to file descriptor 2,
before (or regardless of) `TF_CPP_MIN_LOG_LEVEL`. `native_stderr_filter`
captures that descriptor while TensorFlow starts, and writes back every line
except those known start-up notices, so real errors still show.

Example:

>>> from tlkeras import quiet
>>> with quiet.native_stderr_filter():
...     pass
"""

import contextlib
import os
import re
import sys
import tempfile

__all__ = ["native_stderr_filter", "NOISE"]

NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|failed call to cuInit|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|"
    r"This TensorFlow binary is optimized to use available CPU instructions|"
    r"rebuild TensorFlow with the appropriate compiler flags|cpu_feature_guard\.cc|"
    r"oneDNN custom operations are on"
)


@contextlib.contextmanager
def native_stderr_filter():
    """Drops TensorFlow's native start-up notices written to fd 2 inside the block."""
    # Descriptor 2 itself: in Jupyter sys.stderr.fileno() is a copy of it, not what TensorFlow uses.
    fd = 2
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # no descriptor 2 (or no sys.stderr)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf8", "replace").splitlines(True)
                    if not NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def start_devices():
    """Starts TensorFlow's devices (the CUDA probe) with the notices filtered; returns the GPUs."""
    import tensorflow as tf  # imported by tlkeras already; here so this module imports alone

    with native_stderr_filter():
        return tf.config.list_physical_devices("GPU")
