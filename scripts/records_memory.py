#!/usr/bin/env python3
"""Redis memory per million response records (``gateway/records/redis.py``), for sizing.

Writes --count records under a prefix of its own (``gwmeasure:<pid>``), as the gateway writes
them (``SET <prefix>:resp:<id> ["<owner>"] EX <retention>``, ids shaped as xAI's UUIDs unless
``--id-style openai``), reads Redis' ``used_memory`` before and after and ``MEMORY USAGE`` of a
sample, scales both to a million, and deletes every key it wrote. Use a spare database
(``--url redis://127.0.0.1:6379/15``): ``used_memory`` is the whole server's, so a busy server
makes that figure noisy (``MEMORY USAGE`` is per key and is not).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid

import redis

from gateway.records import Record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="redis://127.0.0.1:6379/15")
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--owner", default="team-analytics-prod", help="a key name of typical length")
    p.add_argument("--id-style", choices=("xai", "openai"), default="xai")
    p.add_argument("--retention", type=int, default=30 * 86400)
    args = p.parse_args()
    client = redis.Redis.from_url(args.url)
    prefix = f"gwmeasure:{os.getpid()}"
    value = Record(args.owner).encode()

    def rid(i: int) -> str:
        if args.id_style == "xai":
            return str(uuid.UUID(int=i + (1 << 100)))
        return f"resp_{i:048x}"

    keys = [f"{prefix}:resp:{rid(i)}" for i in range(args.count)]
    before = client.info("memory")["used_memory"]
    try:
        for start in range(0, len(keys), 10_000):
            pipe = client.pipeline(transaction=False)
            for key in keys[start:start + 10_000]:
                pipe.set(key, value, ex=args.retention)
            pipe.execute()
        after = client.info("memory")["used_memory"]
        sample = keys[:: max(1, len(keys) // 1000)]
        usage = [client.memory_usage(k, samples=0) or 0 for k in sample]
    finally:
        for start in range(0, len(keys), 10_000):
            client.delete(*keys[start:start + 10_000])
    per_key_info = (after - before) / args.count
    per_key_usage = sum(usage) / len(usage)
    print(json.dumps({
        "redis_version": client.info("server")["redis_version"], "records": args.count,
        "id_style": args.id_style, "key_example": keys[0].replace(prefix, "<prefix>"),
        "value": value.decode(), "memory_usage_bytes_per_record": round(per_key_usage, 1),
        "used_memory_bytes_per_record": round(per_key_info, 1),
        "mib_per_million_memory_usage": round(per_key_usage * 1e6 / 2**20, 1),
        "mib_per_million_used_memory": round(per_key_info * 1e6 / 2**20, 1)}, indent=2))


if __name__ == "__main__":
    main()
