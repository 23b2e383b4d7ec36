"""The documentation stands alone and its code runs.

* Every fenced block tagged ``python`` in README.md and docs/*.md runs as printed, in order, in one
  namespace per file (a later block may use names of an earlier one). A block that is not meant to run
  takes another tag (``bash``, ``text``, ``pycon``, or none): only ``python`` blocks are executed, and a
  README without them fails too.
* Every relative Markdown link resolves to a file inside the repository (its #anchor to a heading of the
  target), and every backticked path that starts with a top-level entry of the repository
  (``hallolive_rt/...``, ``tests/...``, ``docs/...``) names a file or folder that exists; a
  ``tests/x.py::test_name`` reference names a test defined in that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
TICKED = re.compile(r"`([^`\s]+)`")


def _blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1).strip() == lang]


def _prose(path: Path) -> str:
    """The file without its fenced blocks (commands and code are not references)."""
    return FENCE.sub("", path.read_text())


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    out = set()
    for line in _prose(path).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_readme_has_python_examples():
    blocks = _blocks(ROOT / "README.md", "python")
    assert len(blocks) >= 2, "the README's Python API section lost its examples"
    assert any("generate(" in code for _, code in blocks) and any("StreamSession" in code for _, code in blocks)


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d, "python")], ids=lambda d: d.name)
def test_python_blocks_run_as_printed(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here, not into the checkout
    namespace: dict = {"__name__": "__readme__"}
    for line, code in _blocks(doc, "python"):
        exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)  # a failure points at the block's line
    out = capsys.readouterr().out
    if doc.name == "README.md":  # the shapes the example's comments promise
        assert "torch.Size([1, 4, 48, 4, 6])" in out and "torch.Size([1, 20, 20])" in out
        assert "\n10\n" in out and "(5, 64, 96, 3)" in out and "(8, 64, 96, 3)" in out


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_and_paths_resolve_inside_the_repository(doc):
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
    prose, bad = _prose(doc), []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if ROOT not in dest.parents and dest != ROOT or not dest.exists():
            bad.append(f"link {target!r}: {dest} is not a file of the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"link {target!r}: no heading #{anchor} in {dest.name}")
    for token in TICKED.findall(prose):
        path, _, test = token.partition("::")
        if path.split("/")[0] not in top or re.search(r"[<>*{}$]", path):
            continue
        dest = ROOT / path.rstrip("/")
        if not dest.exists():
            bad.append(f"path `{token}` does not exist")
        elif test and not re.search(rf"^def {re.escape(test)}\(", dest.read_text(), re.M):
            bad.append(f"`{token}`: no test {test} in {path}")
    unlinked = LINK.sub("", prose)  # the documents of this repository are cited as links, never bare
    for name in ("FACTS.md", "MEASURE.md"):
        bad.extend(f"{name} named without a link: {ln.strip()[:100]}" for ln in unlinked.splitlines() if name in ln)
    assert not bad, f"{doc.name}:\n  " + "\n  ".join(bad)


def test_metrics_json_points_at_the_definitions_in_this_repository():
    import numpy as np

    from hallolive_rt.runtime.decode_pipeline import DecodedBlock
    from hallolive_rt.runtime.metrics import stream_metrics

    blk = DecodedBlock(0, np.zeros((1, 2, 2, 3), np.uint8), np.zeros(512, np.float32), {"dit": 1.0}, 0.0, 0.1, 0.2)
    where = stream_metrics([blk], fps=25.0, with_env=False)["definitions"].split(";")[0]
    assert where == "docs/MEASURE.md" and (ROOT / where).is_file()
    text = (ROOT / where).read_text()
    for key in ("ttff_s", "steady_fps", "block_time_s", "inter_block_gap_s", "projected_two_device_fps"):
        assert f"`{key}`" in text, f"{where} does not define {key}"
