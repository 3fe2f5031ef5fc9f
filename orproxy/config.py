"""The configuration: one frozen, validated value built at start and passed in.

It owns the schema (names, types, defaults), reading YAML and the two environment overrides,
and reporting every problem at once with its field path. It knows nothing of sockets or of
how the values are used. Names from the original project (``rate_limit_cooldown``,
``requestProxy`` …) are kept as they were so existing config files work unchanged; new
settings carry their unit in the name.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from orproxy.keys import KEY_PREFIX, STRATEGIES, mask_key

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
PROXY_SCHEMES = ("socks5", "socks5h", "http")


class ConfigError(Exception):
    """Every problem found in the configuration, each prefixed with its field path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class UpstreamKey:
    key: str
    account: str | None = None


@dataclass(frozen=True)
class Origin:
    """A parsed ``scheme://host:port/path`` URL."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class OutgoingProxy:
    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5555
    access_key: str = ""
    log_level: str = "INFO"
    http_log_level: str = "INFO"
    log_format: str = "text"
    cors_origins: tuple[str, ...] = ()  # browser origins allowed; ("*",) for any


@dataclass(frozen=True)
class OpenRouterConfig:
    keys: tuple[UpstreamKey, ...] = ()
    enable_cache: bool = True
    cache_ttl: float = 300.0
    base_url: Origin = Origin("https", "openrouter.ai", 443, "/api/v1")
    public_endpoints: tuple[str, ...] = ("/api/v1/models",)
    key_selection_strategy: str = "round-robin"
    key_selection_opts: tuple[str, ...] = ()
    rate_limit_cooldown: float = 14400.0
    free_only: bool = False
    google_rate_delay: float = 0.0
    ca_file: str | None = None
    credit_cooldown_seconds: float = 3600.0
    sticky_sessions: bool = True  # keep a conversation on the key it started on
    sticky_ttl_seconds: float = 600.0  # forgotten after this long idle (as OpenRouter's)
    sticky_max_conversations: int = 10000
    stream_commit_seconds: float = 10.0  # hold a stream's head for its first event (0: off)
    quota_check_seconds: float = 300.0  # ask OpenRouter about each key this often (0: off)


@dataclass(frozen=True)
class LimitsConfig:
    max_head_bytes: int = 16 * 1024
    max_header_count: int = 100
    max_target_bytes: int = 8 * 1024
    max_body_bytes: int = 32 * 1024 * 1024
    max_connections: int = 4096
    max_upstream_idle_connections: int = 128


@dataclass(frozen=True)
class TimeoutsConfig:
    client_head_seconds: float = 30.0
    client_body_seconds: float = 30.0
    keepalive_seconds: float = 75.0
    client_write_seconds: float = 300.0
    upstream_connect_seconds: float = 10.0
    upstream_first_byte_seconds: float = 600.0
    upstream_idle_seconds: float = 300.0
    shutdown_grace_seconds: float = 30.0


@dataclass(frozen=True)
class StateConfig:
    file: str | None = "orproxy-state.json"  # None: keep key state in memory only
    counters_interval_seconds: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    public: bool = False  # /metrics, /metrics/json, /metrics/raw without the access key
    enable_token_counting: bool = True
    enable_system_metrics: bool = False
    models: tuple[str, ...] = ()  # models counted under their own name (else the first N)
    models_top_n: int = 20


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    deadline_seconds: float = 60.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    openrouter: OpenRouterConfig = field(default_factory=OpenRouterConfig)
    request_proxy: OutgoingProxy | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state: StateConfig = field(default_factory=StateConfig)


# --- field checkers: each returns (value, problem) -------------------------------------------

Checker = Callable[[Any], "tuple[Any, str | None]"]


def _int(lo: int, hi: int) -> Checker:
    def check(v: Any) -> tuple[Any, str | None]:
        if isinstance(v, bool) or not isinstance(v, int):
            return None, f"must be an integer, got {shown(v)}"
        if not lo <= v <= hi:
            return None, f"must be between {lo} and {hi}, got {shown(v)}"
        return v, None

    return check


def _seconds(lo: float = 0.0, hi: float = 10 * 365 * 86400.0) -> Checker:
    def check(v: Any) -> tuple[Any, str | None]:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None, f"must be a number of seconds, got {shown(v)}"
        if not lo <= v <= hi:
            return None, f"must be between {lo:g} and {hi:g}, got {shown(v)}"
        return float(v), None

    return check


def _bool(v: Any) -> tuple[Any, str | None]:
    return (v, None) if isinstance(v, bool) else (None, f"must be true or false, got {shown(v)}")


def _str(v: Any) -> tuple[Any, str | None]:
    # only the type: a string setting may hold a secret (server.access_key), whatever its type
    return (v, None) if isinstance(v, str) else (None, f"must be a string, got {_kind(v)}")


def _kind(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__


# strings shown whole in problem reports: paths, numbers (with a unit), yes/no words
_PLAIN = re.compile(r"/\S*|[0-9.]{1,12}[a-z]{0,3}|yes|no|on|off|true|false|none|null",
                    re.IGNORECASE)


def shown(v: Any) -> str:
    """A value as a problem report may show it: any string may be a secret pasted into the
    wrong setting (an access key in ``log_level``), so strings are masked like keys."""
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        if _PLAIN.fullmatch(v):
            return repr(v)  # a path, a number with its unit, a yes/no: worth seeing whole
        if len(v) >= 8:
            return f"a string ('{v[:2]}…{v[-2:]}', {len(v)} characters)"
        return f"a string of {len(v)} characters"
    if isinstance(v, list | dict):
        return f"a {type(v).__name__} of {len(v)} items"
    return f"a {type(v).__name__}"


def _opt_str(v: Any) -> tuple[Any, str | None]:
    return (None, None) if v is None else _str(v)


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Checker:
    def check(v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str) and (v.upper() if upper else v) in options:
            return (v.upper() if upper else v), None
        return None, f"must be one of {', '.join(options)}, got {shown(v)}"

    return check


def _str_list(item: Checker | None = None) -> Checker:
    def check(v: Any) -> tuple[Any, str | None]:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            return None, f"must be a list of strings, got {shown(v)}"
        if item is None:
            return tuple(v), None
        out = []
        for i, x in enumerate(v):
            parsed, problem = item(x)
            if problem:
                return None, f"item {i} {problem}"
            out.append(parsed)
        return tuple(out), None

    return check


def _endpoint(v: Any) -> tuple[Any, str | None]:
    if isinstance(v, str) and v.startswith("/api/v1/") and "?" not in v:
        return v.rstrip("/"), None
    return None, "must be a path under /api/v1/ without a query"


def _origin(v: Any) -> tuple[Any, str | None]:
    """A browser origin (scheme://host[:port], no path) or "*"."""
    if v == "*":
        return v, None
    parts = urlsplit(v) if isinstance(v, str) else None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.path or parts.query or parts.fragment or parts.username):
        return None, "must be an origin such as https://chat.example (no path) or \"*\""
    return v.rstrip("/"), None


def parse_origin(url: str) -> Origin:
    """Parse an http(s) base URL; raises ValueError with a readable reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.query or parts.fragment or parts.username:
        raise ValueError("must not carry a query, fragment or credentials")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Origin(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def _base_url(v: Any) -> tuple[Any, str | None]:
    if not isinstance(v, str):
        return None, f"must be a URL string, got {shown(v)}"
    try:
        return parse_origin(v), None
    except ValueError as exc:  # the URL is not echoed: it may carry credentials
        return None, str(exc)


def _ca_file(v: Any) -> tuple[Any, str | None]:
    if v is None:
        return None, None
    if not isinstance(v, str) or not os.path.isfile(v):
        return None, f"must be the path of a readable PEM file, got {shown(v)}"
    return v, None


SCHEMA: dict[str, dict[str, tuple[str, Checker]]] = {
    # section -> yaml name -> (dataclass field, checker)
    "server": {
        "host": ("host", _str),
        "port": ("port", _int(0, 65535)),
        "access_key": ("access_key", _str),
        "log_level": ("log_level", _choice(LOG_LEVELS, upper=True)),
        "http_log_level": ("http_log_level", _choice(LOG_LEVELS, upper=True)),
        "log_format": ("log_format", _choice(LOG_FORMATS)),
        "cors_origins": ("cors_origins", _str_list(_origin)),
    },
    "openrouter": {
        "keys": ("keys", lambda v: (v, None)),  # checked on its own: positions, masking
        "enable_cache": ("enable_cache", _bool),
        "cache_ttl": ("cache_ttl", _seconds()),
        "base_url": ("base_url", _base_url),
        "public_endpoints": ("public_endpoints", _str_list(_endpoint)),
        "key_selection_strategy": ("key_selection_strategy", _choice(STRATEGIES)),
        "key_selection_opts": ("key_selection_opts", _str_list(_choice(("same",)))),
        "rate_limit_cooldown": ("rate_limit_cooldown", _seconds()),
        "free_only": ("free_only", _bool),
        "google_rate_delay": ("google_rate_delay", _seconds(0, 600)),
        "global_rate_delay": ("google_rate_delay", _seconds(0, 600)),
        "ca_file": ("ca_file", _ca_file),
        "credit_cooldown_seconds": ("credit_cooldown_seconds", _seconds()),
        "sticky_sessions": ("sticky_sessions", _bool),
        "sticky_ttl_seconds": ("sticky_ttl_seconds", _seconds(1.0, 86400.0)),
        "sticky_max_conversations": ("sticky_max_conversations", _int(1, 10_000_000)),
        "stream_commit_seconds": ("stream_commit_seconds", _seconds(0.0, 600.0)),
        "quota_check_seconds": ("quota_check_seconds", _seconds(0.0, 86400.0)),
    },
    "requestProxy": {"enabled": ("enabled", _bool), "url": ("url", _opt_str)},
    "limits": {
        "max_head_bytes": ("max_head_bytes", _int(1024, 1 << 20)),
        "max_header_count": ("max_header_count", _int(8, 1000)),
        "max_target_bytes": ("max_target_bytes", _int(256, 1 << 20)),
        "max_body_bytes": ("max_body_bytes", _int(0, 1 << 31)),
        "max_connections": ("max_connections", _int(1, 1 << 20)),
        "max_upstream_idle_connections": ("max_upstream_idle_connections", _int(0, 1 << 16)),
    },
    "timeouts": {
        name: (name, _seconds(0.001, 86400.0)) for name in TimeoutsConfig.__dataclass_fields__
    },
    "retry": {
        "max_attempts": ("max_attempts", _int(1, 100)),
        "deadline_seconds": ("deadline_seconds", _seconds(0.001, 86400.0)),
    },
    "metrics": {
        "public": ("public", _bool),
        "enable_token_counting": ("enable_token_counting", _bool),
        "enable_system_metrics": ("enable_system_metrics", _bool),
        "models": ("models", _str_list()),
        "models_top_n": ("models_top_n", _int(0, 1000)),
    },
    "state": {
        "file": ("file", _opt_str),
        "counters_interval_seconds": ("counters_interval_seconds", _seconds(0.0, 3600.0)),
    },
}


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def _unknown(name: object, known: Collection[str]) -> str:
    """An unknown setting name as a report may show it: a name-like word as it is, anything
    else (a key pasted where a name goes) masked."""
    if isinstance(name, str) and _NAME.fullmatch(name) and not name.startswith("sk"):
        return name
    return f"({shown(name)})"


def _did_you_mean(name: object, known: Collection[str]) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_section(
    name: str, raw: Any, problems: list[str]
) -> dict[str, Any]:
    """Validate one section against SCHEMA; returns dataclass kwargs for the valid fields."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a mapping, got {type(raw).__name__}")
        return {}
    spec = SCHEMA[name]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in spec:
            problems.append(f"{name}.{_unknown(key, spec)}: unknown setting"
                            f"{_did_you_mean(key, spec)}")
            continue
        attr, check = spec[key]
        parsed, problem = check(value)
        if problem:
            problems.append(f"{name}.{key}: {problem}")
        else:
            out[attr] = parsed
    return out


def _check_keys(raw: Any, where: str, problems: list[str]) -> tuple[UpstreamKey, ...]:
    """Keys are strings or ``{key, account}`` mappings; each must start with ``sk-or-``."""
    if not isinstance(raw, list):
        problems.append(f"{where}: must be a list of keys, got {type(raw).__name__}")
        return ()
    keys: list[UpstreamKey] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"{where}[{i}]"
        account = None
        if isinstance(item, dict):
            unknown = set(item) - {"key", "account"}
            if unknown:
                names = ", ".join(sorted(_unknown(name, ("key", "account")) for name in unknown))
                problems.append(f"{path}: unknown setting(s) {names}")
            account = item.get("account")
            if account is not None and not isinstance(account, str):
                problems.append(f"{path}.account: must be a string")
                account = None
            item = item.get("key")
        if not isinstance(item, str):
            problems.append(f"{path}: must be a string, got {type(item).__name__}")
            continue
        item = item.strip()
        if not item.startswith(KEY_PREFIX) or len(item) <= len(KEY_PREFIX) or any(
            c.isspace() or not c.isprintable() for c in item
        ):
            problems.append(f"{path}: not an OpenRouter key (must start with {KEY_PREFIX!r}): "
                            f"{mask_key(item)}")
            continue
        if item in seen:
            problems.append(f"{path}: duplicate of {where}[{seen[item]}] ({mask_key(item)})")
            continue
        seen[item] = i
        keys.append(UpstreamKey(item, account))
    if not keys and not any(p.startswith(where) for p in problems):
        problems.append(f"{where}: at least one key is required (or set OPENROUTER_KEYS)")
    return tuple(keys)


def _check_request_proxy(kwargs: dict[str, Any], problems: list[str]) -> OutgoingProxy | None:
    if not kwargs.get("enabled"):
        return None
    url = kwargs.get("url") or ""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in PROXY_SCHEMES or not parts.hostname or not port:
        problems.append(
            "requestProxy.url: must be socks5://, socks5h:// or http:// with host and port "
            f"(got {parts.scheme or 'no'} scheme)"
        )
        return None
    return OutgoingProxy(parts.scheme, parts.hostname, port, parts.username, parts.password)


def build_config(raw: Any, env: Mapping[str, str]) -> Config:
    """Validate a parsed YAML document plus the environment overrides into a Config."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(raw).__name__}"])
    for name in raw:
        if name not in SCHEMA:
            problems.append(f"{_unknown(name, SCHEMA)}: unknown section"
                            f"{_did_you_mean(name, SCHEMA)}")
    sections = {name: _check_section(name, raw.get(name), problems) for name in SCHEMA}

    server, openrouter = sections["server"], sections["openrouter"]
    raw_openrouter = raw.get("openrouter")
    if isinstance(raw_openrouter, dict) and {"google_rate_delay", "global_rate_delay"} <= set(
        raw_openrouter
    ):
        problems.append("openrouter.global_rate_delay: an alias of google_rate_delay; set one")
    if env.get("ORPROXY_ACCESS_KEY"):
        server["access_key"] = env["ORPROXY_ACCESS_KEY"]
    if not server.get("access_key") and not any(
        p.startswith("server.access_key") for p in problems
    ):
        problems.append("server.access_key: required (or set ORPROXY_ACCESS_KEY)")
    if env.get("OPENROUTER_KEYS", "").strip():
        env_keys = [k for k in (p.strip() for p in env["OPENROUTER_KEYS"].split(",")) if k]
        openrouter["keys"] = _check_keys(env_keys, "OPENROUTER_KEYS", problems)
    else:
        openrouter["keys"] = _check_keys(openrouter.get("keys", []), "openrouter.keys", problems)
    proxy = _check_request_proxy(sections["requestProxy"], problems)
    state = sections["state"]
    if env.get("ORPROXY_STATE_FILE"):  # systemd's unit points it into StateDirectory
        state["file"] = env["ORPROXY_STATE_FILE"]
    if state.get("file") == "":
        state["file"] = None
    if problems:
        raise ConfigError(problems)
    return Config(
        server=ServerConfig(**server),
        openrouter=OpenRouterConfig(**openrouter),
        request_proxy=proxy,
        limits=LimitsConfig(**sections["limits"]),
        timeouts=TimeoutsConfig(**sections["timeouts"]),
        retry=RetryConfig(**sections["retry"]),
        metrics=MetricsConfig(**sections["metrics"]),
        state=StateConfig(**state),
    )


ENV_SETTINGS = {"OPENROUTER_KEYS": "openrouter.keys", "ORPROXY_ACCESS_KEY": "server.access_key",
                "ORPROXY_STATE_FILE": "state.file"}
Flags = Mapping[str, Mapping[str, Any]]  # section -> setting -> value, from the command line


@dataclass(frozen=True)
class Loaded:
    """A config with where it came from: the file read (None if none) and, per setting
    given anywhere, its source ("file", "environment (VAR)", "command line")."""

    config: Config
    path: str | None
    sources: Mapping[str, str]


def load_config(path: str | None, env: Mapping[str, str], flags: Flags | None = None,
                ) -> Config:
    return load(path, env, flags).config


def load(path: str | None, env: Mapping[str, str], flags: Flags | None = None) -> Loaded:
    """Read ``path`` (default ``./config.yml``), then apply the environment, then the
    command-line flags.

    The default file may be missing when the environment carries the keys and access key;
    a path given explicitly must exist.
    """
    explicit = path is not None
    path = path or "config.yml"
    used: str | None = path
    try:
        with open(path, "rb") as f:  # bytes: PyYAML reports a bad encoding as a YAMLError
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError([f"{path}: no such file"]) from None
        if not (env.get("OPENROUTER_KEYS") or env.get("ORPROXY_ACCESS_KEY")):
            raise ConfigError([
                f"no configuration: no --config given and no config.yml in "
                f"{os.path.abspath('.')}; copy config.yml.example to config.yml and edit it "
                "(or pass --config PATH), or set OPENROUTER_KEYS and ORPROXY_ACCESS_KEY"
            ]) from None
        raw, used = {}, None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a config file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
    sources = _file_sources(raw)
    if flags:
        raw = dict(raw) if isinstance(raw, dict) else raw
        for section, values in flags.items():
            if isinstance(raw, dict):
                merged = raw.get(section)
                raw[section] = {**(merged if isinstance(merged, dict) else {}), **values}
            for name in values:
                sources[f"{section}.{name}"] = "command line"
    for var, setting in ENV_SETTINGS.items():
        if env.get(var, "").strip():
            sources[setting] = f"environment ({var})"
    return Loaded(build_config(raw, env), used, sources)


def _file_sources(raw: Any) -> dict[str, str]:
    """Settings the file gives, by their field name (an alias counts for its setting)."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for section, values in raw.items():
        spec = SCHEMA.get(section, {}) if isinstance(section, str) else {}
        if isinstance(values, dict):
            for name in values:
                field_name = spec[name][0] if name in spec else name
                out[f"{section}.{field_name}"] = "file"
    return out
