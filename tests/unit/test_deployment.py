"""Deployment files and process boundaries."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_services_run_commands_that_exist() -> None:
    # arrange
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    ppml = Path(sys.executable).parent / "ppml"
    # assert: the layout the issue asks for
    assert {"api", "worker", "postgres", "redis", "migrate"} <= services.keys()
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("api", "worker", "migrate"):
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
