"""`import trl_opsdl` pulls no research harness, and data flows one way: no library module imports the command line,
the demo, the tests, the benchmarks or the experiments (only the command line and the demo themselves may)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "trl_opsdl"
# What `import trl_opsdl` must never pull: the comparisons (the demo's), step timing and the experiments.
HARNESS = ("compare", "timing", "experiments")
OUTSIDE = ("tests", "benchmarks", "experiments", "step_timing", "toy_variants", "real_variants")


def test_importing_the_package_pulls_no_harness():
    code = (
        "import json, sys, trl_opsdl\n"
        "from trl_opsdl import OPSDLConfig, OPSDLTrainer, OPSDLEvalCallback, build_ruler\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    modules = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert "trl_opsdl.opsdl_trainer" in modules  # the check sees what the public names pull
    pulled = [m for m in modules if any(word in m for word in HARNESS)]
    assert not pulled, f"`import trl_opsdl` pulled {pulled}"
    assert not [m for m in modules if m.startswith(("trl_opsdl.demo", "trl_opsdl.cli"))]


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of every module `path` (or `source` read as that file) imports, relative imports resolved, at
    any depth of the file (imports inside functions too)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import cli`
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_library_module_imports_the_cli_demo_tests_benchmarks_or_experiments(path):
    # The CLI and the demo may import the demo (and the CLI is the top); nothing in the package imports what lives
    # outside it.
    top = path.name == "cli.py" or "demo" in path.relative_to(PACKAGE).parts
    wrong = sorted(
        name
        for name in _imports(path)
        if name.split(".")[0] in OUTSIDE or (not top and name.startswith(("trl_opsdl.cli", "trl_opsdl.demo")))
    )
    assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {wrong}"


def test_the_import_check_sees_relative_imports():
    # it must be able to fail: `from ..demo.toy import x` in trl_opsdl/data/ is trl_opsdl.demo.toy
    names = _imports(
        PACKAGE / "data" / "fake.py", "from ..demo.toy import run_demo\nfrom . import cli\nimport tests\n"
    )
    assert {"trl_opsdl.demo.toy", "trl_opsdl.data.cli", "tests"} <= names
