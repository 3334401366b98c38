"""The README and docs/ say only what the repository holds: links resolve, code parses, every
coverage row names a test that exists, the README stays short, and the design document has
every section the code cites and the import rules it states."""
import ast
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CODE_DIRS = ("seqpar_compiler", "passes", "runtime", "kernels")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _python_files(top: str):
    """Every .py under ``top``, not following links (a development worktree links passes/,
    runtime/ and kernels/ into seqpar_compiler/; a clean checkout does not)."""
    for folder, dirs, files in os.walk(ROOT / top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                yield pathlib.Path(folder) / f


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue                                    # http(s), mailto: not ours to check
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert broken == [], f"{page.name}: links that do not resolve: {broken}"


def test_every_python_block_in_the_readme_parses():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        ast.parse(block)


def test_the_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def _coverage_rows() -> list[str]:
    text = README.read_text()
    start = text.index("## What shards")
    section = text[start:text.index("\n## ", start + 1)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return rows[2:]                                      # past the header and its rule


def test_the_coverage_table_has_rows_and_a_place_for_more():
    assert len(_coverage_rows()) >= 10
    assert "<!-- hybrid rows -->" in README.read_text()


@pytest.mark.parametrize("row", _coverage_rows(), ids=lambda r: r.split("|")[1].strip()[:40])
def test_every_coverage_row_names_a_test_that_exists(row):
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row.split("|")[-2])
    assert refs, f"a coverage row names no test: {row}"
    for path, name in refs:
        source = ROOT / path
        assert source.exists(), path
        if name:
            assert re.search(rf"^\s*def {name}\(", source.read_text(), re.M), f"{path} has no {name}"


def test_no_issue_numbers_or_section_signs_in_the_code():
    """Comments say why, not when: no tracker numbers, no sections of documents outside the repo."""
    found = []
    for top in CODE_DIRS:
        for path in _python_files(top):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"issue [0-9]|§", line):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_every_section_the_code_cites_in_the_design_document_exists():
    anchors = _anchors(ROOT / "docs" / "architecture.md")
    cited = set()
    for top in (*CODE_DIRS, "bench", "examples"):
        for path in _python_files(top):
            text = re.sub(r"\s*\n\s*", " ", path.read_text())
            cited |= set(re.findall(r'docs/architecture\.md, "([^"]+)"', text))
    assert cited, "the code cites no section: the pattern is stale"
    missing = sorted(s for s in cited if _slug(s) not in anchors)
    assert missing == [], f"sections cited in code but not headings of docs/architecture.md: {missing}"


def _imports(path: pathlib.Path) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def _layer(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "seqpar_compiler":
        parts = parts[1:] or ["seqpar_compiler"]
        return parts[0] if parts[0] in ("passes", "runtime", "kernels") else "seqpar_compiler"
    return parts[0] if parts[0] in ("passes", "runtime", "kernels") else None


# docs/architecture.md, "Layering": imports point down only
_MAY_IMPORT = {"kernels": {"kernels"}, "runtime": {"runtime", "kernels"}, "passes": {"passes", "runtime", "kernels"}}
_LEAVES = {"seqpar_compiler.torch_compat"}          # version shims and the control device


@pytest.mark.parametrize("layer", sorted(_MAY_IMPORT))
def test_imports_point_down_only(layer):
    wrong = []
    for path in _python_files(layer):
        for name in _imports(path):
            target = _layer(name)
            if target is not None and target not in _MAY_IMPORT[layer] and name not in _LEAVES:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == [], wrong


def test_the_sharding_core_has_no_fx_and_no_dynamo():
    wrong = [f"{p.name}: {n}" for p in _python_files("runtime/sharding") for n in _imports(p)
             if n.startswith(("torch.fx", "torch._dynamo"))]
    assert wrong == [], wrong


def _stages(text: str) -> list[str]:
    diagram = text[text.index("Dynamo FX graph"):]
    diagram = diagram[:diagram.index("```")]
    return re.findall(r"^\s*│ (\S[^:\n]*?)\s*:", diagram, re.M)


def test_the_backend_how_it_works_and_the_design_list_the_same_stages_in_order():
    backend = _stages((ROOT / "seqpar_compiler" / "backend.py").read_text())
    assert len(backend) >= 6, backend
    assert _stages((ROOT / "docs" / "architecture.md").read_text()) == backend
    assert _stages((ROOT / "docs" / "how_it_works.md").read_text()) == backend
