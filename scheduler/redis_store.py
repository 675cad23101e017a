"""The Redis store, by its old name: scheduler/redis/ holds it (store.py says how it works)."""

from scheduler.redis.partial import NotLoaded, Partial, PartialSet
from scheduler.redis.records import decode_leases, encode_leases
from scheduler.redis.store import RedisStore, StoreBusy

__all__ = ["NotLoaded", "Partial", "PartialSet", "RedisStore", "StoreBusy", "decode_leases",
           "encode_leases"]
