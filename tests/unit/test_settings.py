"""The option table and everything derived from it: parser, env, config file,
Config, check_implemented, -help, docs/settings.md, and the CLI exit codes."""

import dataclasses
import ipaddress
import os
import pathlib
import re
import subprocess
import sys

import pytest

from httptp import cli, cpus, settings
from httptp.config import (NOT_YET_ACTIVE, Config, check_implemented, diff, inactive_in_use,
                           load_config, restart_needed)
from httptp.errors import ConfigError
from httptp.netaddr import Address
from httptp.settings import SETTINGS, parse_bool, parse_duration

REPO = pathlib.Path(__file__).resolve().parents[2]
OK = ["-outType=http"]          # a config that needs no teleport peer


def load(*argv, env=None):
    return load_config(list(argv), env or {})


def config_error(*argv, env=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(*argv, env=env)
    return str(info.value)


# --- the table -------------------------------------------------------------

ORIGINAL = {
    "in": "127.0.0.1:8080", "inType": "http", "out": "127.0.0.1:8043", "outType": "teleport",
    "outTimeout": "3s", "concurrency": "100000", "inMaxBodySize": "4194304",
    "inMaxHeaderSize": "4096", "outMaxHeaderSize": "4096", "inGetOnly": "false",
    "inAllowIP": "", "clientIPHeader": "", "reusePort": "false", "logAllErrors": "false",
    "expvarAddr": "localhost:8040", "inCompress": "flate", "outCompress": "flate",
    "inDelay": "0", "outDelay": "0", "outConnsPerAddr": "1", "inTLSCert": "", "inTLSKey": "",
    "inTLSSessionTicketKey": "", "autocertCacheDir": "autocert-cache",
    "autocertHostRegexp": "^.*$",
}
OURS = {"workers": "auto", "gracefulTimeout": "30s", "httpParser": "auto", "config": "",
        "checkConfig": "false", "inHeaderTimeout": "10s", "inIdleTimeout": "60s",
        "outMaxFails": "3", "outFailTimeout": "5s", "outIdleTimeout": "10s", "outMaxBodySize": "67108864",
        "inTLSAllowPlaintext": "false", "inTLSClientCA": "", "outTLSCA": "", "outTLSServerName": "",
        "outTLSInsecure": "false", "outTLSCert": "", "outTLSKey": "", "autocertHTTPAddr": ":80",
        "autocertDirectory": "https://acme-v02.api.letsencrypt.org/directory",
        "autocertDirectoryCA": "", "autocertEmail": "", "autocertRenewBefore": "720h",
        "accessLog": "", "logFormat": "text", "requestIDHeader": "X-Request-Id",
        "outHealthCheck": "", "outHealthCheckInterval": "5s", "outHealthCheckTimeout": "2s",
        "outHealthCheckRise": "2", "outHealthCheckFall": "3",
        "outResolveInterval": "10s", "resolver": "", "outMaxAddrs": "256", "outResolveWait": "0s",
        "forwardedProto": "true",
        "inCompressLevel": "", "outCompressLevel": ""}


def test_table_has_the_original_flags_and_defaults():
    assert {s.name: s.default for s in SETTINGS} == ORIGINAL | OURS
    assert {s.name for s in SETTINGS if s.ours} == set(OURS)
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)


@pytest.mark.parametrize("name, env, field", [
    ("outTimeout", "HTTPTP_OUT_TIMEOUT", "out_timeout"),
    ("inTLSCert", "HTTPTP_IN_TLS_CERT", "in_tls_cert"),
    ("expvarAddr", "HTTPTP_EXPVAR_ADDR", "expvar_addr"),
    ("inTLSSessionTicketKey", "HTTPTP_IN_TLS_SESSION_TICKET_KEY", "in_tls_session_ticket_key"),
    ("clientIPHeader", "HTTPTP_CLIENT_IP_HEADER", "client_ip_header"),
    ("inAllowIP", "HTTPTP_IN_ALLOW_IP", "in_allow_ip"),
    ("outConnsPerAddr", "HTTPTP_OUT_CONNS_PER_ADDR", "out_conns_per_addr"),
    ("in", "HTTPTP_IN", "in_addr"),
    ("config", "HTTPTP_CONFIG", "config_file"),
])
def test_derived_names(name, env, field):
    s = settings.BY_NAME[name]
    assert (s.env, s.field) == (env, field)


def test_config_fields_match_the_table():
    table = {s.field for s in SETTINGS if s.name not in settings.CLI_ONLY}
    assert {f.name for f in dataclasses.fields(Config)} == table | {"listen", "upstreams"}


def test_every_default_parses():
    for s in SETTINGS:
        s.parse(s.default)


def test_defaults():
    c = load(*OK)
    assert c.in_addr == "127.0.0.1:8080" and c.listen == Address("tcp", "127.0.0.1", 8080)
    assert c.out == ("127.0.0.1:8043",) and c.upstreams == (Address("tcp", "127.0.0.1", 8043),)
    assert c.out_timeout == 3.0 and c.concurrency == 100000
    assert (c.in_max_body_size, c.in_max_header_size, c.out_max_header_size) == (4194304, 4096, 4096)
    assert c.in_get_only is False and c.reuse_port is False and c.in_allow_ip == ()
    assert c.in_tls_cert == () and c.in_tls_key == ()
    assert c.workers == cpus.available_cpus() and c.graceful_timeout == 30.0
    assert c.http_parser == "auto" and c.config_file is None
    assert (c.in_header_timeout, c.in_idle_timeout) == (10.0, 60.0)
    assert (c.out_max_fails, c.out_fail_timeout, c.out_idle_timeout) == (3, 5.0, 10.0)
    assert (c.in_delay, c.out_delay, c.out_conns_per_addr) == (0.0, 0.0, 1)
    assert c.expvar_addr == "localhost:8040" and c.autocert_host_regexp == "^.*$"


# --- flag forms ------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-outTimeout", "5s"], ["-outTimeout=5s"], ["--outTimeout", "5s"], ["--outTimeout=5s"],
])
def test_flag_forms(argv):
    assert load(*OK, *argv).out_timeout == 5.0


def test_last_flag_wins():
    assert load(*OK, "-workers=2", "-workers", "3").workers == 3


@pytest.mark.parametrize("argv, expected", [
    (["-inGetOnly"], True), (["--inGetOnly"], True),
    (["-inGetOnly=true"], True), (["-inGetOnly=false"], False),
    (["-inGetOnly=1"], True), (["-inGetOnly=0"], False),
    (["-inGetOnly=t"], True), (["-inGetOnly=f"], False),
    (["-inGetOnly=TRUE"], True), (["-inGetOnly=FALSE"], False),
    (["-inGetOnly=True"], True), (["-inGetOnly=False"], False),
    (["-inGetOnly", "-reusePort"], True), ([], False),
])
def test_bools(argv, expected):
    assert load(*OK, *argv).in_get_only is expected


@pytest.mark.parametrize("text", ["yes", "no", "on", "", "2", "tRuE"])
def test_bad_bools(text):
    with pytest.raises(ValueError):
        parse_bool(text)
    assert config_error(*OK, f"-inGetOnly={text}").startswith("-inGetOnly: ")


@pytest.mark.parametrize("argv, flag", [
    (["-inT", "http"], "-inT"),               # no abbreviations (argparse 3.11 would allow it)
    (["--inT=http"], "--inT"),
    (["-outTimout=1s"], "-outTimout"),
    (["-bogus"], "-bogus"),
    (["-h1"], "-h1"),
])
def test_unknown_and_abbreviated_flags(argv, flag):
    assert config_error(*OK, *argv).startswith(f"{flag}: flag provided but not defined")


def test_unknown_flag_suggests():
    assert "did you mean outTimeout?" in config_error("-outTimout=1s")


def test_positional_argument_is_an_error():
    assert "unexpected argument 'extra'" in config_error(*OK, "extra")


def test_missing_value_names_the_flag():
    assert config_error(*OK, "-outTimeout").startswith("-outTimeout: ")
    assert config_error(*OK, "-inDelay", "-1s") == "-inDelay: expected one argument"
    assert config_error(*OK, "-inDelay=-1s").startswith("-inDelay: invalid duration")


def test_double_dash_ends_flags():
    assert config_error(*OK, "--", "-workers=2") == "unexpected argument '-workers=2'"


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_requested(flag):
    with pytest.raises(settings.HelpRequested):
        load(flag)


def test_help_text_lists_every_flag_with_default():
    text = settings.help_text()
    for s in SETTINGS:
        assert f"\n  -{s.name}" in text
    assert '(default "127.0.0.1:8080")' in text and "(default 3s)" in text
    assert "(default 100000)" in text and '(default "^.*$")' in text


def test_help_marks_the_settings_a_hup_cannot_change():
    """docs/operations.md: -help marks each setting reload or restart."""
    text = settings.help_text()
    assert "A HUP (reload) applies a change to any flag but those marked [restart]." in text
    blocks = dict(re.findall(r"(?m)^  -(\w+).*\n(.*)$", text))
    for s in SETTINGS:
        marked = blocks[s.name].endswith("[restart]")
        assert marked == (not s.reloadable and s.name not in settings.CLI_ONLY), s.name
    assert blocks["in"].endswith("[restart]") and blocks["expvarAddr"].endswith("[restart]")
    assert not blocks["out"].endswith("[restart]")


# --- values ----------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("3s", 3.0), ("1ms", 0.001), ("1m30s", 90.0), ("500us", 0.0005), ("500µs", 0.0005),
    ("500μs", 0.0005), ("2h", 7200.0), ("0", 0.0), ("1.5s", 1.5), (".5s", 0.5),
    ("100ns", 1e-7), ("1h2m3s", 3723.0), ("+2s", 2.0), ("0s", 0.0), ("-0", 0.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "1.5", "", "s", "3x", "3 s", "1m30", "-1s", "ms", "1.s.s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_message_mentions_unit():
    assert config_error(*OK, "-outTimeout=5") == \
        "-outTimeout: invalid duration '5': missing unit (ns, us, ms, s, m, h)"


def test_values_parsed():
    c = load("-outType=unix", "-out=/run/a.sock, unix:/run/b.sock", "-inMaxBodySize=0",
             "-concurrency=0x10", "-inAllowIP=10.0.0.0/8, ::1", "-clientIPHeader=X-Real-IP",
             "-inCompress=auto", "-httpParser=h11", "-gracefulTimeout=0", "-workers=2")
    assert c.out == ("/run/a.sock", "unix:/run/b.sock")
    assert c.upstreams == (Address("unix", path="/run/a.sock"), Address("unix", path="/run/b.sock"))
    assert c.in_max_body_size == 4194304            # 0 means the default, as in fasthttp
    assert c.concurrency == 16
    assert c.in_allow_ip == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
    assert c.client_ip_header == "X-Real-IP"
    assert (c.in_compress, c.http_parser, c.graceful_timeout, c.workers) == ("auto", "h11", 0, 2)


def test_ipv6_listen_and_upstreams():
    c = load(*OK, "-in=[::1]:0", "-out=[2001:db8::1]:80,host:81")
    assert c.listen == Address("tcp", "::1", 0)
    assert [str(u) for u in c.upstreams] == ["[2001:db8::1]:80", "host:81"]


def test_unix_listener(tmp_path):
    path = str(tmp_path / "in.sock")
    assert load(*OK, "-inType=unix", f"-in={path}").listen == Address("unix", path=path)
    assert load(*OK, "-inType=unix", "-in=@abstract").listen.path == "@abstract"


@pytest.mark.parametrize("argv, flag", [
    (["-inType=bogus"], "-inType"),
    (["-outType=tcp"], "-outType"),
    (["-in=nowhere"], "-in"),
    (["-in=1.2.3.4:99999"], "-in"),
    (["-out=a:1,,b:2"], "-out"),
    (["-out="], "-out"),
    (["-out=host"], "-out"),
    (["-out=host:0"], "-out"),
    (["-inType=unix", "-in=/no/such/dir/x.sock"], "-in"),
    (["-inMaxBodySize=-1"], "-inMaxBodySize"),
    (["-inMaxHeaderSize=-5"], "-inMaxHeaderSize"),
    (["-outMaxHeaderSize=big"], "-outMaxHeaderSize"),
    (["-concurrency=0"], "-concurrency"),
    (["-workers=0"], "-workers"),
    (["-workers=-1"], "-workers"),
    (["-workers=many"], "-workers"),
    (["-outTimeout=0"], "-outTimeout"),
    (["-outTimeout=soon"], "-outTimeout"),
    (["-gracefulTimeout=-1s"], "-gracefulTimeout"),
    (["-inHeaderTimeout=10"], "-inHeaderTimeout"),
    (["-autocertHostRegexp=(unclosed"], "-autocertHostRegexp"),
    (["-inAllowIP=1.2.3.999"], "-inAllowIP"),
    (["-inAllowIP=10.0.0.0/40"], "-inAllowIP"),
    (["-outConnsPerAddr=0"], "-outConnsPerAddr"),
    (["-inCompress=gzip"], "-inCompress"),
    (["-outCompress=auto"], "-outCompress"),          # auto is only for -inCompress
    (["-httpParser=picohttp"], "-httpParser"),
    (["-inTLSCert=a.pem,b.pem", "-inTLSKey=a.key"], "-inTLSCert"),
    (["-inTLSKey=a.key"], "-inTLSCert"),
    (["-inTLSCert=a.pem,"], "-inTLSCert"),
    (["-clientIPHeader=Bad Header"], "-clientIPHeader"),
    (["-outMaxFails=0"], "-outMaxFails"),
])
def test_bad_values_name_the_flag(argv, flag):
    assert config_error(*OK, *argv).startswith(flag + ": ")


# --- sources and precedence --------------------------------------------------

def test_env(tmp_path):
    env = {"HTTPTP_OUT_TIMEOUT": "7s", "HTTPTP_IN_GET_ONLY": "true", "HTTPTP_OUT_TYPE": "http",
           "HTTPTP_IN_TLS_CERT": "", "HTTPTP_EXPVAR_ADDR": "", "UNRELATED": "x"}
    c = load(env=env)
    assert (c.out_timeout, c.in_get_only, c.out_type, c.expvar_addr) == (7.0, True, "http", "")


def test_env_error_names_the_variable():
    msg = config_error(*OK, env={"HTTPTP_OUT_TIMEOUT": "7"})
    assert msg.startswith("-outTimeout: ") and msg.endswith("(from HTTPTP_OUT_TIMEOUT)")
    msg = config_error(*OK, env={"HTTPTP_IN_GET_ONLY": ""})     # set but empty: not false
    assert msg == "-inGetOnly: invalid boolean '': want true or false (from HTTPTP_IN_GET_ONLY)"


def test_check_config_has_no_env():
    assert settings.BY_NAME["checkConfig"].env is None


def write(tmp_path, text, name="httptp.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_cli_env_file_default(tmp_path):
    path = write(tmp_path, "outType = http\noutTimeout = 1s\nconcurrency = 11\nworkers = 5\n")
    env = {"HTTPTP_CONFIG": path, "HTTPTP_OUT_TIMEOUT": "2s", "HTTPTP_CONCURRENCY": "22"}
    c = load("-outTimeout=3ms", env=env)
    assert c.out_timeout == 0.003           # command line beats env and file
    assert c.concurrency == 22              # env beats file
    assert c.workers == 5                   # file beats default
    assert c.in_max_header_size == 4096     # default
    assert c.config_file == path


def test_config_flag_beats_env(tmp_path):
    a = write(tmp_path, "outType = http\nworkers = 1\n", "a.conf")
    b = write(tmp_path, "outType = http\nworkers = 2\n", "b.conf")
    assert load(f"-config={a}", env={"HTTPTP_CONFIG": b}).workers == 1
    assert load("-config", "", env={"HTTPTP_CONFIG": b}).config_file is None


def test_config_file_format(tmp_path):
    path = write(tmp_path, """
# a comment
   # an indented comment

outType=http
in = :9000
clientIPHeader = "X-Forwarded-For"
inTLSSessionTicketKey = ' spaced # secret '
autocertHostRegexp = ^(a|b)\\.example\\.com$
inAllowIP =
--inGetOnly = t
""")
    c = load("-config", path)
    assert c.listen == Address("tcp", "", 9000)
    assert c.client_ip_header == "X-Forwarded-For"
    assert c.in_tls_session_ticket_key == " spaced # secret "
    assert c.autocert_host_regexp == r"^(a|b)\.example\.com$"
    assert c.in_allow_ip == () and c.in_get_only is True


@pytest.mark.parametrize("text, expected", [
    ("outType = http\noutTimout = 1s\n", ":2: unknown key 'outTimout' (did you mean outTimeout?)"),
    ("outType = http\n= 2\n", ":2: want 'flagName = value', got '= 2'"),
    ("= 2\n", ":1: want 'flagName = value'"),
    ("workers = 1\nworkers = 2\n", ":2: workers is already set at "),
    ("config = other.conf\n", ":1: config cannot be set in a config file"),
    ("checkConfig = true\n", ":1: checkConfig cannot be set in a config file"),
])
def test_config_file_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    msg = config_error("-config", path)
    assert msg.startswith(f"-config: {path}") and expected in msg


def test_config_file_bad_value_names_flag_and_line(tmp_path):
    path = write(tmp_path, "outType = http\n\nconcurrency = -3\n")
    assert config_error("-config", path) == \
        f"-concurrency: -3 must not be less than 1 (from {path}:3)"


def test_config_file_missing(tmp_path):
    msg = config_error(f"-config={tmp_path}/nope.conf")
    assert msg.startswith("-config: cannot read ") and "No such file" in msg


# --- check_implemented, diff ------------------------------------------------

def test_default_out_type_is_teleport_and_runs():
    c = load()
    assert c.out_type == "teleport" and c.in_type == "http"
    check_implemented(c)


@pytest.mark.parametrize("argv", [[], ["-inType=unix", "-in=/tmp/x.sock", "-outType=unix",
                                       "-out=/tmp/y.sock"],
                                  ["-expvarAddr=:9999", "-logAllErrors",
                                   "-autocertCacheDir=/var/cache", "-inCompress=flate",
                                   "-inDelay=0s", "-outConnsPerAddr=1"]])
def test_implemented_configs_pass(argv):
    check_implemented(load(*OK, *argv))


@pytest.mark.parametrize("argv", [
    ["-inType=https", "-inTLSCert=a.pem", "-inTLSKey=a.key"],
    ["-inType=teleports", "-inTLSAllowPlaintext", "-inTLSClientCA=ca.pem"],
    ["-outType=teleports", "-outTLSCA=ca.pem", "-outTLSServerName=x.example"],
    ["-outType=https", "-outTLSInsecure", "-outTLSCert=c.pem", "-outTLSKey=c.key"],
    ["-inTLSSessionTicketKey=s"],
])
def test_tls_settings_are_implemented(argv):
    check_implemented(load(*OK, *argv))     # the files are read later, by httptp.tls


def _refusing(monkeypatch):
    """The table as it was before TLS: the mechanism still refuses what is marked."""
    table = tuple(dataclasses.replace(s, not_yet=("https", "teleports"))
                  if s.name in ("inType", "outType") else
                  dataclasses.replace(s, implemented=False)
                  if s.name in ("inTLSCert", "inTLSSessionTicketKey") else s
                  for s in SETTINGS)
    monkeypatch.setattr(settings, "SETTINGS", table)


@pytest.mark.parametrize("argv, start", [
    (["-inType=https"], "-inType: https is not implemented yet"),
    (["-outType=teleports"], "-outType: teleports is not implemented yet"),
    (["-inTLSCert=a.pem", "-inTLSKey=a.key"], "-inTLSCert: a.pem is not implemented yet"),
    (["-inTLSSessionTicketKey=s"], "-inTLSSessionTicketKey: s is not implemented yet"),
])
def test_not_implemented(monkeypatch, argv, start):
    config = load(*OK, *argv)
    _refusing(monkeypatch)
    with pytest.raises(ConfigError) as info:
        check_implemented(config)
    assert str(info.value).startswith(start)


def test_every_setting_is_active():
    assert NOT_YET_ACTIVE == frozenset()
    assert inactive_in_use(load(*OK)) == []


def test_diff_and_restart_needed():
    old = load(*OK)
    new = load(*OK, "-in=:9000", "-outTimeout=1s", "-workers=7")
    assert diff(old, old) == set()
    assert diff(old, new) == {"in_addr", "listen", "out_timeout", "workers"}
    assert restart_needed(old, new) == {"in"}


def test_config_is_frozen():
    c = load(*OK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.workers = 3
    assert load(*OK) == c


# --- docs ------------------------------------------------------------------

def test_docs_settings_md_is_up_to_date():
    path = REPO / "docs" / "settings.md"
    assert path.read_text() == settings.markdown(), \
        "docs/settings.md is stale: python -m httptp.settings --markdown > docs/settings.md"


def test_docs_mention_every_setting():
    text = settings.markdown()
    for s in SETTINGS:
        assert f"### `-{s.name}`" in text


# --- cli -------------------------------------------------------------------

def test_cli_help(capsys):
    assert cli.main(["-help"]) == 0
    assert "-outTimeout duration" in capsys.readouterr().out


def test_cli_config_error(capsys):
    assert cli.main(["-inType=bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("httptp: -inType: ") and err.count("\n") == 1


def test_cli_tls_certificate_missing(capsys):
    assert cli.main(["-inType=teleports", "-outType=http"]) == 2
    err = capsys.readouterr().err
    assert err == "httptp: -inTLSCert: teleports needs a certificate\n"


def test_cli_check_config(capsys):
    assert cli.main([*OK, "-checkConfig"]) == 0
    assert capsys.readouterr().out == "configuration OK\n"
    assert cli.main([*OK, "-checkConfig=false", "-inType=teleports"]) == 2


def run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTTPTP_")}
    return subprocess.run([sys.executable, "-m", "httptp", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)


def test_subprocess_bad_value_exits_2_with_one_line():
    p = run("-inType=bogus")
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("httptp: -inType: ")


def test_subprocess_help_lists_every_flag():
    p = run("-help")
    assert p.returncode == 0
    for s in SETTINGS:
        assert f"-{s.name}" in p.stdout


def test_subprocess_check_config():
    p = run("-outType=http", "-checkConfig")
    assert (p.returncode, p.stdout) == (0, "configuration OK\n")


# --- active health checks ------------------------------------------------------

def test_health_check_flags(tmp_path):
    c = load("-outHealthCheck=/healthz?deep=0", "-outHealthCheckInterval=1s",
             env={"HTTPTP_OUT_HEALTH_CHECK_FALL": "5"})
    assert (c.out_health_check, c.out_health_check_interval, c.out_health_check_timeout,
            c.out_health_check_rise, c.out_health_check_fall) == ("/healthz?deep=0", 1.0, 2.0, 2, 5)
    assert load().out_health_check == ""


@pytest.mark.parametrize("value", ["healthz", "/a b", "/\x7f", "/" + "x" * 1024])
def test_health_check_path_is_checked(value):
    msg = config_error(*OK, f"-outHealthCheck={value}")
    assert msg.startswith("-outHealthCheck: invalid health check path"), msg


@pytest.mark.parametrize("flag", ["-outHealthCheckRise=0", "-outHealthCheckFall=0",
                                  "-outHealthCheckInterval=0", "-outHealthCheckTimeout=0"])
def test_health_check_numbers_are_checked(flag):
    assert config_error(*OK, flag).startswith(flag.split("=")[0] + ": ")
