"""`pdserve scheduler`: the global scheduler (SPEC §2). Takes registrations, or fixed instances.

Two ways to start a cluster, both from the seed: scheduler first, then instances (they register at the
default address http://127.0.0.1:8081), or instances first, then `pdserve scheduler --manual` (fixed
pair at the seed's ports 8082 and 8084 unless --prefill/--decode say otherwise).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pdserve.server import auth
from pdserve.server.policies import POLICY_NAMES

DEFAULT_PREFILL_URL = "http://127.0.0.1:8082"
DEFAULT_DECODE_URL = "http://127.0.0.1:8084"


def _url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// URL, got {value!r}")
    return value.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="the model every instance serves (for tokenization)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument(
        "--ep-policy", choices=POLICY_NAMES, default="rr", help="how to pick the prefill instance"
    )
    parser.add_argument(
        "--ed-policy", choices=POLICY_NAMES, default="rr", help="how to pick the decode instance"
    )
    parser.add_argument(
        "--prefill",
        action="append",
        type=_url,
        default=[],
        metavar="URL",
        help="a fixed prefill instance (repeatable)",
    )
    parser.add_argument(
        "--decode",
        action="append",
        type=_url,
        default=[],
        metavar="URL",
        help="a fixed decode instance (repeatable)",
    )
    parser.add_argument(
        "--colocated",
        action="append",
        type=_url,
        default=[],
        metavar="URL",
        help="a fixed colocated (--role both) instance (repeatable)",
    )
    parser.add_argument(
        "--manual",
        action="store_true",
        help=f"fixed pair mode; without --prefill/--decode uses {DEFAULT_PREFILL_URL} and {DEFAULT_DECODE_URL}",
    )
    parser.add_argument(
        "--layerwise",
        choices=("auto", "on", "off"),
        default="auto",
        help="layer-wise KV transfer: auto follows each prefill instance's --enable-layer",
    )
    parser.add_argument(
        "--dcache",
        choices=("auto", "on", "off"),
        default="auto",
        help="back-transfer after decode: auto follows each decode instance's --enable-dcache",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between stats/event pulls"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    auth.add_api_key_argument(parser)
    auth.add_cluster_token_argument(parser)
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )


def build_config(args: argparse.Namespace):
    """SchedulerConfig from the flags (`--manual` alone means the seed's fixed pair 8082/8084; secrets
    fall back to $PDSERVE_API_KEY / $PDSERVE_CLUSTER_TOKEN). Raises ValueError when the API key and
    the cluster token are the same."""
    from pdserve.server.scheduler import SchedulerConfig

    api_key = auth.secret_from(args.api_key, auth.API_KEY_ENV)
    cluster_token = auth.secret_from(args.cluster_token, auth.CLUSTER_TOKEN_ENV)
    auth.check_secrets(api_key, cluster_token)

    prefill, decode = list(args.prefill), list(args.decode)
    if args.manual and not (prefill or decode or args.colocated):
        prefill, decode = [DEFAULT_PREFILL_URL], [DEFAULT_DECODE_URL]
    tri = {"auto": None, "on": True, "off": False}
    return SchedulerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        ep_policy=args.ep_policy,
        ed_policy=args.ed_policy,
        prefill_urls=prefill,
        decode_urls=decode,
        colocated_urls=list(args.colocated),
        poll_interval=args.poll_interval,
        seed=args.seed,
        layerwise=tri[args.layerwise],
        dcache=tri[args.dcache],
        api_key=api_key,
        cluster_token=cluster_token,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from aiohttp import web

    from pdserve.server.scheduler import GlobalScheduler

    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"pdserve scheduler: error: {exc}", file=sys.stderr)
        return 2
    note = auth.open_internal_note(config.api_key, config.cluster_token)
    if note:
        print(f"pdserve scheduler: note: {note}", file=sys.stderr)
    app = GlobalScheduler(config).build_app()
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    except OSError as exc:
        print(
            f"pdserve scheduler: error: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0
