"""Index page: links to every report page and the config that made the run.

`write_site` also assembles a self-contained copy (index, pages, plotly.min.js) in one directory,
which `snakemake --report report.zip` can embed through `report(directory(...), htmlindex=...)`:
Snakemake stores each report item in its own folder, so pages registered one by one would lose
the shared plotly.min.js.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from saeflow.errors import DataError
from saeflow.io import atomic_dir
from saeflow.report.common import PLOTLY_JS, esc, plotlyjs_source, render_page, write_page
from saeflow.report.shards import data_dir

KIND_TITLES = {
    "umap": "UMAP embeddings",
    "diffing": "Model diffing",
    "similarity": "Similarity",
    "metrics": "SAE metrics",
    "geometry": "Feature geometry",
    "mfa": "Mixture of factor analyzers",
}
_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def page_title(path: str | os.PathLike) -> str:
    """Plain-text title of a report page (its <title>), or its file name."""
    try:
        head = Path(path).read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError as err:
        raise DataError(f"{path}: cannot read report page ({err})") from None
    match = _TITLE.search(head)
    return html.unescape(match.group(1)).strip() if match else Path(path).name


def page_kind(path: str | os.PathLike) -> str:
    """`umap`, `diffing`, ... from `reports/{kind}-{name}.html`."""
    return Path(path).name.split("-", 1)[0]


def build_index(
    pages: Sequence[str | os.PathLike],
    config: dict[str, Any] | None,
    base_dir: str | os.PathLike,
    title: str = "saeflow reports",
) -> str:
    """Index HTML; links are relative to `base_dir` (where the index lives)."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for page in pages:
        href = os.path.relpath(Path(page).resolve(), Path(base_dir).resolve())
        href = urllib.parse.quote(Path(href).as_posix(), safe="/-_.~")
        groups.setdefault(page_kind(page), []).append((href, page_title(page), Path(page).name))
    order = list(KIND_TITLES) + sorted(set(groups) - set(KIND_TITLES))
    parts = []
    for kind in order:
        if kind not in groups:
            continue
        parts.append(f"<h2>{esc(KIND_TITLES.get(kind, kind))}</h2>\n<ul>\n")
        for href, text, name in sorted(groups[kind], key=lambda g: g[2]):
            link = f'<a href="{esc(href)}">{esc(text)}</a>'
            parts.append(f'<li>{link} <span class="note">{esc(name)}</span></li>\n')
        parts.append("</ul>\n")
    if not pages:
        parts.append('<p class="note">No report pages: the config has no analyses.</p>\n')
    if config is not None:
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)
        parts.append(f'<h2>Config</h2>\n<pre class="config" id="config">{esc(text)}</pre>\n')
    return render_page(
        title, subtitle=f"{len(pages)} pages", body_html="".join(parts), index_href=None
    )


def write_index(
    pages: Sequence[str | os.PathLike],
    config: dict[str, Any] | None,
    out_path: str | os.PathLike,
    site_dir: str | os.PathLike | None = None,
) -> Path:
    """Write index.html next to (or above) the pages; optionally also the bundled site."""
    out_path = Path(out_path)
    missing = [str(p) for p in pages if not Path(p).exists()]
    if missing:
        raise DataError(f"report index: pages not found: {missing}")
    write_page(out_path, build_index(pages, config, out_path.parent), ship_plotlyjs=bool(pages))
    if site_dir is not None:
        write_site(pages, config, site_dir)
    return out_path


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_site(
    pages: Sequence[str | os.PathLike], config: dict[str, Any] | None, site_dir: str | os.PathLike
) -> Path:
    """One flat folder with index.html, every page, its shard folder, its `{page}.*.js` sidecars
    (e.g. families-NAME.links.js, which dashboards load) and plotly.min.js (hard links where
    possible)."""
    names = [Path(p).name for p in pages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "index.html" in names:
        raise DataError(f"report site: page file names must be unique and not index.html: {dupes}")
    with atomic_dir(site_dir) as tmp:
        for page in pages:
            _link_or_copy(Path(page), tmp / Path(page).name)
            for sidecar in sorted(Path(page).parent.glob(f"{Path(page).stem}.*.js")):
                _link_or_copy(sidecar, tmp / sidecar.name)
            shards = data_dir(page)
            if shards.is_dir():
                shutil.copytree(
                    shards,
                    tmp / shards.name,
                    copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(".*"),
                )
        site_pages = [tmp / n for n in names]
        (tmp / "index.html").write_text(build_index(site_pages, config, tmp), encoding="utf-8")
        shutil.copyfile(plotlyjs_source(), tmp / PLOTLY_JS)
    return Path(site_dir)
