"""KV caches and the sink/window policies that bound them; `make_policy(name, **settings)` builds one."""
from .kv import CallSpec, KVCache
from .policy import CacheFullError, CachePolicy, make_policy

__all__ = ["CallSpec", "KVCache", "CacheFullError", "CachePolicy", "make_policy"]
