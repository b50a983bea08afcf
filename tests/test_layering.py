"""The layering rule, checked on the source: imports only go downward.

    nets (network pieces), shards (data)  <-  latent_actions, worldmodel, decoders (models)  <-  wm_pipeline

Every import statement counts, also the ones inside functions (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"nets", "shards", "latent_actions", "worldmodel", "decoders", "wm_pipeline"}
MAY_IMPORT = {
    "nets": {"nets"},
    "shards": {"shards"},
    "latent_actions": {"latent_actions", "nets", "shards"},
    "worldmodel": {"worldmodel", "nets", "shards"},
    "decoders": {"decoders", "nets", "shards"},
    "wm_pipeline": PROJECT,
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PROJECT]
    return out


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_only_go_downward(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no package {package}/"
    upward = [
        f"{f.relative_to(ROOT)}:{line} imports {name}"
        for f in files
        for line, name in project_imports(f)
        if name not in MAY_IMPORT[package]
    ]
    assert not upward, "imports that go upward or sideways:\n" + "\n".join(upward)


def test_the_check_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from wm_pipeline.training import trainer\n    import decoders.flow\n")
    assert project_imports(f) == [(4, "wm_pipeline"), (5, "decoders")]
