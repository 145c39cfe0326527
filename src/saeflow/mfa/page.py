"""Moved: the MFA page lives in `saeflow.report.mfa_page` with every other page.

Re-exported here so existing imports keep working."""

from saeflow.report.mfa_page import (
    choose_components,
    contexts_html,
    nll_figure,
    run_report_mfa,
    steer_html,
    subspace_figure,
    write_mfa_page,
)

__all__ = [
    "choose_components",
    "contexts_html",
    "nll_figure",
    "run_report_mfa",
    "steer_html",
    "subspace_figure",
    "write_mfa_page",
]
