"""A plain `pip install safelora-cli` brings everything the commands import.

torch does not require numpy, yet safetensors' torch writer and `Tensor.numpy()` do; such a gap only
shows on a machine where nobody installed numpy for another reason. So each command runs in a fresh
interpreter that records what it imported, and every third-party module must come from a declared
runtime dependency or from what those require in turn. A second check runs the commands with only
that closure of distributions importable, as a plain install would have it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import safelora_cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib  # type: ignore[no-redef]

PACKAGE_DIR = Path(safelora_cli.__file__).parent
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
STDLIB_DIRS = tuple(Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib"))

# Runs one `safelora` command; at exit dumps the top-level modules it imported and their files.
CHILD = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
dump, sys.argv = sys.argv[2], ["safelora", *sys.argv[3:]]
before = set(sys.modules)
try:
    from safelora_cli.cli import main
    main()
finally:
    tops = {name.partition(".")[0] for name in set(sys.modules) - before}
    files = {name: getattr(sys.modules.get(name), "__file__", None) for name in tops}
    origin = getattr(sys.modules.get("safelora_cli"), "__file__", None)
    with open(dump, "w") as f:
        json.dump({"origin": origin, "modules": files}, f)
"""


def demo_commands() -> list[list[str]]:
    """The arguments of each `safelora` line in the README's demo block."""
    section = (ROOT / "README.md").read_text().split("## Try it in under a minute", 1)[1]
    block = section.split("```\n", 2)[1]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("safelora ")]


def test_make_demo_runs_the_readme_demo() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines()[1:]]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("$(BIN)/safelora ")]
    assert commands == demo_commands()
    assert [c[0] for c in commands] == ["demo", "patch", "inspect"]


def run_commands(workdir: Path, flags: list[str], path: list[str]) -> dict[str, str | None]:
    """Run each demo command in its own interpreter; the union of the top-level modules they imported."""
    modules: dict[str, str | None] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for i, command in enumerate(demo_commands()):
        dump = workdir / f"modules-{i}.json"
        argv = [sys.executable, *flags, "-c", CHILD, json.dumps(path), str(dump), *command]
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"safelora {command[0]} failed:\n{done.stderr[-3000:]}"
        record = json.loads(dump.read_text())
        # the package under test, not another installed copy
        assert Path(record["origin"]).resolve().parent == PACKAGE_DIR.resolve(), record["origin"]
        modules.update(record["modules"])
    assert (workdir / "demo" / "patched" / "adapter_model.safetensors").is_file()
    return modules


def declared_requirements() -> list[Requirement]:
    """The runtime dependencies as pyproject.toml declares them (not the possibly stale installed metadata)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def requirement_closure(roots: Iterable[Requirement]) -> set[str]:
    """Normalised names of the roots and everything they require, extras only where asked for."""
    seen: set[tuple[str, str]] = set()
    stack = [r for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                texts = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue  # not installed here, so nothing of it can have been imported either
            for text in texts:
                child = Requirement(text)
                if child.marker is None or child.marker.evaluate({"extra": extra}):
                    stack.append(child)
    return {name for name, _ in seen}


def is_stdlib(name: str, file: str | None) -> bool:
    if name in sys.stdlib_module_names or name.startswith("__"):  # __mp_main__ aliases __main__
        return True
    if file is None:
        return name in sys.builtin_module_names
    resolved = Path(file).resolve()
    return "site-packages" not in resolved.parts and any(resolved.is_relative_to(d) for d in STDLIB_DIRS)


def undeclared(modules: dict[str, str | None], requirements: Iterable[Requirement]) -> dict[str, list[str]]:
    """Third-party module → its distributions, for each module no declared dependency accounts for."""
    allowed = requirement_closure(requirements)
    owners = metadata.packages_distributions()
    missing: dict[str, list[str]] = {}
    for name, file in sorted(modules.items()):
        if name == "safelora_cli" or (name not in owners and is_stdlib(name, file)):
            continue
        dists = sorted({canonicalize_name(d) for d in owners.get(name, [])}) or [f"? ({file})"]
        if not allowed & set(dists):
            missing[name] = dists
    return missing


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    """What demo, patch and inspect import, with the package importable exactly as the tests import it."""
    return run_commands(tmp_path_factory.mktemp("imports"), [], [str(PACKAGE_DIR.parent)])


@pytest.mark.slow
def test_every_third_party_import_is_a_declared_dependency(imported: dict[str, str | None]) -> None:
    assert {"torch", "safetensors", "typer"} <= imported.keys()  # the commands really ran
    missing = undeclared(imported, declared_requirements())
    assert not missing, f"imported but not declared in pyproject.toml [project] dependencies: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("left_out", ["numpy", "safetensors"])
def test_a_dependency_left_out_of_pyproject_is_caught(imported: dict[str, str | None], left_out: str) -> None:
    """The check has teeth: without the declaration, the module shows up as undeclared."""
    requirements = [r for r in declared_requirements() if canonicalize_name(r.name) != left_out]
    assert left_out in undeclared(imported, requirements)


def link_closure(sandbox: Path, names: Iterable[str]) -> None:
    """Symlink each distribution's top-level entries (packages, modules, dist-info) into `sandbox`."""
    for name in sorted(names):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}):
            target = Path(str(dist.locate_file(top)))
            link = sandbox / top
            if target.exists() and not link.exists():
                link.symlink_to(target, target_is_directory=target.is_dir())


@pytest.mark.slow
def test_demo_runs_with_only_the_declared_dependencies_importable(tmp_path: Path) -> None:
    """Like a fresh `pip install .`: no site-packages, only the dependency closure and the package."""
    sandbox = tmp_path / "site"
    sandbox.mkdir()
    closure = requirement_closure(declared_requirements())
    link_closure(sandbox, closure)
    (sandbox / "safelora_cli").symlink_to(PACKAGE_DIR, target_is_directory=True)
    assert (sandbox / "torch").is_dir()
    work = tmp_path / "work"
    work.mkdir()
    modules = run_commands(work, ["-I", "-S"], [str(sandbox)])
    outside = [n for n, f in modules.items() if f and not is_stdlib(n, f) and not f.startswith(str(sandbox))]
    assert not outside, f"imported from outside the sandbox: {outside}"
