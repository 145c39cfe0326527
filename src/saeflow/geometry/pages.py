"""Moved: the geometry pages live in `saeflow.report.geometry_pages` with every other page.

Re-exported here so the geometry stages' imports keep working."""

from saeflow.report.geometry_pages import (
    build_dashboard_page,
    build_decoder_umap_page,
    build_mapper_page,
    build_match_page,
    graph_layout,
    write_dashboard_page,
    write_decoder_umap_page,
    write_mapper_page,
    write_match_page,
)

__all__ = [
    "build_dashboard_page",
    "build_decoder_umap_page",
    "build_mapper_page",
    "build_match_page",
    "graph_layout",
    "write_dashboard_page",
    "write_decoder_umap_page",
    "write_mapper_page",
    "write_match_page",
]
