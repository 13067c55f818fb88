"""The workers' healthcheck in docker-compose.yml, run as written against a real worker."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REDIS_URL
from tests.integration.stack import BIN, process, service_env

ROOT = Path(__file__).resolve().parents[2]


def healthcheck(data_dir: Path) -> str:
    """The compose worker's check as its shell receives it, aimed at this test's data dir."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    worker = compose["services"]["worker-cpu"]
    kind, command = worker["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    container_dir = worker["environment"]["PPML_DATA_DIR"]
    # compose turns $$ into $; the container's data dir is this test's
    return command.replace("$$", "$").replace(f"{container_dir}/", f"{data_dir}/")


def check(command: str, env: dict[str, str], hostname: str) -> int:
    env = {**env, "HOSTNAME": hostname, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=60)
    return result.returncode


@pytest.mark.redis
@pytest.mark.postgres
def test_a_worker_is_healthy_when_it_answers_by_name_or_is_busy(
    tmp_path: Path, pg_database_url: str
) -> None:
    # arrange: a broker of its own (another Redis database), so only this worker answers
    broker = REDIS_URL.rsplit("/", 1)[0] + f"/{9 + secrets.randbelow(6)}"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = service_env(
        data_dir,
        PPML_DATABASE_URL=pg_database_url,
        PPML_BROKER_URL=broker,
        PPML_WORKER__QUEUE=f"training-{secrets.token_hex(4)}",
    )
    command, host = healthcheck(data_dir), os.uname().nodename
    (data_dir / "worker.busy").write_text("left by a worker killed mid-task")
    with process([str(BIN / "ppml"), "worker"], env, tmp_path / "worker.log"):
        # act: the check as Docker runs it, until the worker has started
        deadline = time.monotonic() + 90
        while check(command, env, host) != 0:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        # assert: a stale busy flag was cleared at start-up, so only the ping made it healthy
        assert not (data_dir / "worker.busy").exists()
        # another host's name in the replies is not this worker's answer
        assert check(command, env, "some-other-host") != 0
        # a worker busy with a task (the solo pool answers no ping) is healthy
        (data_dir / "worker.busy").write_text("ppml.run_job")
        assert check(command, env, "some-other-host") == 0
