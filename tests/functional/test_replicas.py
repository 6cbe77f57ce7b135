"""Two ``phivault serve`` replicas sharing one PostgreSQL and one S3 bucket (DESIGN.md §8)."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from factories.accounts import login
from phivault.db.engine import Database
from phivault.db.jobs import enqueue
from phivault.db.models import Job, JobRun
from phivault.ids import new_id
from phivault.runtime import SELFTEST_JOB
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env
from servers.postgres import PostgresServer
from servers.s3 import S3Server

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

JOBS = 150


@pytest.fixture
def replicas(
    tmp_path: Path, postgres_server: PostgresServer, s3_server: S3Server
) -> Iterator[tuple[PhivaultServer, ...]]:
    suffix = new_id().replace("-", "")[:12]
    bucket = s3_server.create_bucket(f"replicas-{suffix}")
    shared = {
        "database_url": postgres_server.create_database(f"main_{suffix}"),
        "phi_database_url": postgres_server.create_database(f"phi_{suffix}"),
        "object_store_url": s3_server.url_for(bucket),
        "job_poll_seconds": "0.05",
    }
    servers = []
    for name in ("a", "b"):
        env = {**phivault_env(tmp_path / name / "data", **shared), **s3_server.env()}
        servers.append(PhivaultServer(tmp_path / name / "data", env=env))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        for server in servers:
            server.start()
        yield tuple(servers)
    finally:
        for server in servers:
            server.kill()


def test_both_replicas_serve_and_run_each_job_exactly_once(replicas: tuple[PhivaultServer, ...]) -> None:
    for replica in replicas:
        with replica.client() as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
    url = replicas[0].env["PHIVAULT_DATABASE_URL"]
    db = Database(url)
    try:
        now = datetime.now(UTC)
        with db.transaction() as session:
            job_ids = [enqueue(session, SELFTEST_JOB, {}, now=now) for _ in range(JOBS)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with db.transaction() as session:
                pending = session.scalar(
                    select(func.count()).where(Job.id.in_(job_ids), Job.status != "succeeded")
                )
            if pending == 0:
                break
            time.sleep(0.2)
        with db.transaction() as session:
            statuses = Counter(session.scalars(select(Job.status).where(Job.id.in_(job_ids))))
            runs = session.execute(
                select(JobRun.job_id, JobRun.worker, JobRun.outcome).where(JobRun.job_id.in_(job_ids))
            ).all()
    finally:
        db.dispose()
    assert statuses == {"succeeded": JOBS}
    per_job = Counter(job_id for job_id, _, _ in runs)
    assert set(per_job.values()) == {1}, "a job ran more than once"
    assert len(per_job) == JOBS
    assert {outcome for _, _, outcome in runs} == {"succeeded"}
    workers = Counter(worker.split(":")[1] for _, worker, _ in runs)  # host:pid:random
    assert len(workers) == 2, f"both replicas should have taken jobs: {workers}"


def test_a_session_from_one_replica_works_on_the_other_and_ends_on_both(
    replicas: tuple[PhivaultServer, ...],
) -> None:
    first, second = replicas
    outputs = [replica.output() for replica in replicas]
    assert sum("one-time password" in output for output in outputs) == 1, "one bootstrap operator, not two"
    env = first.env
    institution = subprocess.run(
        [PHIVAULT, "institution", "create", "Replica Hospital", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    institution_id = json.loads(institution.stdout)["id"]
    subprocess.run(
        [
            PHIVAULT,
            "user",
            "create",
            "--institution",
            institution_id,
            "--email",
            "rep@example.org",
            "--role",
            "clinician",
            "--password-stdin",
        ],
        env=env,
        input="plain sailing through november\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    with first.client() as a, second.client() as b:
        tokens = login(a, "rep@example.org", "plain sailing through november").json()
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert b.get("/api/v1/auth/me", headers=headers).status_code == 200
        rotated = b.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).json()
        # the spent refresh token, replayed on the other replica, ends the session there too
        replay = a.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert replay.json()["code"] == "invalid_grant"
        new_headers = {"Authorization": f"Bearer {rotated['access_token']}"}
        assert b.get("/api/v1/auth/me", headers=new_headers).status_code == 401
        assert a.get("/api/v1/auth/me", headers=new_headers).status_code == 401

        again = login(b, "rep@example.org", "plain sailing through november").json()
        headers = {"Authorization": f"Bearer {again['access_token']}"}
        assert a.get("/api/v1/auth/me", headers=headers).status_code == 200
        assert a.post("/api/v1/auth/logout", headers=headers).status_code == 204
        assert b.get("/api/v1/auth/me", headers=headers).status_code == 401
        assert a.get("/api/v1/auth/me", headers=headers).status_code == 401
