"""The Redis store, by its old name: scheduler/redis/ holds it (store.py says how it works)."""

from scheduler.redis.partial import NotLoaded, Partial
from scheduler.redis.records import decode_holders, decode_leases, encode_holders, encode_leases
from scheduler.redis.store import RedisStore, StoreBusy

__all__ = ["NotLoaded", "Partial", "RedisStore", "StoreBusy", "decode_holders", "decode_leases",
           "encode_holders", "encode_leases"]
