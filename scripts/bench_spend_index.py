#!/usr/bin/env python3
"""Spend sums with and without the cost in the spender's index (SQLite).

A budget's first check sums a spender's spend for its period; for a total budget that is the
spender's whole history. This builds two databases of N request rows (four keys, ~600-byte rows,
WAL), one with the index `(key_id, id)` Sluice had up to schema version 7 and one with
`(key_id, id, cost_usd)` (version 8), and times one key's `SUM(cost_usd)` in each: cold (after
dropping the page cache, where allowed) and warm.

    python3 scripts/bench_spend_index.py [N]      (default 2000000)
"""
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
QUERY = "SELECT SUM(cost_usd) FROM requests WHERE key_id = ? AND id >= ?"

with tempfile.TemporaryDirectory() as tmp:
    for covering in (False, True):
        path = os.path.join(tmp, f"covering_{covering}.db")
        c = sqlite3.connect(path)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute(
            "CREATE TABLE requests (id TEXT PRIMARY KEY, key_id TEXT, cost_usd REAL NOT NULL,"
            " metadata TEXT NOT NULL, body TEXT)"
        )
        cols = "key_id, id, cost_usd" if covering else "key_id, id"
        c.execute(f"CREATE INDEX requests_key ON requests ({cols}) WHERE key_id IS NOT NULL")
        pad = "x" * 600
        rows = (
            (f"{i:012d}-{uuid.uuid4()}", f"sk-key-{i % 4}", random.random() * 1e-3, "{}", pad)
            for i in range(N)
        )
        c.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?)", rows)
        c.commit()
        c.close()
        os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
        c = sqlite3.connect(path)
        t = time.perf_counter()
        c.execute(QUERY, ("sk-key-1", "")).fetchone()
        cold = time.perf_counter() - t
        t = time.perf_counter()
        c.execute(QUERY, ("sk-key-1", "")).fetchone()
        warm = time.perf_counter() - t
        plan = c.execute("EXPLAIN QUERY PLAN " + QUERY, ("a", "")).fetchall()[0][3]
        c.close()
        print(
            f"index ({cols}): sum over {N // 4} rows: cold {cold * 1000:.0f} ms,"
            f" warm {warm * 1000:.0f} ms  [{plan}]"
        )
