"""Copy keys from a private redis-server (the loaded RDB snapshot, on a unix socket) into the
live server, with ``DUMP`` / ``RESTORE key ttl payload REPLACE``: Redis's own serialization of
every type (strings, lists, hashes, sets, sorted sets, streams, module types), so the copy
is exact. Commands are pipelined in batches. Standard library only: any ``python3`` works.

    python3 redis_copy.py SOURCE_SOCKET

Environment: BACKUP_HOST, BACKUP_PORT (6379), BACKUP_USERNAME, BACKUP_PASSWORD (the live
server), BACKUP_DATABASE (db number, default 0), REDIS_KEY_PATTERN (default ``*``),
REDIS_FLUSH_BEFORE_RESTORE (``true``: first delete the live keys matching the pattern).
The password travels over the socket, never on a command line.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from typing import TypeAlias, cast

BATCH = 500


class RedisError(Exception):
    pass


Argument: TypeAlias = "bytes | str | int"
Reply: TypeAlias = "bytes | int | list[Reply] | RedisError | None"
"""A RESP2 reply: simple and bulk strings are bytes, an error reply is a RedisError."""


class Resp:
    """A minimal RESP2 client: enough for SCAN, DUMP, PTTL, RESTORE, UNLINK."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    @classmethod
    def tcp(cls, host: str, port: int) -> Resp:
        return cls(socket.create_connection((host, port), timeout=300))

    @classmethod
    def unix(cls, path: str) -> Resp:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(300)
        s.connect(path)
        return cls(s)

    def call(self, *args: Argument) -> Reply:
        return self.pipeline([args])[0]

    def pipeline(self, commands: list[tuple[Argument, ...]]) -> list[Reply]:
        self.sock.sendall(b"".join(encode(c) for c in commands))
        return [self.read() for _ in commands]

    def read(self) -> Reply:
        line = self.file.readline()
        if not line:
            raise RedisError("connection closed by the server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


def encode(args: tuple[Argument, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def ok(reply: Reply) -> bytes | int | list[Reply] | None:
    if isinstance(reply, RedisError):
        raise reply
    return reply


def number(reply: Reply) -> int:
    """An integer reply (UNLINK, PTTL)."""
    value = ok(reply)
    if not isinstance(value, int):
        raise RedisError(f"expected an integer reply, not {type(value).__name__}")
    return value


def string(reply: Reply) -> bytes:
    """A bulk string reply (DUMP)."""
    value = ok(reply)
    if not isinstance(value, bytes):
        raise RedisError(f"expected a string reply, not {type(value).__name__}")
    return value


def scan(conn: Resp, pattern: str) -> Iterator[list[bytes]]:
    cursor = b"0"
    while True:
        # SCAN answers the next cursor and a page of keys.
        reply = ok(conn.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000))
        cursor, keys = cast("tuple[bytes, list[bytes]]", reply)
        if keys:
            yield keys
        if cursor == b"0":
            return


def main(source_socket: str) -> int:
    db = os.environ.get("BACKUP_DATABASE") or "0"
    pattern = os.environ.get("REDIS_KEY_PATTERN") or "*"
    source = Resp.unix(source_socket)
    target = Resp.tcp(
        os.environ.get("BACKUP_HOST", "127.0.0.1"), int(os.environ.get("BACKUP_PORT", "6379"))
    )
    password = os.environ.get("BACKUP_PASSWORD", "")
    if password:
        ok(target.call("AUTH", os.environ.get("BACKUP_USERNAME") or "default", password))
    ok(source.call("SELECT", db))
    ok(target.call("SELECT", db))
    deleted = 0
    if os.environ.get("REDIS_FLUSH_BEFORE_RESTORE", "false").lower() == "true":
        for keys in scan(target, pattern):
            deleted += number(target.call("UNLINK", *keys))
    copied = 0
    for keys in scan(source, pattern):
        for i in range(0, len(keys), BATCH):
            batch = keys[i : i + BATCH]
            replies = source.pipeline([c for k in batch for c in (("DUMP", k), ("PTTL", k))])
            restores: list[tuple[Argument, ...]] = []
            for key, payload, ttl in zip(batch, replies[::2], replies[1::2], strict=True):
                if payload is None or ttl == -2:
                    continue  # expired meanwhile
                ttl_ms = max(number(ttl), 0)
                restores.append(("RESTORE", key, ttl_ms, string(payload), "REPLACE"))
            for reply in target.pipeline(restores):
                ok(reply)
            copied += len(restores)
    print(f"restored {copied} keys into db {db} (pattern {pattern!r}); deleted before: {deleted}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: redis_copy.py SOURCE_SOCKET")
    try:
        sys.exit(main(sys.argv[1]))
    except (RedisError, OSError) as exc:
        sys.exit(f"redis_copy: {exc}")
