"""Offline interactive HTML reports: every page of the workflow, and the index.

Every page is a static file that opens from disk with no network; plotly.js is shipped once next
to the pages as `plotly.min.js`. Detail that grows with the SAE (per-feature records, per-point
hover text, search indexes) sits in script-tag shards beside each page (`{page}.data/`), loaded
on demand, so the first load of a page stays under 2 MB at any size (`first_load_bytes`).
Page JavaScript and CSS are files in `report/assets/`.

New pages: `Page` (title, figures, tables, notes, shards) - see its docstring.
"""

from __future__ import annotations

from saeflow.report.common import (
    Page,
    ensure_plotlyjs,
    esc,
    esc_label,
    render_page,
    write_page,
)
from saeflow.report.diffing_page import build_diffing_page, write_diffing_page
from saeflow.report.geometry_pages import (
    build_dashboard_page,
    build_decoder_umap_page,
    build_mapper_page,
    build_match_page,
    write_dashboard_page,
    write_decoder_umap_page,
    write_mapper_page,
    write_match_page,
)
from saeflow.report.index import build_index, write_index, write_site
from saeflow.report.metrics_page import build_metrics_page, write_metrics_page
from saeflow.report.mfa_page import run_report_mfa, write_mfa_page
from saeflow.report.shards import PageData, data_dir, first_load_bytes, pack, page_data
from saeflow.report.similarity_page import build_similarity_page, write_similarity_page
from saeflow.report.umap_page import build_umap_page, write_umap_page

__all__ = [
    "Page",
    "PageData",
    "build_dashboard_page",
    "build_decoder_umap_page",
    "build_diffing_page",
    "build_index",
    "build_mapper_page",
    "build_match_page",
    "build_metrics_page",
    "build_similarity_page",
    "build_umap_page",
    "data_dir",
    "ensure_plotlyjs",
    "esc",
    "esc_label",
    "first_load_bytes",
    "pack",
    "page_data",
    "render_page",
    "run_report_mfa",
    "write_dashboard_page",
    "write_decoder_umap_page",
    "write_diffing_page",
    "write_index",
    "write_mapper_page",
    "write_match_page",
    "write_metrics_page",
    "write_mfa_page",
    "write_page",
    "write_similarity_page",
    "write_site",
    "write_umap_page",
]
