"""A hang guard for calls that must return (a fault-recovery path, not a speed goal)."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

T = TypeVar("T")


def returns(call: Callable[[], T], hang_s: float) -> T:
    """call()'s result or exception. A hang guard, not a speed check: it only stops a call that never
    returns (the failure these tests are about) from blocking the suite."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=hang_s)
    except FutureTimeout:
        raise AssertionError(f"hung: no return within {hang_s:g} s") from None
    finally:
        pool.shutdown(wait=False)  # a hung call's thread is left behind, not waited for
