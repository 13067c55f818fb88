"""Authentication: who a bearer token acts for, checked before anything reads a body.

FastAPI reads and parses a route's body before it solves the route's dependencies, so a
dependency alone would let anyone without a key make the API parse 100 MB of JSON before its
401. :class:`Authenticate` is ASGI middleware: every ``/v1`` request passes it before any
route (or parser) runs; it hands the principal it found to the dependencies in the scope.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response, unavailable_response
from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.models import utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import UNAVAILABLE, Database
from ppml.errors import Unauthorized
from ppml.services.nodes import CREDENTIAL_PREFIX, NodePrincipal, check_credential
from ppml.services.tenants import Principal, ValidKey, check_key, hash_key, record_key_use

__all__ = [
    "ENROLMENT_PATHS",
    "KEY_CACHE_TTL_S",
    "NODE_SCOPE_KEY",
    "PRINCIPAL_SCOPE_KEY",
    "Authenticate",
    "bearer_token",
    "is_admin_path",
    "is_admin_token",
    "is_node_path",
    "node_for_credential",
    "principal_for_token",
]

log = logging.getLogger(__name__)

PRINCIPAL_SCOPE_KEY = "ppml.principal"
NODE_SCOPE_KEY = "ppml.node"
# Node routes whose caller has no credential yet: the enrolment token is in the small body.
ENROLMENT_PATHS = frozenset({"/v1/node/schema", "/v1/node/enrol"})

# Valid keys, so most requests skip the key lookup. Only valid keys are cached (a guessed
# key always reaches the database), and an entry lives half a second: a revoked key is
# refused by every API process within that (plus the lookup in flight), well inside the
# promised second, with no cross-process signal to lose. The price is one indexed lookup per
# active key per process every half second, instead of one per request. Expiry is checked on
# every hit (the entry carries expires_at), so an expired key is refused at once.
KEY_CACHE_TTL_S = 0.5
_keys: LRUCache[str, ValidKey] = LRUCache(4096, ttl=KEY_CACHE_TTL_S)


def is_admin_token(settings: Settings, token: str) -> bool:
    """Whether ``token`` is the admin token (compared in constant time)."""
    expected = settings.ensure_admin_token()
    return hmac.compare_digest(token.encode(), expected.encode())


def _look_up(db: Database, token: str) -> ValidKey | None:
    now = utcnow()
    # A short read of its own: the request's writer transaction must not start here.
    with db.read_one() as session:
        valid = check_key(Repositories(session), token, now=now)
    if valid is not None and valid.use_unrecorded:
        try:  # last_used_at is advisory: a busy database must not refuse the request
            with db.session(write=True) as session:
                record_key_use(Repositories(session), valid.id, now=now)
        except UNAVAILABLE as exc:
            log.warning("last_used_at of key %s not recorded: %s", valid.id, exc)
    return valid


async def principal_for_token(db: Database, token: str) -> Principal | None:
    """The principal of a valid (unrevoked, unexpired) API key, or None.

    Async, so a cached key costs no thread-pool hop; only a miss reads in a thread.
    """
    digest = hash_key(token)
    valid = _keys.get(digest)
    if valid is None:
        valid = await _shared_look_up(db, token, digest)
        if valid is None:
            return None
        _keys.put(digest, valid)
    if not valid.valid_at(utcnow()):
        _keys.pop(digest)
        return None
    return valid.principal


# Lookups under way, by event loop and key hash: when a busy key's entry expires, the
# requests that find it gone share one lookup instead of each making its own (and its own
# thread-pool hop and connection). A waiter gets the answer of a lookup that started after
# the entry expired, as if it had made it.
_inflight: dict[tuple[int, str], asyncio.Future[ValidKey | None]] = {}


async def _shared_look_up(db: Database, token: str, digest: str) -> ValidKey | None:
    key = (id(asyncio.get_running_loop()), digest)
    lookup = _inflight.get(key)
    if lookup is None:
        lookup = asyncio.ensure_future(run_in_threadpool(_look_up, db, token))
        lookup.add_done_callback(_settled)
        _inflight[key] = lookup
        lookup.add_done_callback(lambda _done: _inflight.pop(key, None))
    # shield: a waiter that goes away (a closed connection) does not cancel the others' lookup
    return await asyncio.shield(lookup)


def _settled(lookup: asyncio.Future[ValidKey | None]) -> None:
    if not lookup.cancelled():
        lookup.exception()  # retrieved: an error with no waiter left is not logged as lost


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def is_admin_path(path: str) -> bool:
    """Routes of the admin token: tenants and their keys."""
    return path == "/v1/tenants" or path.startswith("/v1/tenants/")


def is_node_path(path: str) -> bool:
    """Routes of federation nodes: node credentials only (API keys are refused there)."""
    return path.startswith("/v1/node/")


def _node_look_up(db: Database, credential: str) -> NodePrincipal | None:
    with db.read_one() as session:
        return check_credential(Repositories(session), credential)


async def node_for_credential(db: Database, credential: str) -> NodePrincipal | None:
    """The active node behind a credential, or None. Not cached: a revoked node is refused
    at its next request."""
    if not credential.startswith(CREDENTIAL_PREFIX):
        return None
    return await run_in_threadpool(_node_look_up, db, credential)


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class Authenticate:
    """401 for a ``/v1`` request without a valid bearer token, before its body is read.

    Routes under ``/v1/tenants`` need the admin token, those under ``/v1/node/`` a node
    credential (but enrolment, which carries its token in the body), all others an API key;
    the principal of a key is left in the scope for :data:`api.deps.CurrentPrincipal`, a
    node's for :data:`api.deps.CurrentNode`. A refused request
    whose body is still on its way gets ``Connection: close``, so the server stops reading.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings, db: Database) -> None:
        self.app, self.settings, self.db = app, settings, db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            refusal = await self._check(scope)
        except UNAVAILABLE as exc:
            response = unavailable_response(exc)
        else:
            if refusal is None:
                await self.app(scope, receive, send)
                return
            response = error_response(Unauthorized(refusal))
        if _has_body(scope):
            response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def _check(self, scope: Scope) -> str | None:
        """None when the request may pass, else why not."""
        token = bearer_token(scope)
        if is_node_path(scope["path"]):
            return await self._check_node(scope, token)
        if token is None:
            return "missing bearer token"
        if token.startswith(CREDENTIAL_PREFIX):
            return "node credentials are accepted only on /v1/node/ routes"
        if is_admin_path(scope["path"]):
            return None if is_admin_token(self.settings, token) else "invalid admin token"
        principal = await principal_for_token(self.db, token)
        if principal is None:
            return "invalid API key"
        scope[PRINCIPAL_SCOPE_KEY] = principal
        return None

    async def _check_node(self, scope: Scope, token: str | None) -> str | None:
        if scope["path"] in ENROLMENT_PATHS:
            return None
        if token is None:
            return "missing bearer token"
        node = await node_for_credential(self.db, token)
        if node is None:
            return "invalid node credential (API keys are not accepted on /v1/node/ routes)"
        scope[NODE_SCOPE_KEY] = node
        return None
