"""Report pages in a real headless Chromium with the network cut off.

Each page must render from file:// with no console error and no request leaving the disk, show the
expected number of points, and show hostile dataset text as text. One browser serves the module.
Runs wherever chromium + chromedriver are installed; skipped elsewhere, except on CI (env CI set),
where a missing browser is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _browser import (
    CI_INSTALL,
    DIFF_ANALYSIS,
    DIFF_SUMMARY,
    NEURONPEDIA_ID,
    UMAP_ANALYSIS,
    XSS,
    build_all_reports,
    diffing_frame,
    find_chromium,
    load,
    make_driver,
    severe,
    umap_frame,
)

from saeflow.report import build_diffing_page, build_umap_page, write_page

pytestmark = pytest.mark.browser

# Installed before any page script: records alert() calls instead of showing a dialog.
TRIPWIRE = "window.__alerts = []; window.alert = function (m) { window.__alerts.push(String(m)); };"


def _require_browser() -> None:
    reason = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        reason = "selenium is not installed (pip install selenium==4.51.0)"
    if reason is None and find_chromium() is None:
        reason = f"chromium and chromedriver are not installed ({CI_INSTALL})"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run on CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reports")
    built = build_all_reports(root)
    reports = root / "reports"
    built["diffing_gl"] = write_page(
        reports / "diffing-gl.html",
        build_diffing_page(
            diffing_frame(), DIFF_SUMMARY, DIFF_ANALYSIS, neuronpedia=NEURONPEDIA_ID, webgl=True
        ),
    )
    built["umap3d"] = write_page(
        reports / "umap-3d.html", build_umap_page(umap_frame(dims=3), UMAP_ANALYSIS)
    )
    cdn = reports / "cdn-control.html"
    cdn.write_text(
        '<!DOCTYPE html><html><head><script src="https://cdn.plot.ly/plotly-3.0.0.min.js">'
        "</script></head><body>control</body></html>"
    )
    built["cdn"] = cdn
    return built


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    _require_browser()
    drv = make_driver(tmp_path_factory.mktemp("chrome-profile"))
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": TRIPWIRE})
    yield drv
    drv.quit()


def open_page(driver, path: Path, ready: bool = True) -> None:
    """Load a page and check what every page must satisfy."""
    entries = load(driver, path, ready=ready)
    assert severe(entries) == [], f"{path.name}: console errors {severe(entries)}"
    urls = driver.execute_script(
        "var urls = performance.getEntriesByType('resource').map(function (e) { return e.name; });"
        "document.querySelectorAll('[src], link[href]').forEach(function (el) {"
        "  urls.push(el.src || el.href); });"
        "return urls;"
    )
    assert all(u.startswith("file://") for u in urls), urls
    if ready:
        assert any(u.endswith("/plotly.min.js") for u in urls)
        assert driver.execute_script("return typeof Plotly") == "object"
    assert_safe(driver)


def assert_safe(driver) -> None:
    """Hostile text never ran: no alert call, no alert dialog, no injected <img>."""
    from selenium.common.exceptions import NoAlertPresentException

    assert driver.execute_script("return window.__alerts") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 - the property access is the check
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0


def shown_points(driver, trace: int = 0) -> int:
    return driver.execute_script(
        "var d = document.getElementById('plot').data[arguments[0]];"
        "return Array.prototype.filter.call(d.x, function (v) { return v !== null; }).length;",
        trace,
    )


def hover_text(driver, curve: int, point: int) -> str:
    return driver.execute_script(
        "var gd = document.getElementById('plot');"
        "Plotly.Fx.hover(gd, [{curveNumber: arguments[0], pointNumber: arguments[1]}]);"
        "var h = document.querySelector('.hoverlayer .hovertext');"
        "return h ? h.textContent : null;",
        curve,
        point,
    )


def mouse_hover(driver, curve: int, point: int) -> str | None:
    """Move the real mouse onto a point (works for SVG and WebGL traces); return the hover text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    gd = driver.find_element("id", "plot")
    dx, dy = driver.execute_script(
        "var gd = arguments[0], t = gd.data[arguments[1]], i = arguments[2];"
        "var xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();"
        "return [xa._offset + xa.l2p(t.x[i]) - r.width / 2,"
        "        ya._offset + ya.l2p(t.y[i]) - r.height / 2];",
        gd,
        curve,
        point,
    )
    ActionChains(driver).move_to_element_with_offset(gd, round(dx), round(dy)).perform()
    WebDriverWait(driver, 5).until(
        lambda d: d.execute_script("return !!document.querySelector('.hoverlayer .hovertext')")
    )
    return driver.execute_script(
        "var h = document.querySelector('.hoverlayer .hovertext'); return h && h.textContent;"
    )


def test_network_is_blocked(driver, pages):
    """Negative control: a CDN script fails to load, so a page relying on one would fail."""
    entries = load(driver, pages["cdn"], ready=False)
    assert severe(entries), "a CDN script loaded: the browser is not offline"


def test_umap_page(driver, pages):
    open_page(driver, pages["umap"])
    assert shown_points(driver) == 20
    assert driver.execute_script("return document.getElementById('plot').data[0].type") == "scatter"

    hostile = driver.execute_script(
        "var h = document.getElementById('plot').data[0].hovertext;"
        "for (var i = 0; i < h.length; i++) { if (h[i].indexOf('img') >= 0) { return i; } }"
    )
    assert XSS in hover_text(driver, 0, hostile)
    assert_safe(driver)

    def refresh(words: str, limit: str) -> None:
        driver.execute_script(
            "document.getElementById('filter-words').value = arguments[0];"
            "document.getElementById('filter-limit').value = arguments[1];"
            "return window.saeflowRefresh();",
            words,
            limit,
        )

    refresh("needle", "4")
    assert shown_points(driver) == 5
    assert shown_points(driver, 1) == 5  # the connecting line follows the filter
    assert "showing 1 of 4 sequences" in driver.find_element("id", "filter-status").text
    refresh("", "2")
    assert shown_points(driver) == 10
    refresh("onerror=alert(1)", "4")  # matches the hostile text as plain words
    assert shown_points(driver) == 5

    buttons = driver.find_elements("css selector", ".updatemenu-button")
    next(b for b in buttons if b.text == "colour: role").click()
    colours = driver.execute_script("return document.getElementById('plot').data[0].marker.color")
    assert colours[:3] == ["#9e9e9e", "#000000", "#d62728"]
    assert_safe(driver)


def test_umap_3d_page(driver, pages):
    open_page(driver, pages["umap3d"])
    assert driver.execute_script("return document.getElementById('plot').data[0].type") == (
        "scatter3d"
    )
    assert shown_points(driver) == 20


@pytest.mark.parametrize("which", ["diffing", "diffing_gl"])
def test_diffing_page_click_opens_neuronpedia(driver, pages, which):
    open_page(driver, pages[which])
    counts = driver.execute_script(
        "return document.getElementById('plot').data.map(function (t) { return t.x.length; })"
    )
    assert sum(counts) == 12
    if which == "diffing_gl":
        assert driver.execute_script(
            "return !!document.getElementById('plot')._fullLayout._glcanvas"
        )

    driver.execute_script(
        "window.__opened = [];"
        "window.open = function (url, target, features) {"
        "  window.__opened.push([String(url), String(target)]); return null; };"
    )
    trace, point, feature = driver.execute_script(
        "var gd = document.getElementById('plot');"
        "for (var t = 0; t < gd.data.length; t++) {"
        "  var cd = gd.data[t].customdata;"
        "  if (cd.length) { return [t, 0, cd[0][0]]; } }"
    )
    driver.execute_script(
        "var gd = document.getElementById('plot'), t = arguments[0], i = arguments[1];"
        "gd.emit('plotly_click', {points: [{curveNumber: t, pointNumber: i,"
        "  customdata: gd.data[t].customdata[i], data: gd.data[t]}]});",
        trace,
        point,
    )
    opened = driver.execute_script("return window.__opened")
    assert opened == [[f"https://www.neuronpedia.org/{NEURONPEDIA_ID}/{feature}", "_blank"]]

    hostile = driver.execute_script(
        "var gd = document.getElementById('plot');"
        "for (var t = 0; t < gd.data.length; t++) { var cd = gd.data[t].customdata;"
        "  for (var i = 0; i < cd.length; i++) {"
        "    if (String(cd[i][cd[i].length - 1]).indexOf('img') >= 0) { return [t, i]; } } }"
    )
    text = mouse_hover(driver, *hostile)
    assert XSS in text and "</script><script>alert(2)</script>" in text
    assert_safe(driver)

    # A real mouse click on a point goes through the same handler.
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("window.__opened = [];")
    mouse_hover(driver, *hostile)
    ActionChains(driver).click().perform()
    opened = driver.execute_script("return window.__opened")
    assert opened == [[f"https://www.neuronpedia.org/{NEURONPEDIA_ID}/3", "_blank"]]


def test_diffing_metric_dropdown(driver, pages):
    open_page(driver, pages["diffing"])
    driver.find_element("css selector", ".updatemenu-header").click()
    buttons = driver.find_elements("css selector", ".updatemenu-dropdown-button")
    next(b for b in buttons if b.text == "target_sparsity").click()
    title = driver.execute_script("return document.getElementById('plot').layout.xaxis.title.text")
    assert title == "base target_sparsity"
    rng = driver.execute_script("return document.getElementById('plot').layout.yaxis.range")
    assert rng == driver.execute_script("return document.getElementById('plot').layout.xaxis.range")


def test_similarity_page(driver, pages):
    open_page(driver, pages["similarity"])
    shape = driver.execute_script(
        "var z = document.getElementById('plot').data[0].z; return [z.length, z[0].length];"
    )
    assert shape == [5, 5]
    ticks = driver.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('.ytick text'),"
        " function (t) { return t.textContent; });"
    )
    assert sorted(ticks) == sorted(["0: <bos>", "1: the", f"2: {XSS}", "3: the", "4: \\n"])
    assert_safe(driver)


def test_metrics_page(driver, pages):
    open_page(driver, pages["metrics"])
    assert shown_points(driver) == 2
    body = driver.find_element("tag name", "table").text
    assert f"temporal {XSS}" in body
    assert_safe(driver)


def test_index_page(driver, pages):
    open_page(driver, pages["index"], ready=False)
    links = driver.find_elements("css selector", "li a")
    assert len(links) == 4
    assert XSS in driver.find_element("id", "config").text
    next(a for a in links if "Similarity" in a.text).click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return window.SAEFLOW_READY"))
    assert driver.current_url.endswith("/similarity-sim.html")
    assert severe(driver.get_log("browser")) == []
    assert_safe(driver)
