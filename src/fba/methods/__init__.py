"""Training methods, one file each, registered by name."""

from fba.registry import Registry

METHODS: Registry = Registry("method")


def _register_builtin() -> None:
    # Imported here so that `import fba` stays light; each module registers itself.
    from fba.methods import auglocal, bp, bp_checkpoint, dgl, fba, infopro, predsim  # noqa: F401


def get_method(name: str):
    _register_builtin()
    return METHODS.get(name)


def list_methods() -> list[str]:
    _register_builtin()
    return METHODS.names()
