"""Every code block in README.md and docs/*.md runs as written, so the docs cannot drift.

- ```python blocks run as scripts in a fresh interpreter, each in its own empty directory.
- ```c blocks with a ``main`` are compiled (-Wall -Wextra -Werror against include/zcbuf.h) and
  run; a block of declarations only is compiled after the header, so a signature that drifted
  from the header is an error.
- ```rust blocks of README.md run as doctests (src/lib.rs includes the README under
  cfg(doctest)); here we check that the inclusion is still there.
- ```bash blocks are the install and run commands (the README's two are what CI runs): each
  must parse, and the C build recipe of docs/c-api.md is run on the README's C program.
- The layout diagram of docs/design.md names only files that exist, and every source file.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LIB = os.path.join(ROOT, "target", "release")
DOCS = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```$", re.S | re.M)


def blocks(lang):
    out = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                line = text[: m.start()].count("\n") + 1
                out.append(pytest.param(doc, line, m.group(2), id=f"{doc}:{line}"))
    return out


def test_every_block_has_a_known_language():
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for m in FENCE.finditer(text):
            assert m.group(1) in ("python", "c", "rust", "bash", "text", ""), (doc, m.group(1))


@pytest.mark.parametrize("doc,line,code", blocks("python"))
def test_python_block_runs(doc, line, code, tmp_path):
    if "import pyarrow" in code:
        pytest.importorskip("pyarrow")
    script = tmp_path / "block.py"
    script.write_text(code)
    p = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, f"{doc}:{line} failed:\n{p.stderr[-3000:]}"


def _cc():
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    if not os.path.exists(os.path.join(LIB, "libzcbuf.so")):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)


@pytest.mark.parametrize("doc,line,code", blocks("c"))
def test_c_block_compiles_and_runs(doc, line, code, tmp_path):
    _cc()
    src = tmp_path / "block.c"
    has_main = re.search(r"\bint\s+main\s*\(", code) is not None
    # A declarations-only block is checked against the header it summarises.
    src.write_text(code if has_main else '#include "zcbuf.h"\n' + code)
    cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/include", str(src)]
    if has_main:
        cmd += [f"-L{LIB}", "-lzcbuf", "-o", str(tmp_path / "prog")]
    else:
        cmd += ["-c", "-o", str(tmp_path / "block.o")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{doc}:{line} does not compile:\n{p.stderr}"
    if has_main:
        r = subprocess.run(
            [str(tmp_path / "prog")], capture_output=True, text=True, timeout=60,
            env={**os.environ, "LD_LIBRARY_PATH": LIB},
        )
        assert r.returncode == 0, f"{doc}:{line} exited {r.returncode}:\n{r.stderr}"


def test_rust_blocks_are_doctests():
    lib = open(os.path.join(ROOT, "src", "lib.rs")).read()
    assert re.search(r'#\[cfg\(doctest\)\]\s*#\[doc = include_str!\("../README.md"\)\]', lib), (
        "README.md's Rust blocks are no longer run as doctests"
    )
    others = [p for p in blocks("rust") if p.values[0] != "README.md"]
    assert not others, f"Rust blocks outside README.md are not run: {[p.id for p in others]}"


@pytest.mark.parametrize("doc,line,code", blocks("bash"))
def test_bash_block_parses(doc, line, code):
    p = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert p.returncode == 0, f"{doc}:{line}: {p.stderr}"


def test_c_api_build_recipe_runs_the_readme_program(tmp_path):
    """docs/c-api.md's gcc line, as written, on README.md's C quickstart saved as prog.c."""
    _cc()
    readme_c = [p.values[2] for p in blocks("c") if p.values[0] == "README.md"]
    assert readme_c, "README.md has no C quickstart"
    recipe = [p.values[2] for p in blocks("bash") if p.values[0] == os.path.join("docs", "c-api.md")][0]
    work = tmp_path / "w"
    shutil.copytree(os.path.join(ROOT, "include"), work / "include")
    os.symlink(os.path.join(ROOT, "target"), work / "target")
    (work / "prog.c").write_text(readme_c[0])
    script = "\n".join(l for l in recipe.splitlines() if not l.startswith("cargo build"))
    p = subprocess.run(["bash", "-ec", script], cwd=work, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "1048576 bytes" in p.stdout


def test_design_layout_matches_the_tree():
    text = open(os.path.join(ROOT, "docs", "design.md")).read()
    tree = FENCE.search(text[text.index("## Layout"):]).group(2)
    listed, parent = set(), ""
    for raw in tree.splitlines():
        if not raw.strip() or raw.startswith(" " * 10):  # continuation of a description
            continue
        name = raw.split()[0]
        if raw.startswith("  "):
            path = parent + name
        else:
            path = name
            parent = name if name.endswith("/") else ""
        if "generated by maturin" in raw:
            continue
        listed.add(path.rstrip("/"))
        assert os.path.exists(os.path.join(ROOT, path)), f"design.md lists {path}, which is gone"
    for folder, ext in (("src", ".rs"), ("python/zcbuf", ".py"), ("examples", "")):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if f.startswith(("__", ".")) or not f.endswith(ext) or f == "__init__.py":
                continue
            p = f"{folder}/{f}"
            assert p in listed, f"design.md's layout does not list {p}"
