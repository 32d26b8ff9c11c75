"""Dump one Redis database as a stream of RESP ``RESTORE key ttl payload REPLACE`` commands.

DUMP payloads carry Redis's own serialization of every type (strings, lists, hashes, sets,
sorted sets, streams, modules), so the replay is exact; ``redis-cli --pipe`` loads it into a
running server without a restart. Standard library only, so any python3 works.
Environment: BACKUP_HOST, BACKUP_PORT (6379), BACKUP_USERNAME, BACKUP_PASSWORD,
BACKUP_DATABASE (db number, default 0), REDIS_KEY_PATTERN (default ``*``).
"""

from __future__ import annotations

import os
import socket
import sys


class Resp:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        self.file = self.sock.makefile("rb")

    def call(self, *args: bytes | str | int) -> object:
        self.sock.sendall(encode(args))
        return self.read()

    def read(self) -> object:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")


def encode(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def dump(path: str) -> int:
    r = Resp(os.environ.get("BACKUP_HOST", "127.0.0.1"), int(os.environ.get("BACKUP_PORT", "6379")))
    password = os.environ.get("BACKUP_PASSWORD", "")
    if password:
        r.call("AUTH", os.environ.get("BACKUP_USERNAME") or "default", password)
    r.call("SELECT", os.environ.get("BACKUP_DATABASE") or "0")
    pattern = os.environ.get("REDIS_KEY_PATTERN", "*")
    count = 0
    with open(path, "wb") as out:
        cursor = b"0"
        while True:
            cursor, keys = r.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)  # type: ignore[misc]
            for key in keys:
                payload = r.call("DUMP", key)
                ttl = r.call("PTTL", key)
                if payload is None or ttl == -2:
                    continue  # expired or deleted meanwhile
                out.write(encode(("RESTORE", key, max(int(ttl), 0), payload, "REPLACE")))
                count += 1
            if cursor == b"0":
                break
    print(f"dumped {count} keys")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "dump":
        sys.exit("usage: redis_dump.py dump FILE")
    sys.exit(dump(sys.argv[2]))
