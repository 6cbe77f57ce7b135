"""A real ``phivault serve`` and the real ``phivault-agent`` command, as a device runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from factories.dicom_factory import make_instance, to_bytes
from phivault.config.settings import load_settings
from phivault.devices.models import Upload
from phivault.runtime import Runtime, build_runtime
from servers import logscan
from servers.phivault import PHIVAULT, PhivaultServer

AGENT = str(Path(sys.executable).with_name("phivault-agent"))


def run_phivault(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@dataclass
class Agent:
    home: Path
    server: PhivaultServer

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
        env["PHIVAULT_AGENT_HOME"] = str(self.home)
        return env

    def command(self, *args: str) -> list[str]:
        return [AGENT, *args]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def json(self, *args: str) -> Any:  # noqa: ANN401  # the command's JSON answer
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@dataclass
class Deployment:
    server: PhivaultServer
    institution_id: str

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    def code(self) -> tuple[str, str]:
        """A code from ``phivault device code`` (JSON, the scripted contract) and the server
        pin from its text form.
        """
        made = run_phivault(self.env, "device", "code", "--institution", self.institution_id, "--json")
        assert made.returncode == 0, made.stderr
        answer = json.loads(made.stdout)
        assert set(answer) == {"code", "expires_at"}
        logscan.plant(answer["code"])
        text = run_phivault(self.env, "device", "code", "--institution", self.institution_id)
        pin = next(
            line.rsplit(" ", 1)[1]
            for line in text.stdout.splitlines()
            if line.startswith("server certificate pin")
        )
        return answer["code"], pin

    def agent(self, home: Path) -> Agent:
        code, pin = self.code()
        agent = Agent(home, self.server)
        result = agent.run(
            "activate",
            "--server",
            self.server.base_url,
            "--code",
            code,
            "--ca-cert",
            str(self.server.ca_file),
            "--pin",
            pin,
            "--json",
        )
        assert result.returncode == 0, result.stderr
        return agent

    def runtime(self) -> Runtime:
        return build_runtime(load_settings(data_dir=self.server.data_dir))

    def uploads(self) -> list[Upload]:
        runtime = self.runtime()
        try:
            with runtime.db.transaction() as session:
                return list(session.scalars(select(Upload).order_by(Upload.created_at)))
        finally:
            runtime.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    data = tmp_path / "data"
    server = PhivaultServer(data)
    created = run_phivault(server.env, "institution", "create", "Agent Clinic", "--json")
    assert created.returncode == 0, created.stderr
    server.start()
    try:
        yield Deployment(server, json.loads(created.stdout)["id"])
    finally:
        server.kill()


def exam(path: Path, *, sop: str = "1", frames: int = 4, rows: int = 48, columns: int = 64) -> Path:
    dataset, _ = make_instance(
        sop_uid=f"1.2.826.0.1.3680043.10.1444.7.{sop}", frames=frames, rows=rows, columns=columns
    )
    path.write_bytes(to_bytes(dataset))
    return path
