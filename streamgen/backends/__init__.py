"""One interface to run frame streams — `local` (in process, one engine loop) and `ray` — used identically
by the server and by render jobs. Its names load on first use, so `backends.names` stays torch-free."""

__all__ = ["Backend", "CapacityError", "LocalBackend"]


def __getattr__(name: str):
    if name in ("Backend", "CapacityError"):
        from . import base

        return getattr(base, name)
    if name == "LocalBackend":
        from .local import LocalBackend

        return LocalBackend
    raise AttributeError(f"module 'streamgen.backends' has no attribute {name!r}")
