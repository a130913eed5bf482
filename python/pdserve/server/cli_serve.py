"""`pdserve serve`: one instance (prefill, decode or both) with the OpenAI API and the internal API.

Every flag of the seed's launch recipe (SPEC §1) is accepted verbatim next to our own spellings; a flag
whose feature needs hardware or support that is absent fails at start with a message naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

from pdserve.argtypes import fraction, positive_float, positive_int
from pdserve.server import auth

DEFAULT_SCHEDULER_URL = "http://127.0.0.1:8081"
DEFAULT_PORT_BY_ROLE = {"prefill": 8082, "decode": 8084, "both": 8082}
ROLE_ALIASES = {
    "prompt": "prefill",
    "decoder": "decode",
    "prefill": "prefill",
    "decode": "decode",
    "both": "both",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "dummy")


class ConfigError(ValueError):
    """A flag combination that cannot run here; the message names the flag."""


def _role(value: str) -> str:
    role = ROLE_ALIASES.get(value)
    if role is None:
        raise argparse.ArgumentTypeError(
            f"invalid role {value!r}; choose prefill (alias prompt), decode (alias decoder) or both"
        )
    return role


def _block_size(value: str) -> int:
    n = positive_int(value)
    if n & (n - 1) or n > 256:
        raise argparse.ArgumentTypeError(f"block size must be a power of two in [1, 256], got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("instance")
    g.add_argument(
        "--model", required=True, help="HF-format directory or preset name (tiny, llama-2-7b, ...)"
    )
    g.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: --model)"
    )
    g.add_argument(
        "--host", "--local_host", dest="host", default="127.0.0.1", help="address to bind"
    )
    g.add_argument(
        "--advertise-host",
        default=None,
        help="address peers and the scheduler use to reach this instance (default: --host, or 127.0.0.1 "
        "when --host is a wildcard such as 0.0.0.0)",
    )
    g.add_argument(
        "--port",
        "--local_port",
        dest="port",
        type=int,
        default=None,
        help="HTTP port (default: 8082 for prefill/both, 8084 for decode, the seed's ports)",
    )
    g.add_argument(
        "--role",
        type=_role,
        metavar="{prefill,decode,both}",
        default=None,
        help="prefill (alias prompt), decode (alias decoder) or both (colocated; the default)",
    )
    g.add_argument(
        "--enable-separate",
        "--disaggregated",
        dest="enable_separate",
        action="store_true",
        help="disaggregated mode: this instance does only its --role's phase",
    )
    g.add_argument(
        "--scheduler",
        default=None,
        help=f"global scheduler to register with (default: offer to {DEFAULT_SCHEDULER_URL} and keep retrying; 'none' to stay alone)",
    )
    g.add_argument(
        "--heartbeat-interval", type=positive_float, default=1.0, help="seconds between heartbeats"
    )
    g.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

    a = parser.add_argument_group("access")
    auth.add_api_key_argument(a)
    auth.add_cluster_token_argument(a)

    c = parser.add_argument_group("caching and transfer")
    c.add_argument(
        "--enable-radix-caching",
        "--prefix-caching",
        dest="enable_radix_caching",
        action="store_true",
        help="radix-tree prefix cache over KV blocks",
    )
    c.add_argument(
        "--enable-layer",
        "--layerwise-transfer",
        dest="enable_layer",
        action="store_true",
        help="send each layer's KV as soon as it is computed (default: whole request after prefill)",
    )
    c.add_argument(
        "--enable-dcache",
        "--back-transfer",
        dest="enable_dcache",
        action="store_true",
        help="after decode, send the sequence's new KV blocks back to the prefill instance's cache",
    )
    c.add_argument(
        "--enable-direct",
        "--gpu-direct",
        dest="enable_direct",
        action="store_true",
        help="KV straight from the prefill GPU to the decode GPU (needs CUDA GPUs)",
    )
    c.add_argument(
        "--enable-trans-to-dram",
        "--host-tier",
        dest="enable_trans_to_dram",
        action="store_true",
        help="pinned host DRAM as a second cache tier",
    )
    c.add_argument(
        "--host-kv-cache-gb", type=positive_float, default=None, help="size of the DRAM tier"
    )
    c.add_argument(
        "--use-agg-block",
        "--block-major",
        dest="use_agg_block",
        action="store_true",
        help="aggregated (block-major) KV layout: few large transfer pieces",
    )
    c.add_argument(
        "--enable-radix-evictor",
        "--evictor",
        dest="enable_radix_evictor",
        action="store_true",
        help="watermark evictor: demote/free unreferenced cache blocks past a threshold",
    )
    c.add_argument(
        "--kv-staging",
        choices=("auto", "on", "off"),
        default="auto",
        help="copy KV through pinned host slots (auto: when the KV is on a GPU and --enable-direct is off)",
    )
    c.add_argument(
        "--staging-gb",
        type=positive_float,
        default=4.0,
        help="size of the pinned host staging arena (a request holds slots for its prompt's blocks)",
    )
    c.add_argument(
        "--transfer-port", type=int, default=0, help="KV transfer listening port (0: any free port)"
    )
    c.add_argument(
        "--transfer-timeout",
        type=positive_float,
        default=60.0,
        help="seconds a decode instance waits for a request's KV before aborting it",
    )

    e = parser.add_argument_group("engine")
    e.add_argument(
        "--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=positive_int, default=1
    )
    e.add_argument(
        "--worker-use-ray",
        action="store_true",
        help="launch TP workers with Ray (default: multiprocessing)",
    )
    e.add_argument(
        "--disable-custom-all-reduce",
        action="store_true",
        help="TP on GPUs: NCCL for every collective instead of the IPC all-reduce (decode then runs "
        "without CUDA graphs at TP > 1)",
    )
    e.add_argument("--block-size", type=_block_size, default=16, help="tokens per KV block")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--dtype", choices=DTYPES, default="auto")
    e.add_argument("--kv-cache-gb", type=positive_float, default=None, help="KV cache size on CPU")
    e.add_argument("--gpu-memory-utilization", type=fraction, default=0.9)
    e.add_argument("--max-num-seqs", type=positive_int, default=None)
    e.add_argument("--max-num-batched-tokens", type=positive_int, default=None)
    e.add_argument("--max-model-len", type=positive_int, default=None)
    e.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    e.add_argument("--seed", type=int, default=0)


@dataclass
class ServeConfig:
    """The instance's resolved settings (after defaults and checks)."""

    model: str
    served_model_name: str
    host: str
    port: int
    advertise_host: str
    role: str  # prefill | decode | both
    scheduler_url: str | None
    scheduler_is_default: bool
    enable_separate: bool = False
    heartbeat_interval: float = 1.0
    enable_radix_caching: bool = False
    enable_layer: bool = False
    enable_dcache: bool = False
    enable_direct: bool = False
    enable_trans_to_dram: bool = False
    host_kv_cache_gb: float | None = None
    use_agg_block: bool = False
    enable_radix_evictor: bool = False
    kv_staging: str = "auto"
    staging_gb: float = 4.0
    transfer_port: int = 0
    transfer_timeout: float = 60.0
    tensor_parallel_size: int = 1
    worker_use_ray: bool = False
    disable_custom_all_reduce: bool = False
    block_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    # secrets: never printed (repr=False), never sent anywhere but in their headers
    api_key: str | None = field(default=None, repr=False)
    cluster_token: str | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_config(args: argparse.Namespace, cuda_available: bool | None = None) -> ServeConfig:
    """Apply defaults and check flag combinations; raises ConfigError naming the flag."""
    role = args.role
    if args.enable_separate and role in (None, "both"):
        raise ConfigError(
            "--enable-separate needs --role prefill (alias prompt) or --role decode (alias decoder)"
        )
    if role is None:
        role = "both"
    if role != "both" and not args.enable_separate:
        # The seed always paired --role with --enable-separate; a role alone means the same.
        args.enable_separate = True
    cuda = _cuda_available() if cuda_available is None else cuda_available
    if args.device == "cuda" and not cuda:
        raise ConfigError(
            "--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)"
        )
    on_gpu = args.device == "cuda" or (args.device == "auto" and cuda)
    if args.enable_direct:
        if not on_gpu:
            raise ConfigError(
                "--enable-direct sends KV GPU to GPU, but this instance runs on the CPU (no CUDA GPU visible); "
                "drop the flag: on the CPU the KV goes over TCP"
            )
        if args.tensor_parallel_size > 1:
            raise ConfigError(
                f"--enable-direct with --tensor-parallel-size {args.tensor_parallel_size}: the direct "
                "(CUDA IPC) transport sends from one GPU process's KV only in this version; drop "
                "--enable-direct (the KV then goes through pinned host staging) or run "
                "--tensor-parallel-size 1"
            )
        if args.kv_staging == "on":
            raise ConfigError(
                "--kv-staging on and --enable-direct contradict each other: direct sends never stage"
            )
    if args.enable_dcache and role == "both":
        raise ConfigError(
            "--enable-dcache sends decode KV back to a prefill instance; it needs --enable-separate --role"
        )
    if args.enable_dcache and not args.enable_radix_caching:
        raise ConfigError(
            "--enable-dcache inserts the returned KV into the radix cache; add --enable-radix-caching"
        )
    if args.enable_trans_to_dram and not args.enable_radix_caching:
        raise ConfigError(
            "--enable-trans-to-dram is a second tier of the radix cache; add --enable-radix-caching"
        )
    if args.enable_radix_evictor and not args.enable_radix_caching:
        raise ConfigError(
            "--enable-radix-evictor evicts radix cache blocks; add --enable-radix-caching"
        )
    if args.host_kv_cache_gb is not None and not args.enable_trans_to_dram:
        raise ConfigError("--host-kv-cache-gb sizes the DRAM tier; add --enable-trans-to-dram")
    api_key = auth.secret_from(args.api_key, auth.API_KEY_ENV)
    cluster_token = auth.secret_from(args.cluster_token, auth.CLUSTER_TOKEN_ENV)
    try:
        auth.check_secrets(api_key, cluster_token)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    notes = []
    open_internal = auth.open_internal_note(api_key, cluster_token)
    if open_internal:
        notes.append(open_internal)
    if role == "both" and args.enable_layer:
        notes.append(
            "--enable-layer: a colocated instance sends no KV; the flag matters with --enable-separate"
        )
    if args.worker_use_ray and args.tensor_parallel_size == 1:
        notes.append(
            "--worker-use-ray: accepted; with --tensor-parallel-size 1 there are no workers to launch"
        )
    port = args.port if args.port is not None else DEFAULT_PORT_BY_ROLE[role]
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    sched = args.scheduler
    is_default = sched is None
    if sched is None:
        sched = DEFAULT_SCHEDULER_URL
    elif sched.lower() in ("none", "off", ""):
        sched = None
    elif not sched.startswith(("http://", "https://")):
        raise ConfigError(f"--scheduler must be an http:// URL or 'none', got {sched!r}")
    return ServeConfig(
        model=args.model,
        served_model_name=args.served_model_name or args.model,
        host=args.host,
        port=port,
        advertise_host=args.advertise_host
        or ("127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host),
        role=role,
        scheduler_url=sched.rstrip("/") if sched else None,
        scheduler_is_default=is_default,
        enable_separate=role != "both",
        heartbeat_interval=args.heartbeat_interval,
        enable_radix_caching=args.enable_radix_caching,
        enable_layer=args.enable_layer,
        enable_dcache=args.enable_dcache,
        enable_direct=args.enable_direct,
        enable_trans_to_dram=args.enable_trans_to_dram,
        host_kv_cache_gb=args.host_kv_cache_gb,
        use_agg_block=args.use_agg_block,
        enable_radix_evictor=args.enable_radix_evictor,
        kv_staging=args.kv_staging,
        staging_gb=args.staging_gb,
        transfer_port=args.transfer_port,
        transfer_timeout=args.transfer_timeout,
        tensor_parallel_size=args.tensor_parallel_size,
        worker_use_ray=args.worker_use_ray,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        load_format=args.load_format,
        seed=args.seed,
        api_key=api_key,
        cluster_token=cluster_token,
        notes=notes,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"pdserve serve: error: {exc}", file=sys.stderr)
        return 2
    for note in config.notes:
        print(f"pdserve serve: note: {note}", file=sys.stderr)
    from pdserve.server.instance import serve_forever

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return serve_forever(config)
