"""TensorFlow's import-time notices kept out of the CLI's stderr, and nothing else lost (cxrkeras.startup)."""

import os
import subprocess
import sys

import pytest

from cxrkeras.startup import NOTICES, without_notices

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796159345.035360   30402 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. To turn "
    "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796158168.561345   21047 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_notices_dropped_other_lines_kept(capfd, raises):
    kept = ["E0000 a real TensorFlow error line", "text on fd 2 between notices", "WARNING: something else"]

    def write():
        os.write(2, ("\n".join([NOISE[0], kept[0], NOISE[1], NOISE[2]]) + "\n").encode())
        os.write(2, (kept[1] + "\n" + NOISE[3] + "\n" + kept[2] + "\n").encode())
        if raises:
            raise ValueError("boom")

    if raises:
        with pytest.raises(ValueError, match="boom"), without_notices():
            write()
    else:
        with without_notices():
            write()
    assert capfd.readouterr().err.splitlines() == kept
    assert all(NOTICES.fullmatch(line) for line in NOISE) and not any(NOTICES.fullmatch(line) for line in kept)


def _import_tf(quiet, env):
    code = ("from cxrkeras.startup import quiet_tensorflow_import\n"
            + ("quiet_tensorflow_import()\n" if quiet else "")
            + "import tensorflow as tf\nprint(tf.constant(2) + 1)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)


def test_fresh_import_has_no_notices_and_still_works():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    plain, quiet = _import_tf(False, env), _import_tf(True, env)
    assert plain.returncode == 0 and quiet.returncode == 0, (plain.stderr, quiet.stderr)
    assert quiet.stdout == plain.stdout and "3" in quiet.stdout
    # whatever TensorFlow prints here at start-up (on x86 with oneDNN: the notices above) is gone, nothing else is
    assert [line for line in plain.stderr.splitlines() if not NOTICES.fullmatch(line)] == quiet.stderr.splitlines()
    assert not any(NOTICES.fullmatch(line) for line in quiet.stderr.splitlines())
