"""`pdserve serve` / `scheduler` / `link` arguments: the seed's flags verbatim, our spellings, clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from pdserve.server import cli_scheduler, cli_serve
from pdserve.server.cli_serve import DEFAULT_SCHEDULER_URL, ConfigError, resolve_config

SEED_PREFILL = (
    "--local_host 127.0.0.1 --model=tiny --local_port 8082 --worker-use-ray --tensor-parallel-size 2 "
    "--block-size 16 --enable-separate --role=prompt --enable-direct --enable-layer --enable-dcache "
    "--enable-radix-caching"
).split()


def parse(argv, cuda=False):
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    return resolve_config(parser.parse_args(argv), cuda_available=cuda)


def without(argv, *flags):
    out = []
    for a in argv:
        if a in flags:
            continue
        out.append(a)
    return out


def test_seed_flags_are_all_accepted_verbatim():
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    extra = ["--enable-trans-to-dram", "--use-agg-block", "--enable-radix-evictor"]
    args = parser.parse_args(SEED_PREFILL + extra)
    assert args.host == "127.0.0.1" and args.port == 8082 and args.model == "tiny"
    assert args.role == "prefill" and args.enable_separate and args.worker_use_ray
    assert args.tensor_parallel_size == 2 and args.block_size == 16
    assert (
        args.enable_direct
        and args.enable_layer
        and args.enable_dcache
        and args.enable_radix_caching
    )
    assert args.enable_trans_to_dram and args.use_agg_block and args.enable_radix_evictor
    decoder = parser.parse_args(["--model", "tiny", "--role=decoder", "--local_port", "8084"])
    assert decoder.role == "decode"


def test_seed_line_on_cpu_fails_naming_the_hardware_flags():
    with pytest.raises(ConfigError, match="--enable-direct"):
        parse(SEED_PREFILL)  # no GPU here
    # on a GPU the direct (CUDA IPC) transport takes one-rank instances; TP 2 names both flags
    with pytest.raises(ConfigError, match="--enable-direct with --tensor-parallel-size 2"):
        parse(SEED_PREFILL, cuda=True)
    direct = parse(without(SEED_PREFILL, "--tensor-parallel-size", "2"), cuda=True)
    assert direct.enable_direct and direct.tensor_parallel_size == 1
    with pytest.raises(ConfigError, match="--kv-staging on and --enable-direct"):
        parse(without(SEED_PREFILL, "--tensor-parallel-size", "2") + ["--kv-staging", "on"], True)
    argv = without(SEED_PREFILL, "--enable-direct")
    # tensor parallelism runs (the engine refuses a size the model cannot split, at start-up)
    config = parse(argv)
    assert config.tensor_parallel_size == 2 and config.worker_use_ray
    assert not any("--worker-use-ray" in n for n in config.notes)
    i = argv.index("--tensor-parallel-size")
    config = parse(argv[:i] + ["--tensor-parallel-size", "1"] + argv[i + 2 :])
    assert (
        config.role == "prefill"
        and config.port == 8082
        and config.enable_layer
        and config.enable_dcache
    )
    assert any("--worker-use-ray" in n for n in config.notes)


def test_defaults_and_our_spellings():
    c = parse(["--model", "tiny"])
    assert c.role == "both" and c.port == 8082 and c.scheduler_url == DEFAULT_SCHEDULER_URL
    assert c.scheduler_is_default
    c = parse(
        [
            "--model",
            "tiny",
            "--role",
            "decode",
            "--prefix-caching",
            "--back-transfer",
            "--scheduler",
            "none",
        ]
    )
    assert c.port == 8084 and c.enable_separate and c.enable_dcache and c.scheduler_url is None
    c = parse(
        [
            "--model",
            "tiny",
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--block-major",
            "--layerwise-transfer",
        ]
    )
    assert c.host == "0.0.0.0" and c.port == 9000 and c.use_agg_block and c.enable_layer
    assert (
        c.advertise_host == "127.0.0.1"
    )  # a wildcard bind is reached through loopback unless told
    c = parse(["--model", "tiny", "--host", "0.0.0.0", "--advertise-host", "10.0.0.7"])
    assert c.advertise_host == "10.0.0.7"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--enable-separate"], "--enable-separate needs --role"),
        (["--role", "both", "--enable-dcache", "--enable-radix-caching"], "--enable-dcache"),
        (["--role", "prefill", "--enable-dcache"], "--enable-radix-caching"),
        (["--enable-trans-to-dram"], "--enable-radix-caching"),
        (["--enable-radix-evictor"], "--enable-radix-caching"),
        (["--device", "cuda"], "--device cuda"),
        (["--scheduler", "localhost:8081"], "--scheduler"),
    ],
)
def test_bad_combinations_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(["--model", "tiny", *argv])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--role", "worker"], r"prefill \(alias prompt\), decode \(alias decoder\) or both"),
        (["--block-size", "12"], "power of two"),
        (["--dtype", "int8"], "float32"),
        (["--gpu-memory-utilization", "1.5"], r"\(0, 1\]"),
        (["--tensor-parallel-size", "0"], "positive integer"),
    ],
)
def test_bad_values_are_argparse_errors_naming_allowed_values(argv, message, capsys):
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "tiny", *argv])
    err = capsys.readouterr().err
    assert argv[0] in err
    import re

    assert re.search(message, err), err


def test_scheduler_arguments():
    parser = argparse.ArgumentParser()
    cli_scheduler.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            "tiny",
            "--ep-policy",
            "prefix",
            "--ed-policy",
            "least",
            "--prefill",
            "http://h:1",
            "--decode",
            "http://h:2",
        ]
    )
    assert args.ep_policy == "prefix" and args.prefill == ["http://h:1"] and args.port == 8081
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "tiny", "--ep-policy", "fastest"])


def test_serve_exits_with_a_clear_message_before_loading_anything():
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "serve", *SEED_PREFILL],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--enable-direct" in proc.stderr


def test_scheduler_manual_mode_defaults_to_the_seed_ports():
    parser = argparse.ArgumentParser()
    cli_scheduler.add_arguments(parser)
    config = cli_scheduler.build_config(parser.parse_args(["--model", "tiny", "--manual"]))
    assert config.prefill_urls == ["http://127.0.0.1:8082"] and config.decode_urls == [
        "http://127.0.0.1:8084"
    ]
    config = cli_scheduler.build_config(parser.parse_args(["--model", "tiny"]))
    assert config.prefill_urls == [] and config.port == 8081  # registrations only


def test_disable_custom_all_reduce_reaches_the_engine_config():
    from pdserve.server.engine_adapter import engine_config_kwargs

    base = ["--model", "tiny", "--tensor-parallel-size", "2"]
    assert engine_config_kwargs(parse(base))["custom_all_reduce"] is True
    off = parse(base + ["--disable-custom-all-reduce"])
    assert engine_config_kwargs(off)["custom_all_reduce"] is False
