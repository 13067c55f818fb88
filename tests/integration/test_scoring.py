"""Where a job's metrics come from, and what a worker that lost its job leaves behind."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.db.models import JobStatus
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs import lifecycle
from ppml.jobs.records import ArtifactRef, Artifacts, PrivacyRecord
from ppml.jobs.runner import JobRunner
from ppml.jobs.schedule import schedule
from ppml.privacy import accounting as acc
from ppml.storage import LocalStore
from tests.conftest import dp_job_spec


def test_a_public_validation_set_scores_jobs_exactly_and_for_free(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange: public digits as the owner's validation set of private digits
    public = client.post(
        "/v1/datasets",
        json={"name": "val", "source": {"builtin": "digits"}, "privacy_budget": None},
        headers=tenant,
    ).json()
    private = client.post(
        "/v1/datasets",
        json={
            "name": "digits",
            "source": {"builtin": "digits"},
            "privacy_budget": {"epsilon": 8.0, "delta": 1e-5},
            "validation_dataset_id": public["id"],
        },
        headers=tenant,
    )
    assert private.status_code == 201, private.text
    spec = dp_job_spec(private.json()["id"], epochs=2)
    submitted = client.post("/v1/jobs", json=spec, headers=tenant).json()
    # act
    outcome = JobRunner(database, settings).run(submitted["id"])
    job = client.get(f"/v1/jobs/{submitted['id']}", headers=tenant).json()
    exact = client.get(f"/v1/jobs/{submitted['id']}/metrics/exact", headers=tenant).json()
    # assert: scored on every row of the public set, exactly, and nothing charged for it
    assert outcome == "succeeded"
    release = job["metrics"]["release"]
    assert release["mechanism"] == "exact-public-validation"
    assert release["scored_on"] == "validation"
    assert release["validation_dataset_id"] == public["id"]
    assert release["units"] == public["num_train"] + public["num_test"]
    assert job["metrics"]["test_accuracy"] == exact["metrics"]["test_accuracy"]
    plan = job["privacy"]
    assert plan["evaluation"]["scalar_releases"] == 0
    event = PrivacyRecord.model_validate(plan).event(plan["steps"])
    assert event.eval_releases == 0
    assert plan["epsilon_spent"] == acc.epsilon(acc.rdp_curve(event), plan["delta"])


def test_a_worker_that_lost_its_job_discards_its_model_files(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange: attempt 1 claims the job, then another worker takes it over
    dataset_id = client.post(
        "/v1/datasets",
        json={"name": "d", "source": {"builtin": "digits"}, "privacy_budget": None},
        headers=tenant,
    ).json()["id"]
    body = {**dp_job_spec(dataset_id), "privacy": None}
    job_id = client.post("/v1/jobs", json=body, headers=tenant).json()["id"]
    runner = JobRunner(database, settings, owner="worker-a")
    claimed = runner.claim(job_id)
    assert claimed is not None
    job, dataset = claimed
    with database.session(write=True) as session:
        row = Repositories(session).job_by_id(job_id, lock=True)
        assert row is not None
        row.lease_owner = "worker-b"  # the reaper re-queued it and attempt 2 claimed it
    store = LocalStore(settings.data_dir)
    key = f"models/{job_id}.attempt-{job.attempts}.safetensors"
    with store.staging(".safetensors") as staged:
        staged.write_bytes(b"weights of a lost attempt")
        store.publish(staged, key)
    plan = schedule(job.spec, dataset)
    artifacts = Artifacts({"safetensors": ArtifactRef(key=key, sha256="0" * 64)})
    ending = lifecycle.Ending(
        status=JobStatus.SUCCEEDED, steps=plan.total_steps, note="succeeded", artifacts=artifacts
    )
    # act
    outcome = runner._finish(job, ending)
    # assert: nothing of attempt 1 became the job's
    assert outcome == "skipped"
    assert not store.exists(key)
    after = client.get(f"/v1/jobs/{job_id}", headers=tenant).json()
    assert after["status"] == "running"
    with database.session() as session:
        found = Repositories(session).job_by_id(job_id)
    assert found is not None and found.artifacts is None
