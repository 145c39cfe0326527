"""Offline interactive HTML reports: UMAP, diffing, similarity, metrics pages and the index.

Every page is a static file that opens from disk with no network; plotly.js is shipped once next
to the pages as `plotly.min.js`.
"""

from __future__ import annotations

from saeflow.report.common import ensure_plotlyjs, esc, esc_label, render_page, write_page
from saeflow.report.diffing_page import build_diffing_page, write_diffing_page
from saeflow.report.index import build_index, write_index, write_site
from saeflow.report.metrics_page import build_metrics_page, write_metrics_page
from saeflow.report.similarity_page import build_similarity_page, write_similarity_page
from saeflow.report.umap_page import build_umap_page, write_umap_page

__all__ = [
    "build_diffing_page",
    "build_index",
    "build_metrics_page",
    "build_similarity_page",
    "build_umap_page",
    "ensure_plotlyjs",
    "esc",
    "esc_label",
    "render_page",
    "write_diffing_page",
    "write_index",
    "write_metrics_page",
    "write_page",
    "write_similarity_page",
    "write_site",
    "write_umap_page",
]
