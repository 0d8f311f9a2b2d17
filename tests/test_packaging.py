"""setup.py ships every subpackage of fsmooth (an editable install would hide a missing one)."""
import ast
import subprocess
from pathlib import Path

import pytest

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


def test_the_tracked_tree_leaves_room_for_the_gpu_carry():
    """The device tool copies the working tree and ``.carry/`` (the data and pyautoattack, about 20 MB) together,
    64 MiB at most: evaluation state kept in the tree (adversarial images) must not crowd the carry out."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = {p: (ROOT / p).stat().st_size for p in listing.decode().split("\0") if p and (ROOT / p).is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
    assert total < 40 * 2**20, (f"tracked files hold {total / 2**20:.1f} MiB (largest: {largest}); remove finished "
                                "runs' chunk tensors from results/eval/*/state (see results/PLAN.md)")
