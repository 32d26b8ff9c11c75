"""Agent backup throughput and peak memory, beside the plain shell pipeline, same storage.

    .venv/bin/python benchmarks/agent_throughput.py [--sizes 50M,256M,1G] [--repeat 3]

For each size a file is generated (half text-like, half random, so compressible about 2:1)
and backed up into one local SeaweedFS (the suite's real S3 server) four ways, one after the
other in the same run:

- ``agent``, transforms off: a real agent process (``python -m agent``) uploads the file the
  backup script left (a hard link: no copy);
- ``shell``, transforms off: ``cat FILE | uploader``;
- ``agent``, zstd + encryption: the agent compresses (zstd level 3) and encrypts
  (AES-256-GCM, chunked) while it uploads;
- ``shell``, zstd + encryption: ``zstd -3 | openssl enc -aes-256-ctr -pbkdf2 | uploader``
  (openssl enc has no AEAD mode; CTR is its fastest, and unauthenticated).

Each stored object is then restored the same way it was written, in the same run:

- ``agent``: a fresh agent restores its own object (``PUT /restore``; download, SHA-256
  check, decryption, decompression, the file written; the restore script does nothing);
- ``shell``: ``downloader | openssl enc -d -aes-256-ctr -pbkdf2 | zstd -d > FILE`` (or
  ``downloader > FILE`` without transforms).

``uploader`` is boto3's ``upload_fileobj`` reading stdin and ``downloader`` its
``download_fileobj`` writing stdout, with the agent's default part size (8 MiB) and
concurrency (4). Throughput is input (backup) or output (restore) bytes per second of wall
time from the request to the stored object or written file; ``cpu_s`` is the CPU time
(user + system) spent on it (the agent process's, or the sum of the pipeline's processes'),
a figure that the machine's other load disturbs much less than wall time. Peak memory: the
agent process's VmHWM (a fresh agent per run), and for the shell pipeline the sum of its
processes' maximum RSS (GNU time). Each kind runs ``--repeat`` times, agent and shell
interleaved; the summary shows the median throughput and CPU time and the largest peak. The
agent's peaks at 50 MiB, 256 MiB and 1 GiB show whether memory depends on the backup size.
The load average is printed before and after: on a shared machine only the ratios of runs
side by side mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import AgentConfig  # noqa: E402
from benchmarks._harness import Figure  # noqa: E402
from benchmarks._harness import report as publish  # noqa: E402
from tests.agent.helpers import AgentProcess, write_script  # noqa: E402
from tests.servers.s3 import SeaweedS3  # noqa: E402

PASSPHRASE = "bench-passphrase"
PART: int = AgentConfig.model_fields["s3_part_size"].default  # the agent's default
UPLOADER = f"""
import os, sys, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=os.environ["BENCH_ENDPOINT"], region_name="us-east-1")
config = TransferConfig(multipart_chunksize={PART}, multipart_threshold={PART}, max_concurrency=4)
s3.upload_fileobj(sys.stdin.buffer, os.environ["BENCH_BUCKET"], sys.argv[1], Config=config)
"""
DOWNLOADER = UPLOADER.replace(
    "s3.upload_fileobj(sys.stdin.buffer,", "s3.download_fileobj("
).replace("sys.argv[1], Config=config)", "sys.argv[1], sys.stdout.buffer, Config=config)")
TIMED = "/usr/bin/time -a -o {} -f '%M %U %S'"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    unit = text[-1].upper()
    return int(text[:-1]) * units[unit] if unit in units else int(text)


def generate(path: Path, size: int) -> None:
    rng = random.Random(42)
    words = [b"backup", b"restore", b"postgres", b"row", b"value", b"2026-01-02", b"NULL"]
    text = b" ".join(rng.choice(words) + str(rng.randrange(10**6)).encode() for _ in range(300_000))
    block = 1 << 20
    with open(path, "wb") as f:
        written = i = 0
        while written < size:
            if i % 2 == 0:
                start = (i * 7919) % (len(text) - block)
                chunk = text[start : start + block]
            else:
                chunk = os.urandom(block)
            chunk = chunk[: size - written]
            f.write(chunk)
            written += len(chunk)
            i += 1


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_agent(
    base: Path, s3: SeaweedS3, bucket: str, source: Path, transform: bool, n: int
) -> dict[str, Any]:
    scripts = base / f"scripts{n}"
    scripts.mkdir()
    write_script(scripts, "backup", f'ln "{source}" "$BACKUP_DIRECTORY/data.bin"')
    agent = AgentProcess(base / f"agent{n}", scripts).start()
    assert agent.proc is not None
    try:
        body: dict[str, Any] = {
            "id": f"bench-{n}",
            "compression": transform,
            "encryption_key": PASSPHRASE if transform else "none",
            "destination": destination(s3, bucket, f"agent{n}/"),
            "backup": {"host": "h", "username": "u", "password": "p", "database": "d"},
        }
        if transform:
            body["transform"] = {"compression": "zstd", "encryption": True}
        cpu = cpu_seconds(agent.proc.pid)
        started = time.monotonic()
        status, resp = agent.request("POST", "/backup", body)
        assert status == 201, resp
        result = agent.wait_job("backup", body["id"], timeout=3600)
        elapsed = time.monotonic() - started
        assert result["status"] == "SUCCEEDED", result
        return {
            "seconds": elapsed,
            "cpu_s": cpu_seconds(agent.proc.pid) - cpu,
            "peak_mib": vm_hwm_mib(agent.proc.pid),
            "stored_bytes": result["stored_size"],
            "filename": result["filename"],
            "checksum": result["checksum"],
            "prefix": f"agent{n}/",
        }
    finally:
        agent.stop()


def destination(s3: SeaweedS3, bucket: str, prefix: str) -> dict[str, Any]:
    return {
        "type": "S3",
        "bucket": bucket,
        "region": "us-east-1",
        "endpoint": s3.endpoint_url,
        "authKey": s3.access_key,
        "authSecret": s3.secret_key,
        "skipSSL": True,
        "filenamePrefix": prefix,
    }


def restore_agent(
    base: Path, s3: SeaweedS3, bucket: str, backup: dict[str, Any], transform: bool, n: int
) -> dict[str, Any]:
    """A fresh agent restores the object ``backup`` stored; the restore script only checks
    that the file is there."""
    scripts = base / f"rscripts{n}"
    scripts.mkdir()
    write_script(scripts, "restore", 'test -s "$RESTORE_FILE"')
    agent = AgentProcess(base / f"ragent{n}", scripts).start()
    assert agent.proc is not None
    try:
        body: dict[str, Any] = {
            "id": f"restore-{n}",
            "compression": transform,
            "encryption_key": PASSPHRASE if transform else "none",
            "destination": {
                **destination(s3, bucket, backup["prefix"]),
                "filename": backup["filename"],
            },
            "restore": {"host": "h", "username": "u", "password": "p", "database": "d"},
            "checksum": backup["checksum"],
        }
        if transform:
            body["transform"] = {"compression": "zstd", "encryption": True}
        cpu = cpu_seconds(agent.proc.pid)
        started = time.monotonic()
        status, resp = agent.request("PUT", "/restore", body)
        assert status == 201, resp
        result = agent.wait_job("restore", body["id"], timeout=3600)
        elapsed = time.monotonic() - started
        assert result["status"] == "SUCCEEDED", result
        return {
            "seconds": elapsed,
            "cpu_s": cpu_seconds(agent.proc.pid) - cpu,
            "peak_mib": vm_hwm_mib(agent.proc.pid),
            "stored_bytes": backup["stored_bytes"],
        }
    finally:
        agent.stop()


def _shell_env(s3: SeaweedS3, bucket: str) -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_KEY": PASSPHRASE,
        "BENCH_ENDPOINT": s3.endpoint_url,
        "BENCH_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }


def _timed_totals(path: Path) -> tuple[float, float]:
    """Summed peak RSS (MiB) and CPU seconds of the processes GNU time measured."""
    peak = cpu = 0.0
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            peak += int(parts[0]) / 1024
            cpu += float(parts[1]) + float(parts[2])
    return peak, cpu


def restore_shell(
    base: Path, s3: SeaweedS3, bucket: str, size: int, transform: bool, n: int
) -> dict[str, Any]:
    """``downloader | openssl enc -d | zstd -d > FILE`` of the object run_shell stored."""
    downloader = base / "downloader.py"
    downloader.write_text(DOWNLOADER)
    rss = base / f"rrss{n}.txt"
    timed = TIMED.format(rss)
    out = base / f"restored{n}.bin"
    down = f'{timed} "{sys.executable}" "{downloader}" shell{n}/data'
    if transform:
        cmd = (
            f"{down} | {timed} openssl enc -d -aes-256-ctr -pbkdf2 -pass env:BENCH_KEY | "
            f'{timed} zstd -d -q -c > "{out}"'
        )
    else:
        cmd = f'{down} > "{out}"'
    started = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=_shell_env(s3, bucket))
    elapsed = time.monotonic() - started
    assert out.stat().st_size == size, "the shell pipeline restored the wrong size"
    out.unlink()
    peak, cpu = _timed_totals(rss)
    return {"seconds": elapsed, "cpu_s": cpu, "peak_mib": peak, "stored_bytes": 0}


def run_shell(
    base: Path, s3: SeaweedS3, bucket: str, source: Path, transform: bool, n: int
) -> dict[str, Any]:
    uploader = base / "uploader.py"
    uploader.write_text(UPLOADER)
    rss = base / f"rss{n}.txt"
    timed = TIMED.format(rss)
    up = f'{timed} "{sys.executable}" "{uploader}" shell{n}/data'
    if transform:
        cmd = (
            f'{timed} zstd -3 -q -c "{source}" | '
            f"{timed} openssl enc -aes-256-ctr -pbkdf2 -pass env:BENCH_KEY | {up}"
        )
    else:
        cmd = f'{timed} cat "{source}" | {up}'
    started = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=_shell_env(s3, bucket))
    elapsed = time.monotonic() - started
    peak, cpu = _timed_totals(rss)
    head = s3.client().head_object(Bucket=bucket, Key=f"shell{n}/data")
    return {
        "seconds": elapsed,
        "cpu_s": cpu,
        "peak_mib": peak,
        "stored_bytes": head["ContentLength"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50M,256M,1G", help="comma-separated sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind (medians)")
    parser.add_argument(
        "--transforms",
        default="none,zstd+encrypt",
        help="comma-separated: none, zstd+encrypt (default both)",
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    kinds = [t == "zstd+encrypt" for t in args.transforms.split(",")]
    base = Path(tempfile.mkdtemp(prefix="agent-bench-", dir=args.dir))
    s3 = SeaweedS3(base / "s3")
    rows: list[dict[str, Any]] = []
    loads = [load_text("before")]
    print(loads[0], flush=True)
    try:
        s3.start()
        bucket = s3.make_bucket()
        n = 0
        for size_text in args.sizes.split(","):
            size = parse_size(size_text)
            source = base / f"source-{size_text}.bin"
            generate(source, size)
            # Agent and shell interleaved, so that a shared machine's load favours neither.
            for _ in range(args.repeat):
                for transform in kinds:
                    n += 1
                    label = "zstd+encrypt" if transform else "none"
                    agent = run_agent(base, s3, bucket, source, transform, n)
                    shell = run_shell(base, s3, bucket, source, transform, n)
                    agent_back = restore_agent(base, s3, bucket, agent, transform, n)
                    shell_back = restore_shell(base, s3, bucket, size, transform, n)
                    for r, runner, op in (
                        (agent, "agent", "backup"),
                        (shell, "shell", "backup"),
                        (agent_back, "agent", "restore"),
                        (shell_back, "shell", "restore"),
                    ):
                        r = {k: v for k, v in r.items() if k not in ("filename", "checksum")}
                        r.update(
                            size=size_text,
                            runner=runner,
                            op=op,
                            transforms=label,
                            mib_per_s=size / (1 << 20) / r["seconds"],
                        )
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                    for key in s3.keys(bucket):
                        s3.client().delete_object(Bucket=bucket, Key=key)
            source.unlink()
    finally:
        s3.stop()
        shutil.rmtree(base, ignore_errors=True)
    loads.append(load_text("after"))
    print(loads[1])
    report(rows, loads)


def load_text(when: str) -> str:
    one, five, _ = os.getloadavg()
    return f"load average {when}: {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} cores"


def report(rows: list[dict[str, Any]], loads: list[str]) -> None:
    """Median throughput and CPU time and the largest peak memory of each kind of run, and
    the headline figures for the ``make bench`` summary."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    labels = list(dict.fromkeys(r["transforms"] for r in rows))
    kinds = [
        (z, t, op, w)
        for z in sizes
        for t in labels
        for op in ("backup", "restore")
        for w in ("agent", "shell")
    ]
    summary = {}
    for kind in kinds:
        runs = [r for r in rows if (r["size"], r["transforms"], r["op"], r["runner"]) == kind]
        summary[kind] = {
            "mib_per_s": statistics.median(r["mib_per_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_mib": max(r["peak_mib"] for r in runs),
            "stored_bytes": runs[-1]["stored_bytes"],
            "runs": len(runs),
        }
    print()
    head = ("size", "transforms", "op", "runner", "MiB/s", "CPU s", "peak MiB", "stored")
    print(
        "{:>5} {:>13} {:>7} {:>6} {:>8} {:>7} {:>9} {:>12}   (medians, largest peak)".format(*head)
    )
    for (size, t, op, runner), v in summary.items():
        print(
            f"{size:>5} {t:>13} {op:>7} {runner:>6} {v['mib_per_s']:>8.1f} {v['cpu_s']:>7.2f} "
            f"{v['peak_mib']:>9.1f} {v['stored_bytes']:>12}"
        )
    print()
    figures: list[Figure] = []
    for size in sizes:
        for t in labels:
            for op in ("backup", "restore"):
                agent, shell = summary[size, t, op, "agent"], summary[size, t, op, "shell"]
                ratio = agent["mib_per_s"] / shell["mib_per_s"]
                cpu = shell["cpu_s"] / agent["cpu_s"] if agent["cpu_s"] else float("nan")
                print(
                    f"{size:>5} {t:>13} {op:>7}: agent / shell throughput = {ratio:.2f}, "
                    f"shell CPU / agent CPU = {cpu:.2f} (target >= 1.0 with zstd+encrypt)"
                )
                if size == sizes[-1] and t == "zstd+encrypt":
                    figures.append(
                        Figure(
                            "agent_throughput",
                            f"{op} {size} zstd+AES",
                            agent["mib_per_s"],
                            "MiB/s",
                            reference="shell pipeline",
                            reference_value=shell["mib_per_s"],
                            target_ratio=1.0,
                            note=f"median of {agent['runs']}; {loads[0]}",
                        )
                    )
    for t in labels:
        peaks = ", ".join(
            f"{summary[z, t, 'backup', 'agent']['peak_mib']:.0f} MiB at {z}" for z in sizes
        )
        print(f"agent peak memory, backup {t}: {peaks}")
        peaks = ", ".join(
            f"{summary[z, t, 'restore', 'agent']['peak_mib']:.0f} MiB at {z}" for z in sizes
        )
        print(f"agent peak memory, restore {t}: {peaks}")
    if len(sizes) > 1 and "zstd+encrypt" in labels:
        small = summary[sizes[0], "zstd+encrypt", "backup", "agent"]["peak_mib"]
        large = summary[sizes[-1], "zstd+encrypt", "backup", "agent"]["peak_mib"]
        figures.append(
            Figure(
                "agent_throughput",
                f"backup peak memory growth {sizes[0]} -> {sizes[-1]}",
                large - small,
                "MiB",
                higher_is_better=False,
                target_value=64.0,
            )
        )
    print(
        f"(the upload pipeline holds up to {PART >> 20} MiB x (4 in flight + 1 being filled) "
        "of parts: a backup smaller than that never fills it)"
    )
    print("\n".join(loads))
    if figures:
        publish(figures)


if __name__ == "__main__":
    main()
