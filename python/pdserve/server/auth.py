"""Who may call what (SPEC §7): the public API key on `/v1/*`, the cluster token on `/internal/*`.

Two secrets for two doors, one middleware for instances and the scheduler alike. The API key
(`--api-key`, like vLLM's) is for clients and travels as `Authorization: Bearer KEY`; the cluster token
(`--cluster-token`) is for the scheduler, the instances and `pdserve link`, and travels in the header
`X-PDServe-Cluster-Token`. Neither opens the other's door (the two may not be equal), `/health` and
`/metrics` stay open for probes and Prometheus, and no path is checked when its secret is unset (the
default: today's open cluster). Secrets are compared in constant time and never echoed or logged.
"""

from __future__ import annotations

import hmac
import os

from aiohttp import web

from pdserve.server.protocol import ProtocolError

API_KEY_ENV = "PDSERVE_API_KEY"
CLUSTER_TOKEN_ENV = "PDSERVE_CLUSTER_TOKEN"
CLUSTER_TOKEN_HEADER = "X-PDServe-Cluster-Token"
PUBLIC_PREFIX = "/v1/"
INTERNAL_PREFIX = "/internal/"


def secret_from(value: str | None, *env_names: str) -> str | None:
    """The flag's value, else the first non-empty environment variable of `env_names`, else None.
    An empty string counts as unset (so `--api-key ''` or `PDSERVE_API_KEY=` turns auth off)."""
    if value:
        return value
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def add_api_key_argument(parser) -> None:
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on the OpenAI API /v1/* (default: ${API_KEY_ENV}; "
        "unset: open); /health and /metrics stay open",
    )


def add_cluster_token_argument(parser, what: str = "") -> None:
    parser.add_argument(
        "--cluster-token",
        default=None,
        metavar="TOKEN",
        help=what
        or f"require header '{CLUSTER_TOKEN_HEADER}: TOKEN' on the internal API /internal/*, and send it "
        f"on every internal call this process makes (default: ${CLUSTER_TOKEN_ENV}; unset: open). "
        "Give every instance and the scheduler the same token",
    )


def check_secrets(api_key: str | None, cluster_token: str | None) -> None:
    """Raises ValueError when the API key and the cluster token are the same secret (one would open
    both doors: a client holding the API key could drive the internal API)."""
    if api_key and cluster_token and hmac.compare_digest(api_key.encode(), cluster_token.encode()):
        raise ValueError(
            "--api-key and --cluster-token are the same secret; give the cluster token another value "
            "(clients holding the API key must not reach the internal API)"
        )


def open_internal_note(api_key: str | None, cluster_token: str | None) -> str | None:
    """A warning for people when the public door is locked and the internal one is not."""
    if api_key and not cluster_token:
        return (
            "--api-key without --cluster-token: the internal API (/internal/*) stays open, and whoever "
            "reaches it can generate without the key; set --cluster-token (or $PDSERVE_CLUSTER_TOKEN) "
            "on the scheduler and every instance"
        )
    return None


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """HTTP headers that carry a client's API key (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def cluster_headers(cluster_token: str | None) -> dict[str, str]:
    """HTTP headers that carry the cluster token on an internal call (none without one)."""
    return {CLUSTER_TOKEN_HEADER: cluster_token} if cluster_token else {}


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def public_refusal(headers, api_key: str) -> str | None:
    """Why a public request with these headers is refused, or None when its API key matches."""
    auth = headers.get("Authorization")
    if auth is None:
        return (
            "missing API key: this server needs the header 'Authorization: Bearer <API key>' "
            "(the key its --api-key names)"
        )
    scheme, _, given = auth.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed Authorization header: expected 'Bearer <API key>'"
    if not _same(given.strip(), api_key):
        return "wrong API key: the bearer token in the Authorization header is not this server's --api-key"
    return None


def internal_refusal(headers, cluster_token: str) -> str | None:
    """Why an internal request with these headers is refused, or None when its cluster token matches."""
    given = headers.get(CLUSTER_TOKEN_HEADER)
    if given is None:
        hint = (
            " (an Authorization header, the public API key, does not open the internal API)"
            if "Authorization" in headers
            else ""
        )
        return (
            f"missing cluster token: the internal API needs the header '{CLUSTER_TOKEN_HEADER}: <token>' "
            f"(the value of --cluster-token / ${CLUSTER_TOKEN_ENV}){hint}"
        )
    if not _same(given, cluster_token):
        return (
            f"wrong cluster token in the header {CLUSTER_TOKEN_HEADER}: give this process and its "
            "peers the same --cluster-token"
        )
    return None


def _refuse(message: str, bearer: bool) -> web.Response:
    err = ProtocolError(message, 401, kind="authentication_error")
    headers = {"WWW-Authenticate": "Bearer"} if bearer else None
    return web.json_response(err.to_json(), status=401, headers=headers)


def auth_middleware(api_key: str | None, cluster_token: str | None):
    """An aiohttp middleware that answers 401 (OpenAI-shaped error, `type: authentication_error`) to a
    `/v1/*` request without the API key and to an `/internal/*` request without the cluster token.
    Any other path (`/health`, `/metrics`) passes. A secret that is None leaves its paths open."""
    check_secrets(api_key, cluster_token)

    @web.middleware
    async def check_auth(request: web.Request, handler):
        # the path of the route that will answer (not the raw one: no spelling of a path slips by)
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else request.path
        if api_key and path.startswith(PUBLIC_PREFIX):
            refusal = public_refusal(request.headers, api_key)
            if refusal is not None:
                return _refuse(refusal, bearer=True)
        elif cluster_token and path.startswith(INTERNAL_PREFIX):
            refusal = internal_refusal(request.headers, cluster_token)
            if refusal is not None:
                return _refuse(refusal, bearer=False)
        return await handler(request)

    return check_auth


def describe(api_key: str | None, cluster_token: str | None) -> str:
    """One phrase for start-up lines: which doors are locked (never the secrets)."""
    public = "API key on /v1" if api_key else "/v1 open"
    internal = "cluster token on /internal" if cluster_token else "/internal open"
    return f"{public}, {internal}"
