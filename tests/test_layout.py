"""The package layout is the architecture: these tests hold it.

* no import cycle inside ``otp_agents``, whether the import is at module level, inside a function,
  or only under ``TYPE_CHECKING``;
* each layer imports only the layers its line in ``LAYERS`` names (data flows one way);
* ``import otp_agents.worker``, what every worker does, loads no engine, handle, monitor or
  operator-plane module;
* a wheel built from the checkout holds every subpackage, and ``otp-agents check`` runs from it
  with the checkout off ``sys.path``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .helpers import ROOT

PKG = ROOT / "otp_agents"

# What each part of the package may import (besides itself and the leaves). Leaves import
# nothing of the package but other leaves.
LEAVES = {"errors", "events", "redact", "linux", "livekit_env", "retention"}
LAYERS: dict[str, set[str]] = {
    "wire": set(),
    "worker": {"wire"},
    "zygote": {"wire", "worker"},
    "spec": {"wire"},
    "tree": {"spec"},
    "proc": {"spec", "wire"},
    "health": {"proc", "spec", "wire"},
    "runtime": {"tree", "proc", "health", "spec", "wire"},
    "ops": {"runtime", "tree", "proc", "health", "spec", "wire"},
    "cli": {"ops", "runtime", "proc", "spec", "wire"},
    "voice": {"worker", "wire", "ops.control_client"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module of the package that ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_the_package() -> None:
    assert _cycles(_graph()) == []


def _part(module: str) -> str | None:
    """The layer of a module: ``otp_agents.tree.rules`` -> ``tree``; a leaf -> None."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return None if parts[1] in LEAVES else parts[1]


def test_each_layer_imports_only_what_its_line_allows() -> None:
    wrong = []
    for module, targets in _graph().items():
        part = _part(module)
        for target in targets:
            there = _part(target)
            if target == "otp_agents" or there is None or there == part:
                if part is None and there is not None:  # a leaf reaching into a layer
                    wrong.append(f"{module} -> {target}")
                continue
            allowed = LAYERS.get(part or "", set())
            if there not in allowed and target.removeprefix("otp_agents.") not in allowed:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_layer_is_named() -> None:
    parts = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts == set(LAYERS)
    leaves = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert leaves == LEAVES


def test_the_worker_library_loads_nothing_of_the_supervisor() -> None:
    code = (
        "import json, sys; import otp_agents.worker; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('otp_agents'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = json.loads(done.stdout)
    allowed = ("otp_agents.worker", "otp_agents.wire", "otp_agents.errors")
    assert [m for m in loaded if m != "otp_agents" and not m.startswith(allowed)] == []
    assert "otp_agents.worker.loop" in loaded  # and it did load the library itself


def test_importing_the_package_loads_nothing_until_asked() -> None:
    code = "import sys, otp_agents; print(sorted(m for m in sys.modules if m.startswith('otp_agents')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "['otp_agents']"


def test_the_documented_embedding_imports_work() -> None:
    import otp_agents
    from otp_agents import Kind, Worker, load_file, run, running
    from otp_agents.runtime import running as running_too
    from otp_agents.worker import Worker as WorkerToo

    assert running is running_too and Worker is WorkerToo
    assert callable(load_file) and callable(run) and Kind.CHILD_STARTED.value == "child_started"
    assert set(otp_agents.__all__) <= set(dir(otp_agents))
    with pytest.raises(AttributeError):
        _ = otp_agents.no_such_name  # type: ignore[attr-defined]


def test_every_error_derives_from_one_base() -> None:
    from otp_agents.errors import OtpAgentsError

    errors = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(
                ("Error", "Unavailable", "Busy", "Running")
            ):
                errors.append((name, node.name))
    assert len(errors) > 10
    for module, cls in errors:
        obj = getattr(__import__(module, fromlist=[cls]), cls)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, OtpAgentsError), f"{module}.{cls}"


@pytest.mark.slow
def test_a_built_wheel_holds_every_subpackage_and_checks_a_tree(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        str(wheels),
        ".",
    ]
    subprocess.run(build, cwd=ROOT, check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("otp_agents-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for part in [*LAYERS, ""]:
        assert f"otp_agents/{part}/__init__.py".replace("//", "/") in names, part
    # A fresh environment that sees the project's installed dependencies but not the checkout.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "deps.pth").write_text("\n".join(deps) + "\n")
    install = [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        "--target",
        site,
        str(wheel),
    ]
    subprocess.run([sys.executable, *install[1:]], check=True, capture_output=True, timeout=600)
    tree = tmp_path / "tree.toml"
    tree.write_text((ROOT / "supervisors" / "default.toml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    check = [
        str(python),
        "-c",
        "import sys; from otp_agents.cli import main; sys.argv[0] = 'otp-agents'; main()",
    ]
    done = subprocess.run(
        [*check, "check", str(tree)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout.splitlines()[0]
    where = subprocess.run(
        [str(python), "-c", "import otp_agents, otp_agents.voice; print(otp_agents.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(site) and not where.startswith(str(ROOT))
