"""`--api-key` and `--cluster-token` without model processes: the middleware on a small in-process app,
the flags and their environment fallbacks on every sub-command, and the key kept out of result files."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pdserve.client import bench
from pdserve.client.metrics import summarize
from pdserve.client.results import BenchConfig, BenchResult, result_to_dict
from pdserve.server import auth, cli_link, cli_scheduler, cli_serve
from pdserve.server.cli_serve import ConfigError, resolve_config

KEY = "sk-public-0123"
TOKEN = "cluster-secret-4567"
ENVS = (auth.API_KEY_ENV, auth.CLUSTER_TOKEN_ENV, "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def _no_secrets_in_env(monkeypatch):
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)


async def _ok(request):
    return web.json_response({"ok": True})


def _app(api_key, cluster_token) -> web.Application:
    app = web.Application(middlewares=[auth.auth_middleware(api_key, cluster_token)])
    for path in ("/v1/models", "/health", "/metrics", "/internal/v1/info"):
        app.router.add_get(path, _ok)
    app.router.add_post("/v1/completions", _ok)
    app.router.add_post("/internal/v1/link", _ok)
    return app


def _calls(api_key, cluster_token, calls) -> list[tuple[int, dict]]:
    """(status, JSON body) of each (method, path, headers) call to the in-process app."""

    async def go():
        async with TestClient(TestServer(_app(api_key, cluster_token))) as client:
            out = []
            for method, path, headers in calls:
                resp = await client.request(method, path, headers=headers, json={})
                out.append((resp.status, await resp.json()))
            return out

    return asyncio.run(go())


def _refusal(status_body: tuple[int, dict]) -> str:
    status, body = status_body
    assert status == 401, body
    err = body["error"]
    assert err["type"] == "authentication_error" and err["code"] == 401
    assert KEY not in err["message"] and TOKEN not in err["message"]
    return err["message"]


def test_public_endpoints_need_the_bearer_key_and_say_what_is_wrong():
    bearer = {"Authorization": f"Bearer {KEY}"}
    got = _calls(
        KEY,
        TOKEN,
        [
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"Authorization": "Bearer nope"}),
            ("POST", "/v1/completions", {"Authorization": f"Basic {KEY}"}),
            ("POST", "/v1/completions", {auth.CLUSTER_TOKEN_HEADER: TOKEN}),  # wrong door
            ("POST", "/v1/completions", bearer),
            ("GET", "/v1/models", {"Authorization": f"bearer {KEY}"}),  # scheme is case-blind
        ],
    )
    assert "missing API key" in _refusal(got[0])
    assert "wrong API key" in _refusal(got[1])
    assert "malformed Authorization header" in _refusal(got[2])
    assert "missing API key" in _refusal(got[3])
    assert got[4] == (200, {"ok": True}) and got[5] == (200, {"ok": True})


def test_internal_endpoints_need_the_cluster_token_and_refuse_the_api_key():
    got = _calls(
        KEY,
        TOKEN,
        [
            ("GET", "/internal/v1/info", None),
            ("POST", "/internal/v1/link", {auth.CLUSTER_TOKEN_HEADER: "nope"}),
            ("POST", "/internal/v1/link", {"Authorization": f"Bearer {KEY}"}),
            ("POST", "/internal/v1/link", {auth.CLUSTER_TOKEN_HEADER: KEY}),
            ("GET", "/internal/v1/info", {auth.CLUSTER_TOKEN_HEADER: TOKEN}),
        ],
    )
    assert "missing cluster token" in _refusal(got[0])
    assert "wrong cluster token" in _refusal(got[1])
    assert "does not open the internal API" in _refusal(got[2])
    assert "wrong cluster token" in _refusal(got[3])
    assert got[4] == (200, {"ok": True})


def test_health_and_metrics_stay_open_and_unset_secrets_open_their_paths():
    got = _calls(KEY, TOKEN, [("GET", "/health", None), ("GET", "/metrics", None)])
    assert [s for s, _ in got] == [200, 200]
    # no secrets: today's behaviour, everything open
    got = _calls(None, None, [("GET", "/v1/models", None), ("GET", "/internal/v1/info", None)])
    assert [s for s, _ in got] == [200, 200]
    # only a cluster token: the public API stays open, the internal one does not
    got = _calls(None, TOKEN, [("GET", "/v1/models", None), ("GET", "/internal/v1/info", None)])
    assert [s for s, _ in got] == [200, 401]
    # only an API key: the reverse
    got = _calls(KEY, None, [("GET", "/v1/models", None), ("GET", "/internal/v1/info", None)])
    assert [s for s, _ in got] == [401, 200]


def test_the_two_secrets_must_differ():
    with pytest.raises(ValueError, match="same secret"):
        auth.auth_middleware("same", "same")


def _serve(argv):
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    return resolve_config(parser.parse_args(["--model", "tiny", *argv]), cuda_available=False)


def _parsed(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_flags_and_environment_fallbacks(monkeypatch):
    config = _serve([])
    assert config.api_key is None and config.cluster_token is None
    config = _serve(["--api-key", KEY, "--cluster-token", TOKEN])
    assert (config.api_key, config.cluster_token) == (KEY, TOKEN)
    assert KEY not in repr(config) and TOKEN not in repr(config)
    # the API key alone leaves the internal API open: said at start
    assert any("--api-key without --cluster-token" in n for n in _serve(["--api-key", KEY]).notes)
    monkeypatch.setenv(auth.API_KEY_ENV, "from-env")
    monkeypatch.setenv(auth.CLUSTER_TOKEN_ENV, "token-env")
    config = _serve([])
    assert (config.api_key, config.cluster_token) == ("from-env", "token-env")
    assert not config.notes
    assert _serve(["--api-key", KEY]).api_key == KEY  # the flag wins
    with pytest.raises(ConfigError, match="same secret"):
        _serve(["--api-key", "x", "--cluster-token", "x"])


def test_scheduler_link_and_bench_flags_and_environment_fallbacks(monkeypatch):
    args = _parsed(cli_scheduler, ["--model", "tiny"])
    config = cli_scheduler.build_config(args)
    assert config.api_key is None and config.cluster_token is None
    monkeypatch.setenv(auth.API_KEY_ENV, KEY)
    monkeypatch.setenv(auth.CLUSTER_TOKEN_ENV, TOKEN)
    config = cli_scheduler.build_config(args)
    assert (config.api_key, config.cluster_token) == (KEY, TOKEN)
    assert KEY not in repr(config) and TOKEN not in repr(config)
    config = cli_scheduler.build_config(
        _parsed(cli_scheduler, ["--model", "tiny", "--api-key", "k", "--cluster-token", "t"])
    )
    assert (config.api_key, config.cluster_token) == ("k", "t")
    with pytest.raises(ValueError, match="same secret"):
        cli_scheduler.build_config(_parsed(cli_scheduler, ["--model", "m", "--cluster-token", KEY]))
    assert _parsed(cli_link, ["--cluster-token", "t"]).cluster_token == "t"
    # bench: --api-key, else $PDSERVE_API_KEY, else $OPENAI_API_KEY
    assert bench.config_from_args(_parsed(bench, [])).api_key == KEY
    assert bench.config_from_args(_parsed(bench, ["--api-key", "k"])).api_key == "k"
    monkeypatch.delenv(auth.API_KEY_ENV)
    monkeypatch.setenv("OPENAI_API_KEY", "openai")
    assert bench.config_from_args(_parsed(bench, [])).api_key == "openai"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert bench.config_from_args(_parsed(bench, [])).api_key is None


def test_help_names_the_flags_and_their_variables(capsys):
    for module, names in (
        (cli_serve, ("--api-key", "--cluster-token", "PDSERVE_API_KEY", "PDSERVE_CLUSTER_TOKEN")),
        (cli_scheduler, ("--api-key", "--cluster-token")),
        (cli_link, ("--cluster-token", "PDSERVE_CLUSTER_TOKEN")),
        (bench, ("--api-key", "OPENAI_API_KEY")),
    ):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        text = parser.format_help()
        for name in names:
            assert name in text, (module.__name__, name)


def test_result_files_never_hold_the_api_key():
    config = BenchConfig(api_key=KEY)
    result = BenchResult(config, "tiny", "2025-01-01T00:00:00+00:00", [], summarize([], 1.0))
    data = result_to_dict(result)
    assert "api_key" not in data["config"] and KEY not in repr(data) and KEY not in repr(config)
