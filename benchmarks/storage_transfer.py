"""Throughput and peak memory of the storage backends, beside the reference clients.

    .venv/bin/python benchmarks/storage_transfer.py [--sizes 50M,1G] [--backends s3,swift]
                                                    [--dir /var/tmp] [--repeat 3]
                                                    [--part-size 16M] [--concurrency 4]

It starts a local SeaweedFS (S3) and a local OpenStack Swift (the suite's own test servers, on
free loopback ports), generates a file of each size (deleted afterwards) and moves it up and
down through each backend, every transfer in a fresh process of its own so that its peak RSS
(``ru_maxrss``) belongs to that transfer alone:

- ``storage``: this project's ``storage.open_store`` (defaults: 16 MiB parts, 4 in flight),
  reading the file in 1 MiB chunks as the agent does, with the SHA-256 computed on the way up
  and verified on the way down;
- S3 reference: boto3's managed ``upload_file`` / ``download_file`` (its defaults: 8 MiB parts,
  10 threads);
- Swift reference: swiftclient's ``SwiftService.upload`` (static large object, same segment
  size) and ``SwiftService.download`` (its defaults: 10 threads, MD5 checked).

Throughput is the file's bytes per second of wall time for the transfer itself (process start,
imports and client construction excluded), the median of ``--repeat`` runs taken in turns with
the reference's. "peak" is the process's maximum RSS; "base" its RSS after the imports,
before the transfer. Targets: the ``storage`` peak at the largest size stays within 64 MiB of
its peak at the smallest, and its throughput is at least 0.8 times the reference's.

On a shared machine the figures move with the load: run it on an idle machine to compare
releases, and read the ratios rather than the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
PART = 16 * MiB
MEMORY_TARGET = 64 * MiB
RATIO_TARGET = 0.8


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    unit = text[-1].upper()
    return int(text[:-1]) * units[unit] if unit in units else int(text)


def human(n: float) -> str:
    return f"{n / (1 << 30):.0f} GiB" if n >= 1 << 30 else f"{n / MiB:.0f} MiB"


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------- one transfer (child)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one transfer in this (fresh) process; return its figures."""
    tool, direction = spec["tool"], spec["direction"]
    if tool == "storage":
        from storage import S3Settings, SwiftSettings, TransferSettings, open_store

        settings_cls = S3Settings if spec["backend"] == "s3" else SwiftSettings
        settings = settings_cls.model_validate(spec["settings"])
        transfer = TransferSettings(**spec.get("transfer", {}))
        base = rss_now()

        async def run() -> None:
            async with open_store(settings, transfer) as store:
                if spec["backend"] == "s3":
                    await store._s3()  # the client's construction, excluded for boto3 too
                started[0] = time.perf_counter()
                if direction == "up":
                    stored = await store.upload(spec["key"], file_chunks(spec["path"]))
                    assert stored.size == spec["size"], stored
                    spec["sha256"] = stored.sha256
                else:
                    with open(spec["path"], "wb") as out:  # noqa: ASYNC230 - sequential writes
                        async for chunk in store.download(
                            spec["key"], expected_sha256=spec.get("sha256")
                        ):
                            out.write(chunk)

        started = [0.0]
        asyncio.run(run())
        elapsed = time.perf_counter() - started[0]
    elif tool == "boto3":
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s = spec["settings"]
        client = boto3.client(
            "s3",
            endpoint_url=s["endpoint"],
            region_name=s["region"],
            aws_access_key_id=s["access_key_id"],
            aws_secret_access_key=s["secret_access_key"],
            config=Config(s3={"addressing_style": "path"}),
        )
        config = TransferConfig()  # the managed transfer's defaults
        base = rss_now()
        started = time.perf_counter()
        if direction == "up":
            client.upload_file(spec["path"], s["bucket"], spec["key"], Config=config)
        else:
            client.download_file(s["bucket"], spec["key"], spec["path"], Config=config)
        elapsed = time.perf_counter() - started
    elif tool == "swiftclient":
        from swiftclient.service import SwiftError, SwiftService, SwiftUploadObject

        s = spec["settings"]
        options = {"auth": s["auth_url"], "user": s["username"], "key": s["password"]}
        base = rss_now()
        started = time.perf_counter()
        with SwiftService(options={**options, "auth_version": "1"}) as service:
            if direction == "up":
                results = service.upload(
                    s["container"],
                    [SwiftUploadObject(spec["path"], object_name=spec["key"])],
                    options={"segment_size": PART, "use_slo": True},
                )
            else:
                results = service.download(
                    s["container"], [spec["key"]], options={"out_file": spec["path"]}
                )
            for result in results:
                if not result.get("success"):
                    raise SwiftError(f"swiftclient failed: {result.get('error')}")
        elapsed = time.perf_counter() - started
    else:
        raise ValueError(tool)
    return {"seconds": elapsed, "peak": rss_peak(), "base": base, "sha256": spec.get("sha256")}


async def file_chunks(path: str, size: int = MiB):  # type: ignore[no-untyped-def]
    with open(path, "rb", buffering=0) as f:  # noqa: ASYNC230 - read in a thread below
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec (credentials included) goes through stdin, never on a command line."""
    done = subprocess.run(
        [sys.executable, __file__, "--child"],
        input=json.dumps(spec).encode(),
        capture_output=True,
        check=False,
        cwd=ROOT,
        timeout=3600,
    )
    if done.returncode:
        raise RuntimeError(
            f"{spec['tool']} {spec['direction']} failed:\n{done.stderr.decode()[-3000:]}"
        )
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


# ---------------------------------------------------------------------- the run (parent)


def make_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(MiB, size - written)
            f.write(written.to_bytes(8, "big") + block[8:n] if n > 8 else block[:n])
            written += n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50M,1G")
    parser.add_argument("--backends", default="s3,swift")
    parser.add_argument("--dir", default=None, help="where the generated files go")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--part-size", default=None, help="storage's part size (default: its own)")
    parser.add_argument("--concurrency", type=int, default=None, help="storage's parts in flight")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(sys.stdin.read()))))
        return 0

    from tests.servers.s3 import SeaweedS3
    from tests.servers.swift import SwiftCluster

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    transfer: dict[str, int] = {}
    if args.part_size:
        transfer["part_size"] = parse_size(args.part_size)
    if args.concurrency:
        transfer["max_concurrency"] = args.concurrency
    backends = args.backends.split(",")
    work = Path(tempfile.mkdtemp(prefix="storage-bench-", dir=args.dir))
    servers: list[Any] = []
    rows: list[dict[str, Any]] = []
    try:
        settings: dict[str, dict[str, Any]] = {}
        if "s3" in backends:
            s3 = SeaweedS3(work / "s3")
            (work / "s3").mkdir()
            servers.append(s3)
            s3.start()
            settings["s3"] = s3.settings().model_dump(mode="json")
            settings["s3"]["secret_access_key"] = s3.secret_key
        if "swift" in backends:
            # Swift's default manifest limit: swiftclient's reference does not nest manifests.
            swift = SwiftCluster(work / "swift", max_manifest_segments=1000)
            (work / "swift").mkdir()
            servers.append(swift)
            swift.start()
            settings["swift"] = swift.settings().model_dump(mode="json")
            settings["swift"]["password"] = swift.key
        print(
            f"storage_transfer: {', '.join(backends)}; sizes {', '.join(map(human, sizes))}; "
            f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} "
            "(figures on a shared, loaded machine move with the load)",
            flush=True,
        )
        reference = {"s3": "boto3", "swift": "swiftclient"}
        for size in sizes:
            source = work / f"source-{size}"
            make_file(source, size)
            for backend in backends:
                tools = ("storage", reference[backend])
                figures: dict[tuple[str, str], list[dict[str, Any]]] = {
                    (tool, direction): [] for tool in tools for direction in ("up", "down")
                }
                # Interleaved (ours, reference, ours, ...) so that a change of load in the
                # middle of the run does not favour one side.
                for _ in range(args.repeat):
                    for tool in tools:
                        spec = {
                            "tool": tool,
                            "backend": backend,
                            "settings": settings[backend],
                            "size": size,
                            "direction": "up",
                            "key": f"bench/{tool}-{uuid.uuid4().hex[:8]}",
                            "path": str(source),
                            "transfer": transfer,
                        }
                        up = run_child(spec)
                        figures[tool, "up"].append(up)
                        target = work / "downloaded"
                        spec.update(direction="down", path=str(target), sha256=up["sha256"])
                        figures[tool, "down"].append(run_child(spec))
                        if os.path.getsize(target) != size:
                            raise RuntimeError(f"{tool} downloaded a wrong size")
                        target.unlink()
                for tool in tools:
                    for direction in ("up", "down"):
                        runs = figures[tool, direction]
                        row = {
                            "backend": backend,
                            "tool": tool,
                            "direction": direction,
                            "size": size,
                            "seconds": statistics.median(f["seconds"] for f in runs),
                            "peak": max(f["peak"] for f in runs),
                            "base": min(f["base"] for f in runs),
                        }
                        rows.append(row)
                        print_row(row, header=len(rows) == 1)
            source.unlink()
        return verdict(rows, sizes, backends, reference)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(
            f"\n{'backend':<7} {'direction':<9} {'size':>8} {'tool':<12} {'MiB/s':>8} "
            f"{'peak RSS':>9} {'base RSS':>9} {'peak-base':>9}"
        )
    rate = row["size"] / MiB / row["seconds"]
    print(
        f"{row['backend']:<7} {row['direction']:<9} {human(row['size']):>8} {row['tool']:<12} "
        f"{rate:>8.1f} {row['peak'] / MiB:>8.0f}M {row['base'] / MiB:>8.0f}M "
        f"{(row['peak'] - row['base']) / MiB:>8.0f}M",
        flush=True,
    )


def verdict(
    rows: list[dict[str, Any]], sizes: list[int], backends: list[str], reference: dict[str, str]
) -> int:
    def find(backend: str, tool: str, direction: str, size: int) -> dict[str, Any]:
        return next(
            r
            for r in rows
            if (r["backend"], r["tool"], r["direction"], r["size"])
            == (backend, tool, direction, size)
        )

    from benchmarks._harness import Figure, report

    ok = True
    figures: list[Figure] = []
    print("\nChecks (storage against its targets):")
    small, large = min(sizes), max(sizes)
    for backend in backends:
        for direction in ("up", "down"):
            if small != large:
                growth = (
                    find(backend, "storage", direction, large)["peak"]
                    - find(backend, "storage", direction, small)["peak"]
                )
                good = growth <= MEMORY_TARGET
                ok &= good
                figures.append(
                    Figure("storage_transfer", f"{backend} {direction}: peak RSS growth "
                           f"{human(small)} to {human(large)}", growth / MiB, "MiB",
                           higher_is_better=False, target_value=MEMORY_TARGET / MiB + 1e-9)
                )  # fmt: skip
                print(
                    f"  {backend:<6} {direction:<5} peak RSS {human(large)} - {human(small)}: "
                    f"{growth / MiB:+.0f} MiB (target <= {MEMORY_TARGET // MiB} MiB) "
                    f"{'ok' if good else 'MISSED'}"
                )
            ours = find(backend, "storage", direction, large)
            ref = find(backend, reference[backend], direction, large)
            ratio = ref["seconds"] / ours["seconds"]
            good = ratio >= RATIO_TARGET
            ok &= good
            figures.append(
                Figure("storage_transfer", f"{backend} {direction} {human(large)}",
                       large / MiB / ours["seconds"], "MiB/s", reference[backend],
                       large / MiB / ref["seconds"], target_ratio=RATIO_TARGET)
            )  # fmt: skip
            print(
                f"  {backend:<6} {direction:<5} throughput at {human(large)}: {ratio:.2f} x "
                f"{reference[backend]} (target >= {RATIO_TARGET}) {'ok' if good else 'MISSED'}"
            )
    report(figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
