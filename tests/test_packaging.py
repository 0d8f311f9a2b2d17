"""setup.py ships every subpackage of fsmooth (an editable install would hide a missing one)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_packages() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no packages=[...]")


def test_every_subpackage_is_listed_in_setup_py():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fsmooth").rglob("__init__.py")}
    found.add("fsmooth.kernels")  # kernels/ is installed as fsmooth.kernels (package_dir)
    assert found == _setup_packages()
