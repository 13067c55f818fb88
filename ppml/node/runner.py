"""``ppml node run``: start (check the data, enrol or say hello), then poll and train.

Start: the data file is read with ppml's upload readers and checked against the federation's
schema (from ``/v1/node/schema`` at enrolment, the one kept in ``node.json`` after, checked
again if ``/v1/node/hello`` answers another). The local ledger is opened before the
enrolment token is spent, so a node that cannot open its budget (no ε, δ too large) spends
nothing. A failed check is reported (``ok: false``, the message) and ends the node.

Loop: long-poll for a task; for each, fetch the global weights, charge the round on the local
ledger before training (sample level; the whole job must fit at its first task, else the task
is refused with ``budget``), train, upload ``local − global``. A refusal leaves the ledger as
it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ppml.errors import InvalidInput, PPMLError
from ppml.node.client import NodeApi, problem_detail
from ppml.node.config import NodeConfig, ledger_path, load_config, save_config
from ppml.node.data import LocalData, SchemaCheck, SchemaMismatch, load_local
from ppml.node.ledger import Charge, LocalLedger, Refusal, new_fingerprint_key
from ppml.node.tasks import Task
from ppml.node.train import expected_shapes, local_update
from ppml.node.updates import decode_weights, encode_update

__all__ = ["NodeError", "NodeOptions", "NodeRunner", "software_version"]

log = logging.getLogger(__name__)


class NodeError(Exception):
    """Ends the node with a message for its operator (exit code 2)."""


def software_version() -> str:
    try:
        return f"ppml {version('ppml')}"
    except PackageNotFoundError:
        return "ppml (source)"


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    server: str
    data: Path
    target: str
    data_dir: Path
    epsilon: float | None
    delta: float | None
    name: str
    enrol: str | None = None
    max_idle_polls: int | None = None  # stop after this many empty polls in a row (tests)
    max_tasks: int | None = None  # stop after this many tasks (tests)
    poll_wait_s: int = 25


class NodeRunner:
    """One node process: its data, its ledger, its connection."""

    def __init__(self, options: NodeOptions, api: NodeApi | None = None) -> None:
        self.options = options
        self.api = api or NodeApi(options.server)
        self.config: NodeConfig | None = None
        self.data: LocalData | None = None
        self.ledger: LocalLedger | None = None

    # --- start ------------------------------------------------------------------------
    def start(self) -> None:
        """Check the data, open the ledger, enrol or say hello. Raises NodeError."""
        opts = self.options
        config = load_config(opts.data_dir) or NodeConfig(
            server=opts.server, fingerprint_key=new_fingerprint_key()
        )
        config = config.with_(server=opts.server)
        if config.enrolled:
            if opts.enrol is not None:
                log.warning(
                    "this data dir is enrolled already (node %s): --enrol is ignored",
                    config.node_id,
                )
            config = self._hello(config)
        else:
            if opts.enrol is None:
                raise NodeError("this node is not enrolled yet: give --enrol TOKEN")
            config = self._enrol(config, opts.enrol)
        self.config = config

    def _enrol(self, config: NodeConfig, token: str) -> NodeConfig:
        answer = self.api.schema(token)
        if answer.status_code != 200:
            raise NodeError(f"the server refused the enrolment token: {problem_detail(answer)}")
        body = answer.json()
        check = self._check(body["schema"])
        if not check.ok:
            self.api.enrol(token, software_version(), check.to_json())
            raise NodeError(
                f"this node's data does not match the federation's schema: {check.message}"
            )
        save_config(self.options.data_dir, config)  # the fingerprint key, before the ledger
        self._open_ledger(config)
        answer = self.api.enrol(token, software_version(), check.to_json())
        if answer.status_code != 201:
            raise NodeError(f"enrolment refused: {problem_detail(answer)}")
        got = answer.json()
        config = config.with_(
            node_id=got["node_id"],
            credential=got["credential"],
            federation_id=got.get("federation_id"),
            schema=got.get("schema", body["schema"]),
            privacy_unit=got.get("privacy_unit", body.get("privacy_unit")),
        )
        save_config(self.options.data_dir, config)
        self.api.credential = config.credential
        log.info("enrolled as node %s of federation %s", config.node_id, config.federation_id)
        return config

    def _hello(self, config: NodeConfig) -> NodeConfig:
        self.api.credential = config.credential
        check = self._check(config.schema or {})
        for _ in range(2):
            answer = self.api.hello(software_version(), check.to_json())
            if answer.status_code == 401:
                raise NodeError(
                    "the server refused this node's credential (revoked?): "
                    f"{problem_detail(answer)}"
                )
            if answer.status_code != 200:
                raise NodeError(f"the server refused this node: {problem_detail(answer)}")
            got = answer.json()
            schema = got.get("schema")
            if schema is None or schema == config.schema:
                break
            config = config.with_(schema=schema)  # the federation's schema changed
            check = self._check(schema)
        if not check.ok:
            raise NodeError(
                f"this node's data does not match the federation's schema: {check.message}"
            )
        self._open_ledger(config)
        config = config.with_(privacy_unit=got.get("privacy_unit", config.privacy_unit))
        save_config(self.options.data_dir, config)
        log.info("node %s is back (federation %s)", config.node_id, config.federation_id)
        return config

    def _check(self, schema: dict[str, Any]) -> SchemaCheck:
        try:
            self.data = load_local(self.options.data, target=self.options.target, schema=schema)
        except SchemaMismatch as exc:
            self.data = None
            return SchemaCheck(ok=False, rows=None, message=exc.detail)
        return self.data.check

    def _open_ledger(self, config: NodeConfig) -> None:
        if self.ledger is not None or self.data is None:
            return
        try:
            self.ledger = LocalLedger.open(
                ledger_path(self.options.data_dir),
                fingerprint_key=bytes.fromhex(config.fingerprint_key),
                data=self.data,
                epsilon=self.options.epsilon,
                delta=self.options.delta,
                name=self.options.name,
            )
        except InvalidInput as exc:
            raise NodeError(exc.detail) from None

    # --- loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Poll and work until a test limit says stop (never, by default). Returns the
        number of tasks handled."""
        idle, handled = 0, 0
        opts = self.options
        while opts.max_tasks is None or handled < opts.max_tasks:
            answer = self.api.poll(opts.poll_wait_s)
            if answer.status_code == 401:
                raise NodeError("the server refused this node's credential (revoked?)")
            if answer.status_code == 204 or answer.status_code != 200:
                if answer.status_code not in (204, 200):
                    log.warning(
                        "poll answered HTTP %s: %s", answer.status_code, problem_detail(answer)
                    )
                idle += 1
                if opts.max_idle_polls is not None and idle >= opts.max_idle_polls:
                    break
                continue
            idle = 0
            body = answer.json()
            self.handle(body.get("task", body) if isinstance(body, dict) else body)
            handled += 1
        return handled

    def handle(self, raw: Any) -> None:
        """Do one task: refuse it, or train and upload. Never raises for the task's sake."""
        task_id = raw.get("id") if isinstance(raw, dict) else None
        try:
            task = Task.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            if isinstance(task_id, str):
                self._refuse(
                    None,
                    task_id,
                    Refusal(
                        reason="error",
                        message=f"this node cannot read the task: {where}: {first['msg']}",
                    ),
                )
            return
        try:
            self._work(task)
        except PPMLError as exc:
            self._refuse(task, task.id, Refusal(reason="error", message=exc.detail))
        except (ValueError, RuntimeError) as exc:  # torch's errors quote no data values
            log.exception("task %s failed", task.id)
            self._refuse(
                task,
                task.id,
                Refusal(reason="error", message=f"local training failed: {type(exc).__name__}"),
            )

    def _work(self, task: Task) -> None:
        assert self.data is not None and self.ledger is not None
        refusal = self._precheck(task)
        if refusal is not None:
            self._refuse(task, task.id, refusal)
            return
        answer = self.api.weights(task.id)
        if answer.status_code != 200:
            log.info("task %s is no longer open (HTTP %s)", task.id, answer.status_code)
            return
        weights = decode_weights(
            answer.content, expected=expected_shapes(task), sha256=task.weights_sha256
        )
        metadata: dict[str, str] = {}
        if task.mode == "sample":
            outcome = self._charge(task)
            if isinstance(outcome, Refusal):
                self._refuse(task, task.id, outcome)
                return
            metadata = {
                "epsilon": repr(outcome.epsilon),
                "epsilon_total": repr(outcome.epsilon_total),
            }
        else:
            self.ledger.record(
                job_id=task.job_id, task_id=task.id, mode=task.mode, round_index=task.round
            )
        update = local_update(task, self.data, weights)
        self._upload(task, encode_update(update, metadata))

    def _precheck(self, task: Task) -> Refusal | None:
        assert self.data is not None
        if task.mode == "none":
            return Refusal(
                reason="budget",
                message="this node's data has a privacy budget: "
                "it trains only under differential privacy (sample or client level)",
            )
        if task.num_features != self.data.num_features or task.num_classes != len(
            self.data.classes
        ):
            return Refusal(
                reason="schema",
                message=f"the task's model takes "
                f"{task.num_features} features and {task.num_classes} classes; this "
                f"node's data has {self.data.num_features} and "
                f"{len(self.data.classes)}",
            )
        if task.mode == "sample":  # refuse before the download, which counts as a start
            assert self.ledger is not None
            sample = task.sample
            return self.ledger.fits(
                job_id=task.job_id,
                rounds=max(sample.rounds, task.rounds),
                event=sample.round_event(),
            )
        return None

    def _charge(self, task: Task) -> Charge | Refusal:
        assert self.ledger is not None
        sample = task.sample
        outcome = self.ledger.charge_round(
            job_id=task.job_id,
            task_id=task.id,
            round_index=task.round,
            rounds=max(sample.rounds, task.rounds),
            event=sample.round_event(),
            delta=sample.delta,
        )
        if isinstance(outcome, Charge):
            log.info(
                "task %s (job %s, round %s): charged ε=%.4g, job total ε=%.4g, ε=%.4g left",
                task.id,
                task.job_id,
                task.round,
                outcome.epsilon,
                outcome.epsilon_total,
                self.ledger.remaining(),
            )
        return outcome

    def _upload(self, task: Task, body: bytes) -> None:
        answer = self.api.upload(task.id, body)
        if answer.status_code in (200, 201, 202):
            log.info("task %s: update accepted", task.id)
        else:
            log.warning(
                "task %s: update not accepted (HTTP %s): %s",
                task.id,
                answer.status_code,
                problem_detail(answer),
            )

    def _refuse(self, task: Task | None, task_id: str, refusal: Refusal) -> None:
        log.warning("task %s refused (%s): %s", task_id, refusal.reason, refusal.message)
        if task is not None and self.ledger is not None:
            self.ledger.refused(job_id=task.job_id, task_id=task_id, refusal=refusal)
        self.api.refuse(task_id, refusal.reason, refusal.message)

    def close(self) -> None:
        self.api.close()
        if self.ledger is not None:
            self.ledger.close()
