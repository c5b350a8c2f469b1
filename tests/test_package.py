"""The package: no import cycles, modules of readable size, installable and runnable anywhere."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deit_jax"
MAX_LINES = 500
COMMANDS = ("deit-train", "deit-teacher-logits", "deit-convert", "deit-benchmark",
            "deit-analyze", "deit-quickstart", "deit-reproduce")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the deit_jax modules it imports}, from every import statement (top level or
    inside a function: a lazy import that closes a cycle is still a cycle)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                # `from pkg import mod` imports the submodule pkg.mod when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_and_no_top_level_configs():
    graph = import_graph()
    assert {"deit_jax.train", "deit_jax.teacher", "deit_jax.teacher_logits"} <= set(graph)
    assert "deit_jax.teacher_store" in graph["deit_jax.train"]  # the graph sees real edges
    assert find_cycle(graph) is None
    # The library runs installed, without the repository's top-level configs package.
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "configs"], path


def test_importing_the_library_starts_no_jax_backend():
    """A jnp array made at import time starts the backend, after which neither
    jax.distributed.initialize nor jax_num_cpu_devices (benchmark --cpu_devices) can be set."""
    # The command modules define absl flags at import (one per process); each is imported alone
    # by the command tests.
    commands = {"deit_jax.main", "deit_jax.quickstart", "deit_jax.reproduce"}
    code = ("import importlib, pkgutil, deit_jax\n"
            "from jax._src import xla_bridge\n"
            "for m in pkgutil.walk_packages(deit_jax.__path__, 'deit_jax.'):\n"
            f"    if m.name not in {sorted(commands)!r}:\n"
            "        importlib.import_module(m.name)\n"
            "        assert not xla_bridge._backends, m.name\n"
            "import jax.numpy as jnp; jnp.zeros(1)\n"
            "assert xla_bridge._backends  # the check sees a started backend\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=300)


def test_no_module_over_500_lines():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, {p: n for p, n in sizes.items() if n > MAX_LINES}


def _venv(tmp_path: Path) -> Path:
    """A venv that sees this interpreter's packages (a .pth file), without pip of its own."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    Path(site, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _install(venv: Path, source: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", *args,
                    str(source)], check=True, timeout=300)


def _copy_repo(tmp_path: Path) -> Path:
    """What the build reads (pyproject.toml, README.md, requirements.txt, deit_jax/), in a fresh
    directory: the checkout stays free of build outputs."""
    dst = tmp_path / "src"
    shutil.copytree(PACKAGE, dst / "deit_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, dst / name)
    return dst


def test_pip_install_runs_every_command_outside_the_repo(tmp_path):
    venv = _venv(tmp_path)
    _install(venv, _copy_repo(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import deit_jax, deit_jax.configs.deit_ti as c; from deit_jax import cli; "
            "print(deit_jax.__file__); print(cli.resolve_config_path('configs/deit_ti.py:smoke'));"
            " print(c.get_config('smoke').model.img_size)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=elsewhere, env=env,
                         check=True, capture_output=True, text=True).stdout.split()
    site = str(venv / "lib")
    assert out[0].startswith(site) and out[1].startswith(site) and out[2] == "32"
    assert out[1].endswith("deit_jax/configs/deit_ti.py:smoke") and Path(
        out[1].split(":")[0]).is_file()
    # The flags each command must show in its --help.
    expected = {"deit-train": "--workdir", "deit-teacher-logits": "--top_k",
                "deit-convert": "--src", "deit-benchmark": "--peak_tflops",
                "deit-analyze": "--num_maps", "deit-quickstart": "--teacher_epochs",
                "deit-reproduce": "--seeds"}
    for command in COMMANDS:
        proc = subprocess.run([str(venv / "bin" / command), "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert expected[command] in proc.stdout, (command, proc.stdout[-2000:])


def test_editable_install_imports_the_checkout(tmp_path):
    src = _copy_repo(tmp_path)
    venv = _venv(tmp_path)
    _install(venv, src, "-e")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import deit_jax.configs; print(deit_jax.configs.__file__)"],
                         cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    assert Path(out.stdout.strip()) == src / "deit_jax" / "configs" / "__init__.py"
