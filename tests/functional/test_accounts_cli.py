"""``phivault institution`` / ``phivault user`` as set-up scripts use them, and the
bootstrap operator of the first ``serve``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from factories.accounts import login
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

PASSWORD = "plain sailing through november"


def run(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_scripted_set_up_needs_no_prompts(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    created = run("institution", "create", "Mercy General", "--json", env=env)
    assert created.returncode == 0, created.stderr
    institution = json.loads(created.stdout)
    assert set(institution) == {"id", "name", "region"}
    assert institution["name"] == "Mercy General"
    assert institution["region"] == "local"
    listed = json.loads(run("institution", "list", "--json", env=env).stdout)
    assert [row["id"] for row in listed] == [institution["id"]]

    user = run(
        "user",
        "create",
        "--institution",
        institution["id"],
        "--email",
        "ada@example.org",
        "--role",
        "clinician",
        "--password-stdin",
        "--json",
        env=env,
        stdin=PASSWORD + "\n",
    )
    assert user.returncode == 0, user.stderr
    user_id = json.loads(user.stdout)["id"]
    assert PASSWORD not in user.stdout + user.stderr
    users = json.loads(run("user", "list", "--json", env=env).stdout)
    assert [(row["id"], row["role"], row["disabled"]) for row in users] == [(user_id, "clinician", False)]

    disabled = run("user", "disable", "ada@example.org", "--json", env=env)
    assert json.loads(disabled.stdout) == {"id": user_id, "disabled": True}


def test_cli_refusals_are_one_line_with_the_right_exit_code(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    institution = json.loads(run("institution", "create", "Clinic", "--json", env=env).stdout)["id"]
    base = ("user", "create", "--institution", institution, "--role", "clinician", "--password-stdin")
    weak = run(*base, "--email", "bob@example.org", env=env, stdin="password123\n")
    assert weak.returncode == 1
    assert "password_policy" in weak.stderr
    assert "common_password" in weak.stderr
    assert run(*base, "--email", "bob@example.org", env=env, stdin=PASSWORD + "\n").returncode == 0
    taken = run(*base, "--email", "BOB@example.org", env=env, stdin=PASSWORD + "\n")
    assert taken.returncode == 1
    assert "email_taken" in taken.stderr
    bad_role = run(*base[:-3], "--role", "superuser", "--email", "c@example.org", env=env)
    assert bad_role.returncode == 2
    other_region = run("institution", "create", "Far Away", "--region", "eu-west", env=env)
    assert other_region.returncode == 1
    assert "region_mismatch" in other_region.stderr
    no_institution = run("user", "create", "--email", "d@example.org", "--role", "clinician", env=env)
    assert no_institution.returncode == 2
    assert len(no_institution.stderr.strip().splitlines()) == 1


def test_user_created_without_a_password_gets_a_one_time_one(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    institution = json.loads(run("institution", "create", "Clinic", "--json", env=env).stdout)["id"]
    created = run(
        "user",
        "create",
        "--institution",
        institution,
        "--email",
        "e@example.org",
        "--role",
        "auditor",
        "--json",
        env=env,
    )
    body = json.loads(created.stdout)
    assert re.fullmatch(r"[a-z2-9]{5}(-[a-z2-9]{5}){4}", body["one_time_password"])

    reset = run("user", "reset-password", "E@example.org", "--json", env=env)
    assert reset.returncode == 0, reset.stderr
    renewed = json.loads(reset.stdout)
    assert (renewed["id"], renewed["email"]) == (body["id"], "e@example.org")
    assert re.fullmatch(r"[a-z2-9]{5}(-[a-z2-9]{5}){4}", renewed["one_time_password"])
    assert renewed["one_time_password"] != body["one_time_password"]
    unknown = run("user", "reset-password", "nobody@example.org", env=env)
    assert unknown.returncode == 1
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_first_serve_prints_the_operators_one_time_password_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = PhivaultServer(data_dir)
    server.start()
    try:
        output = server.output()
        match = re.search(r"^phivault: one-time password .*: (\S+)$", output, re.MULTILINE)
        assert match, output
        password = match[1]
        assert output.count(password) == 1  # printed, never logged
        assert "phivault: created the platform operator operator@localhost" in output
        with server.client() as client:
            signed_in = login(client, "operator@localhost", password)
            assert signed_in.status_code == 200
            token = signed_in.json()["access_token"]
            blocked = client.get("/api/v1/institutions", headers={"Authorization": f"Bearer {token}"})
            assert blocked.json()["code"] == "password_change_required"
    finally:
        server.kill()
    again = PhivaultServer(data_dir, port=server.port)
    again.start()
    try:
        assert again.output().count("one-time password") == 1  # the first start's line only
    finally:
        again.kill()
