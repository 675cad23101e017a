"""The scheduler's state in Redis or a Redis Cluster (`RedisStore`, scheduler/redis/store.py),
in small parts: key names and slots (keys), the Lua and its batching (scripts), the records'
one field table and encodings (records), maps loaded in part (partial), a call's slice of state
(loader), the writes back (diff) and the wake-ups between replicas (feed)."""
