"""The documentation: its relative links and anchors resolve, no file of the repository refers to a section mark or to
notes outside it, and the README's quick start runs as written on the shipped toy model."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), the target up to the first space (a title may follow) or the closing parenthesis.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)


def _prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where a bracket or a hash is no link or heading."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text in lower case, every character but letters, digits,
    underscores, hyphens and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file: its headings' slugs (a repeated one numbered -1, -2, ... as GitHub does) and
    explicit `<a id=...>` / `<a name=...>` anchors."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set(_HTML_ANCHOR.findall(text))
    for _, title in _HEADING.findall(text):
        slug = github_slug(title)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    """The link and image targets of a markdown file that point into the repository (no scheme, no mail address)."""
    targets = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def test_the_slugs_are_githubs():
    assert github_slug("Joint attention (SD3, Flux)") == "joint-attention-sd3-flux"
    assert github_slug("`GoCAMixin`") == "gocamixin"
    assert github_slug("Single-pass layer-weight kernel, opt-in") == "single-pass-layer-weight-kernel-opt-in"
    assert github_slug("COCO-30k FID / CLIP (`benchmarks/coco30k.py`)") == "coco-30k-fid--clip-benchmarkscoco30kpy"


def test_the_link_finder_finds_links_and_images_but_not_code(tmp_path):
    path = tmp_path / "probe.md"
    path.write_text(
        'See [a](docs/a.md#x) and ![pic](images/p.png "title"), [web](https://example.org), '
        "`[no](code.md)`.\n```python\nx = [1](2)\n```\n## A heading, `with code`\n",
        encoding="utf-8",
    )
    assert relative_links(path) == ["docs/a.md#x", "images/p.png"]
    assert anchors(path) == {"a-heading-with-code"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    """Every relative link and image of the README and docs/*.md names an existing file, and its #anchor (if any) a
    heading of that file."""
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        destination = (doc.parent / file_part).resolve() if file_part else doc
        if not destination.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_are_linked_from_the_readme():
    """Every page of docs/ is reachable: linked from the README or from a page the README links."""
    linked = set()
    for doc in DOCS:
        for target in relative_links(doc):
            file_part = target.partition("#")[0]
            if file_part:
                linked.add((doc.parent / file_part).resolve())
    orphans = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages no page links to: {orphans}"


# Built from pieces, so that this file does not match itself.
_FORBIDDEN = {
    "a section mark": "\u00a7",
    "the design notes": "ALGO" + "RITHMS",
    "a folder outside the repository": "../" + "shared",
}
_SCANNED = {".py", ".md", ".sh", ".toml", ".cfg"}
_SKIPPED_DIRS = {"outputs", "toy_runs", ".git"}


def _repository_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if Path(name).suffix in _SCANNED:
                yield Path(folder) / name


def test_no_file_refers_to_section_marks_or_outside_notes():
    found = []
    for path in _repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for what, needle in _FORBIDDEN.items():
            for number, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}")
    assert not found, "\n".join(found)


def _readme_quick_start() -> str:
    """The README's first ```python block: the quick start on the shipped toy model."""
    match = re.search(
        r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL
    )
    assert match, "the README has no ```python block"
    return match.group(1)


def test_the_quick_start_is_the_toy_model_one():
    code = _readme_quick_start()
    assert "load_toy_pipeline" in code and "from_pretrained" not in code


def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """Runs the quick start as a user would paste it, in an empty folder; it must print its results and write every
    file it saves."""
    import torch
    from PIL import Image

    code = _readme_quick_start()
    saved = re.findall(r"\.save\(\s*[\"']([^\"']+)[\"']", code)
    assert saved, "the quick start saves no file"
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 32-px toy gains nothing from threads, and on a busy machine they wait on each other
    try:
        exec(compile(code, "README.md (quick start)", "exec"), {"__name__": "__quick_start__"})
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.strip(), "the quick start printed nothing"
    for name in saved:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, f"the quick start did not write {name}"
        with Image.open(path) as picture:
            assert picture.width > 0 and picture.height > 0
