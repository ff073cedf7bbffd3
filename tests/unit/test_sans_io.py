"""``httptp/http/`` and ``httptp/teleport/`` are sans-IO (STYLE.md §7.2): bytes
in, values out, bytes to send; no sockets, no loop, no clock.  An AST scan of
every import statement in them (at any depth: inside functions too) fails on
IO modules and on ``httptp.io``, whose drivers sit on top of them.  A second
test imports them all in a fresh interpreter and checks what came along."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("httptp/http", "httptp/teleport")
BANNED = ("gevent", "greenlet", "socket", "ssl", "select", "selectors", "time", "asyncio",
          "threading", "httptp.io")

# (file, function) pairs where importing httptp.io is allowed.  The blocking
# library API (httptp.teleport.Client, Server, ...) lives with the drivers in
# httptp/io/teleport_api.py; users import it from httptp.teleport (and, before
# it moved, from httptp.teleport.api).  A module-level __getattr__ (PEP 562)
# loads it only when one of those names is asked for, so importing the package
# or any protocol module never brings gevent in: the second test checks that.
LAZY_REEXPORTS = {
    ("httptp/teleport/__init__.py", "__getattr__"),
    ("httptp/teleport/api.py", "__getattr__"),
    # the asyncio library (AsyncClient, AsyncServer, serve_asgi) lives in
    # httptp/io/teleport_aio.py; it must not bring gevent in either (below)
    ("httptp/teleport/aio.py", "__getattr__"),
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts)


def _imports(path: Path, source: str | None = None):
    """``(module, function)`` for every import in ``path`` (or in ``source``
    as if it were ``path``): the absolute module name(s) it imports, and the
    name of the enclosing top-level function (None at module level)."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    found = []

    def visit(node, func):
        if isinstance(node, ast.Import):
            found.extend((a.name, func) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package_of(path).split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # "from httptp import io" imports httptp.io too
            found.extend((f"{base}.{a.name}" if base else a.name, func) for a in node.names)
            found.append((base, func))
        for child in ast.iter_child_nodes(node):
            inner = func
            if func is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            visit(child, inner)

    visit(tree, None)
    return found


def _banned(module: str) -> str | None:
    for name in BANNED:
        if module == name or module.startswith(name + "."):
            return name
    return None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_io_imports(path):
    rel = str(path.relative_to(ROOT))
    bad = []
    for module, func in _imports(path):
        name = _banned(module)
        if name is None:
            continue
        if name == "httptp.io" and (rel, func) in LAZY_REEXPORTS:
            continue
        bad.append(f"{module} (in {func or 'the module body'})")
    assert not bad, f"{rel} is sans-IO but imports: {', '.join(sorted(set(bad)))}"


def test_the_scan_sees_what_it_must():
    """The scanner itself: relative, nested and from-imports are all seen."""
    src = ("import gevent.socket\nfrom .. import io\nfrom . import handshake\n"
           "def f():\n    from time import monotonic\n")
    mods = {m for m, _ in _imports(ROOT / "httptp" / "teleport" / "probe.py", src)}
    assert {"gevent.socket", "httptp.io", "httptp.teleport.handshake", "time"} <= mods
    assert {_banned(m) for m in mods} >= {"gevent", "httptp.io", "time"}


def test_whitelisted_functions_exist():
    """Each allowed lazy re-export is still there (a stale entry would hide
    a new import in a function of the same name)."""
    for rel, func in LAZY_REEXPORTS:
        assert (rel, func) in {(rel, f) for m, f in _imports(ROOT / rel)
                               if _banned(m) == "httptp.io"}


def test_importing_them_all_brings_no_io_in():
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in _modules()]
    names = [n[:-len(".__init__")] if n.endswith(".__init__") else n for n in names]
    code = (f"import sys\nfor n in {names!r}: __import__(n)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'greenlet') "
            "or m.startswith('httptp.io')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_asyncio_library_brings_no_gevent_in():
    """``httptp.teleport.aio`` (AsyncClient, AsyncServer, serve_asgi) runs in
    asyncio programs: loading and using it imports neither gevent nor
    greenlet."""
    code = ("import sys\nfrom httptp.teleport.aio import AsyncClient, AsyncServer, serve_asgi\n"
            "import httptp.teleport\nhttptp.teleport.TeleportError\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'greenlet')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
