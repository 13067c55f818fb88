"""``ppml tenants`` and ``ppml keys``: administration with the admin token."""

from __future__ import annotations

from typing import Annotated

import typer

from ppml.cli.common import AdminToken, AsJson, Url, api_client, created
from ppml.client import DEFAULT_URL

tenants_app = typer.Typer(help="Tenants (admin token).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin token).", no_args_is_help=True)


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
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create an API key for a tenant (admin); prints the key, which is shown only once."""
    with api_client(url, admin_token=admin_token) as client:
        key = client.create_api_key(tenant_id)
    message = f"key {key['id']} for tenant {tenant_id} (shown once; keep it secret)"
    created(key, key["key"], message, as_json)
