"""Run-time code must not import the libraries the design rules out (tests/ may)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"diffusers", "peft", "accelerate", "bitsandbytes"}


def imported_top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_forbidden_imports_outside_tests():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or "site-packages" in rel.parts:
            continue
        bad = imported_top_level_names(path) & FORBIDDEN
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, "run-time code imports test-only libraries:\n" + "\n".join(offenders)


def test_the_check_sees_an_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom diffusers import AutoencoderKL\n")
    assert "diffusers" in imported_top_level_names(bad)


# The family seam: the generic code asks the registry (families/__init__.py) for a family and
# calls its surface; it never imports a family module nor compares a family name.
GENERIC = ("train.py", "sample.py", "plan.py", "training.py", "data.py", "lora.py", "cache.py", "blockswap.py",
           "losses.py", "optim.py", "activations.py", "checkpoint.py")


def family_names() -> set[str]:
    return {path.stem for path in (ROOT / "families").glob("*.py") if path.stem != "__init__"}


def family_leaks(path: Path, names: set[str]) -> list[str]:
    """Imports of a family module, and string constants equal to a family name in a comparison
    or a dict key (the shapes a branch on the family would take)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("families."):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("families.")]
        elif isinstance(node, ast.ImportFrom) and node.module == "families":
            found += [f"line {node.lineno}: from families import {a.name}" for a in node.names if a.name in names]
        elif isinstance(node, ast.Compare):
            constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            found += [f"line {node.lineno}: compares with {c!r}" for c in constants if c in names]
    return found


def test_generic_code_never_names_a_family():
    names = family_names() | {"sd3", "sdxl", "deepfloyd", "if"}
    leaks = {rel: family_leaks(ROOT / rel, names) for rel in GENERIC}
    assert not {rel: found for rel, found in leaks.items() if found}


def test_the_family_check_sees_a_branch(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from families.flux import FAMILY\nif cfg['model_family'] == 'flux':\n    pass\n")
    assert len(family_leaks(bad, {"flux"})) == 2
