"""tlkeras.quiet: TensorFlow's native start-up notices dropped, other stderr lines kept."""

import os
import sys

from tlkeras import quiet


def test_notices_on_descriptor_2_are_dropped_when_sys_stderr_is_another_descriptor(
        capfd, monkeypatch):
    # As in Jupyter (ipykernel): sys.stderr writes to a copy of descriptor 2, while TensorFlow's
    # C++ code writes to descriptor 2 itself.
    stream = os.fdopen(os.dup(2), "w")
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        with quiet.native_stderr_filter():
            os.write(2, b"I0000 00:00:1795729318.2 14400 cudart_stub.cc:31] Could not find cuda "
                        b"drivers on your machine, GPU will not be used.\nreal error: kept\n")
    finally:
        monkeypatch.undo()
        stream.close()
    err = capfd.readouterr().err
    assert "real error: kept" in err and "cudart_stub" not in err
