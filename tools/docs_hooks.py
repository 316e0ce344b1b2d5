"""mkdocs hooks (mkdocs.yml ``hooks:``): the pages built from the registries.

* ``index.md``: the README's introduction and its install section;
* ``ops/<family>.md`` for every family of ``fastvision.bench.suites.FAMILIES``:
  the family's README section (semantics, shapes, dtypes, anchor), its
  migration table (``docs/migration/<family>.md``) and the API of its public
  functions and layers, rendered from their docstrings by mkdocstrings;
* ``models.md``: every builder of ``fastvision.models.registry.MODELS`` with its
  published config, ``load_official`` and the layouts it maps;
* ``benchmarks.md``: the README's speed section with its plots.

A family added later gets its page from these sources without a change here.
Links into the repository are rewritten for the site (pages of ``docs/``
and images are served; other files become their path as code).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def readme_sections(text: str | None = None) -> list[tuple[int, str, str]]:
    """(level, title, body) of every ``##`` / ``###`` section of the README (code
    blocks are not searched for headings)."""
    text = (ROOT / "README.md").read_text() if text is None else text
    sections, current, fenced = [], None, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#{2,3}) (.+)", line)
        if m:
            current = [len(m.group(1)), m.group(2).strip(), ""]
            sections.append(current)
        elif current is not None:
            current[2] += line
    return [tuple(s) for s in sections]


def section(title_prefix: str, level: int = 2, text: str | None = None) -> str:
    """The body of the README section whose title starts with `title_prefix`, with
    its subsections."""
    out, inside = [], False
    for lvl, title, body in readme_sections(text):
        if inside and lvl <= level:
            break
        if inside:
            out.append(f"{'#' * lvl} {title}\n{body}")
        elif lvl == level and title.startswith(title_prefix):
            inside = True
            out.append(body)
    if not inside:
        raise LookupError(f"README.md has no '{'#' * level} {title_prefix}' section")
    return "".join(out)


def family_api(family: str) -> list[str]:
    """Dotted names of the family's public API: the names of ``fastvision.ops.__all__``
    defined in ``fastvision/ops/<family>.py`` or ``<family>_layers.py``, and a package
    ``fastvision.<family>``'s ``__all__`` (the mask codecs)."""
    ops = importlib.import_module("fastvision.ops")
    names = [f"fastvision.ops.{n}" for n in ops.__all__
             if getattr(getattr(ops, n), "__module__", "").split(".")[-1] in (family, f"{family}_layers")]
    try:
        package = importlib.import_module(f"fastvision.{family}")
        names += [f"fastvision.{family}.{n}" for n in getattr(package, "__all__", [])]
    except ImportError:
        pass
    return names


def family_section(family: str, api: list[str], text: str | None = None) -> tuple[str, str]:
    """(title, body) of the README's ``###`` section about `family`: the one that
    imports one of its public names (``from fastvision.ops import ...``) or the
    family's package."""
    short = {n.rsplit(".", 1)[1] for n in api}
    for level, title, body in readme_sections(text):
        imported = {w for line in re.findall(r"from fastvision\.ops import ([\w, ]+)", body)
                    for w in re.split(r"[, ]+", line) if w}
        if level == 3 and (imported & short or f"fastvision.{family}" in body):
            return title, body
    raise LookupError(f"README.md has no '### ' section importing {family}'s API ({sorted(short)})")


def _slug(title: str) -> str:
    """The anchor mkdocs gives a heading (python-markdown's toc slugify)."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", title).strip().lower())


def _rewrite_links(markdown: str, page_dir: str, files: list[File], config) -> str:
    """README links made valid on a page in `page_dir` (``""`` or ``"ops"``)."""
    up = "../" * (page_dir.count("/") + 1) if page_dir else ""
    anchors = {_slug(h) for h in re.findall(r"(?m)^#+ (.+)$", markdown)}

    def repl(m):
        text, target = m.group(1), m.group(2)
        if target.startswith("#"):  # a README section not on this page: the text alone
            return m.group(0) if target[1:] in anchors else text
        if re.match(r"[a-z]+://", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        if path.startswith("docs/") and path.endswith(".md"):
            return f"[{text}]({up}{path[5:]}{'#' + anchor if anchor else ''})"
        if path.endswith((".png", ".svg")) and (ROOT / path).exists():
            uri = "images/" + path.replace("/", "_")
            if not any(f.src_uri == uri for f in files):
                files.append(File.generated(config, uri, content=(ROOT / path).read_bytes()))
            return f"[{text}]({up}{uri})"
        return f"{text} (`{path}`)" if text != path and text != f"`{path}`" else f"`{path}`"
    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", repl, markdown)


def _images(markdown: str, page_dir: str, files: list[File], config) -> str:
    up = "../" * (page_dir.count("/") + 1) if page_dir else ""

    def repl(m):
        alt, path = m.group(1), m.group(2)
        if re.match(r"[a-z]+://", path) or not (ROOT / path).exists():
            return m.group(0)
        uri = "images/" + path.replace("/", "_")
        if not any(f.src_uri == uri for f in files):
            files.append(File.generated(config, uri, content=(ROOT / path).read_bytes()))
        return f"![{alt}]({up}{uri})"
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", repl, markdown)


def _page(markdown: str, page_dir: str, files: list[File], config) -> str:
    return _rewrite_links(_images(markdown, page_dir, files, config), page_dir, files, config)


def family_page(family: str) -> str:
    api = family_api(family)
    title, body = family_section(family, api)
    migration = ROOT / "docs" / "migration" / f"{family}.md"
    parts = [f"# {title}\n\n`{family}` family. Semantics, shapes and dtypes as the README states them; the "
             f"API below is rendered from the docstrings.\n\n## Semantics\n{body}\n"]
    if migration.exists():
        parts.append(migration.read_text().replace("# Migration", "## Migration", 1) + "\n")
    parts.append("## API\n\n" + "\n".join(f"::: {name}\n" for name in api))
    return "\n".join(parts)


def models_page() -> str:
    from fastvision.models.official import LAYOUTS
    from fastvision.models.registry import MODELS
    rows = ["| builder | input | crop, interpolation | mean / std | classes | published layouts mapped |",
            "|---|---|---|---|---|---|"]
    for name, e in MODELS.items():
        c = e.pretrained_cfg
        rows.append(f"| `{name}` | {c['input_size']} | {c['crop_pct']}, {c['interpolation']} | "
                    f"{c['mean']} / {c['std']} | {c['num_classes']} | "
                    f"{', '.join(f'`{x}`' for x in e.layouts) or 'none (same names)'} |")
    layouts = "\n".join(f"- `{lay.name}`: {lay.source}; keys under `{lay.prefix}`"
                        + (f" ({lay.note})" if lay.note else "") for lay in LAYOUTS.values())
    return ("# Models\n\nThe model builders (`fastvision.models`), their published evaluation configs "
            "(also their timm `pretrained_cfg`: `timm.create_model(\"fastvision_<builder>\")` when timm is "
            "installed) and the published checkpoint layouts `load_official` maps.\n\n" + "\n".join(rows)
            + "\n\n## Published layouts with other names\n\n" + layouts + "\n\n## API\n\n"
            "::: fastvision.models.load_official\n\n::: fastvision.models.official.LoadReport\n\n"
            + "\n".join(f"::: fastvision.models.{name}\n" for name in MODELS))


def on_files(files, config):
    from fastvision.bench.suites import FAMILIES
    generated = list(files)
    intro = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    pages = {
        "index.md": (_page(intro + "\n## Install\n" + section("Install"), "", generated, config)),
        "models.md": models_page(),
        "benchmarks.md": _page("# Benchmarks\n" + section("Speed"), "", generated, config),
    }
    for family in FAMILIES:
        pages[f"ops/{family}.md"] = _page(family_page(family), "ops", generated, config)
    for uri, content in pages.items():
        generated.append(File.generated(config, uri, content=content))
    files.__init__(generated)
    return files


def on_config(config):
    from fastvision.bench.suites import FAMILIES
    config["nav"] = [{"Home": "index.md"}, {"Ops": [f"ops/{f}.md" for f in FAMILIES]},
                     {"Models": "models.md"}, {"Benchmarks": "benchmarks.md"},
                     {"Architecture": "architecture.md"}]
    return config
