"""A real ``ppml node run`` process against a real ``ppml serve`` (#16): enrolment with the
schema check, one sample-level task opened as the server loop opens it, the round charged on
the node's own ledger before it trains, and the update accepted by the server."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from safetensors.torch import save

from ppml.config import Settings
from ppml.db.models import utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.federation.keys import global_key
from ppml.federation.updates import read_header
from ppml.privacy import accounting as acc
from ppml.services import federations as service
from ppml.storage import ArtifactStore
from ppml.training.models import build_model
from tests.integration.stack import BIN, embedded_serve, process, service_env, tenant_client
from tests.unit.node_helpers import SCHEMA, write_csv

ADMIN = "node-process-admin-token-0123456789"


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _node_status(owner: httpx.Client, federation_id: str) -> dict[str, object]:
    nodes = owner.get(f"/v1/federations/{federation_id}").json()["nodes"]
    return dict(nodes[0])


def _open_round(settings: Settings, job_id: str, federation_id: str) -> tuple[str, dict[str, Any]]:
    """What the server loop does: store the global weights, open a task per active node."""
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as session:
            job = Repositories(session).job_by_id(job_id)
            assert job is not None
            spec = job.spec
        module = build_model(spec.model, num_features=4, num_classes=2)
        weights = {k: v.contiguous() for k, v in module.state_dict().items()}
        body = save(weights)
        ArtifactStore.for_settings(settings).write(
            global_key(job_id, 0), lambda p: p.write_bytes(body)
        )
        with db.session(write=True) as session:
            repos = Repositories(session)
            federation = repos.federation_by_id(federation_id)
            assert federation is not None
            (task,) = service.open_tasks(
                repos,
                job_id=job_id,
                spec=spec,
                federation=federation,
                round_=0,
                nodes=repos.active_nodes(federation.id),
                deadline=utcnow() + timedelta(seconds=300),
                # the digest of the plain file the node downloads (the store's Artifact.sha256
                # is the sealed file's, since the 'federations' kind is sealed at rest)
                weights_sha256=hashlib.sha256(body).hexdigest(),
            )
            return task.id, dict(task.payload)
    finally:
        db.dispose()


def test_a_node_enrols_trains_a_round_and_its_update_is_accepted(tmp_path: Path) -> None:
    with embedded_serve(tmp_path, ADMIN, "--no-worker") as (base, _proc):
        # arrange: a record federation, an invited node, the node's own file
        owner = tenant_client(base, ADMIN)
        federation = owner.post(
            "/v1/federations", json={"name": "clinics", "schema": SCHEMA, "privacy_unit": "record"}
        ).json()
        invite = owner.post(f"/v1/federations/{federation['id']}/nodes", json={"name": "a"})
        token = invite.json()["enrolment_token"]
        data = write_csv(tmp_path / "rows.csv", rows=300)
        node_dir = tmp_path / "node"
        command = [
            str(BIN / "ppml"), "node", "run", "--server", base, "--enrol", token,
            "--data", str(data), "--target", "label", "--data-dir", str(node_dir),
            "--epsilon", "8", "--delta", "1e-3", "--max-tasks", "1", "--poll-wait", "2",
        ]  # fmt: skip
        log = tmp_path / "node.log"
        with process(command, service_env(tmp_path / "nodeenv"), log) as node:
            # act 1: enrolment
            _wait(
                lambda: _node_status(owner, federation["id"])["status"] == "active",
                120,
                f"the node's enrolment:\n{log.read_text() if log.exists() else ''}",
            )
            check = _node_status(owner, federation["id"])["schema_check"]
            assert check == {
                "ok": True,
                "rows": 300,
                "message": "300 rows, 4 features, labels within the 2 declared classes",
            }
            # act 2: a sample-level job, and its first round's task
            job = owner.post(
                "/v1/jobs",
                json={
                    "name": "fed",
                    "model": {"arch": "logreg"},
                    "training": {"epochs": 1, "batch_size": 30, "learning_rate": 0.1},
                    "privacy": {"target_epsilon": 2.0, "max_grad_norm": 1.0, "level": "sample"},
                    "federated": {"federation_id": federation["id"], "rounds": 3},
                },
            )
            assert job.status_code == 202, job.text
            settings = Settings(data_dir=tmp_path / "data")
            task_id, payload = _open_round(settings, job.json()["id"], federation["id"])
            node.wait(timeout=180)
        # assert: the node finished its one task cleanly, and the server accepted the update
        assert node.returncode == 0, log.read_text()
        db = Database(settings.resolved_database_url)
        with db.session() as session:
            task = Repositories(session).task(task_id)
            assert task is not None
            assert task.status == "accepted", task.detail
            node_id, stored_at = task.node_id, task.update_key
        db.dispose()
        assert stored_at is not None
        assert stored_at.startswith(f"federations/{job.json()['id']}.round-0.update.{node_id}.")
        store = ArtifactStore.for_settings(settings)
        with store.open_plain(stored_at) as path:
            metadata = read_header(path.read_bytes())["__metadata__"]
        # the node priced the round itself from (q, σ, steps), with ppml's accountant
        privacy = payload["privacy"]
        round_curve = acc.rdp_curve(
            acc.MechanismEvent(
                sample_rate=privacy["sample_rate"],
                noise_multiplier=privacy["noise_multiplier"],
                steps=privacy["steps"],
            )
        )
        assert isinstance(metadata, dict)
        assert float(metadata["epsilon"]) == acc.epsilon(round_curve, privacy["delta"])
        assert float(metadata["epsilon_total"]) == float(metadata["epsilon"])
        # its own ledger holds the charge; its credential file is its owner's alone
        ledger = Database(f"sqlite:///{node_dir / 'ledger.sqlite'}")
        with ledger.session() as session:
            repos = Repositories(session)
            tenant = repos.tenant_by_name("local")
            assert tenant is not None
            (dataset,), _ = repos.list_datasets(tenant.id, page_size=1, page_token=None)
            entries = repos.ledger_entries(dataset.id)
            assert [e.kind for e in entries] == ["reserve", "commit"]
            assert entries[1].rdp["units"] == list(round_curve)
        ledger.dispose()
        mode = stat.S_IMODE(os.stat(node_dir / "node.json").st_mode)
        assert mode == 0o600
        assert "ppml_node_" in (node_dir / "node.json").read_text()
