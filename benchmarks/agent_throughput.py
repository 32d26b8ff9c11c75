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

``uploader`` is boto3's ``upload_fileobj`` reading stdin, with the agent's default part size
(8 MiB) and concurrency (4). Throughput is input bytes per second of wall time from the request to
the stored object. Peak memory: the agent process's VmHWM (a fresh agent per run), and for
the shell pipeline the sum of its processes' maximum RSS (GNU time). Each kind runs
``--repeat`` times, agent and shell interleaved; the summary shows the median throughput and
the largest peak. The agent's peaks at
50 MiB, 256 MiB and 1 GiB show whether memory depends on the backup size.
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


def run_agent(base: Path, s3: SeaweedS3, bucket: str, source: Path, transform: bool, n: int):
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
            "destination": {
                "type": "S3",
                "bucket": bucket,
                "region": "us-east-1",
                "endpoint": s3.endpoint_url,
                "authKey": s3.access_key,
                "authSecret": s3.secret_key,
                "skipSSL": True,
                "filenamePrefix": f"agent{n}/",
            },
            "backup": {"host": "h", "username": "u", "password": "p", "database": "d"},
        }
        if transform:
            body["transform"] = {"compression": "zstd", "encryption": True}
        started = time.monotonic()
        status, resp = agent.request("POST", "/backup", body)
        assert status == 201, resp
        result = agent.wait_job("backup", body["id"], timeout=3600)
        elapsed = time.monotonic() - started
        assert result["status"] == "SUCCEEDED", result
        return {
            "seconds": elapsed,
            "peak_mib": vm_hwm_mib(agent.proc.pid),
            "stored_bytes": result["stored_size"],
        }
    finally:
        agent.stop()


def run_shell(base: Path, s3: SeaweedS3, bucket: str, source: Path, transform: bool, n: int):
    uploader = base / "uploader.py"
    uploader.write_text(UPLOADER)
    rss = base / f"rss{n}.txt"
    timed = f"/usr/bin/time -a -o {rss} -f %M"
    up = f'{timed} "{sys.executable}" "{uploader}" shell{n}/data'
    if transform:
        cmd = (
            f'{timed} zstd -3 -q -c "{source}" | '
            f"{timed} openssl enc -aes-256-ctr -pbkdf2 -pass env:BENCH_KEY | {up}"
        )
    else:
        cmd = f'{timed} cat "{source}" | {up}'
    env = {
        **os.environ,
        "BENCH_KEY": PASSPHRASE,
        "BENCH_ENDPOINT": s3.endpoint_url,
        "BENCH_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }
    started = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env)
    elapsed = time.monotonic() - started
    peaks = [int(x) / 1024 for x in rss.read_text().split() if x.isdigit()]
    head = s3.client().head_object(Bucket=bucket, Key=f"shell{n}/data")
    return {"seconds": elapsed, "peak_mib": sum(peaks), "stored_bytes": head["ContentLength"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50M,256M,1G", help="comma-separated sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind (medians)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="agent-bench-", dir=args.dir))
    s3 = SeaweedS3(base / "s3")
    rows: list[dict[str, Any]] = []
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
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
                for transform in (False, True):
                    for runner, name in ((run_agent, "agent"), (run_shell, "shell")):
                        n += 1
                        r = runner(base, s3, bucket, source, transform, n)
                        r.update(
                            size=size_text,
                            runner=name,
                            transforms="zstd+encrypt" if transform else "none",
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
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    report(rows)


def report(rows: list[dict[str, Any]]) -> None:
    """Median throughput and the largest peak memory of each kind of run."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    kinds = [(z, t, w) for z in sizes for t in ("none", "zstd+encrypt") for w in ("agent", "shell")]
    summary = {}
    for kind in kinds:
        runs = [r for r in rows if (r["size"], r["transforms"], r["runner"]) == kind]
        summary[kind] = {
            "mib_per_s": statistics.median(r["mib_per_s"] for r in runs),
            "peak_mib": max(r["peak_mib"] for r in runs),
            "stored_bytes": runs[-1]["stored_bytes"],
            "runs": len(runs),
        }
    print()
    head = ("size", "transforms", "runner", "MiB/s", "peak MiB", "stored")
    print("{:>5} {:>13} {:>6} {:>8} {:>9} {:>12}   (median MiB/s, largest peak)".format(*head))
    for (size, t, runner), v in summary.items():
        print(
            f"{size:>5} {t:>13} {runner:>6} {v['mib_per_s']:>8.1f} "
            f"{v['peak_mib']:>9.1f} {v['stored_bytes']:>12}"
        )
    print()
    for size in sizes:
        for t in ("none", "zstd+encrypt"):
            ratio = summary[size, t, "agent"]["mib_per_s"] / summary[size, t, "shell"]["mib_per_s"]
            print(f"{size:>5} {t:>13}: agent / shell throughput = {ratio:.2f} (target >= 0.8)")
    for t in ("none", "zstd+encrypt"):
        peaks = ", ".join(f"{summary[z, t, 'agent']['peak_mib']:.0f} MiB at {z}" for z in sizes)
        print(f"agent peak memory, {t}: {peaks}")
    print(
        f"(the upload pipeline holds up to {PART >> 20} MiB x (4 in flight + 1 being filled) "
        "of parts: a backup smaller than that never fills it)"
    )


if __name__ == "__main__":
    main()
