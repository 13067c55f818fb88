"""``ppml tenants`` and ``ppml keys``: administration with the admin token."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from ppml.cli.common import AdminToken, AsJson, Url, api_client, created
from ppml.client import DEFAULT_URL

tenants_app = typer.Typer(help="Tenants (admin token).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin token).", no_args_is_help=True)


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
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create an API key for a tenant (admin); prints the key, which is shown only once."""
    with api_client(url, admin_token=admin_token) as client:
        key = client.create_api_key(tenant_id, role=role.value)
    message = f"{key['role']} key {key['id']} for tenant {tenant_id} (shown once; keep it secret)"
    created(key, key["key"], message, as_json)
