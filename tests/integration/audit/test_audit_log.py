"""The audit log on SQLite and PostgreSQL: transactional recording, the Merkle tree,
signed checkpoints, proofs, append-only triggers, and tamper detection by ``verify_log``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, bindparam, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.canonical import RecordFields, canonical_bytes
from phivault.audit.checkpoint import parse_and_verify, verifier_key
from phivault.audit.errors import AuditError
from phivault.audit.merkle import leaf_hash, root_from_leaf_hashes, verify_consistency, verify_inclusion
from phivault.audit.models import AuditCheckpoint, AuditLeaf, AuditNode, AuditPruneWindow, AuditRecord
from phivault.audit.service import RECORD_COLUMNS, Actor, RequestContext, SystemSubject, Target, record
from phivault.audit.verify import verify_log
from phivault.clock import ManualClock
from phivault.ids import new_id
from phivault.runtime import Runtime

ALICE = SystemSubject(Actor(ActorType.USER, "user-alice"), institution_id="inst-1")


def _record(runtime: Runtime, count: int = 1, *, action: AuditAction = AuditAction.AUDIT_READ) -> list[str]:
    with runtime.db.transaction() as session:
        return [
            record(
                session,
                action,
                ALICE,
                Target("exam", f"exam-{i}"),
                Outcome.SUCCESS,
                now=runtime.clock.now(),
                context=RequestContext(ip="192.0.2.7", user_agent="pytest", request_id=f"req-{i}"),
            )
            for i in range(count)
        ]


def _integrate(runtime: Runtime) -> None:
    while runtime.audit.integrate_pending(runtime.clock.now()):
        pass


def _recomputed_leaf_hashes(runtime: Runtime) -> list[bytes]:
    with runtime.db.transaction() as session:
        rows = session.execute(
            select(*RECORD_COLUMNS)
            .join(AuditLeaf, AuditLeaf.record_seq == AuditRecord.seq)
            .order_by(AuditLeaf.leaf_index)
        ).all()
    return [leaf_hash(canonical_bytes(RecordFields._make(row))) for row in rows]


def test_canonical_form_is_sorted_compact_json() -> None:
    fields = RecordFields(
        "id-1",
        ManualClock().now(),
        "user",
        "u1",
        None,
        "audit.read",
        "exam",
        "e1",
        "success",
        None,
        "ua ü",
        None,
    )
    document = json.loads(canonical_bytes(fields))
    assert (
        canonical_bytes(fields)
        == json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert document["ts"] == "2026-01-01T00:00:00.000000Z"


def test_a_record_commits_only_with_its_change(runtime: Runtime) -> None:
    def failing_change() -> None:
        with runtime.db.transaction() as session:
            record(session, AuditAction.AUDIT_READ, ALICE, None, Outcome.SUCCESS, now=runtime.clock.now())
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        failing_change()
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditRecord)) == 0


def test_records_are_written_in_the_order_they_were_recorded(runtime: Runtime) -> None:
    ids = _record(runtime, 600)  # more than one INSERT page
    with runtime.db.transaction() as session:
        assert list(session.scalars(select(AuditRecord.id).order_by(AuditRecord.seq))) == ids


def test_a_record_is_visible_to_its_own_transaction_before_commit(runtime: Runtime) -> None:
    with runtime.db.transaction() as session:
        record_id = record(
            session, AuditAction.AUDIT_READ, ALICE, None, Outcome.SUCCESS, now=runtime.clock.now()
        )
        assert session.scalar(select(AuditRecord.id).where(AuditRecord.id == record_id)) == record_id


def test_a_record_inside_a_rolled_back_savepoint_is_discarded(runtime: Runtime) -> None:
    def add(session: Session) -> str:
        return record(session, AuditAction.AUDIT_READ, ALICE, None, Outcome.SUCCESS, now=runtime.clock.now())

    def failing_savepoint(session: Session) -> None:
        with session.begin_nested():
            add(session)
            raise RuntimeError("the savepoint's change failed")

    with runtime.db.transaction() as session:
        kept = add(session)
        with pytest.raises(RuntimeError):
            failing_savepoint(session)
        also_kept = add(session)
    with runtime.db.transaction() as session:
        assert list(session.scalars(select(AuditRecord.id).order_by(AuditRecord.seq))) == [kept, also_kept]


def test_records_become_leaves_and_a_signed_checkpoint(runtime: Runtime) -> None:
    _record(runtime, 25)
    _integrate(runtime)
    checkpoint = runtime.audit.latest_checkpoint()
    assert checkpoint is not None
    assert checkpoint.size == 25
    (key_id, origin, public_key), *_ = runtime.audit.public_keys()
    signed = parse_and_verify(
        checkpoint.note, verifier_key(origin, public_key), expected_origin="phivault/local/audit"
    )
    assert signed.size == 25
    # the first checkpoint's key was created after it, so its creation event is leaf 26
    assert signed.root_hash == root_from_leaf_hashes(_recomputed_leaf_hashes(runtime)[:25])
    assert checkpoint.key_id == key_id


def test_checkpoints_follow_the_policy(runtime: Runtime, clock: ManualClock) -> None:
    _record(runtime, 3)
    _integrate(runtime)
    _record(runtime, 3)
    _integrate(runtime)
    assert runtime.audit.latest_checkpoint().size == 3  # type: ignore[union-attr]  # neither N records nor T seconds
    clock.advance(timedelta(seconds=11))
    _record(runtime, 1)
    _integrate(runtime)
    assert runtime.audit.latest_checkpoint().size == 8  # type: ignore[union-attr]  # 6 + the key-creation event + 1


def test_inclusion_and_consistency_proofs_verify(runtime: Runtime, clock: ManualClock) -> None:
    _record(runtime, 13)
    first = runtime.audit.checkpoint_now(clock.now())
    _record(runtime, 40)
    second = runtime.audit.checkpoint_now(clock.now())
    assert first is not None
    assert second is not None
    leaves = _recomputed_leaf_hashes(runtime)
    for index in (0, 7, 13, len(leaves) - 1):
        leaf, proof = runtime.audit.inclusion(index, second.size)
        assert leaf == leaves[index]
        verify_inclusion(leaf, index, second.size, proof, second.root_hash)
    verify_consistency(
        first.size,
        second.size,
        first.root_hash,
        second.root_hash,
        runtime.audit.consistency(first.size, second.size),
    )


def test_concurrent_writers_and_sequencers_lose_nothing(runtime: Runtime) -> None:
    errors: list[BaseException] = []

    def work(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                for _ in range(10):
                    fn()
            except BaseException as exc:  # noqa: BLE001  # asserted below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=work(lambda: _record(runtime, 5))) for _ in range(3)]
    threads += [
        threading.Thread(target=work(lambda: runtime.audit.integrate_pending(runtime.clock.now())))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    runtime.audit.checkpoint_now(runtime.clock.now())
    report = verify_log(runtime.db)
    assert report.ok, report.problems
    assert report.records_checked == 150 + 1  # + the checkpoint-key event
    assert report.pending_records == 0


# -- append-only -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_records SET action = 'audit.export'",
        "DELETE FROM audit_records",
        "UPDATE audit_leaves SET leaf_index = leaf_index + 100",
        "DELETE FROM audit_leaves",
        "DELETE FROM audit_nodes",
        "UPDATE audit_checkpoints SET note = 'x'",
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_signing_keys",
    ],
)
def test_the_database_refuses_to_change_the_log(runtime: Runtime, clock: ManualClock, statement: str) -> None:
    _record(runtime, 5)
    runtime.audit.checkpoint_now(clock.now())
    with (
        pytest.raises(DBAPIError, match=r"append-only|retention lock"),
        runtime.db.engine.begin() as connection,
    ):
        connection.execute(text(statement))


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_postgres_refuses_truncate(runtime: Runtime) -> None:
    _record(runtime, 1)
    with pytest.raises(DBAPIError, match="append-only"), runtime.db.engine.begin() as connection:
        connection.execute(text("TRUNCATE audit_records CASCADE"))


def test_pruning_needs_an_old_record_and_a_prune_window(runtime: Runtime, clock: ManualClock) -> None:
    clock.set(datetime.now(UTC))  # the trigger measures age against the database's clock
    clock.advance(-timedelta(days=400))  # records written over a year ago …
    old = _record(runtime, 3)
    clock.advance(timedelta(days=400))
    young = _record(runtime, 2)  # … and today
    runtime.audit.checkpoint_now(clock.now())
    with runtime.db.transaction() as session:
        seqs = dict(session.execute(select(AuditRecord.id, AuditRecord.seq)).all())
    with pytest.raises(DBAPIError, match="retention lock"), runtime.db.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": seqs[old[0]]})
    with runtime.db.transaction() as session:
        session.add(AuditPruneWindow(id=new_id(), up_to_seq=seqs[young[-1]], created_at=clock.now()))
    with runtime.db.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_records WHERE seq <= :s"), {"s": seqs[old[-1]]})
    with pytest.raises(DBAPIError, match="retention lock"), runtime.db.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": seqs[young[0]]})
    report = verify_log(runtime.db)
    assert report.ok, report.problems  # pruned records' leaves still prove the tree


# -- tampering, by someone who can switch the triggers off --------------------------------


def _without_triggers(runtime: Runtime, tamper: Callable[[Connection], object]) -> None:
    tables = ("audit_records", "audit_leaves", "audit_nodes", "audit_checkpoints")
    with runtime.db.engine.begin() as connection:
        if runtime.db.is_sqlite:
            names = (
                connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
                .scalars()
                .all()
            )
            for name in names:
                connection.execute(text(f"DROP TRIGGER {name}"))
        else:
            for table in tables:
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        tamper(connection)


@pytest.fixture
def sealed_log(runtime: Runtime, clock: ManualClock) -> Runtime:
    """A log of 64 records with checkpoints at 20, 41 and 65 leaves."""
    _record(runtime, 20)
    runtime.audit.checkpoint_now(clock.now())  # + the key event: size 21
    _record(runtime, 20)
    runtime.audit.checkpoint_now(clock.now())
    _record(runtime, 24)
    runtime.audit.checkpoint_now(clock.now())
    report = verify_log(runtime.db)
    assert report.ok, report.problems
    assert report.checkpoints_checked == 3
    return runtime


# 0: everything in the test process; 2: the test process checks leaves 0-19 of the sealed
# log, two worker processes leaves 20-39 and 40-64 (what a large log gets).
PROCESSES = pytest.mark.parametrize("processes", [0, 2])


def _seq_of_leaf(runtime: Runtime, index: int) -> int:
    with runtime.db.transaction() as session:
        return session.scalar(select(AuditLeaf.record_seq).where(AuditLeaf.leaf_index == index))  # type: ignore[return-value]


@PROCESSES
def test_one_changed_byte_is_found_at_its_leaf(sealed_log: Runtime, processes: int) -> None:
    seq = _seq_of_leaf(sealed_log, 33)
    _without_triggers(
        sealed_log,
        lambda c: c.execute(text("UPDATE audit_records SET object_id = 'exam-X' WHERE seq = :s"), {"s": seq}),
    )
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert report.first_bad_index == 33


@PROCESSES
def test_a_changed_timestamp_is_found_at_its_leaf(sealed_log: Runtime, processes: int) -> None:
    seq = _seq_of_leaf(sealed_log, 12)
    _without_triggers(
        sealed_log,
        lambda c: c.execute(
            text("UPDATE audit_records SET ts = :ts WHERE seq = :s").bindparams(
                bindparam("ts", type_=AuditRecord.ts.type)  # stored as the application stores times
            ),
            {"s": seq, "ts": datetime(2020, 1, 1, 0, 0, 1, tzinfo=UTC)},
        ),
    )
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert report.first_bad_index == 12


@PROCESSES
def test_a_timestamp_that_is_no_time_is_found_at_its_leaf(sealed_log: Runtime, processes: int) -> None:
    if not sealed_log.db.is_sqlite:
        pytest.skip("PostgreSQL's timestamptz column holds only times: nothing to forge there")
    seq = _seq_of_leaf(sealed_log, 40)
    _without_triggers(
        sealed_log,
        lambda c: c.execute(text("UPDATE audit_records SET ts = 'soon' WHERE seq = :s"), {"s": seq}),
    )
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert report.first_bad_index == 40


@PROCESSES
def test_a_deleted_record_is_found(sealed_log: Runtime, processes: int) -> None:
    seq = _seq_of_leaf(sealed_log, 5)
    _without_triggers(
        sealed_log, lambda c: c.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": seq})
    )
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert report.first_bad_index == 5


@PROCESSES
def test_a_deleted_leaf_with_its_record_is_found(sealed_log: Runtime, processes: int) -> None:
    seq = _seq_of_leaf(sealed_log, 50)

    def delete(connection: Connection) -> None:
        connection.execute(text("DELETE FROM audit_leaves WHERE leaf_index = 50"))
        connection.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": seq})

    _without_triggers(sealed_log, delete)
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert report.first_bad_index == 50


def test_swapped_records_are_found(sealed_log: Runtime) -> None:
    first, second = _seq_of_leaf(sealed_log, 10), _seq_of_leaf(sealed_log, 11)

    def swap(connection: Connection) -> None:
        connection.execute(text("UPDATE audit_leaves SET record_seq = -1 WHERE leaf_index = 10"))
        connection.execute(
            text("UPDATE audit_leaves SET record_seq = :a WHERE leaf_index = 11"), {"a": first}
        )
        connection.execute(
            text("UPDATE audit_leaves SET record_seq = :b WHERE leaf_index = 10"), {"b": second}
        )

    _without_triggers(sealed_log, swap)
    report = verify_log(sealed_log.db)
    assert not report.ok
    assert report.first_bad_index == 10


def test_a_record_inserted_into_the_middle_is_found(sealed_log: Runtime) -> None:
    seq = _seq_of_leaf(sealed_log, 0)

    def insert_in_the_middle(connection: Connection) -> None:
        connection.execute(
            text("UPDATE audit_leaves SET leaf_index = leaf_index + 1000 WHERE leaf_index >= 30")
        )
        connection.execute(
            text("UPDATE audit_leaves SET leaf_index = leaf_index - 999 WHERE leaf_index >= 1030")
        )
        stored = connection.execute(
            text("SELECT leaf_hash FROM audit_leaves WHERE leaf_index = 0")
        ).scalar_one()
        connection.execute(
            text("INSERT INTO audit_leaves (leaf_index, record_seq, leaf_hash) VALUES (30, :s, :h)"),
            {"s": seq + 100_000, "h": stored},
        )

    _without_triggers(sealed_log, insert_in_the_middle)
    report = verify_log(sealed_log.db)
    assert not report.ok
    assert report.first_bad_index == 30


@PROCESSES
def test_a_record_rewritten_together_with_its_leaf_hash_is_found_by_the_signed_root(
    sealed_log: Runtime, processes: int
) -> None:
    seq = _seq_of_leaf(sealed_log, 33)

    def rewrite(connection: Connection) -> None:
        connection.execute(text("UPDATE audit_records SET object_id = 'exam-X' WHERE seq = :s"), {"s": seq})
        row = connection.execute(select(*RECORD_COLUMNS).where(AuditRecord.seq == seq)).one()
        connection.execute(
            text("UPDATE audit_leaves SET leaf_hash = :h WHERE leaf_index = 33"),
            {"h": leaf_hash(canonical_bytes(RecordFields._make(row)))},
        )

    _without_triggers(sealed_log, rewrite)
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert "the tree of size 41 does not match its signed checkpoint" in report.problems
    assert "interior node (level 1, index 16) was altered" in report.problems
    assert report.first_bad_index == 20  # somewhere in the leaves the checkpoint of 41 added


@PROCESSES
def test_an_intact_log_verifies_the_same_in_worker_processes(sealed_log: Runtime, processes: int) -> None:
    report = verify_log(sealed_log.db, processes=processes)
    assert report.ok, report.problems
    assert (report.tree_size, report.records_checked, report.checkpoints_checked) == (65, 65, 3)


def test_a_forged_checkpoint_is_found(sealed_log: Runtime) -> None:
    def forge(connection: Connection) -> None:
        note = connection.execute(text("SELECT note FROM audit_checkpoints WHERE size = 41")).scalar_one()
        lines = note.split("\n")
        lines[1] = "40"
        connection.execute(
            text("UPDATE audit_checkpoints SET note = :n WHERE size = 41"), {"n": "\n".join(lines)}
        )

    _without_triggers(sealed_log, forge)
    report = verify_log(sealed_log.db)
    assert not report.ok
    assert any("bad signature" in problem for problem in report.problems)


def _alter_nodes(runtime: Runtime, *nodes: tuple[int, int]) -> None:
    def alter(connection: Connection) -> None:
        for level, index in nodes:
            connection.execute(
                text("UPDATE audit_nodes SET hash = :h WHERE level = :l AND node_index = :i"),
                {"h": bytes(32), "l": level, "i": index},
            )

    _without_triggers(runtime, alter)


# With two workers the levels up to 2 are checked in each range, the ones above in the test
# process: (2, 1) covers leaves 4-7 (first range), (1, 20) leaves 40-41 (third range),
# (3, 2) leaves 16-23 (across the first two ranges).
@pytest.mark.parametrize(("level", "index"), [(3, 2), (2, 1), (1, 20)])
@PROCESSES
def test_an_altered_interior_node_is_found(
    sealed_log: Runtime, processes: int, level: int, index: int
) -> None:
    _alter_nodes(sealed_log, (level, index))
    report = verify_log(sealed_log.db, processes=processes)
    assert not report.ok
    assert f"interior node (level {level}, index {index}) was altered" in report.problems
    assert report.first_bad_index == index << level  # the first leaf the node covers


@PROCESSES
def test_of_several_altered_nodes_the_lowest_is_reported(sealed_log: Runtime, processes: int) -> None:
    _alter_nodes(sealed_log, (3, 2), (1, 20), (2, 12))
    report = verify_log(sealed_log.db, processes=processes)
    assert [problem for problem in report.problems if "interior node" in problem] == [
        "interior node (level 1, index 20) was altered"
    ]


def test_nodes_and_leaves_are_all_stored(sealed_log: Runtime) -> None:
    with sealed_log.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditLeaf)) == 65
        # every perfect subtree above the leaves: 32+16+8+4+2+1 for the first 64 leaves
        assert session.scalar(select(func.count()).select_from(AuditNode)) == 63
        assert session.scalar(select(func.count()).select_from(AuditCheckpoint)) == 3


@PROCESSES
def test_prune_deletes_only_old_integrated_records_and_the_log_still_verifies(
    runtime: Runtime, clock: ManualClock, processes: int
) -> None:
    clock.set(datetime.now(UTC) - timedelta(days=400))
    old = _record(runtime, 4)
    runtime.audit.checkpoint_now(clock.now())
    clock.set(datetime.now(UTC))
    young = _record(runtime, 3)
    runtime.audit.checkpoint_now(clock.now())
    operator = SystemSubject(Actor(ActorType.USER, "operator-1"))
    cutoff = clock.now() - timedelta(days=300)
    with runtime.db.transaction() as session:
        older = session.scalar(select(func.count()).where(AuditRecord.ts < cutoff))
    assert older == len(old) + 1  # and the checkpoint key's creation, written back then
    deleted = runtime.audit.prune(operator, before=cutoff, retention=timedelta(days=183), now=clock.now())
    assert deleted == older
    with runtime.db.transaction() as session:
        left = set(session.scalars(select(AuditRecord.id)))
    assert not left & set(old)
    assert set(young) <= left
    report = verify_log(runtime.db, processes=processes)
    assert report.ok, report.problems


def test_prune_refuses_the_retention_lock(runtime: Runtime, clock: ManualClock) -> None:
    _record(runtime, 2)
    operator = SystemSubject(Actor(ActorType.USER, "operator-1"))
    with pytest.raises(AuditError, match="retention lock"):
        runtime.audit.prune(
            operator, before=clock.now() - timedelta(days=30), retention=timedelta(days=183), now=clock.now()
        )
