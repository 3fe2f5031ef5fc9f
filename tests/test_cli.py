"""The command line, as a user runs it: ``python -m orproxy`` in a subprocess.

Configuration errors (exit 2, every problem listed with its path, keys masked, no
traceback), ``--check``, start-up from the environment, signals (graceful stop, exit 0),
and a port that is already taken.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from orproxy import __version__
from orproxy.keys import key_id, mask_key
from tests.conftest import ACCESS_KEY, KEYS
from tests.fakeor import FakeOpenRouter, Recorded, Responder
from tests.procs import free_port, orproxy_env, orproxy_process, proxy_process, run_orproxy
from tests.rawhttp import connected, refused, roundtrip


def write_config(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def problems(stderr: str) -> list[str]:
    return [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]


# --- configuration errors --------------------------------------------------------------------

BAD_KEY = "not-a-key-1234567890abcdef"
SPACED_KEY = "sk-or-v1-secret part-9876543210"


def test_config_errors_are_all_listed_with_paths(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yml", {
        "server": {"port": "abc", "log_level": "LOUD", "colour": "blue"},
        "openrouter": {
            "keys": [BAD_KEY, KEYS[0], KEYS[0], SPACED_KEY, 42],
            "key_selection_strategy": "weird",
            "rate_limit_cooldown": -5,
            "base_url": "ftp://example.com",
        },
        "retry": {"max_attempts": 0},
        "bogus": 1,
    })
    result = run_orproxy("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("orproxy: configuration error:\n")
    found = problems(result.stderr)
    expected_prefixes = [
        "bogus: unknown section",
        "server.port: must be an integer",
        "server.log_level: must be one of",
        "server.colour: unknown setting",
        "openrouter.key_selection_strategy: must be one of",
        "openrouter.rate_limit_cooldown: must be between",
        "openrouter.base_url: must start with http:// or https://",
        "retry.max_attempts: must be between 1 and 100, got 0",
        "server.access_key: required",
        "openrouter.keys[0]: not an OpenRouter key",
        "openrouter.keys[2]: duplicate of openrouter.keys[1]",
        "openrouter.keys[3]: not an OpenRouter key",
        "openrouter.keys[4]: must be a string",
    ]
    for prefix in expected_prefixes:
        assert sum(p.startswith(prefix) for p in found) == 1, (prefix, found)
    assert len(found) == len(expected_prefixes), found
    # every key is shown masked only
    assert "not…cdef" in result.stderr
    assert "sk-or-…3210" in result.stderr
    assert "sk-or-…0001" in result.stderr
    for secret in (BAD_KEY, SPACED_KEY, KEYS[0], "secret part", "1234567890abcdef"):
        assert secret not in result.stderr


def test_invalid_env_key_is_reported_masked(tmp_path: Path) -> None:
    env = orproxy_env(OPENROUTER_KEYS=f"{KEYS[1]}, sk-live-abcdefghijklmnop1234 ,",
                    ORPROXY_ACCESS_KEY=ACCESS_KEY)
    result = run_orproxy("--check", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert problems(result.stderr) == [
        "OPENROUTER_KEYS[1]: not an OpenRouter key (must start with 'sk-or-'): sk-…1234"]
    assert "abcdefghijklmnop" not in result.stderr


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    result = run_orproxy("--config", str(tmp_path / "nope.yml"), cwd=tmp_path)
    assert result.returncode == 2
    assert problems(result.stderr) == [f"{tmp_path / 'nope.yml'}: no such file"]
    assert "Traceback" not in result.stderr


def test_invalid_yaml_is_an_error_without_leaking_keys(tmp_path: Path) -> None:
    secret = "sk-or-v1-secret-aaaaaaaaaaaaaaa1"
    config = write_config(tmp_path / "broken.yml",
                          f'server:\n  access_key: abc\nopenrouter:\n  keys: [{secret}, "x]\n')
    result = run_orproxy("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    [problem] = problems(result.stderr)
    assert problem.startswith(f"{config}: not valid YAML")
    assert "Traceback" not in result.stderr
    assert secret not in result.stderr


def test_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "latin1.yml"
    config.write_bytes(b"# r\xe9glages\nserver:\n  access_key: abc\n")
    result = run_orproxy("--config", str(config), "--check", cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    [problem] = problems(result.stderr)
    assert problem.startswith(f"{config}: ")


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    result = run_orproxy("--config", str(tmp_path), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert problems(result.stderr) == [f"{tmp_path}: is a directory, not a config file"]
    assert "Traceback" not in result.stderr


def test_config_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "list.yml", "- a\n- b\n")
    result = run_orproxy("--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert problems(result.stderr) == ["(top level): must be a mapping, got list"]


def test_no_config_and_no_env_says_where_it_looked(tmp_path: Path) -> None:
    result = run_orproxy("--check", cwd=tmp_path)
    assert result.returncode == 2
    [found] = problems(result.stderr)
    assert found.startswith(f"no configuration: no --config given and no config.yml in "
                            f"{tmp_path.resolve()}")
    assert "config.yml.example" in found and "OPENROUTER_KEYS" in found


def test_an_empty_config_lists_what_is_missing(tmp_path: Path) -> None:
    write_config(tmp_path / "config.yml", "{}\n")
    result = run_orproxy("--check", cwd=tmp_path)
    assert result.returncode == 2
    found = problems(result.stderr)
    assert len(found) == 2
    assert found[0].startswith("server.access_key: required")
    assert found[1].startswith("openrouter.keys: at least one key is required")


def test_check_on_a_good_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "good.yml", {
        "server": {"port": 8080, "access_key": ACCESS_KEY},
        "openrouter": {"keys": [KEYS[0], {"key": KEYS[1], "account": "acct"}],
                       "key_selection_strategy": "first", "global_rate_delay": 1.5},
        "requestProxy": {"enabled": False, "url": None},
    })
    result = run_orproxy("--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"orproxy {__version__}: configuration OK ({config})"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.startswith("  ")
            and not line.startswith("    ")}
    assert rows["server.port"] == ["8080", "file"]
    assert rows["server.host"] == ["127.0.0.1", "default"]
    assert rows["server.access_key"] == ["(set,", f"{len(ACCESS_KEY)}", "characters)", "file"]
    assert rows["openrouter.google_rate_delay"] == ["1.5", "file"]  # given by its alias
    assert rows["openrouter.key_selection_strategy"] == ["first", "file"]
    assert f"    {key_id(KEYS[1])}  {mask_key(KEYS[1])}  account acct" in lines
    assert ACCESS_KEY not in result.stdout and all(k not in result.stdout for k in KEYS)


def test_check_from_the_environment_only(tmp_path: Path) -> None:
    env = orproxy_env(OPENROUTER_KEYS=",".join(KEYS), ORPROXY_ACCESS_KEY=ACCESS_KEY)
    result = run_orproxy("check", "--port", "6001", cwd=tmp_path, env=env)  # no ./config.yml
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("configuration OK (no file (environment only))")
    assert any(line.split()[:2] == ["server.port", "6001"] and line.endswith("command line")
               for line in lines)
    assert any(line.startswith("  server.access_key") and
               line.endswith("environment (ORPROXY_ACCESS_KEY)") for line in lines)
    assert "  3 key(s):" in lines


# --- running ---------------------------------------------------------------------------------


HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.anyio
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_env_start_serves_health_and_stops_on_signal(tmp_path: Path, sig: signal.Signals
                                                           ) -> None:
    port = free_port()
    write_config(tmp_path / "config.yml", {"server": {"port": port}})  # found as ./config.yml
    env = orproxy_env(OPENROUTER_KEYS=f" {KEYS[0]} ,{KEYS[2]}", ORPROXY_ACCESS_KEY=ACCESS_KEY)
    async with orproxy_process(cwd=tmp_path, port=port, env=env) as proxy:
        resp = await roundtrip(port, HEALTH)
        assert resp.status == 200
        doc = json.loads(resp.body)
        assert doc["status"] == "ok"
        assert doc["keys"] == {"available": 2, "free_limited": 0,
                               "cooling": 0, "disabled": 0, "total": 2}
        resp = await roundtrip(port, HEALTH.replace(b"/health", b"/api/v1/chat/completions"))
        assert resp.status == 401  # the access key from the environment is enforced
        # an idle keep-alive connection must not hold the shutdown for the 30 s grace period
        async with connected(port) as idle:
            await idle.send(HEALTH)
            first = await idle.response()
            assert first.status == 200
            assert first.http_version == b"1.1" and first.header(b"connection") != b"close"
            assert await proxy.stop(sig) == 0
            assert await idle.wait_eof() == b""  # closed by the server, nothing more sent
            assert not idle.reset
    stderr = proxy.log()
    assert "Traceback" not in stderr
    assert f"listening on 127.0.0.1:{port}" in stderr
    assert re.search(r"INFO orproxy\.app stopped$", stderr, re.MULTILINE), stderr
    for secret in (KEYS[0], KEYS[2], ACCESS_KEY):
        assert secret not in stderr


def test_port_in_use_fails_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.yml", {
            "server": {"port": port, "access_key": ACCESS_KEY},
            "openrouter": {"keys": KEYS},
        })
        result = run_orproxy("--config", str(config), cwd=tmp_path)
    assert result.returncode not in (0, 2)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot start" in result.stderr
    assert f"server.port {port} on 127.0.0.1 is in use by another program" in result.stderr
    assert "--port" in result.stderr  # and what to do about it


# --- graceful shutdown with a request in flight ------------------------------------------------


@pytest.mark.anyio
async def test_sigterm_lets_a_running_stream_finish(
    fake: FakeOpenRouter, ca_file: str, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"text/event-stream")])
        await resp.data(b'data: {"n":1}\n\n')
        await asyncio.wait_for(gate.wait(), 15)
        await resp.data(b'data: {"n":2}\n\n')
        await resp.data(b"data: [DONE]\n\n")
        await resp.end()

    fake.script = script
    first = b'data: {"n":1}\n\n'
    async with proxy_process(tmp_path, fake.port, ca_file,
                             server={"http_log_level": "INFO"}) as proxy:
        async with connected(proxy.port) as client:
            await client.request(b'{"model":"m","messages":[],"stream":true}')
            assert (await client.head()).status_code == 200
            assert await client.read_exactly(len(first)) == first
            proxy.proc.send_signal(signal.SIGTERM)
            await wait_refusing(proxy.port)  # stopped accepting new connections...
            assert proxy.proc.returncode is None  # ...but still serving this one
            gate.set()
            received = first + await client.body(timeout=20)
        assert received == b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\n'
        assert await asyncio.wait_for(proxy.proc.wait(), 15) == 0
    stderr = proxy.log()
    assert "Traceback" not in stderr
    assert "stopped" in stderr
    assert "cut off" not in stderr
    assert "status=200" in stderr  # the access log line of the stream
    for secret in (*KEYS, ACCESS_KEY):
        assert secret not in stderr


async def wait_refusing(port: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        try:
            if await refused(port):
                return
        except ConnectionResetError:  # closed in the backlog
            return
        await asyncio.sleep(0.05)
    raise AssertionError("orproxy still accepts connections after SIGTERM")
