"""Agent backup throughput and peak memory versus the equivalent shell pipeline.

    .venv/bin/python benchmarks/agent_throughput.py --sizes 64M,1G

For each size: a generated file (half text-like, half random: compressible-ish) is backed up
through a real agent process into a local SeaweedFS, with the agent's zstd + AES-256-GCM
transforms off and on; beside it, ``zstd | openssl enc -aes-256-cbc -pbkdf2 | uploader`` and
``cat | uploader`` (boto3 upload_fileobj from stdin) upload the same file to the same server.
Peak memory: the agent's VmHWM (a fresh agent per run), the pipeline's largest process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agent.helpers import AgentProcess, write_script  # noqa: E402
from tests.servers.ports import free_port, wait_listening  # noqa: E402

ACCESS, SECRET, BUCKET = "benchkey", "benchsecret", "bench"
STANDIN = importlib.util.find_spec("storage.s3") is None
UPLOADER = r"""
import resource, sys, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],
                  aws_secret_access_key=sys.argv[3], region_name="us-east-1")
cfg = TransferConfig(multipart_chunksize=16 * 1024 * 1024, max_concurrency=4)
s3.upload_fileobj(sys.stdin.buffer, sys.argv[4], sys.argv[5], Config=cfg)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def generate(path: Path, size: int) -> None:
    rng = random.Random(42)
    words = [
        b"backup",
        b"restore",
        b"postgres",
        b"row",
        b"value",
        b"2026-01-02",
        b"insert into",
        b"NULL",
    ]
    text = b" ".join(rng.choice(words) + str(rng.randrange(10**6)).encode() for _ in range(120_000))
    block = 1 << 20
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            chunk = (
                text[(i * 7919) % (len(text) - block) :][:block]
                if i % 2 == 0
                else os.urandom(block)
            )
            chunk = chunk[: size - written]
            f.write(chunk)
            written += len(chunk)
            i += 1


class Weed:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        data = self.base / "weed"
        data.mkdir()
        ports = {
            "s3.port": self.port,
            "s3.port.grpc": free_port(),
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "admin.port": free_port(),
            "admin.port.grpc": free_port(),
            "webdav.port": free_port(),
        }
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-{k}={v}" for k, v in ports.items()] + ["-admin.ui=false"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=open(self.base / "weed.log", "wb")
        )
        wait_listening(self.port, timeout=60, proc=self.proc)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                s3.create_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_agent(base: Path, weed: Weed, source: Path, transform: bool, n: int) -> dict:
    scripts = base / f"scripts{n}"
    scripts.mkdir()
    write_script(scripts, "backup", f'ln "{source}" "$BACKUP_DIRECTORY/data.bin"')
    work = base / f"agent{n}"
    work.mkdir()
    agent = AgentProcess(work, scripts)
    if STANDIN:
        agent.start_cmd = [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'benchmarks'); import agent_s3_standin as s; "
            "s.run_agent()",
        ]
    agent.start()
    assert agent.proc is not None
    try:
        body = {
            "id": f"bench-{n}",
            "compression": transform,
            "encryption_key": "bench-passphrase" if transform else "none",
            "destination": {
                "type": "S3",
                "bucket": BUCKET,
                "region": "us-east-1",
                "endpoint": weed.endpoint,
                "authKey": ACCESS,
                "authSecret": SECRET,
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
            "peak_rss_mib": vm_hwm_kib(agent.proc.pid) / 1024,
            "stored_bytes": result["stored_size"],
        }
    finally:
        agent.stop()


def run_shell(base: Path, weed: Weed, source: Path, transform: bool, n: int) -> dict:
    uploader = base / "uploader.py"
    uploader.write_text(UPLOADER)
    key = f"shell{n}/data"
    up = f'"{sys.executable}" "{uploader}" {weed.endpoint} {ACCESS} {SECRET} {BUCKET} {key}'
    timing = base / f"time{n}.txt"
    tm = f"/usr/bin/time -a -o {timing} -f %M"
    if transform:
        cmd = (
            f'{tm} zstd -3 -q -c "{source}" | '
            f"{tm} openssl enc -aes-256-cbc -pbkdf2 -pass env:BENCH_KEY | {tm} {up}"
        )
    else:
        cmd = f'{tm} cat "{source}" | {tm} {up}'
    env = {**os.environ, "BENCH_KEY": "bench-passphrase"}
    started = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env, capture_output=True)
    elapsed = time.monotonic() - started
    peaks = [int(x) for x in timing.read_text().split() if x.isdigit()]
    return {"seconds": elapsed, "peak_rss_mib": max(peaks) / 1024, "stored_bytes": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64M,1G")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="agent-bench-", dir=args.dir))
    if STANDIN:
        print("storage/s3.py not found: the agent uses benchmarks/agent_s3_standin.py", flush=True)
    weed = Weed(base)
    rows = []
    try:
        weed.start()
        n = 0
        for size_text in args.sizes.split(","):
            size = parse_size(size_text)
            source = base / f"source-{size_text}.bin"
            generate(source, size)
            for transform in (False, True):
                for runner, name in ((run_agent, "agent"), (run_shell, "shell")):
                    n += 1
                    r = runner(base, weed, source, transform, n)
                    r.update(
                        size=size_text,
                        runner=name,
                        transforms="zstd+encrypt" if transform else "none",
                        mib_per_s=size / (1 << 20) / r["seconds"],
                    )
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            source.unlink()
    finally:
        weed.stop()
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(
        f"{'size':>5} {'transforms':>13} {'runner':>6} {'MiB/s':>8} {'peak MiB':>9} {'stored':>12}"
    )
    for r in rows:
        stored = r["stored_bytes"] if r["stored_bytes"] is not None else "-"
        print(
            f"{r['size']:>5} {r['transforms']:>13} {r['runner']:>6} {r['mib_per_s']:>8.1f} "
            f"{r['peak_rss_mib']:>9.1f} {stored!s:>12}"
        )
    for size in dict.fromkeys(r["size"] for r in rows):
        for t in ("none", "zstd+encrypt"):
            a = next(
                r for r in rows if (r["size"], r["transforms"], r["runner"]) == (size, t, "agent")
            )
            s = next(
                r for r in rows if (r["size"], r["transforms"], r["runner"]) == (size, t, "shell")
            )
            print(f"{size} {t}: agent/shell throughput = {a['mib_per_s'] / s['mib_per_s']:.2f}")


if __name__ == "__main__":
    main()
