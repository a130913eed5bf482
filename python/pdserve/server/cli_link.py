"""`pdserve link --prefill URL --decode URL`: create the communication domain between two instances by hand.

The scheduler does this on its own when instances join; this is for the manual mode and for tools.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pdserve.server import auth
from pdserve.server.cli_scheduler import DEFAULT_DECODE_URL, DEFAULT_PREFILL_URL, _url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill", type=_url, default=DEFAULT_PREFILL_URL, help="prefill instance URL"
    )
    parser.add_argument(
        "--decode", type=_url, default=DEFAULT_DECODE_URL, help="decode instance URL"
    )
    parser.add_argument("--timeout", type=float, default=30.0)
    auth.add_cluster_token_argument(
        parser,
        what=f"the instances' --cluster-token, sent on the link calls (default: ${auth.CLUSTER_TOKEN_ENV})",
    )


async def _link(prefill: str, decode: str, timeout: float, cluster_token: str | None) -> None:
    import aiohttp

    from pdserve.server.scheduler_cluster import link_pair

    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout), headers=auth.cluster_headers(cluster_token)
    ) as session:
        await link_pair(session, prefill, decode)


def run(args: argparse.Namespace) -> int:
    try:
        token = auth.secret_from(args.cluster_token, auth.CLUSTER_TOKEN_ENV)
        asyncio.run(_link(args.prefill, args.decode, args.timeout, token))
    except Exception as exc:  # noqa: BLE001 - one line for people
        print(f"pdserve link: error: {exc}", file=sys.stderr)
        return 1
    print(f"linked {args.prefill} <-> {args.decode}")
    return 0
