"""Property-based fuzzing (schemathesis) of every operation the OpenAPI document of a real
``phivault serve`` lists, as every role in ``auth_headers``.

Routes join the run by being in ``/api/openapi.json``; nothing here names them. The budget
of generated cases per role is fixed and spread over the operations, so the run stays
bounded as the API grows, and the seed is fixed, so a failure found once is found again
(``SEED``; change it locally to explore). Reports (JSON summary, NDJSON event log with
every request and response, JUnit) land in the test's tmp directory, one folder per role.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest

from servers.phivault import PHIVAULT, PhivaultServer, phivault_env
from servers.tools import SCHEMATHESIS, require_tool

pytestmark = pytest.mark.security

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    # An operation that declares a security scheme must refuse requests without or with
    # broken credentials; an undeclared method must get 405 with an Allow header.
    "ignored_auth",
    "unsupported_method",
)
PHASES = "examples,coverage,fuzzing,stateful"  # stateful runs once the document has links
SEED = 20_261_122
CASES_PER_ROLE = 400  # fuzzing budget spread over the operations (five roles: keep the suite under 20 min)
# With ~90 operations the minimum decides the run's length (the suite stays under 20 min).
MIN_EXAMPLES, MAX_EXAMPLES = 3, 100
RUN_TIMEOUT = 300
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
_SHOWN_BODY = 600


@dataclass(frozen=True, slots=True)
class Failure:
    role: str
    operation: str
    check: str
    title: str
    message: str
    request: str
    response: str

    def __str__(self) -> str:
        return (
            f"[{self.role}] {self.operation}: {self.check} — {self.title}\n"
            f"{_indent(self.message)}\n  request:  {self.request}\n  response: {self.response}"
        )


@dataclass(frozen=True, slots=True)
class FuzzRun:
    role: str
    report_dir: Path
    summary: dict[str, Any]
    failures: list[Failure]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhivaultServer]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    # Sign-ins come from 127.0.0.2 (see ``_sign_in``), which must reach admin routes; an
    # access token lives as long as one run may take.
    env = phivault_env(data_dir, admin_allow_cidrs="127.0.0.0/8", access_token_seconds="900")
    running = PhivaultServer(data_dir, env=env)
    running.start()
    yield running
    running.kill()


SignIn = Callable[[], dict[str, str]]
FUZZ_PASSWORD = "fuzzing is a kind of testing"


@pytest.fixture(scope="module")
def auth_headers(server: PhivaultServer) -> list[tuple[str, SignIn]]:
    """(role, sign-in) pairs the API is fuzzed as, one full run each.

    Each role is a user made with ``phivault user create … --password-stdin``; it signs in
    just before its run (tokens outlive one run, not all of them) and, where its role
    needs MFA, sets up TOTP first. Operators and institution admins need MFA by default.
    """
    env = server.env
    institution = _cli(env, "institution", "create", "Fuzz Hospital", "--json")["id"]
    roles: list[tuple[str, SignIn]] = [("anonymous", dict)]
    for role in ("operator", "institution_admin", "clinician", "auditor"):
        where = [] if role == "operator" else ["--institution", institution]
        email = f"fuzz-{role.replace('_', '-')}@phivault.test"
        _cli(
            env,
            "user",
            "create",
            *where,
            "--email",
            email,
            "--role",
            role,
            "--password-stdin",
            "--json",
            stdin=FUZZ_PASSWORD,
        )
        roles.append((role, functools.partial(_sign_in, server, email)))
    return roles


def _cli(env: dict[str, str], *args: str, stdin: str = "") -> dict[str, Any]:
    done = subprocess.run(
        [PHIVAULT, *args],
        env=env,
        input=stdin + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _sign_in(server: PhivaultServer, email: str) -> dict[str, str]:
    """Sign in from 127.0.0.2: the runs' failed sign-ins from 127.0.0.1 throttle that address."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    transport = httpx.HTTPTransport(verify=context, local_address="127.0.0.2")
    with httpx.Client(base_url=server.base_url, transport=transport, timeout=30) as client:
        response = client.post("/api/v1/auth/login", json={"email": email, "password": FUZZ_PASSWORD})
        response.raise_for_status()
        headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
        me = client.get("/api/v1/auth/me", headers=headers)
        if me.status_code == 200 and not me.json()["mfa_enabled"]:
            seed = client.post("/api/v1/auth/mfa/totp", headers=headers).json()["secret"]
            code = pyotp.TOTP(seed).now()
            confirmed = client.post("/api/v1/auth/mfa/totp/confirm", headers=headers, json={"code": code})
            confirmed.raise_for_status()
    return headers


def test_every_operation_survives_fuzzing_as_every_role(
    server: PhivaultServer, auth_headers: list[tuple[str, SignIn]], tmp_path: Path
) -> None:
    st = require_tool("schemathesis", SCHEMATHESIS) / "st"
    operations = _count_operations(server)
    assert operations > 0, "the OpenAPI document lists no operation"
    max_examples = max(MIN_EXAMPLES, min(MAX_EXAMPLES, CASES_PER_ROLE // operations))

    runs = [
        _run_schemathesis(st, server, role, sign_in(), tmp_path / role, max_examples)
        for role, sign_in in auth_headers
    ]

    problems: list[str] = []
    for run in runs:
        tested = run.summary["operations"]
        if run.summary["errors"] or tested["errored"] or run.summary["test_cases"]["errored"]:
            problems.append(
                f"[{run.role}] schemathesis errors: {json.dumps(run.summary['errors'], indent=2)}"
            )
        if tested["tested"] != tested["selected"] or tested["selected"] != operations:
            problems.append(f"[{run.role}] not every operation was tested: {tested}")
        problems.extend(str(failure) for failure in run.failures)
        if run.summary["test_cases"]["with_failures"] and not run.failures:
            problems.append(f"[{run.role}] failures reported without details: {run.summary['failures']}")
    reports = ", ".join(str(run.report_dir) for run in runs)
    assert not problems, f"{len(problems)} problem(s); reports in {reports}\n\n" + "\n\n".join(problems)


def _count_operations(server: PhivaultServer) -> int:
    with server.client() as client:
        response = client.get("/api/openapi.json")
    response.raise_for_status()
    paths: dict[str, dict[str, Any]] = response.json()["paths"]
    return sum(1 for item in paths.values() for method in item if method in HTTP_METHODS)


def _run_schemathesis(
    st: Path, server: PhivaultServer, role: str, headers: dict[str, str], report_dir: Path, max_examples: int
) -> FuzzRun:
    report_dir.mkdir(parents=True)
    summary_path, events_path = report_dir / "report.json", report_dir / "events.ndjson"
    command = [
        str(st),
        "run",
        f"{server.base_url}/api/openapi.json",
        f"--tls-verify={server.ca_file}",
        f"--checks={','.join(CHECKS)}",
        f"--phases={PHASES}",
        f"--max-examples={max_examples}",
        f"--seed={SEED}",
        "--generation-database=none",  # nothing carried over between runs: reproducible
        "--workers=1",  # one request at a time: the same order every run
        "--request-timeout=10",
        "--no-color",
        "--report=json,ndjson,junit",
        f"--report-dir={report_dir}",
        f"--report-json-path={summary_path}",
        f"--report-ndjson-path={events_path}",
        f"--report-junit-path={report_dir / 'junit.xml'}",
    ]
    for name, value in headers.items():
        command.append(f"--header={name}: {value}")
    log = report_dir / "schemathesis.log"
    try:
        with log.open("wb") as output:
            completed = subprocess.run(
                command,
                cwd=report_dir,  # no stray schemathesis.toml or .hypothesis/ from elsewhere
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=RUN_TIMEOUT,
                check=False,
            )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"[{role}] schemathesis ran past {RUN_TIMEOUT} s with --max-examples={max_examples}; "
            f"lower CASES_PER_ROLE. Log: {log}\n{log.read_text(errors='replace')[-2000:]}"
        )
    # Exit 1 means "failures found"; anything else is schemathesis itself failing.
    assert completed.returncode in (0, 1), (
        f"schemathesis exited {completed.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
    )
    assert summary_path.exists(), f"no report:\n{log.read_text(errors='replace')[-4000:]}"
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return FuzzRun(role=role, report_dir=report_dir, summary=summary, failures=_failures(role, events_path))


def _failures(role: str, events_path: Path) -> list[Failure]:
    """Every failed check in the NDJSON event log, with the request and response behind it."""
    found: dict[tuple[str, str, str], Failure] = {}
    for line in events_path.read_text().splitlines():
        event: dict[str, Any] = json.loads(line)
        scenario = event.get("ScenarioFinished")
        if scenario is None:
            continue
        recorder = scenario.get("recorder") or {}
        interactions = recorder.get("interactions") or {}
        for case_id, checks in (recorder.get("checks") or {}).items():
            for check in checks:
                if check["status"] != "failure":
                    continue
                failure = check["failure_info"]["failure"]
                interaction = interactions.get(case_id, {})
                key = (failure["operation"], check["name"], failure["message"])
                found.setdefault(
                    key,
                    Failure(
                        role=role,
                        operation=failure["operation"],
                        check=check["name"],
                        title=f"{failure['code']} {failure['title']}",
                        message=failure["message"],
                        request=_describe_request(interaction.get("request")),
                        response=_describe_response(interaction.get("response")),
                    ),
                )
    return list(found.values())


def _describe_request(request: dict[str, Any] | None) -> str:
    if request is None:
        return "(not recorded)"
    headers = {
        name: value for name, value in request.get("headers", {}).items() if name.lower() != "authorization"
    }
    body = _payload(request.get("body"))
    return f"{request['method']} {request['uri']} headers={headers} body={body}"


def _describe_response(response: dict[str, Any] | None) -> str:
    if response is None:
        return "(no response)"
    content_type = response.get("headers", {}).get("content-type", ["-"])[0]
    return f"{response['status_code']} {content_type} {_payload(response.get('content'))}"


def _payload(value: Any) -> str:  # noqa: ANN401  # NDJSON: null, text, or {"$base64": …}
    if value is None:
        return "(none)"
    raw = base64.b64decode(value["$base64"]) if isinstance(value, dict) else str(value).encode()
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= _SHOWN_BODY else text[:_SHOWN_BODY] + "…")


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
