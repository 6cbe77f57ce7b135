"""Benchmark of the audit log.

    .venv/bin/python bench/audit.py [--records 1000000] [--write-docs]

Measures, in one run:

* append throughput of ``audit.record`` (events/s, one process, batched 500 per
  transaction) on SQLite and on PostgreSQL 15 (a throwaway cluster started here), and the
  sequencer's throughput integrating them into the Merkle tree; median of three rounds;
* ``verify_log`` over ``--records`` records (target: 1 000 000 in < 10 s), as
  ``phivault audit verify`` runs it (worker processes, one per CPU) and in one process;
* inclusion-proof latency at that size (p50/p95 of 1000 random proofs; target < 5 ms).

The machine's load average is printed (and written) before and after: other work on the
same cores shows up in every figure.

Targets from issue 4: ≥ 5 000 appends/s batched, verify of 1 M records < 10 s, proof < 5 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert

from perfdoc import git_revision, machine, write_section
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, RequestContext, SystemSubject, Target, record
from phivault.audit.verify import default_processes, verify_log
from phivault.clock import SystemClock
from phivault.config.settings import load_settings
from phivault.ids import new_id
from phivault.runtime import Runtime, build_runtime, initialise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers.postgres import PostgresServer  # the test suite's throwaway cluster

APPEND_EVENTS = 20_000
BATCH = 500
ROUNDS = 3
PROOFS = 1000
SUBJECT = SystemSubject(Actor(ActorType.USER, "bench-user"), "bench-institution")
CONTEXT = RequestContext(ip="192.0.2.1", user_agent="bench", request_id="bench")


@dataclass
class AppendResult:
    backend: str
    appends_per_s: list[float]
    integrate_per_s: list[float]

    def cells(self) -> str:
        return " | ".join(
            f"{statistics.median(rates):,.0f} ({min(rates):,.0f} to {max(rates):,.0f})"
            for rates in (self.appends_per_s, self.integrate_per_s)
        )


@contextmanager
def runtime_for(backend: str, workdir: Path, postgres: PostgresServer | None) -> Iterator[Runtime]:
    data = workdir / backend
    data.mkdir(mode=0o700)
    if backend == "postgresql":
        assert postgres is not None  # noqa: S101
        suffix = new_id()[:8]
        settings = load_settings(
            data_dir=data,
            database_url=postgres.create_database(f"bench_{suffix}"),
            phi_database_url=postgres.create_database(f"bench_phi_{suffix}"),
        )
    else:
        settings = load_settings(data_dir=data)
    runtime = build_runtime(settings, clock=SystemClock())
    initialise(runtime)
    try:
        yield runtime
    finally:
        runtime.close()


def measure_appends(runtime: Runtime, backend: str) -> AppendResult:
    result = AppendResult(backend, [], [])
    for _ in range(ROUNDS):
        appends, integrated = append_round(runtime)
        result.appends_per_s.append(appends)
        result.integrate_per_s.append(integrated)
    return result


def append_round(runtime: Runtime) -> tuple[float, float]:
    """(appends/s, integrated/s) of one round of ``APPEND_EVENTS`` records."""
    started = time.perf_counter()
    for _ in range(APPEND_EVENTS // BATCH):
        with runtime.db.transaction() as session:
            now = runtime.clock.now()
            for i in range(BATCH):
                record(
                    session,
                    AuditAction.AUDIT_READ,
                    SUBJECT,
                    Target("exam", str(i)),
                    Outcome.SUCCESS,
                    now=now,
                    context=CONTEXT,
                )
    appended = time.perf_counter() - started
    started = time.perf_counter()
    while runtime.audit.integrate_pending(runtime.clock.now()):
        pass
    integrated = time.perf_counter() - started
    return APPEND_EVENTS / appended, APPEND_EVENTS / integrated


def bulk_load(runtime: Runtime, count: int) -> float:
    """Insert ``count`` records fast (bulk INSERT, not the benchmark's subject) and integrate them.

    Each record has its own timestamp and request id, as in a real log.
    """
    start_time = runtime.clock.now() - dt.timedelta(microseconds=count)
    chunk = 20_000
    for start in range(0, count, chunk):
        rows = [
            {
                "id": new_id(), "ts": start_time + dt.timedelta(microseconds=i), "actor_type": "user",
                "actor_id": f"u{i % 97}", "institution_id": f"inst-{i % 7}", "action": "exam.read",
                "object_type": "exam", "object_id": f"exam-{i}", "outcome": "success",
                "ip": f"192.0.2.{i % 251}", "user_agent": "bench", "request_id": f"req-{i}",
            }
            for i in range(start, min(start + chunk, count))
        ]  # fmt: skip
        with runtime.db.transaction() as session:
            session.execute(insert(AuditRecord), rows)
    started = time.perf_counter()
    while runtime.audit.integrate_pending(runtime.clock.now(), limit=20_000):
        pass
    runtime.audit.checkpoint_now(runtime.clock.now())
    return time.perf_counter() - started


def proof_latencies(runtime: Runtime, size: int) -> list[float]:
    rng = random.Random(7)  # noqa: S311  # reproducible choice of leaves, not a secret
    latencies = []
    for _ in range(PROOFS):
        index = rng.randrange(size)
        started = time.perf_counter()
        runtime.audit.inclusion(index, size)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def timed_verify(runtime: Runtime, processes: int | None) -> tuple[float, int]:
    """Seconds ``verify_log`` took, and how many worker processes it used."""
    started = time.perf_counter()
    report = verify_log(runtime.db, processes=processes)
    seconds = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(f"verify failed: {report.problems[:3]}")
    workers = processes if processes is not None else default_processes(report.tree_size)
    print(f"verify ({workers} worker processes): {seconds:.1f} s for {report.records_checked:,} records")
    return seconds, workers


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="log size for verify and proofs")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    arguments = parser.parse_args(argv)

    load_before = load()
    print(f"load average (1/5/15 min): {load_before}")
    postgres = PostgresServer()
    postgres.start()
    appends: list[AppendResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="phivault-bench-audit-") as tmp:
            workdir = Path(tmp)
            for backend in ("sqlite", "postgresql"):
                with runtime_for(backend, workdir, postgres) as runtime:
                    result = measure_appends(runtime, backend)
                    appends.append(result)
                    print(f"{backend}: appends/s | integrated/s: {result.cells()}")
            with runtime_for("large", workdir, None) as runtime:
                integrate_seconds = bulk_load(runtime, arguments.records)
                size = runtime.audit.tree_size()
                print(f"integrated {size:,} records in {integrate_seconds:.1f} s")
                verify_seconds, workers = timed_verify(runtime, None)
                single_seconds, _ = timed_verify(runtime, 0)
                latencies = proof_latencies(runtime, size)
                p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
                print(f"inclusion proof at {size:,}: p50 {p50:.2f} ms, p95 {p95:.2f} ms")
    finally:
        postgres.remove()
    load_after = load()
    print(f"load average (1/5/15 min): {load_after}")

    if arguments.write_docs:
        today = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}"
        rows = "\n".join(f"| {r.backend} | {r.cells()} |" for r in appends)
        write_section(
            "audit.py",
            f"""## Audit log (bench/audit.py)

`.venv/bin/python bench/audit.py --records {arguments.records} --write-docs` on {today} at
{git_revision()}; {machine()}. Load average (1/5/15 min) {load_before} before the run and
{load_after} after it: on a 2-core machine anything above about 1 means other work shared the
cores and every figure below is lower than on an idle machine.

Appending: {APPEND_EVENTS:,} `audit.record` calls, {BATCH} per transaction, one process (target ≥ 5 000/s);
then the sequencer integrating them into the Merkle tree (leaves, nodes, tree head). Median
of {ROUNDS} rounds, slowest to fastest in brackets.

| database | appends/s | integrated/s |
|---|---:|---:|
{rows}

Verifying and proving at {size:,} records (SQLite):

| measurement | result | target |
|---|---:|---:|
| `verify_log`, {workers} worker processes (the default here) | {verify_seconds:.1f} s | < 10 s |
| `verify_log`, one process | {single_seconds:.1f} s | |
| inclusion proof, p50 of {PROOFS} random leaves | {p50:.2f} ms | |
| inclusion proof, p95 | {p95:.2f} ms | < 5 ms |
| sequencing the {size:,} records (bulk-inserted first) | {integrate_seconds:.1f} s | |

`verify_log` checks every leaf against its record, every interior node, every checkpoint
signature and the consistency of consecutive checkpoints.
""",
        )
        print("updated docs/performance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
