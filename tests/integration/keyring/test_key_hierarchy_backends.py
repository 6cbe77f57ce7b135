"""The whole key hierarchy on every keyring backend: local, SoftHSM2 (PKCS#11) and OpenBao.

Objects and fields round-trip, a root rotation re-wraps institution keys inside the HSM or
OpenBao and retires the old root version there, and shredding works the same everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from phivault.audit.service import Actor, SystemSubject
from phivault.clock import ManualClock
from phivault.config.settings import Settings
from phivault.crypto.errors import KeyShredded
from phivault.crypto.models import PurgeReason
from phivault.crypto.rotation import run_rotation_batch, start_rotation
from phivault.crypto.service import ObjectContext
from phivault.runtime import Runtime, build_runtime, initialise
from servers.keyrings import KeyringBackend

OPERATOR = SystemSubject(Actor.system("test"))


@pytest.fixture
def backend_runtime(
    settings: Settings, clock: ManualClock, keyring_backend: KeyringBackend
) -> Iterator[Runtime]:
    changed = Settings(
        **{
            **settings.model_dump(),
            "keyring_url": keyring_backend.url,
            "master_key_file": keyring_backend.master_key_path,
        }
    )
    runtime = build_runtime(changed, clock=clock)
    initialise(runtime)
    runtime.keyring.check()
    yield runtime
    runtime.close()


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
def test_hierarchy_round_trips_rotates_and_shreds_on_every_keyring(backend_runtime: Runtime) -> None:
    runtime = backend_runtime
    keys = runtime.keys
    now = runtime.clock.now
    with runtime.db.transaction() as session:
        keys.new_institution_key(session, "inst-a", now())
        alice = ObjectContext("inst-a", keys.new_patient_key(session, "inst-a", now()), "exam")
        bob = ObjectContext("inst-a", keys.new_patient_key(session, "inst-a", now()), "exam")
    data = b"cine loop " * 50_000
    with runtime.db.transaction() as session:
        stored = keys.encrypt_object(runtime.store, io.BytesIO(data), session=session, context=alice)
        name = keys.encrypt_field(session, bob.patient_key_id, "DOE^BOB", aad=b"name")
        before = runtime.store.size(stored.key)

    with runtime.db.transaction() as session:
        progress = start_rotation(keys, session, institution_id=None, actor=OPERATOR, now=now())
    while not progress.done:
        if progress.settle_until is not None:
            runtime.clock.set(progress.settle_until)  # type: ignore[attr-defined]
        with runtime.db.transaction() as session:
            progress = run_rotation_batch(keys, session, progress.id, now=now())
    assert progress.retired_version == 1
    assert [(v.version, v.retired) for v in runtime.keyring.versions()][-2:] == [(1, True), (2, False)]

    keys.forget_all()  # the institution key comes from the backend again, under version 2
    with runtime.db.transaction() as session:
        opened = keys.open_object(runtime.store, stored.key, session=session, context=alice)
        assert opened.read(0, len(data)) == data
        assert keys.decrypt_field(session, bob.patient_key_id, name, aad=b"name") == b"DOE^BOB"
    assert runtime.store.size(stored.key) == before

    with runtime.db.transaction() as session:
        keys.destroy_patient_key(
            session, alice.patient_key_id, actor=OPERATOR, reason=PurgeReason.ERASURE_REQUEST, now=now()
        )
    with pytest.raises(KeyShredded), runtime.db.transaction() as session:
        keys.open_object(runtime.store, stored.key, session=session, context=alice)
