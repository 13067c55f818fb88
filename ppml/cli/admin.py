"""``ppml tenants`` and ``ppml keys``: administration with the admin token."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from ppml.cli.common import (
    AdminToken,
    ApiKey,
    AsJson,
    Limit,
    Url,
    api_client,
    created,
    err,
    print_json,
    table,
)
from ppml.client import DEFAULT_URL

tenants_app = typer.Typer(help="Tenants (admin token).", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys: the admin's for every tenant, an owner's for its own tenant.",
    no_args_is_help=True,
)
TenantOption = Annotated[
    str | None,
    typer.Option(
        "--tenant",
        help="The tenant's id (with the admin token); without it, the API key's own tenant.",
        show_default=False,
    ),
]


class KeyRole(StrEnum):
    """The roles of an API key (PRIVACY.md, "Roles")."""

    owner = "owner"
    analyst = "analyst"


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="The tenant's name.")],
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create a tenant (admin); prints its id."""
    with api_client(url, admin_token=admin_token) as client:
        tenant = client.create_tenant(name)
    created(tenant, tenant["id"], f"tenant {tenant['id']} {tenant['name']!r}", as_json)


@keys_app.command("create")
def keys_create(
    tenant_id: Annotated[str, typer.Argument(help="The tenant's id.")],
    role: Annotated[
        KeyRole,
        typer.Option(
            help="owner: registers budgeted data and sees its exact figures; "
            "analyst: submits jobs and sees only differentially private releases."
        ),
    ] = KeyRole.owner,
    expires_at: Annotated[
        str | None,
        typer.Option(
            help="When the key stops working, ISO-8601 with a time zone "
            "(e.g. 2027-01-31T00:00:00Z); by default it never expires.",
            show_default=False,
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create an API key for a tenant (admin); prints the key, which is shown only once."""
    with api_client(url, admin_token=admin_token) as client:
        key = client.create_api_key(tenant_id, role=role.value, expires_at=expires_at)
    message = f"{key['role']} key {key['id']} for tenant {tenant_id} (shown once; keep it secret)"
    created(key, key["key"], message, as_json)


def _when(value: str | None) -> str:
    return "-" if value is None else value[:16].replace("T", " ")


@keys_app.command("list")
def keys_list(
    tenant: TenantOption = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    admin_token: AdminToken = None,
    limit: Limit = 50,
    as_json: AsJson = False,
) -> None:
    """List a tenant's keys, newest first (their first characters only, never the keys)."""
    with api_client(url, api_key=api_key, admin_token=admin_token) as client:
        items = client.list_api_keys(tenant, limit=limit)
    if as_json:
        print_json(items)
        return
    columns = ["id", "prefix", "role", "created", "expires", "revoked", "last used"]
    rows = [
        [
            k["id"],
            k["prefix"] + "…",
            k["role"],
            _when(k["created_at"]),
            _when(k["expires_at"]),
            _when(k["revoked_at"]),
            _when(k["last_used_at"]),
        ]
        for k in items
    ]
    table("API keys", columns, rows)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `ppml keys list`).")],
    tenant: TenantOption = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    admin_token: AdminToken = None,
) -> None:
    """Revoke a key; every API process refuses it within a second."""
    with api_client(url, api_key=api_key, admin_token=admin_token) as client:
        client.revoke_api_key(key_id, tenant_id=tenant)
    err().print(f"key {key_id} revoked")
