"""One interface to run frame streams — `local` (in process) and, later, `ray` — used identically by
the server and by render jobs."""
from .base import Backend, CapacityError
from .local import LocalBackend

__all__ = ["Backend", "CapacityError", "LocalBackend"]
