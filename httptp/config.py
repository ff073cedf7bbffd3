"""The validated configuration: a frozen `Config` built from the settings table.

Sources, highest first: command line, HTTPTP_* environment, -config file,
defaults (see httptp.settings).  Every bad value raises ConfigError whose
message starts with the flag ("-outTimeout: invalid duration 'x' ...").

The file is read with configargparse's own config-file parser (the format
its users know: ``flagName = value``, ``flagName: value``, ``[sections]``
ignored, ``#``/``;`` comments, ``out = [a, b]`` lists), fed one line at a
time so that every error names the file and the line.  We do not let
configargparse drive argparse itself: it would turn file entries into
``--key=value`` arguments, report a bad key as an "unrecognized argument"
with no file or line, and read booleans as store_true instead of Go's
``-flag=false``.
"""

from __future__ import annotations

import difflib
import io
import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

import configargparse

from httptp import settings
from httptp.errors import ConfigError
from httptp.netaddr import Address, parse_address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_FILE_LINE = configargparse.DefaultConfigFileParser()


@dataclass(frozen=True, slots=True)
class Config:
    """One value per setting (field names are the snake_case flag names; -in is
    ``in_addr`` and -config ``config_file``), plus the parsed addresses."""

    in_addr: str
    in_type: str
    out: tuple[str, ...]
    out_type: str
    out_timeout: float
    concurrency: int
    in_max_body_size: int
    in_max_header_size: int
    out_max_header_size: int
    out_max_body_size: int
    in_get_only: bool
    in_allow_ip: tuple[Network, ...]
    client_ip_header: str
    forwarded_proto: bool
    request_id_header: str
    reuse_port: bool
    log_all_errors: bool
    expvar_addr: str
    in_compress: str
    out_compress: str
    in_compress_level: int | str | None
    out_compress_level: int | str | None
    in_delay: float
    out_delay: float
    out_conns_per_addr: int
    in_tls_cert: tuple[str, ...]
    in_tls_key: tuple[str, ...]
    in_tls_session_ticket_key: str
    in_tls_allow_plaintext: bool
    in_tls_client_ca: str
    out_tls_ca: str
    out_tls_server_name: str
    out_tls_insecure: bool
    out_tls_cert: str
    out_tls_key: str
    autocert_cache_dir: str
    autocert_host_regexp: str
    autocert_http_addr: str
    autocert_directory: str
    autocert_directory_ca: str
    autocert_email: str
    autocert_renew_before: float
    workers: int
    graceful_timeout: float
    http_parser: str
    access_log: str
    log_format: str
    config_file: str | None
    in_header_timeout: float
    in_idle_timeout: float
    out_max_fails: int
    out_fail_timeout: float
    out_idle_timeout: float
    out_health_check: str
    out_health_check_interval: float
    out_health_check_timeout: float
    out_health_check_rise: int
    out_health_check_fall: int
    out_resolve_interval: float
    resolver: tuple[tuple[str, int], ...]
    out_max_addrs: int
    out_resolve_wait: float
    # derived
    listen: Address
    upstreams: tuple[Address, ...]


DERIVED = frozenset({"listen", "upstreams"})

# Accepted but not acted on yet (logged once at start); refused flags are in check_implemented.
NOT_YET_ACTIVE: frozenset[str] = frozenset(
    s.name for s in settings.SETTINGS if not s.implemented and not s.refuse)


# ---------------------------------------------------------------------------
# Loading.

def load_config(argv: list[str], environ: Mapping[str, str]) -> Config:
    """Build the Config from arguments (without the program name) and an
    environment.  Raises ConfigError, or settings.HelpRequested for -help."""
    raw = gather(argv, environ)
    values = {name: _parse_one(name, text, source) for name, (text, source) in raw.items()}
    return _build(values)


def gather(argv: list[str], environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{flag name: (raw text, source)} after precedence; source is "" for the
    command line, else the env name, "FILE:LINE" or "default"."""
    try:
        cli = settings.parse_argv(argv)
    except settings.ArgvError as e:
        raise ConfigError(_with_suggestion(str(e))) from None
    env = {s.name: (environ[s.env], s.env)
           for s in settings.SETTINGS if s.env and s.env in environ}
    path = cli["config"] if "config" in cli else env.get("config", ("", ""))[0]
    merged = {s.name: (s.default, "default") for s in settings.SETTINGS}
    merged.update(read_config_file(path) if path else {})
    merged.update(env)
    merged.update({name: (text, "") for name, text in cli.items()})
    return merged


def read_config_file(path: str) -> dict[str, tuple[str, str]]:
    """Parse a config file (format above).  Returns {flag name: (value, "PATH:LINE")}."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"-config: cannot read {path}: {reason}") from None
    found: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        try:
            items = _FILE_LINE.parse(io.StringIO(line))
        except configargparse.ConfigFileParserException:
            raise ConfigError(f"-config: {where}: want 'flagName = value', got {line.strip()!r}") from None
        for key, value in items.items():
            key = key.lstrip("-")
            _check_file_key(key, where, found)
            if isinstance(value, list):
                value = ",".join(value)
            found[key] = (value, where)
    return found


def _check_file_key(key: str, where: str, found: Mapping[str, tuple[str, str]]) -> None:
    setting = settings.BY_NAME.get(key)
    if setting is None:
        hint = _suggest(key)
        raise ConfigError(f"-config: {where}: unknown key {key!r}{hint}")
    if not setting.in_file:
        raise ConfigError(f"-config: {where}: {key} cannot be set in a config file")
    if key in found:
        raise ConfigError(f"-config: {where}: {key} is already set at {found[key][1]}")


def _suggest(name: str) -> str:
    prefixed = [n for n in settings.BY_NAME if n.startswith(name) and name]
    close = prefixed or difflib.get_close_matches(name, settings.BY_NAME, n=1)
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _with_suggestion(message: str) -> str:
    flag, sep, rest = message.partition(": ")
    if sep and rest == "flag provided but not defined":
        return message + _suggest(flag.lstrip("-"))
    return message


def _parse_one(name: str, text: str, source: str) -> Any:
    setting = settings.BY_NAME[name]
    try:
        return setting.parse(text)
    except ValueError as e:
        raise ConfigError(f"-{name}: {e}{_from(source)}") from None


def _from(source: str) -> str:
    return f" (from {source})" if source and source != "default" else ""


def _build(values: dict[str, Any]) -> Config:
    fields_ = {s.field: values[s.name] for s in settings.SETTINGS
               if s.name not in settings.CLI_ONLY}
    fields_["config_file"] = fields_["config_file"] or None
    fields_["out"] = _split_out(values["out"])
    _check_tls_pairs(fields_["in_tls_cert"], fields_["in_tls_key"])
    _check_level("inCompressLevel", "inCompress", values)
    _check_level("outCompressLevel", "outCompress", values)
    fields_["listen"] = _listen_address(values["in"], values["inType"])
    fields_["upstreams"] = tuple(_address("out", text, values["outType"], allow_srv=True)
                                 for text in fields_["out"])
    _check_room(fields_["upstreams"], values["outMaxAddrs"])
    _check_writable("accessLog", fields_["access_log"])
    return Config(**fields_)


def _check_writable(flag: str, path: str) -> None:
    """A log file every worker will append to must open now, not fail in each
    worker (which would then respawn for ever)."""
    if not path or path == "-":
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise ConfigError(f"-{flag}: cannot open {path}: {e.strerror or e}") from None


def _split_out(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(","))
    if "" in items:
        what = "no upstream address" if items == ("",) else f"empty entry in {text!r}"
        raise ConfigError(f"-out: {what}")
    return items


def _check_level(flag: str, codec_flag: str, values: dict[str, Any]) -> None:
    """A level must be one its codec takes (httptp.teleport.codecs.check_level)."""
    from httptp.teleport import codecs
    level, name = values[flag], values[codec_flag]
    if level is None:
        return
    if name == "auto":
        if level != codecs.AUTO:
            raise ConfigError(f"-{flag}: a number needs a fixed -{codec_flag} (auto answers "
                              "in each client's codec); use auto, or leave it empty")
        return
    try:
        codecs.check_level(codecs.BY_NAME[name], level)
    except ValueError as e:
        raise ConfigError(f"-{flag}: {e} (-{codec_flag}={name})") from None


def _check_tls_pairs(certs: tuple[str, ...], keys: tuple[str, ...]) -> None:
    if len(certs) != len(keys):
        raise ConfigError(f"-inTLSCert: {len(certs)} certificate(s) but -inTLSKey has "
                          f"{len(keys)} key(s); they must pair up")


def _address(flag: str, text: str, kind: str, *, allow_port0: bool = False,
             allow_srv: bool = False) -> Address:
    try:
        return parse_address(text, kind, allow_port0=allow_port0, allow_srv=allow_srv)
    except ValueError as e:
        raise ConfigError(f"-{flag}: {e}") from None


def _check_room(upstreams: tuple[Address, ...], room: int) -> None:
    """Every -out entry needs at least one entry of the shared table; a resolved
    entry's address and origin must fit one entry (httptp.discovery)."""
    from httptp.discovery import check_origin
    if len(set(upstreams)) > room:
        raise ConfigError(f"-out: {len(set(upstreams))} upstreams but -outMaxAddrs is {room}")
    for address in upstreams:
        problem = check_origin(address)
        if problem:
            raise ConfigError(f"-out: {problem}")


def _listen_address(text: str, kind: str) -> Address:
    address = _address("in", text, kind, allow_port0=True)
    if address.kind == "unix" and not address.path.startswith("@"):
        parent = os.path.dirname(os.path.abspath(address.path))
        if not os.path.isdir(parent):
            raise ConfigError(f"-in: directory {parent} of the unix socket does not exist")
    return address


# ---------------------------------------------------------------------------
# After loading.

def diff(old: Config, new: Config) -> set[str]:
    """Names of the Config fields whose values differ."""
    return {f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)}


def restart_needed(old: Config, new: Config) -> set[str]:
    """Flag names (Go spelling) changed between two configs that a HUP cannot apply."""
    return {settings.BY_FIELD[name].name for name in diff(old, new) - DERIVED
            if not settings.BY_FIELD[name].reloadable}


def _default(setting: settings.Setting) -> Any:
    return setting.parse(setting.default)


def check_implemented(config: Config) -> None:
    """Refuse a flag this version cannot honour yet, when it is given anything but
    its default value.  Which flags and values are not ready lives in the settings
    table (``implemented``, ``not_yet``), so later work flips one field there."""
    for s in settings.SETTINGS:
        if s.name in settings.CLI_ONLY:
            continue
        value = getattr(config, s.field)
        if value in s.not_yet:
            raise ConfigError(_not_yet_value(s, value))
        if not s.implemented and s.refuse and value != _default(s):
            shown = ",".join(value) if isinstance(value, tuple) else _show(s, value)
            raise ConfigError(f"-{s.name}: {shown or 'a value'} is not implemented yet; "
                              f"leave it at its default ({s.default or 'empty'})")


def _show(setting: settings.Setting, value: Any) -> str:
    if setting.meta == "duration":
        return settings.format_duration(value)
    return str(value)


def _not_yet_value(s: settings.Setting, value: str) -> str:
    usable = [f"-{s.name}={v}" for v in s.choices if v not in s.not_yet]
    default = " (it is the default, as in the original)" if value == s.default else ""
    return (f"-{s.name}: {value}{default} is not implemented yet; "
            f"pass {' or '.join(usable)}")


def inactive_in_use(config: Config) -> list[str]:
    """``-flag=value`` for accepted-but-inactive settings that would do something
    in the original (for one info line at start)."""
    shown = []
    for name in sorted(NOT_YET_ACTIVE):
        s = settings.BY_NAME[name]
        value = getattr(config, s.field)
        if name.startswith("autocert") and (config.in_type != "https" or config.in_tls_cert):
            continue        # only used by https without certificates
        if value:
            shown.append(f"-{name}={value}" if not isinstance(value, bool) else f"-{name}")
    return shown
