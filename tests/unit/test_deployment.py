"""Deployment files and process boundaries."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ONE_SHOT = {"migrate", "minio-init"}  # run to completion; dependents wait for their success


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def _workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if name.startswith("worker")}


def _devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    devices: list[dict[str, Any]] = reservations.get("devices", [])
    return devices


def test_compose_services_run_commands_that_exist() -> None:
    # arrange
    services = _compose()["services"]
    ppml = Path(sys.executable).parent / "ppml"
    for name in ("api", "worker-cpu", "worker-gpu0", "migrate"):
        command = services[name]["command"]
        assert command[0] == "ppml"
        # act: each ppml command exists and parses its arguments (--help stops before running)
        result = subprocess.run(
            [str(ppml), *command[1:], "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from api.app import create_app\n"
        "from ppml.config import Settings\n"
        "create_app(Settings(data_dir='/tmp/ppml-no-torch', broker_url='memory://'))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'opacus' not in sys.modules, 'opacus imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    assert any(line.startswith("make run") for line in readme[:6])
    assert any(line.startswith("make test") for line in readme[:6])
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert shutil.which("make") is not None


def test_compose_has_the_production_services_and_profiles() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api"} <= services.keys()
    workers = _workers(services)
    # every worker is opt-in through exactly one profile: cpu hosts never start a GPU worker
    assert {name: w.get("profiles") for name, w in workers.items()} == {
        "worker-cpu": ["cpu"],
        "worker-gpu0": ["gpu"],
        "worker-gpu1": ["gpu"],
    }
    # a data owner's node (docs/federation.md) is opt-in too, and takes none of the
    # service's settings or secrets
    assert services["node"]["profiles"] == ["node"]
    assert not any(
        k.startswith("PPML_") and k != "PPML_SERVER" and k != "PPML_ENROL_TOKEN"
        for k in services["node"]["environment"]
    )
    # the rest of the stack runs under either profile
    for name in services.keys() - workers.keys() - {"node"}:
        assert "profiles" not in services[name], name


def test_each_gpu_worker_reserves_its_own_device_and_the_cpu_worker_none() -> None:
    workers = _workers(_compose()["services"])
    assert _devices(workers["worker-cpu"]) == []
    assert "deploy" not in workers["worker-cpu"]
    seen: list[str] = []
    for name, worker in workers.items():
        if "gpu" not in worker.get("profiles", []):
            continue
        devices = _devices(worker)
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        # `count` would hand every replica the first free GPU; ids pin one device each
        assert "count" not in devices[0], name
        assert "replicas" not in worker.get("deploy", {}), name
        seen += devices[0]["device_ids"]
    assert len(seen) == 2 and len(set(seen)) == len(seen), seen


def test_gpu_workers_are_built_with_a_cuda_torch_and_the_rest_with_cpu() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if "build" not in service:
            continue
        index = service["build"]["args"]["TORCH_INDEX"]
        if "gpu" in service.get("profiles", []):
            assert "/whl/cu" in index and index.startswith("${PPML_TORCH_INDEX:-"), name
            assert service["image"] == "ppml:gpu"
        else:
            assert index.endswith("/whl/cpu"), name
            assert service["image"] == "ppml:cpu"


def test_every_long_running_service_has_a_healthcheck() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name, worker in _workers(services).items():
        # pinged under its own node name, not "any worker answered"
        test = " ".join(worker["healthcheck"]["test"])
        assert "inspect ping" in test and "HOSTNAME" in test, name
        # ... or busy: the solo pool answers no ping during a task (worker.app.busy_flag)
        data_dir = worker["environment"]["PPML_DATA_DIR"]
        assert f"|| test -f {data_dir}/worker.busy" in test, name


def test_services_wait_for_what_they_need() -> None:
    services = _compose()["services"]
    healthy, done = "service_healthy", "service_completed_successfully"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": healthy}}
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": healthy}}
    for name in ("api", *_workers(services)):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == done, name
        assert depends["minio-init"]["condition"] == done, name
        assert depends["redis"]["condition"] == healthy, name


def test_the_object_store_is_wired_into_every_ppml_service() -> None:
    services = _compose()["services"]
    minio = services["minio"]
    # the bucket the ppml services name is the one the init step creates
    assert services["minio-init"]["entrypoint"][-1] == "store/ppml"
    assert minio["environment"]["MINIO_ROOT_USER"].startswith("${AWS_ACCESS_KEY_ID")
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${AWS_SECRET_ACCESS_KEY")
    for name in ("api", "migrate", *_workers(services)):
        env = services[name]["environment"]
        assert env["PPML_STORAGE_URL"] == "s3://ppml/artefacts", name
        assert env["PPML_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
        assert env["AWS_DEFAULT_REGION"], name
        assert env["PPML_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["PPML_BROKER_URL"].startswith("redis://redis:6379"), name
        # secrets come from the operator's environment, never from a default in this file
        for key in ("PPML_ADMIN_TOKEN", "PPML_ENCRYPTION_KEY", "AWS_SECRET_ACCESS_KEY"):
            assert env[key].startswith("${") and ":?" in env[key], (name, key)


def test_volumes_keep_state_and_share_only_the_ledger_heads() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"pg-data", "redis-data", "minio-data", "ppml-shared"} <= compose["volumes"].keys()
    assert "pg-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    # as on separate machines: no shared data dir (artefacts and keyring are in the bucket);
    # one ledger-heads file for the API and every worker, off the database's volume
    for name in ("api", "migrate", *_workers(services)):
        assert services[name]["volumes"] == ["ppml-shared:/shared"], name
        heads = services[name]["environment"]["PPML_LEDGER_HEADS_FILE"]
        assert heads.startswith("/shared/"), name


def _dockerfile() -> list[str]:
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_builds_torch_from_an_argument_and_dependencies_before_the_source() -> None:
    lines = _dockerfile()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    torch = first('RUN pip install --index-url "${TORCH_INDEX}"')
    deps = first('RUN python -c "import tomllib')
    assert "pip install -r" in lines[deps] and "dependencies" in lines[deps]
    assert "optional-dependencies" not in lines[deps]  # no dev tools in the image
    sources = [i for i, line in enumerate(lines) if line.startswith("COPY")]
    only_pyproject = first("COPY pyproject.toml ./")
    assert torch < only_pyproject < deps
    assert all(i > deps for i in sources if i != only_pyproject)
    install = first("RUN pip install --no-deps .")
    assert install > max(sources)
    assert not any(" -e " in line or "--editable" in line for line in lines)


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    lines = _dockerfile()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") and "/readyz" in line for line in lines)
    entry = next(i for i, line in enumerate(lines) if line.startswith("CMD "))
    assert lines.index(f"USER {users[-1]}") < entry


def test_an_installed_package_finds_its_migrations_from_the_image_workdir(
    tmp_path: Path,
) -> None:
    # arrange: the package away from the source tree, as a non-editable install leaves it
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "ppml", site / "ppml", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "from alembic.script import ScriptDirectory\n"
        "from ppml.db import migrate\n"
        f"assert migrate.__file__.startswith({str(site)!r}), migrate.__file__\n"
        "config = migrate.alembic_config('sqlite:///x.db')\n"
        "print(ScriptDirectory.from_config(config).get_current_head())\n"
    )
    # act: run where the image's WORKDIR is (alembic.ini and migrations/ beside it)
    result = subprocess.run(
        [sys.executable, "-P", "-c", code],  # -P: the working directory is not on sys.path
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    # assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_make_run_installs_the_runtime_only_and_make_test_the_dev_tools(tmp_path: Path) -> None:
    venv = f"VENV={tmp_path / 'venv'}"  # nothing installed yet: make plans every step
    run = _make("-n", "run", venv)
    test = _make("-n", "test", venv)
    assert run.returncode == 0 and test.returncode == 0, run.stderr + test.stderr
    assert "pip install -q -e ." in run.stdout
    assert "[dev]" not in run.stdout
    assert "pip install -q -e '.[dev]'" in test.stdout
    assert "--index-url" not in run.stdout  # PyPI's torch unless TORCH_INDEX is given
    cpu = _make("-n", "run", venv, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu 'torch==" in cpu.stdout


def test_make_refuses_a_python_other_than_3_11_with_a_clear_message(tmp_path: Path) -> None:
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\n[ "$1" = "-V" ] && echo "Python 3.12.4" && exit 0\nexit 1\n')
    fake.chmod(0o755)

    result = _make("install", f"PYTHON={fake}", f"VENV={tmp_path / 'venv'}")

    assert result.returncode != 0
    assert "ppml needs Python 3.11" in result.stderr and "Python 3.12.4" in result.stderr
    assert not (tmp_path / "venv").exists()  # nothing was made with the wrong interpreter
