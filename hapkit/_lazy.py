"""Lazy attribute access for package faces: names are imported from their submodule on first use,
so that importing a package does not import every dependency of every submodule."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, where: dict[str, str]):
    """``(__getattr__, __dir__)`` for a package whose names live in submodules: ``where`` maps a
    name to the submodule (relative to ``package``) that defines it."""
    module = import_module(package)

    def __getattr__(name):
        if name in where:
            value = getattr(import_module(f"{package}.{where[name]}"), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(module)) | set(where))

    return __getattr__, __dir__


def require_extra(extra: str, *modules: str, what: str) -> None:
    """Raise a :class:`~hapkit.errors.MissingExtraError` (an ImportError) that names the pip extra to install when one of ``modules`` is
    missing: the core install is the library alone, the notebooks' tools are extras."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        from hapkit.errors import MissingExtraError

        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which hapkit's {extra!r} extra installs: from a "
            f"clone of the repository, pip install -e '.[{extra}]' (or `make setup`, which installs "
            f"every extra); without a clone, pip install 'hapkit[{extra}] @ git+<repository URL>'"
        )
