"""The node API (#16): what a federation's remote node calls, outbound only.

Only node credentials are accepted here (``api.auth``; API keys are refused), but at
``/v1/node/schema`` and ``/v1/node/enrol``, whose enrolment token comes in the body. Each
route opens its own short transactions (``ppml.services.nodes``): a refused enrolment or a
rejected update is committed before its error is answered, and a long poll holds no
database connection while it waits.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Annotated

from fastapi import Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import CurrentNode, DatabaseDep, StoreDep
from api.routes.common import Router, errors
from api.schemas.federations import (
    Enrolment,
    EnrolmentToken,
    FederationInfo,
    Hello,
    NodeEnrolled,
    NodeHello,
    Poll,
    PollAnswer,
    Refusal,
    UpdateAccepted,
)
from ppml.db.federations import Federation
from ppml.errors import TooManyRequests
from ppml.services import nodes as service

router = Router(prefix="/v1/node", tags=["node"])

TaskId = Annotated[str, Path(max_length=64)]
#: How often a long poll looks for a task (a read after the first look; at 0.5 s a task
#: waited 0.25 s on average to be handed out), and the most polls one node may hold open.
POLL_INTERVAL_S = 0.2
MAX_POLLS_PER_NODE = 2
_polls: Counter[str] = Counter()  # open long polls per node, in this process


def _info(federation: Federation) -> dict[str, object]:
    return {
        "federation_id": federation.id,
        "schema": federation.data_schema,
        "privacy_unit": federation.privacy_unit,
    }


def _check(body: Enrolment | Hello) -> service.SchemaCheck:
    check = body.schema_check
    return service.SchemaCheck(ok=check.ok, rows=check.rows, message=check.message)


@router.post(
    "/schema", operation_id="node_schema", responses=errors(413), response_model=FederationInfo
)
def node_schema(body: EnrolmentToken, db: DatabaseDep) -> FederationInfo:
    """The schema an enrolment token's federation declares (the token is not used up)."""
    federation = service.federation_for_token(db, body.enrolment_token)
    return FederationInfo.model_validate(_info(federation))


@router.post(
    "/enrol",
    status_code=201,
    operation_id="node_enrol",
    responses=errors(413),
    response_model=NodeEnrolled,
)
def node_enrol(body: Enrolment, db: DatabaseDep) -> NodeEnrolled:
    """Exchange the enrolment token for a node credential (shown once). A node whose data
    does not match the schema is refused (422 schema-mismatch) and the token is used up."""
    enrolled = service.enrol(
        db,
        token=body.enrolment_token,
        software_version=body.software_version,
        check=_check(body),
    )
    return NodeEnrolled.model_validate(
        {
            **_info(enrolled.federation),
            "node_id": enrolled.node_id,
            "credential": enrolled.credential,
        }
    )


@router.post("/hello", operation_id="node_hello", responses=errors(), response_model=NodeHello)
def node_hello(body: Hello, node: CurrentNode, db: DatabaseDep) -> NodeHello:
    """A (re)started node reports its version and the check of its data; a failed check
    refuses the node (422 schema-mismatch; its credential stops working)."""
    federation = service.hello(db, node, software_version=body.software_version, check=_check(body))
    return NodeHello.model_validate({**_info(federation), "node_id": node.node_id})


@router.post(
    "/poll",
    operation_id="node_poll",
    responses={**errors(429), 204: {"description": "No task within wait_s."}},
    response_model=PollAnswer,
)
async def node_poll(body: Poll, node: CurrentNode, db: DatabaseDep, request: Request) -> Response:
    """The node's oldest open task, waiting up to ``wait_s`` (≤ 25 s) for one; 204 if none.

    Every poll marks the node seen. A node may hold at most two polls open at once (429)."""
    if _polls[node.node_id] >= MAX_POLLS_PER_NODE:
        raise TooManyRequests(
            f"at most {MAX_POLLS_PER_NODE} polls of one node at once", retry_after=1
        )
    _polls[node.node_id] += 1
    try:
        end, touch = time.monotonic() + body.wait_s, True
        while True:
            # Each look is its own short transaction: no connection is held while waiting.
            task = await run_in_threadpool(service.poll_once, db, node, touch=touch)
            touch = False
            if task is not None:
                return JSONResponse({"task": task})
            if time.monotonic() >= end or await request.is_disconnected():
                return Response(status_code=204)
            await asyncio.sleep(min(POLL_INTERVAL_S, max(0.0, end - time.monotonic())))
    finally:
        _polls[node.node_id] -= 1
        if _polls[node.node_id] <= 0:
            del _polls[node.node_id]


@router.get(
    "/tasks/{task_id}/weights",
    operation_id="node_task_weights",
    responses={
        **errors(404, 409),
        200: {"content": {"application/octet-stream": {}}, "description": "safetensors"},
    },
    response_class=Response,
)
def node_task_weights(
    task_id: TaskId, node: CurrentNode, db: DatabaseDep, store: StoreDep
) -> Response:
    """The global weights an open task trains from (safetensors, float32; 409 once the
    task is no longer open)."""
    key = service.weights_key(db, node, task_id)
    with store.open_plain(key) as path:
        content = path.read_bytes()
    return Response(content, media_type="application/octet-stream")


@router.post(
    "/tasks/{task_id}/update",
    status_code=202,
    operation_id="node_task_update",
    responses=errors(404, 409, 413),
    response_model=UpdateAccepted,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def node_task_update(
    task_id: TaskId, node: CurrentNode, db: DatabaseDep, store: StoreDep, request: Request
) -> UpdateAccepted:
    """Upload the task's update: safetensors of local − global (float32, the model's keys
    and shapes), ``__metadata__`` {"epsilon", "epsilon_total"} in sample mode. 409 when the
    round closed or the task is not open; 422 (malformed-update, and the task is marked
    rejected) for other keys, shapes or dtypes, NaN or infinite values, or a client-mode
    norm above 1.01 × the clipping norm."""
    body = await request.body()
    await run_in_threadpool(service.accept_update, db, store, node, task_id, body)
    return UpdateAccepted()


@router.post(
    "/tasks/{task_id}/refuse",
    operation_id="node_task_refuse",
    responses=errors(404, 409),
)
def node_task_refuse(
    task_id: TaskId, body: Refusal, node: CurrentNode, db: DatabaseDep
) -> dict[str, str]:
    """Decline a task (its budget would not allow it, its data, an error): it is refused."""
    service.refuse_task(db, node, task_id, reason=body.reason, message=body.message)
    return {"status": "refused"}
