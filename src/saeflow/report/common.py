"""The page shell shared by every report: escaping, safe JSON embedding and plotly.js shipping.

Pages are static files that must open from disk with no network, so plotly.js is copied once next
to them (`plotly.min.js`) and referenced by a relative `<script src>`. Dataset text is untrusted:
everything that reaches HTML is escaped here, and everything that reaches a Plotly label is
escaped for Plotly's own pseudo-HTML (which decodes `&lt;`, `&gt;`, `&amp;` and numeric entities).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import os
import re
import shutil
import textwrap
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from saeflow.io import atomic_path

PLOTLY_JS = "plotly.min.js"
PLOT_ID = "plot"

# Tags that Plotly renders in hover text and that the producers of hover strings may use.
_ALLOWED_HOVER_TAGS = re.compile(r"(</?b>|</?i>|<br\s*/?>)", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


def esc(text: Any) -> str:
    """Escape text for HTML element content or a quoted attribute."""
    return html.escape(str(text), quote=True)


def esc_label(text: Any) -> str:
    """Escape text for a Plotly label, legend, tick or hover string.

    Plotly decodes `&lt;`/`&gt;`/`&amp;` and numeric entities but not `&quot;`, so quotes stay
    literal. `$` becomes `&#36;` so that a label with two dollars is not handed to MathJax.
    """
    return html.escape(str(text), quote=False).replace("$", "&#36;")


def sanitize_hover(text: Any) -> str:
    """Make an already-escaped hover string safe even if its producer forgot to escape.

    `<b>`, `<i>` and `<br>` are kept; any other `<` or `>` is escaped. Entities are left alone, so
    a correctly escaped string passes through unchanged.
    """
    parts = _ALLOWED_HOVER_TAGS.split(str(text))
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.lower().replace(" ", "").replace("/>", ">"))
        else:
            out.append(part.replace("<", "&lt;").replace(">", "&gt;").replace("$", "&#36;"))
    return "".join(out)


def hover_to_text(hover: str) -> str:
    """Plain text of a hover string (tags dropped, entities decoded), for word search."""
    return html.unescape(_TAG.sub(" ", hover.replace("<br>", "\n")))


def wrap_label(text: Any, width: int = 60, max_lines: int = 12) -> str:
    """Escape and wrap long text for a hover box (Plotly does not wrap by itself)."""
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width) or [""])
    if len(lines) > max_lines:
        lines = lines[:max_lines] + ["…"]
    return "<br>".join(esc_label(line) for line in lines)


def token_label(token: Any) -> str:
    """Escaped, visible form of a decoded token (whitespace made visible)."""
    tok = str(token).replace("\n", "\\n").replace("\t", "\\t")
    if tok.strip() == "":
        tok = tok.replace(" ", "␣") or "∅"
    return esc_label(tok)


def fmt_num(value: Any, digits: int = 4) -> str:
    """Short human form of a number; missing values show as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "—"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def round_list(values: Iterable[Any], digits: int = 6) -> list[float | None]:
    """Floats rounded to `digits` significant digits (NaN -> null) to keep pages small."""
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        f = float(v)
        out.append(None if not math.isfinite(f) else float(f"{f:.{digits}g}"))
    return out


def safe_json(obj: Any) -> str:
    """Canonical JSON that can sit inside a <script> element.

    `<`, `>` and `&` only ever occur inside JSON strings, where the `\\uXXXX` forms are equivalent,
    so `</script>` in dataset text can never close the element.
    """
    from plotly.utils import PlotlyJSONEncoder

    text = json.dumps(obj, sort_keys=True, cls=PlotlyJSONEncoder, ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def figure_json(fig: Any) -> dict[str, Any]:
    """Plain dict of a plotly Figure (or dict) with a page-friendly config."""
    fig_dict = fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else dict(fig)
    return {
        "data": fig_dict.get("data", []),
        "layout": fig_dict.get("layout", {}),
        "config": {"displaylogo": False, "responsive": True},
    }


def _asset(name: str) -> str:
    """Text of a page asset (`report/assets/*.js|css`); pages inline them, so each page is one
    file plus its shards and the shared plotly.min.js."""
    return resources.files("saeflow.report").joinpath("assets", name).read_text(encoding="utf-8")


def render_page(
    title: str,
    *,
    subtitle: str = "",
    body_html: str = "",
    figure: Any | None = None,
    extra: dict[str, Any] | None = None,
    script: str | None = None,
    after_plot_html: str = "",
    index_href: str | None = "index.html",
    assets: Iterable[str] = (),
    eager: Iterable[str] = (),
    plot_class: str = "plot",
) -> str:
    """Whole HTML document: header, optional controls/body, the graph and the page script.

    `title`/`subtitle` are plain text (escaped here); `body_html` and `after_plot_html` must
    already be safe HTML. `extra` is handed to the page scripts as the global `EXTRA`; `assets`
    names the page's own .js files in report/assets (run after common.js); `script` is extra
    inline JavaScript (default: draw FIG). `eager` lists the shards the page loads at start, so
    `first_load_bytes` counts them.
    """
    assets = list(assets)
    eager = list(eager)
    head_script = f'<script charset="utf-8" src="{PLOTLY_JS}"></script>\n' if figure else ""
    back = f'<a href="{esc(index_href)}">&larr; all reports</a>\n' if index_href else ""
    sub = f'<p class="subtitle">{esc(subtitle)}</p>\n' if subtitle else ""
    eager_meta = f'<meta name="saeflow-eager" content="{esc(" ".join(eager))}">\n' if eager else ""
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        '<meta name="referrer" content="no-referrer">\n',
        eager_meta,
        f"<title>{esc(title)}</title>\n<style>{_asset('page.css')}</style>\n{head_script}",
        "</head>\n<body>\n",
        f"<header>\n{back}<h1>{esc(title)}</h1>\n{sub}</header>\n",
        '<p id="saeflow-status" role="status"></p>\n',
        body_html,
    ]
    if figure is not None:
        parts.append(f'\n<div id="{PLOT_ID}" class="{esc(plot_class)}"></div>\n')
        parts.append(after_plot_html)
        parts.append(
            f"<script>\nvar FIG = {safe_json(figure_json(figure))};\n"
            f"var EXTRA = {safe_json(extra or {})};\n</script>\n"
        )
        code = [_asset("common.js")] + [_asset(a) for a in assets]
        if script is not None:
            code.append(script)
        elif not assets:
            code.append("saeflowPlot(FIG);")
        parts.append("<script>\n" + "\n".join(code) + "\n</script>\n")
    else:
        parts.append(after_plot_html)
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def plotlyjs_source() -> Path:
    """The plotly.min.js bundled with the installed plotly package (matches its JSON schema)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.exists():
        from saeflow.errors import DataError

        raise DataError(f"{path}: plotly.min.js not found in the installed plotly package")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_plotlyjs(directory: str | os.PathLike) -> Path:
    """Copy plotly.min.js into `directory` once; idempotent and atomic under concurrent jobs.

    Several report jobs may run at once: each copies to its own temporary name and renames, so
    the file is always either absent or complete, and an identical file is left untouched.
    """
    src = plotlyjs_source()
    dest = Path(directory) / PLOTLY_JS
    if (
        dest.exists()
        and dest.stat().st_size == src.stat().st_size
        and _sha256(dest) == _sha256(src)
    ):
        return dest
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def write_page(path: str | os.PathLike, page_html: str, *, ship_plotlyjs: bool = True) -> Path:
    """Write a page atomically and make sure plotly.min.js sits next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ship_plotlyjs:
        ensure_plotlyjs(path.parent)
    with atomic_path(path) as tmp:
        tmp.write_text(page_html, encoding="utf-8")
    return path


def html_table(header: list[str], rows: list[list[Any]], *, css_class: str = "data") -> str:
    """An escaped HTML table (every cell is plain text)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return (
        f'<table class="{css_class}">\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}</tbody>\n</table>\n"
    )


class Page:
    """A report page: a title, Plotly figures, tables, notes and lazily loaded shards.

    The public way to make a page (new analyses use it too)::

        page = Page("Title", subtitle="what it shows")
        page.heading("Loss")
        page.figure(fig)                       # a plotly Figure or {"data", "layout"}
        page.table(["feature", "value"], rows)  # cells are plain text, escaped here
        page.note("plain text")
        with page.data(out_path) as data:      # optional: detail in shards beside the page
            page.extra["detail"] = data.items("detail", records, per=256)
            page.write(out_path, assets=["mypage.js"])

    Without `assets` the page just draws its figures. With them, the page script (a .js file in
    report/assets, run after common.js) draws them itself (`saeflowPlotAll(FIGS)`; FIGS holds
    `{id, data, layout, config}`), finds its data in `EXTRA`, and loads a shard item with
    `saeflowItem(EXTRA.data, EXTRA.detail, i)` (a Promise). A rule writing shards declares
    `directory("{page stem}.data")` as an output.
    """

    def __init__(
        self, title: str, *, subtitle: str = "", index_href: str | None = "index.html"
    ) -> None:
        self.title = title
        self.subtitle = subtitle
        self.index_href = index_href
        self.parts: list[str] = []
        self.figures: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._data: Any = None

    def html(self, safe_html: str) -> Page:
        """Append HTML that is already safe (escape dataset text with `esc` first)."""
        self.parts.append(safe_html)
        return self

    def heading(self, text: str, level: int = 2) -> Page:
        return self.html(f"<h{level}>{esc(text)}</h{level}>\n")

    def note(self, text: str) -> Page:
        return self.html(f'<p class="note">{esc(text)}</p>\n')

    def table(self, header: list[str], rows: list[list[Any]]) -> Page:
        return self.html(html_table(header, rows))

    def figure(self, fig: Any, *, css_class: str = "plot-medium", div_id: str | None = None) -> str:
        """Append a figure; returns its div id (`plot`, `plot-1`, ... unless given)."""
        div_id = div_id or (PLOT_ID if not self.figures else f"{PLOT_ID}-{len(self.figures)}")
        self.figures.append({"id": div_id, **figure_json(fig)})
        self.parts.append(f'<div id="{esc(div_id)}" class="{esc(css_class)}"></div>\n')
        return div_id

    @contextlib.contextmanager
    def data(self, out_path: str | os.PathLike) -> Iterator[Any]:
        """The page's shard folder (see saeflow.report.shards.PageData); write inside."""
        from saeflow.report.shards import page_data

        with page_data(out_path) as data:
            self._data = data
            self.extra["data"] = data.meta
            yield data

    def render(self, *, assets: Iterable[str] = ()) -> str:
        assets = list(assets)
        eager = self._data.eager if self._data is not None else []
        if not self.figures:
            return render_page(
                self.title,
                subtitle=self.subtitle,
                body_html="".join(self.parts),
                index_href=self.index_href,
            )
        script = None if assets else "saeflowPlotAll(FIGS);"
        figs = f"<script>\nvar FIGS = {safe_json(self.figures)};\n</script>\n"
        return render_page(
            self.title,
            subtitle=self.subtitle,
            body_html="".join(self.parts) + figs,
            figure=self.figures[0],
            extra=self.extra,
            script=script,
            index_href=self.index_href,
            assets=assets,
            eager=eager,
            plot_class="",
        ).replace(f'\n<div id="{PLOT_ID}" class=""></div>\n', "\n", 1)

    def write(self, path: str | os.PathLike, *, assets: Iterable[str] = ()) -> Path:
        """Write the page atomically, plotly.min.js beside it."""
        return write_page(path, self.render(assets=assets), ship_plotlyjs=bool(self.figures))
