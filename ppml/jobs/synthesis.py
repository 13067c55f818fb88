"""A synthesize job's attempt: bin the table, run MST for the rho it was charged, publish the
synthetic CSV and its quality report with a receipt. The runner (``ppml.jobs.runner``) claims
and finishes it like any job; this module knows how it runs.

The rho charged at admission (``PrivacyRecord.zcdp_rho``) is split as it was priced
(``ppml.services.synthesis.budget_split``): the DP bounds, if any feature needs them, then
MST. The mechanism's randomness comes from the operating system, never from the spec: a
seed an analyst knows would let them subtract the noise.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ppml.datasets.arrays import DatasetArrays
from ppml.db.models import Dataset, Job, JobStatus
from ppml.jobs import lifecycle
from ppml.jobs.receipts import build_receipt
from ppml.jobs.records import ArtifactRef, Artifacts, JobError
from ppml.services.synthesis import budget_split, dp_bounded, features_of
from ppml.storage import ArtifactStore
from ppml.synthesis.table import LABEL, Table, builtin_bounds, dp_bounds

__all__ = ["REPORT", "SYNTHETIC", "leased_ending", "synthesis_ending", "synthesize_job"]

log = logging.getLogger(__name__)

#: Artefact names of a synthesize job: the table, and its quality report.
SYNTHETIC, REPORT = "csv", "report"


def _table(
    job: Job, dataset: Dataset, arrays: DatasetArrays, rho: float, rng: np.random.Generator
) -> tuple[Table, list[int], str]:
    """The binned view: bounds from the spec, the documentation or DP (``rho``)."""
    synth = job.spec.synthesize
    assert synth is not None
    features = features_of(synth, dataset)
    names = [arrays.feature_names[j] for j in features]
    documented = builtin_bounds(dataset.source.get("builtin"), arrays.feature_names)
    given = synth.bounds or {}
    estimated = dp_bounds(arrays.x_train, dp_bounded(synth, dataset), rho, rng) if rho else {}
    bounds = [
        given.get(j) or documented.get(arrays.feature_names[j]) or estimated[j] for j in features
    ]
    source = "dp-estimate" if estimated else ("documented" if documented else "given")
    table = Table(
        names=(*names, LABEL),
        bounds=tuple((float(lo), float(hi)) for lo, hi in bounds),
        bins=synth.bins,
        classes=tuple(arrays.classes),
    )
    return table, features, source


def synthesize_job(
    store: ArtifactStore, job: Job, dataset: Dataset, arrays: DatasetArrays
) -> lifecycle.Ending:
    """Run the job's mechanism and publish its files; the ending the runner finishes with."""
    from ppml.synthesis.mst import synthesize
    from ppml.synthesis.quality import quality_report

    privacy, synth = job.privacy, job.spec.synthesize
    assert privacy is not None and synth is not None and privacy.zcdp_rho > 0
    rng = np.random.default_rng(secrets.randbits(128))
    rho_bounds, rho_mst = budget_split(synth, dataset, privacy.zcdp_rho)
    table, features, source = _table(job, dataset, arrays, rho_bounds, rng)
    real = table.encode(arrays.x_train[:, features], arrays.y_train)
    rows = synth.rows or dataset.num_train
    synthetic, spends = synthesize(real, table.sizes, rho=rho_mst, rows=rows, rng=rng)
    x = table.decode(synthetic, rng)
    y = synthetic[LABEL]
    report: dict[str, Any] = quality_report(
        real=real,
        synthetic=synthetic,
        sizes=table.sizes,
        xy_synthetic=(x, y),
        xy_train=(arrays.x_train[:, features], arrays.y_train),
        xy_test=(arrays.x_test[:, features], arrays.y_test),
    )
    report["synthetic"]["bounds"] = {"source": source, "values": [list(b) for b in table.bounds]}
    stem = f"models/{job.id}.attempt-{job.attempts}"
    classes = np.asarray(table.classes, dtype=object)

    def write_csv(path: Any) -> None:
        import pandas as pd

        frame = pd.DataFrame(x, columns=list(table.names[:-1]))
        frame[LABEL] = classes[y]
        frame.to_csv(path, index=False, float_format="%.6g")

    table_file = store.write(f"{stem}.synthetic.csv", write_csv)
    report_file = store.write(
        f"{stem}.report.json", lambda path: path.write_text(json.dumps(report, sort_keys=True))
    )
    artifacts = Artifacts(
        {
            SYNTHETIC: ArtifactRef(key=table_file.key, sha256=table_file.sha256),
            REPORT: ArtifactRef(key=report_file.key, sha256=report_file.sha256),
        }
    )
    final = privacy.finished(0, None)
    receipt = build_receipt(
        job,
        dataset,
        privacy=final,
        metrics=None,
        architecture={
            "kind": "synthetic-table",
            "mechanism": "mst",
            "rows": rows,
            "columns": list(table.names),
            "bins": table.bins,
            "bounds": source,
            "rho_bounds": rho_bounds,
            "spends": [vars(s) for s in spends],
        },
    )
    return lifecycle.Ending(
        status=JobStatus.SUCCEEDED, steps=0, note="succeeded", artifacts=artifacts, receipt=receipt
    )


def synthesis_ending(
    store: ArtifactStore,
    job: Job,
    dataset: Dataset,
    *,
    arrays: Callable[[], DatasetArrays],
    renew: Callable[[], tuple[bool, bool]],
    lease_seconds: float,
) -> lifecycle.Ending | None:
    """Run a claimed synthesize job while renewing its lease (:func:`leased_ending`)."""
    return leased_ending(
        store,
        job,
        lambda: synthesize_job(store, job, dataset, arrays()),
        renew=renew,
        lease_seconds=lease_seconds,
        error_code="synthesis_error",
    )


def leased_ending(
    store: ArtifactStore,
    job: Job,
    run: Callable[[], lifecycle.Ending],
    *,
    renew: Callable[[], tuple[bool, bool]],
    lease_seconds: float,
    error_code: str,
) -> lifecycle.Ending | None:
    """Run a claimed job that takes no steps (``run``: synthesize, pate) while renewing its
    lease (``renew``: ``(still the owner, cancel requested)``). Its ending: succeeded with
    its files, failed, or cancelled (a cancel that arrives while it runs: the files are
    deleted). Any ending is charged whole (steps 0 of 0: the data was touched). None: the
    lease was lost, the job is another worker's, and this attempt's files are deleted."""
    state = {"owner": True, "cancel": False}
    done = threading.Event()

    def renewing() -> None:
        while not done.wait(lease_seconds / 3):
            try:
                state["owner"], state["cancel"] = renew()
            except Exception:  # an outage: the next renewal tries again
                log.warning("job %s: could not renew its lease", job.id)

    thread = threading.Thread(target=renewing, name=f"lease-{job.id}", daemon=True)
    thread.start()
    try:
        ending = run()
    except Exception as exc:
        log.exception("job %s: %s", job.id, error_code)
        error = JobError(code=error_code, message=type(exc).__name__)
        ending = lifecycle.Ending(status=JobStatus.FAILED, steps=0, note="failed", error=error)
    finally:
        done.set()
        thread.join()
    try:
        state["owner"], state["cancel"] = renew()
    except Exception:
        log.warning("job %s: could not renew its lease at the end", job.id)
    if not state["owner"] or state["cancel"]:
        for fmt in ending.artifacts.formats() if ending.artifacts is not None else []:
            ref = ending.artifacts.get(fmt) if ending.artifacts is not None else None
            if ref is not None:
                store.delete(ref.key)
        if not state["owner"]:
            return None
        return lifecycle.Ending(status=JobStatus.CANCELLED, steps=0, note="cancelled")
    return ending
