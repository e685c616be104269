"""TensorFlow's C++ start-up notices (absl's pre-init warning, oneDNN's, CPU features) kept out of the CLI's stderr."""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# Lines TensorFlow's C++ code writes to fd 2 while `import tensorflow` runs, whatever TF_CPP_MIN_LOG_LEVEL says
# (they come before absl's logging is set up); each command would otherwise start with four of them.
NOTICES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I0000 \S+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. .*"
    r"|I0000 \S+ +\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU .*"
    r"|To enable the following instructions: .*, in other operations, rebuild TensorFlow with the appropriate "
    r"compiler flags\.")


@contextlib.contextmanager
def without_notices():
    """Inside: whatever is written to file descriptor 2 (C++ and Python alike) is held back, then written to stderr
    without the lines `NOTICES` matches, also when the block raises (nothing else is lost)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not NOTICES.fullmatch(line.rstrip("\r\n")))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the import system would, and runs its module code inside `without_notices` (once)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                with without_notices():
                    loader.exec_module(module)

        spec.loader = Loader()
        return spec


def quiet_tensorflow_import():
    """Keep TensorFlow's start-up notices out of stderr when it is first imported (nothing is imported now; a no-op
    once TensorFlow is loaded)."""
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
