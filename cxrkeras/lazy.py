"""Package faces that import their modules on first use, so `import cxrkeras.<package>` never loads TensorFlow."""

import importlib


def lazy_exports(package, exports):
    """(__getattr__, __dir__) for `package` whose public names `exports` ({name: module}) load on first access."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
