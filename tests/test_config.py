"""Tier 1: the configuration schema, its problems report, YAML loading and the environment."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from orproxy.config import (
    SCHEMA,
    Config,
    ConfigError,
    LimitsConfig,
    Origin,
    OutgoingProxy,
    RetryConfig,
    TimeoutsConfig,
    UpstreamKey,
    build_config,
    load_config,
)

KEYS = ["sk-or-v1-" + hashlib.sha256(f"config key {i}".encode()).hexdigest() for i in range(4)]
K0, K1, K2, K3 = KEYS
NO_ENV: dict[str, str] = {}

# The original project's README example, in exactly its shape (keys made real-looking).
README_CONFIG = f"""\
# Server settings
server:
  host: "0.0.0.0" # Interface to bind to
  port: 5555 # Port to listen on
  access_key: "your_local_access_key_here" # Authentication key
  log_level: "INFO" # Logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL)
  http_log_level: "INFO" # HTTP access logs level (DEBUG, INFO, WARNING, ERROR, CRITICAL)

# OpenRouter API settings
openrouter:
  keys:
    - "{K0}"
    - "{K1}"
    - "{K2}"

  # Cache settings for free models endpoint
  enable_cache: true # Enable response caching
  cache_ttl: 300 # Cache lifetime in seconds (5 minutes)

  base_url: "https://openrouter.ai/api/v1" # OpenRouter API endpoint
  public_endpoints: ["/api/v1/models"] # No auth required

  # Key selection strategy: "round-robin" (default), "first" or "random".
  key_selection_strategy: "round-robin"
  # Options: ["same"] to prefer last used key
  key_selection_opts: []

  # When keys get rate limited
  rate_limit_cooldown: 14400 # 4 hours
  free_only: false # Only show free models
  google_rate_delay: 0 # Delay for Google API issues

# Outgoing proxy configuration
requestProxy:
  enabled: false # Enable to use proxy
  url: "socks5://user:pass@proxy.com:1080" # Proxy URL with credentials
"""


def minimal(**sections: Any) -> dict[str, Any]:
    """The smallest valid document, with sections merged over it."""
    raw: dict[str, Any] = {"server": {"access_key": "local-secret"},
                           "openrouter": {"keys": [K0]}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def problems_of(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(raw, env if env is not None else NO_ENV)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- defaults and the original settings ------------------------------------------------------


def test_defaults() -> None:
    config = build_config(minimal(), NO_ENV)
    s, o = config.server, config.openrouter
    assert (s.host, s.port, s.access_key, s.log_level, s.http_log_level) == (
        "127.0.0.1", 5555, "local-secret", "INFO", "INFO")
    assert o.keys == (UpstreamKey(K0, None),)
    assert o.enable_cache is True and o.cache_ttl == 300.0
    assert o.base_url == Origin("https", "openrouter.ai", 443, "/api/v1")
    assert o.base_url.tls and o.base_url.host_header == "openrouter.ai"
    assert o.public_endpoints == ("/api/v1/models",)
    assert (o.key_selection_strategy, o.key_selection_opts) == ("round-robin", ())
    assert (o.rate_limit_cooldown, o.free_only, o.google_rate_delay) == (14400.0, False, 0.0)
    assert (o.ca_file, o.credit_cooldown_seconds) == (None, 3600.0)
    assert config.request_proxy is None
    assert config.limits == LimitsConfig(16384, 100, 8192, 32 * 1024 * 1024, 4096, 128)
    assert config.timeouts == TimeoutsConfig(30.0, 30.0, 75.0, 300.0, 10.0, 600.0, 300.0, 30.0)
    assert config.retry == RetryConfig(5, 60.0)


def test_config_is_frozen() -> None:
    config = build_config(minimal(), NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.retry = RetryConfig()  # type: ignore[misc]


def test_the_original_readme_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(README_CONFIG, encoding="utf-8")
    config = load_config(str(path), NO_ENV)
    s, o = config.server, config.openrouter
    assert (s.host, s.port, s.access_key, s.log_level, s.http_log_level) == (
        "0.0.0.0", 5555, "your_local_access_key_here", "INFO", "INFO")
    assert o.keys == (UpstreamKey(K0), UpstreamKey(K1), UpstreamKey(K2))
    assert (o.enable_cache, o.cache_ttl) == (True, 300.0)
    assert o.base_url == Origin("https", "openrouter.ai", 443, "/api/v1")
    assert o.public_endpoints == ("/api/v1/models",)
    assert (o.key_selection_strategy, o.key_selection_opts) == ("round-robin", ())
    assert (o.rate_limit_cooldown, o.free_only, o.google_rate_delay) == (14400.0, False, 0.0)
    assert config.request_proxy is None  # disabled: its url is not used


EXAMPLE = Path(__file__).resolve().parent.parent / "config.yml.example"


def test_the_shipped_example_loads() -> None:
    config = load_config(str(EXAMPLE), NO_ENV)
    assert config.server.access_key == "change-me"
    assert len(config.openrouter.keys) == 2


def test_the_shipped_example_documents_every_setting() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    for section, spec in SCHEMA.items():
        given = set(doc.get(section) or {})
        missing = set(spec) - given - {"global_rate_delay"}  # an alias, named in a comment
        assert not missing, f"{section}: {sorted(missing)} not in config.yml.example"


def test_every_setting_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
    raw = {
        "server": {"host": "::", "port": 8080, "access_key": "k", "log_level": "debug",
                   "http_log_level": "Warning"},
        "openrouter": {
            "keys": [K0, {"key": K1, "account": "alice"}, {"key": K2}],
            "enable_cache": False, "cache_ttl": 12.5,
            "base_url": "http://localhost:8080/api/v1/",
            "public_endpoints": ["/api/v1/models", "/api/v1/providers"],
            "key_selection_strategy": "random", "key_selection_opts": ["same"],
            "rate_limit_cooldown": 60, "free_only": True, "global_rate_delay": 2,
            "ca_file": str(ca), "credit_cooldown_seconds": 0,
        },
        "requestProxy": {"enabled": True, "url": "socks5h://proxy.example:1080"},
        "limits": {"max_head_bytes": 1024, "max_header_count": 8, "max_target_bytes": 256,
                   "max_body_bytes": 0, "max_connections": 1,
                   "max_upstream_idle_connections": 0},
        "timeouts": {name: 1.5 for name in TimeoutsConfig.__dataclass_fields__},
        "retry": {"max_attempts": 1, "deadline_seconds": 0.5},
    }
    config = build_config(raw, NO_ENV)
    s, o = config.server, config.openrouter
    assert (s.host, s.port, s.log_level, s.http_log_level) == ("::", 8080, "DEBUG", "WARNING")
    assert o.keys == (UpstreamKey(K0), UpstreamKey(K1, "alice"), UpstreamKey(K2))
    assert (o.enable_cache, o.cache_ttl) == (False, 12.5)
    assert o.base_url == Origin("http", "localhost", 8080, "/api/v1")
    assert o.base_url.host_header == "localhost:8080" and not o.base_url.tls
    assert o.public_endpoints == ("/api/v1/models", "/api/v1/providers")
    assert (o.key_selection_strategy, o.key_selection_opts) == ("random", ("same",))
    assert (o.rate_limit_cooldown, o.free_only, o.google_rate_delay) == (60.0, True, 2.0)
    assert (o.ca_file, o.credit_cooldown_seconds) == (str(ca), 0.0)
    assert config.request_proxy == OutgoingProxy("socks5h", "proxy.example", 1080, None, None)
    assert config.limits == LimitsConfig(1024, 8, 256, 0, 1, 0)
    assert config.timeouts == TimeoutsConfig(*([1.5] * 8))
    assert config.retry == RetryConfig(1, 0.5)


def test_global_rate_delay_is_an_alias_of_google_rate_delay() -> None:
    assert build_config(minimal(openrouter={"global_rate_delay": 3}), NO_ENV) \
        .openrouter.google_rate_delay == 3.0
    assert build_config(minimal(openrouter={"google_rate_delay": 4}), NO_ENV) \
        .openrouter.google_rate_delay == 4.0
    assert problems_of(minimal(openrouter={"global_rate_delay": 601})) == [
        "openrouter.global_rate_delay: must be between 0 and 600, got 601"]


def test_public_endpoints_lose_a_trailing_slash() -> None:
    """Routing matches a request path with its trailing slash stripped against this list, so
    a configured ``/api/v1/models/`` must be stored as ``/api/v1/models`` or it never matches
    (the endpoint would silently stop being public)."""
    config = build_config(minimal(openrouter={"public_endpoints": ["/api/v1/models/"]}), NO_ENV)
    assert config.openrouter.public_endpoints == ("/api/v1/models",)


def test_ipv6_base_url_host_header() -> None:
    origin = build_config(minimal(openrouter={"base_url": "https://[::1]:8443/api/v1"}),
                          NO_ENV).openrouter.base_url
    assert origin == Origin("https", "::1", 8443, "/api/v1")
    assert origin.host_header == "[::1]:8443"


def test_empty_sections_take_defaults() -> None:
    raw = minimal()
    raw.update({"limits": None, "timeouts": None, "retry": None, "requestProxy": None})
    config = build_config(raw, NO_ENV)
    assert config.limits == LimitsConfig() and config.request_proxy is None


# --- problems: all at once, with their paths ----------------------------------------------------


def test_empty_document_reports_both_requirements() -> None:
    expected = ["server.access_key: required (or set ORPROXY_ACCESS_KEY)",
                "openrouter.keys: at least one key is required (or set OPENROUTER_KEYS)"]
    assert problems_of({}) == expected
    assert problems_of(None) == expected


def test_several_problems_are_reported_together() -> None:
    raw = {
        "server": {"port": "5555", "log_level": "LOUD", "colour": "blue", "access_key": "k"},
        "openrouter": {"keys": [K0, "sk-xx-0123456789abcdefQRST"], "cache_ttl": "300",
                       "key_selection_strategy": "lru", "enable_cache": "yes"},
        "limits": {"max_head_bytes": 10},
        "retry": {"max_attempts": 0},
        "telemetry": {"enabled": True},
    }
    assert problems_of(raw) == [
        "telemetry: unknown section",
        "server.port: must be an integer, got '5555'",
        "server.log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got a string "
        "of 4 characters",
        "server.colour: unknown setting",
        "openrouter.cache_ttl: must be a number of seconds, got '300'",
        "openrouter.key_selection_strategy: must be one of round-robin, first, random, "
        "got a string of 3 characters",
        "openrouter.enable_cache: must be true or false, got 'yes'",
        "limits.max_head_bytes: must be between 1024 and 1048576, got 10",
        "retry.max_attempts: must be between 1 and 100, got 0",
        "openrouter.keys[1]: not an OpenRouter key (must start with 'sk-or-'): sk-…QRST",
    ]


@pytest.mark.parametrize(
    ("section", "values", "problem"),
    [
        ("server", {"port": True}, "server.port: must be an integer, got true"),
        ("server", {"port": 70000}, "server.port: must be between 0 and 65535, got 70000"),
        ("server", {"port": 55.5}, "server.port: must be an integer, got 55.5"),
        ("server", {"host": 127}, "server.host: must be a string, got int"),
        ("openrouter", {"cache_ttl": -1}, "openrouter.cache_ttl: must be between 0 and 3.1536e+08,"
                                          " got -1"),
        ("openrouter", {"cache_ttl": float("inf")},
         "openrouter.cache_ttl: must be a number of seconds, got inf"),
        ("openrouter", {"cache_ttl": True},
         "openrouter.cache_ttl: must be a number of seconds, got true"),
        ("openrouter", {"public_endpoints": "/api/v1/models"},
         "openrouter.public_endpoints: must be a list of strings, got '/api/v1/models'"),
        ("openrouter", {"public_endpoints": ["/models"]},
         "openrouter.public_endpoints: item 0 must be a path under /api/v1/ without "
         "a query"),
        ("openrouter", {"public_endpoints": ["/api/v1/models?x=1"]},
         "openrouter.public_endpoints: item 0 must be a path under /api/v1/ "
         "without a query"),
        ("openrouter", {"key_selection_opts": ["sticky"]},
         "openrouter.key_selection_opts: item 0 must be one of same, got a string of 6 "
         "characters"),
        ("openrouter", {"base_url": "ftp://openrouter.ai/api/v1"},
         "openrouter.base_url: must start with http:// or https://"),
        ("openrouter", {"base_url": "https:///api/v1"},
         "openrouter.base_url: has no host"),
        ("openrouter", {"base_url": "https://openrouter.ai/api/v1?x=1"},
         "openrouter.base_url: must not carry a query, fragment or credentials"),
        ("openrouter", {"base_url": 5}, "openrouter.base_url: must be a URL string, got 5"),
        ("openrouter", {"ca_file": "/nonexistent/ca.pem"},
         "openrouter.ca_file: must be the path of a readable PEM file, got '/nonexistent/ca.pem'"),
        ("openrouter", {"free_only": 1}, "openrouter.free_only: must be true or false, got 1"),
        ("limits", {"max_header_count": 1001},
         "limits.max_header_count: must be between 8 and 1000, got 1001"),
        ("timeouts", {"keepalive_seconds": 0},
         "timeouts.keepalive_seconds: must be between 0.001 and 86400, got 0"),
        ("timeouts", {"keepalive": 5},
         "timeouts.keepalive: unknown setting (did you mean 'keepalive_seconds'?)"),
        ("retry", {"deadline_seconds": "1m"},
         "retry.deadline_seconds: must be a number of seconds, got '1m'"),
        ("requestProxy", {"enabled": "yes"}, "requestProxy.enabled: must be true or false, "
                                             "got 'yes'"),
        ("requestProxy", {"type": "socks5"}, "requestProxy.type: unknown setting"),
    ],
)
def test_bad_settings(section: str, values: dict[str, Any], problem: str) -> None:
    assert problems_of(minimal(**{section: values})) == [problem]


@pytest.mark.parametrize("value", [["a"], "text", 5])
def test_a_section_that_is_not_a_mapping(value: Any) -> None:
    assert problems_of(minimal(limits=value)) == [
        f"limits: must be a mapping, got {type(value).__name__}"]


@pytest.mark.parametrize("raw", [[1, 2], "server: x", 5])
def test_a_document_that_is_not_a_mapping(raw: Any) -> None:
    assert problems_of(raw) == [f"(top level): must be a mapping, got {type(raw).__name__}"]


# --- keys -----------------------------------------------------------------------------------


def test_a_bad_key_is_reported_with_its_index_and_masked() -> None:
    bad = "sk-xx-" + hashlib.sha256(b"bad").hexdigest()
    problems = problems_of(minimal(openrouter={"keys": [K0, K1, bad]}))
    assert problems == [
        f"openrouter.keys[2]: not an OpenRouter key (must start with 'sk-or-'): sk-…{bad[-4:]}"]
    text = "\n".join(problems)
    assert bad not in text
    assert bad[3:20] not in text


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("sk-or-", "…(6 chars)"),
        ("sk-or-v1 with spaces inside", "sk-or-…side"),
        ("sk-or-v1-\x00abcdefghijklmnop", "sk-or-…mnop"),
        ("OR-sk-v1-abcdefghijklmnop", "OR-…mnop"),
        ("", "…(0 chars)"),
    ],
)
def test_malformed_keys(key: str, shown: str) -> None:
    assert problems_of(minimal(openrouter={"keys": [key]})) == [
        f"openrouter.keys[0]: not an OpenRouter key (must start with 'sk-or-'): {shown}"]


def test_keys_are_stripped_and_duplicates_reported() -> None:
    config = build_config(minimal(openrouter={"keys": [f"  {K0}\n", K1]}), NO_ENV)
    assert config.openrouter.keys == (UpstreamKey(K0), UpstreamKey(K1))
    problems = problems_of(minimal(openrouter={"keys": [K0, K1, K0]}))
    assert problems == [f"openrouter.keys[2]: duplicate of openrouter.keys[0] (sk-or-…{K0[-4:]})"]
    assert K0 not in problems[0]


def test_keys_as_key_account_mappings() -> None:
    keys = [{"key": K0, "account": "alice"}, {"key": K1, "account": "alice"},
            {"key": K2, "account": "bob"}, K3]
    config = build_config(minimal(openrouter={"keys": keys}), NO_ENV)
    assert config.openrouter.keys == (UpstreamKey(K0, "alice"), UpstreamKey(K1, "alice"),
                                      UpstreamKey(K2, "bob"), UpstreamKey(K3, None))


def test_bad_key_mappings() -> None:
    keys = [{"key": K0, "label": "x", "acct": "y"}, {"key": K1, "account": 7},
            {"account": "alice"}, 12345, None]
    problems = problems_of(minimal(openrouter={"keys": keys}))
    assert problems == [
        "openrouter.keys[0]: unknown setting(s) acct, label",
        "openrouter.keys[1].account: must be a string",
        "openrouter.keys[2]: must be a string, got NoneType",
        "openrouter.keys[3]: must be a string, got int",
        "openrouter.keys[4]: must be a string, got NoneType",
    ]


@pytest.mark.parametrize(("keys", "kind"), [(K0, "str"), (None, "NoneType"),
                                            ({"key": K0}, "dict")])
def test_keys_must_be_a_list(keys: Any, kind: str) -> None:
    problems = problems_of(minimal(openrouter={"keys": keys}))
    assert problems == [f"openrouter.keys: must be a list of keys, got {kind}"]
    assert K0 not in problems[0]


def test_an_empty_key_list_needs_the_environment() -> None:
    assert problems_of(minimal(openrouter={"keys": []})) == [
        "openrouter.keys: at least one key is required (or set OPENROUTER_KEYS)"]


# --- environment overrides ------------------------------------------------------------------


def test_env_keys_override_the_file_keys() -> None:
    env = {"OPENROUTER_KEYS": f" {K2} ,{K3},, "}
    # the file's keys, even bad ones, are replaced, not merged
    config = build_config(minimal(openrouter={"keys": [K0, "not-a-key"]}), env)
    assert config.openrouter.keys == (UpstreamKey(K2), UpstreamKey(K3))


def test_blank_env_keys_do_not_override() -> None:
    config = build_config(minimal(), {"OPENROUTER_KEYS": "  ", "ORPROXY_ACCESS_KEY": ""})
    assert config.openrouter.keys == (UpstreamKey(K0),)
    assert config.server.access_key == "local-secret"


def test_a_bad_env_key_is_reported_with_its_position_and_masked() -> None:
    bad = "sk-ant-" + hashlib.sha256(b"x").hexdigest()
    problems = problems_of(minimal(), {"OPENROUTER_KEYS": f"{K0},{bad}"})
    assert problems == [
        f"OPENROUTER_KEYS[1]: not an OpenRouter key (must start with 'sk-or-'): sk-…{bad[-4:]}"]
    assert bad not in problems[0]


def test_env_access_key_overrides_the_file() -> None:
    config = build_config(minimal(), {"ORPROXY_ACCESS_KEY": "from-env"})
    assert config.server.access_key == "from-env"


def test_env_alone_is_enough() -> None:
    config = build_config({}, {"OPENROUTER_KEYS": f"{K0},{K1}", "ORPROXY_ACCESS_KEY": "a"})
    assert config.openrouter.keys == (UpstreamKey(K0), UpstreamKey(K1))
    assert config.server.access_key == "a"
    assert config.server.port == 5555


# --- requestProxy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("socks5://user:pass@proxy.com:1080",
         OutgoingProxy("socks5", "proxy.com", 1080, "user", "pass")),
        ("socks5h://10.0.0.1:9050", OutgoingProxy("socks5h", "10.0.0.1", 9050, None, None)),
        ("http://proxy.internal:3128", OutgoingProxy("http", "proxy.internal", 3128, None, None)),
        ("http://u:p@[fd00::1]:8080", OutgoingProxy("http", "fd00::1", 8080, "u", "p")),
    ],
)
def test_request_proxy_enabled(url: str, proxy: OutgoingProxy) -> None:
    config = build_config(minimal(requestProxy={"enabled": True, "url": url}), NO_ENV)
    assert config.request_proxy == proxy


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("https://user:s3cr3t-pw@proxy.com:443", "https"),
        ("socks4://user:s3cr3t-pw@proxy.com:1080", "socks4"),
        ("socks5://user:s3cr3t-pw@proxy.com", "socks5"),  # no port
        ("socks5://user:s3cr3t-pw@proxy.com:99999", "socks5"),  # port out of range
        ("socks5://user:s3cr3t-pw@:1080", "socks5"),  # no host
        ("//user:s3cr3t-pw@proxy.com:1080", "no"),
        (None, "no"),
    ],
)
def test_request_proxy_bad_url(url: str | None, scheme: str) -> None:
    problems = problems_of(minimal(requestProxy={"enabled": True, "url": url}))
    assert problems == [
        "requestProxy.url: must be socks5://, socks5h:// or http:// with host and port "
        f"(got {scheme} scheme)"]
    assert "s3cr3t-pw" not in problems[0]


def test_request_proxy_enabled_without_url() -> None:
    assert problems_of(minimal(requestProxy={"enabled": True})) == [
        "requestProxy.url: must be socks5://, socks5h:// or http:// with host and port "
        "(got no scheme)"]


def test_request_proxy_disabled_ignores_a_bad_url() -> None:
    config = build_config(minimal(requestProxy={"enabled": False, "url": "nonsense"}), NO_ENV)
    assert config.request_proxy is None


# --- load_config: files, YAML, the environment ----------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "config.yml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_a_file_with_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, README_CONFIG)
    config = load_config(path, {"OPENROUTER_KEYS": K3, "ORPROXY_ACCESS_KEY": "env-access"})
    assert config.openrouter.keys == (UpstreamKey(K3),)
    assert config.server.access_key == "env-access"
    assert config.server.host == "0.0.0.0"


def test_missing_default_file_with_env_works(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"OPENROUTER_KEYS": K0, "ORPROXY_ACCESS_KEY": "a"})
    assert config.openrouter.keys == (UpstreamKey(K0),)
    assert config.server.access_key == "a"


def test_missing_default_file_without_env_names_what_is_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, NO_ENV)
    assert info.value.problems == [
        f"no configuration: no --config given and no config.yml in {tmp_path}; copy "
        "config.yml.example to config.yml and edit it (or pass --config PATH), or set "
        "OPENROUTER_KEYS and ORPROXY_ACCESS_KEY"]
    with pytest.raises(ConfigError) as info:  # one of the two set: say what else is needed
        load_config(None, {"ORPROXY_ACCESS_KEY": "x"})
    assert info.value.problems == [
        "openrouter.keys: at least one key is required (or set OPENROUTER_KEYS)"]


def test_default_file_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, README_CONFIG)
    monkeypatch.chdir(tmp_path)
    assert load_config(None, NO_ENV).server.access_key == "your_local_access_key_here"


def test_missing_explicit_file_fails_even_with_env(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yml")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"OPENROUTER_KEYS": K0, "ORPROXY_ACCESS_KEY": "a"})
    assert info.value.problems == [f"{path}: no such file"]


def test_a_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), NO_ENV)
    assert len(info.value.problems) == 1
    assert info.value.problems[0] == f"{tmp_path}: is a directory, not a config file"


@pytest.mark.parametrize("text", ["server: [unclosed\n", "server:\n  port: 1\n port: 2\n",
                                  "a: b: c\n", "\tserver: {}\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_ENV)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: not valid YAML (")


def test_an_empty_file_is_an_empty_document(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    config = load_config(path, {"OPENROUTER_KEYS": K0, "ORPROXY_ACCESS_KEY": "a"})
    assert config == build_config({}, {"OPENROUTER_KEYS": K0, "ORPROXY_ACCESS_KEY": "a"})
    assert isinstance(config, Config)


def test_yaml_types_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
server:
  access_key: a
  port: "8080"
openrouter:
  keys: ["{K0}"]
  enable_cache: "true"
  cache_ttl: 5m
  key_selection_opts: same
limits:
  max_body_bytes: 1.5
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_ENV)
    assert info.value.problems == [
        "server.port: must be an integer, got '8080'",
        "openrouter.enable_cache: must be true or false, got 'true'",
        "openrouter.cache_ttl: must be a number of seconds, got '5m'",
        "openrouter.key_selection_opts: must be a list of strings, got a string of 4 "
        "characters",
        "limits.max_body_bytes: must be an integer, got 1.5",
    ]


def test_a_yaml_file_with_a_bad_key_never_shows_it(tmp_path: Path) -> None:
    bad = "sk-or-v1 " + hashlib.sha256(b"typo").hexdigest()  # a space where '-' belongs
    path = write(tmp_path, f'server: {{access_key: a}}\nopenrouter:\n  keys:\n    - "{K0}"\n'
                           f'    - {{key: "{bad}", account: team}}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_ENV)
    assert info.value.problems == [
        f"openrouter.keys[1]: not an OpenRouter key (must start with 'sk-or-'): "
        f"sk-or-…{bad[-4:]}"]
    assert bad not in str(info.value) and bad[9:30] not in str(info.value)


def test_secrets_are_not_echoed_in_problems() -> None:
    """A mistyped access key or a base_url with credentials must not end up in a log."""
    problems = problems_of(minimal(server={"access_key": 123456789},
                                   openrouter={"base_url": "https://user:hunter2@x.example/?q"}))
    assert problems == ["server.access_key: must be a string, got int",
                        "openrouter.base_url: must not carry a query, fragment or credentials"]


def test_delay_alias_set_twice_is_a_problem() -> None:
    problems = problems_of(minimal(openrouter={"google_rate_delay": 1, "global_rate_delay": 2}))
    assert problems == ["openrouter.global_rate_delay: an alias of google_rate_delay; set one"]


def test_unknown_names_suggest_the_closest_known_one() -> None:
    problems = problems_of(minimal(server={"prot": 8080}, openrouter={"rate_limit_cooldwn": 5},
                                   limts={"max_body_bytes": 1}))
    assert problems == [
        "limts: unknown section (did you mean 'limits'?)",
        "server.prot: unknown setting (did you mean 'port'?)",
        "openrouter.rate_limit_cooldwn: unknown setting (did you mean 'rate_limit_cooldown'?)",
    ]


def test_a_key_pasted_where_a_name_goes_is_masked() -> None:
    problems = problems_of(minimal(server={K0: True}, **{K0: "primary"}))
    assert len(problems) == 2
    for problem in problems:
        assert K0 not in problem and K0[-12:] not in problem, problem
