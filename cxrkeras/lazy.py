"""Package faces that import their modules on first use, so `import cxrkeras.<package>` never loads TensorFlow."""

import importlib


def lazy_exports(package, modules):
    """(__all__, __getattr__, __dir__) of the face of `package`: `modules` maps each module of the package to the
    space-separated public names it provides; a name's module is imported when the name is first used."""
    owner = {name: f"{package}.{module}" for module, names in modules.items() for name in names.split()}

    def __getattr__(name):
        if name in owner:
            return getattr(importlib.import_module(owner[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(owner)

    return sorted(owner), __getattr__, __dir__
