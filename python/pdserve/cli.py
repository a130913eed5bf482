"""The `pdserve` console script: one sub-command per job (SPEC §2).

Each sub-command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only dispatches, so `pdserve --help` stays fast and imports no torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# (sub-command, module, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("serve", "pdserve.server.cli_serve", "run one instance (prefill, decode or both)"),
    ("scheduler", "pdserve.server.cli_scheduler", "run the global scheduler"),
    ("link", "pdserve.server.cli_link", "create the communication domain between P and D"),
    ("bench", "pdserve.client.bench", "load client: latency, throughput and goodput"),
    ("plot", "pdserve.client.plot", "latency CDFs and latency-vs-rate curves from bench results"),
    (
        "demo",
        "pdserve.demo",
        "start a small cluster here, run a multi-turn workload, print results",
    ),
]


def _available(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="LLM serving with prefill/decode disaggregation and context caching.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        if not _available(module_name):
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def _version() -> str:
    from pdserve import __version__

    return f"pdserve {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
