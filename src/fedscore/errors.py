"""The one exception type for bad input: the CLI prints its message, never a traceback."""


class FedscoreError(ValueError):
    """Bad input (a name, a config value, a data folder, a checkpoint) with a message that
    says what is wrong and how to fix it."""


class DivergenceError(FedscoreError):
    """A loss or the model became NaN or infinite; the last good checkpoint is kept."""


def unknown(kind: str, name: object, allowed) -> FedscoreError:
    """The error for a name that is not one of `allowed`."""
    return FedscoreError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(allowed))}")


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or raise the one FedscoreError that names the extra
    which installs it (`pip install 'fedscore[extra]'`) and what needed it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FedscoreError(
            f"{what} needs the optional package {module.split('.')[0]!r}, which is not "
            f"installed; install it with: pip install 'fedscore[{extra}]'"
        ) from None
