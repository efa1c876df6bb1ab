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
