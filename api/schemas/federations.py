"""Federations of remote data-owner nodes and the node API's bodies (#16)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import _In
from api.schemas.datasets import PrivacyBudget
from ppml.federation.schema import FederationSchema


class FederationCreate(_In):
    name: str = Field(min_length=1, max_length=200)
    data_schema: FederationSchema = Field(
        alias="schema",
        description="What every node's data must hold: the classes, and the feature columns' "
        "names or the input shape.",
    )
    privacy_unit: Literal["record", "client"] = Field(
        description="record: each node's rows are protected at that node (sample-level DP, "
        "charged on the node's own ledger); client: a whole node is the unit (client-level "
        "DP-FedAvg, charged on the federation's budget)."
    )
    budget: PrivacyBudget | None = Field(
        default=None,
        description="The federation's budget: required for privacy_unit client, refused for "
        "record.",
    )


class SchemaCheckView(BaseModel):
    ok: bool
    rows: int | None = Field(description="Training rows the node holds (released metadata).")
    message: str


class NodeView(BaseModel):
    id: str
    name: str
    status: Literal["invited", "active", "refused", "revoked"]
    online: bool = Field(description="Seen within the last 30 seconds.")
    last_seen: datetime | None
    software_version: str | None
    schema_check: SchemaCheckView | None


class FederationBudget(BaseModel):
    """As a dataset's budget shows it (spent + reserved + remaining = total)."""

    epsilon_total: float
    delta_total: float
    epsilon_spent: float
    epsilon_reserved: float
    epsilon_remaining: float
    epsilon_spent_composed: float = Field(
        default=0.0,
        description="ε of the committed charges by the tightest conversion (the full δ at the "
        "best order): what the receipts of client-level jobs add up to; at most epsilon_spent.",
    )


class Federation(BaseModel):
    id: str
    name: str
    data_schema: FederationSchema = Field(alias="schema")
    privacy_unit: Literal["record", "client"]
    dataset_id: str = Field(
        description="The backing dataset jobs on the federation are charged to (not listed)."
    )
    budget: FederationBudget | None
    nodes: list[NodeView]
    created_at: datetime


class FederationPage(BaseModel):
    items: list[Federation]
    next_page_token: str | None


class NodeCreate(_In):
    name: str = Field(min_length=1, max_length=200)


class NodeInvitation(BaseModel):
    node: NodeView
    enrolment_token: str = Field(description="Single use; shown once.")
    expires_at: datetime


# --- the node API ---------------------------------------------------------------------------


class SchemaCheckIn(_In):
    ok: bool
    rows: int | None = Field(default=None, ge=0, le=10**12)
    message: str = Field(default="", max_length=2000)


class EnrolmentToken(_In):
    enrolment_token: str = Field(min_length=1, max_length=200)


class Enrolment(_In):
    enrolment_token: str = Field(min_length=1, max_length=200)
    software_version: str = Field(min_length=1, max_length=64)
    schema_check: SchemaCheckIn


class Hello(_In):
    software_version: str = Field(min_length=1, max_length=64)
    schema_check: SchemaCheckIn


class FederationInfo(BaseModel):
    federation_id: str
    data_schema: FederationSchema = Field(alias="schema")
    privacy_unit: Literal["record", "client"]


class NodeHello(FederationInfo):
    node_id: str


class NodeEnrolled(NodeHello):
    credential: str = Field(description="The node's bearer credential; shown once.")


class Poll(_In):
    wait_s: float = Field(default=0, ge=0, le=25, description="Long-poll up to this long.")


class PollAnswer(BaseModel):
    task: dict[str, Any] = Field(description="The task (docs/federations.md, 'Task').")


class Refusal(_In):
    reason: Literal["budget", "schema", "error"]
    message: str = Field(default="", max_length=2000)


class UpdateAccepted(BaseModel):
    status: Literal["accepted"] = "accepted"
