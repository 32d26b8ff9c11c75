"""How fast replicas drain the job queue: the runner's claim (a conditional ``update_one``
guarded by the ``one_running_job_per_instance`` index) beside the reference
``find_one_and_update`` claim, on the embedded SecantusDB.

    .venv/bin/python benchmarks/runner_claims.py [--jobs 400] [--instances 100] [--replicas 3]

Each round queues ``--jobs`` jobs over ``--instances`` instances, then ``--replicas``
concurrent claimers (each its own client) claim until the queue is empty, ending every job
they claim at once so that the instance's next job becomes claimable. Reported: claims per
second and the median / 95th percentile latency of one successful claim (candidates read
included), for

- ``runner``: ``backup.jobs.claimable`` + ``backup.jobs.claim`` + ``backup.jobs.finish``
  (what the job runner does);
- ``reference``: one ``find_one_and_update`` per claim ({status: QUEUED} -> RUNNING, oldest
  first), the usual textbook queue pop, ended the same way. It does not serialise per
  instance (it would run two jobs of one instance at once), so it does less than the runner.

Both must end with every job claimed exactly once (checked). Figures move with the machine's
load; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymongo import ASCENDING, ReturnDocument  # noqa: E402

from backup import jobs  # noqa: E402
from backup.database import Database, connect  # noqa: E402
from backup.embedded_db import EmbeddedMongo  # noqa: E402


async def _queue(store: Database, n_jobs: int, n_instances: int) -> None:
    docs = []
    for n in range(n_jobs):
        doc = jobs.new_job(
            instance_id=f"instance-{n % n_instances}",
            type="BACKUP",
            plan_id=f"plan-{n}",
            destination_id="d",
            trigger="MANUAL",
            items=[jobs.new_item("db")],
            compression=False,
            encryption={"enabled": False},
        )
        docs.append(doc)
    await store.jobs.insert_many(docs)


async def _runner_claimer(
    store: Database, owner: str, latencies: list[float], claimed: list[str]
) -> None:
    while True:
        start = time.perf_counter()
        now = datetime.now(UTC)
        got = None
        for cand in await jobs.claimable(store, now, limit=4):
            got = await jobs.claim(
                store, cand, owner=owner, at=now, lease_seconds=30, deadline_seconds=3600
            )
            if got:
                break
        if got is None:
            if await store.jobs.count_documents({"status": {"$in": ["QUEUED", "RUNNING"]}}) == 0:
                return
            await asyncio.sleep(0.001)
            continue
        latencies.append(time.perf_counter() - start)
        claimed.append(got.job_id)
        await jobs.finish(store, got, "SUCCEEDED", None, at=datetime.now(UTC))


async def _reference_claimer(
    store: Database, owner: str, latencies: list[float], claimed: list[str]
) -> None:
    while True:
        start = time.perf_counter()
        doc = await store.jobs.find_one_and_update(
            {"status": "QUEUED"},
            {"$set": {"status": "RUNNING", "lease_owner": owner}, "$inc": {"attempts": 1}},
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return
        latencies.append(time.perf_counter() - start)
        claimed.append(doc["_id"])
        await store.jobs.update_one(
            {"_id": doc["_id"], "lease_owner": owner},
            {"$set": {"status": "SUCCEEDED", "lease_owner": None}},
        )


async def _round(url: str, kind: str, args: argparse.Namespace) -> dict[str, float]:
    name = f"bench_{kind}_{uuid.uuid4().hex[:8]}"
    setup = connect(url, name)
    await setup.ensure_indexes()
    await _queue(setup, args.jobs, args.instances)
    stores = [connect(url, name) for _ in range(args.replicas)]
    latencies: list[float] = []
    claimed: list[str] = []
    claimer = _runner_claimer if kind == "runner" else _reference_claimer
    start = time.perf_counter()
    await asyncio.gather(
        *(claimer(s, f"replica-{i}", latencies, claimed) for i, s in enumerate(stores))
    )
    elapsed = time.perf_counter() - start
    assert len(claimed) == len(set(claimed)) == args.jobs, (kind, len(claimed), len(set(claimed)))
    for s in stores:
        await s.close()
    await setup.client.drop_database(name)
    await setup.close()
    latencies.sort()
    return {
        "claims_per_s": args.jobs / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
    }


async def main(args: argparse.Namespace) -> None:
    server = EmbeddedMongo(None)
    server.start()
    try:
        results = {kind: await _round(server.url, kind, args) for kind in ("runner", "reference")}
    finally:
        server.stop()
    print(
        f"{args.jobs} jobs over {args.instances} instances, {args.replicas} concurrent "
        "claimers, embedded SecantusDB (figures move with the machine's load)"
    )
    print(f"{'claim':>10} {'claims/s':>10} {'p50 ms':>8} {'p95 ms':>8}")
    for kind, r in results.items():
        print(f"{kind:>10} {r['claims_per_s']:>10.1f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f}")
    ratio = results["runner"]["claims_per_s"] / results["reference"]["claims_per_s"]
    print(f"runner / reference throughput: {ratio:.2f}")
    from benchmarks._harness import Figure, report

    report(
        [
            Figure("runner_claims", f"claims, {args.replicas} claimers",
                   results["runner"]["claims_per_s"], "claims/s", "one findOneAndUpdate",
                   results["reference"]["claims_per_s"])
        ]
    )  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
