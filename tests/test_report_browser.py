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
    build_geometry_pages,
    diffing_frame,
    find_chromium,
    load,
    make_driver,
    severe,
    umap_frame,
    umap_tokens,
)

from saeflow.report import build_diffing_page, build_umap_page, umap_page, write_page

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
    gl = reports / "diffing-gl.html"
    built["diffing_gl"] = write_page(
        gl,
        build_diffing_page(
            diffing_frame(),
            DIFF_SUMMARY,
            {**DIFF_ANALYSIS, "report": {"plot": "all"}},
            gl,
            neuronpedia=NEURONPEDIA_ID,
            webgl=True,
        ),
    )
    u3 = reports / "umap-3d.html"
    saved, umap_page.PREFETCH_BYTES = umap_page.PREFETCH_BYTES, 0  # tokens load per hover
    try:
        page = build_umap_page(umap_frame(dims=3), UMAP_ANALYSIS, umap_tokens(), u3)
    finally:
        umap_page.PREFETCH_BYTES = saved
    built["umap3d"] = write_page(u3, page)
    built.update(build_geometry_pages(reports))
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
    # Leave the plot first, so a label still showing from an earlier hover is not read.
    header = driver.find_element("tag name", "h1")
    ActionChains(driver).move_to_element(header).perform()
    WebDriverWait(driver, 5).until(
        lambda d: d.execute_script("return !document.querySelector('.hoverlayer .hovertext')")
    )
    ActionChains(driver).move_to_element_with_offset(gd, round(dx), round(dy)).perform()
    WebDriverWait(driver, 5).until(
        lambda d: d.execute_script("return !!document.querySelector('.hoverlayer .hovertext')")
    )
    return driver.execute_script(
        "var h = document.querySelector('.hoverlayer .hovertext'); return h && h.textContent;"
    )


def prime_hover(driver, curve: int, point: int, count: int) -> None:
    """Hover a point through Plotly's event (the page loads its shard and restyles, which
    hides a label under a real mouse) and wait until the page has handled `count` hovers."""
    driver.execute_script(
        "var gd = document.getElementById('plot'), t = gd.data[arguments[0]];"
        "gd.emit('plotly_hover', {points: [{curveNumber: arguments[0], pointNumber: arguments[1],"
        "  customdata: t.customdata ? t.customdata[arguments[1]] : undefined, data: t}]});",
        curve,
        point,
    )
    wait_for(driver, f"window.SAEFLOW_HOVERED >= {count}")


def test_network_is_blocked(driver, pages):
    """Negative control: a CDN script fails to load, so a page relying on one would fail."""
    entries = load(driver, pages["cdn"], ready=False)
    assert severe(entries), "a CDN script loaded: the browser is not offline"


def wait_for(driver, condition: str, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return " + condition))


def test_umap_page(driver, pages):
    open_page(driver, pages["umap"])
    assert shown_points(driver) == 20
    assert driver.execute_script("return document.getElementById('plot').data[0].type") == "scatter"
    assert driver.execute_script("return document.getElementById('plot').data.length") == 2
    assert shown_points(driver, 1) == 20  # lines join every sequence (seed 002)

    # Hovering a point loads its sequence's tokens from a shard (file://, script tag) and shows
    # the context window and the UMAP coordinates.
    # Small token shards are fetched after the first draw (file://, script tags); then the hover
    # shows the context window and the UMAP coordinates at once.
    wait_for(driver, "window.SAEFLOW_PREFETCHED === true")
    hostile = 1 * 5 + 3  # sequence 1, position 3: the hostile token is in its window
    text = mouse_hover(driver, 0, hostile)
    assert text.startswith("Sequence: 1Position: 3Story:") and "UMAP1: " in text
    assert XSS in text and "UMAP2: " in text
    assert XSS in driver.find_element("id", "detail").text
    assert_safe(driver)

    def refresh(words: str, limit: str = "4", mode: str = "any") -> None:
        driver.execute_script(
            "document.getElementById('filter-words').value = arguments[0];"
            "document.getElementById('filter-limit').value = arguments[1];"
            "document.getElementById('filter-mode').value = arguments[2];"
            "return window.saeflowRefresh();",
            words,
            limit,
            mode,
        )

    refresh("needle")  # sequence 2 position 1 with a 3-token window: positions 1..4
    assert shown_points(driver) == 4
    assert shown_points(driver, 1) == 4  # the connecting line follows the filter
    assert "showing 1 of 4 sequences" in driver.find_element("id", "filter-status").text
    refresh("needle w0_0")  # ANY word
    assert shown_points(driver) == 4 + 4
    refresh("needle w2_0", mode="all")  # sequences with ALL words
    assert shown_points(driver) == 5
    refresh("position sequence story")  # the hover prefix never matches
    assert shown_points(driver) == 0
    refresh("", "2")
    assert shown_points(driver) == 10
    refresh("onerror=alert(1)")  # matches the hostile text as plain words
    assert shown_points(driver) == 3

    driver.execute_script(
        "var s = document.getElementById('color-by'); s.value = 'role';"
        "s.dispatchEvent(new Event('change'));"
    )
    wait_for(driver, "window.SAEFLOW_FILTERED >= 7")
    colours = driver.execute_script("return document.getElementById('plot').data[0].marker.color")
    assert colours[:3] == ["#9e9e9e", "#000000", "#d62728"]
    assert severe(driver.get_log("browser")) == []
    assert_safe(driver)


def test_umap_3d_page(driver, pages):
    open_page(driver, pages["umap3d"])
    assert driver.execute_script("return document.getElementById('plot').data[0].type") == (
        "scatter3d"
    )
    assert shown_points(driver) == 20
    assert driver.execute_script(
        "return document.getElementById('plot').data[0].hovertemplate"
    ).endswith("UMAP3: %{z:.2f}<extra></extra>")
    # Larger token sets load per hovered sequence.
    loaded = "return document.querySelectorAll('script[src*=\"umap-3d.data/\"]').length"
    assert driver.execute_script(loaded) == 0
    prime_hover(driver, 0, 1 * 5 + 3, 1)
    assert driver.execute_script(loaded) == 1
    assert XSS in driver.find_element("id", "detail").text
    text = driver.execute_script("return document.getElementById('plot').data[0].text[8]")
    assert text.startswith("Sequence: 1<br>Position: 3<br>Story: ") and "&lt;img" in text
    assert_safe(driver)


def _trace_of_feature(driver, fid: int, group: str = "tt1") -> list[int]:
    """(trace, point) of a feature in one token type's legend group (tt1 = newline)."""
    return driver.execute_script(
        "var gd = document.getElementById('plot');"
        "for (var t = 0; t < gd.data.length; t++) { var cd = gd.data[t].customdata || [];"
        "  if (gd.data[t].legendgroup !== arguments[1]) { continue; }"
        "  for (var i = 0; i < cd.length; i++) {"
        "    if (cd[i] === arguments[0]) { return [t, i]; } } }",
        fid,
        group,
    )


@pytest.mark.parametrize("which", ["diffing", "diffing_gl"])
def test_diffing_page(driver, pages, which):
    open_page(driver, pages[which])
    wait_for(driver, "window.SAEFLOW_COMPLETE === true")
    names = driver.execute_script(
        "return document.getElementById('plot').data.map(function (t) {"
        "  return [t.legendgroup, t.name, t.x.length]; })"
    )
    total = sum(n for _, _, n in names)
    assert total == (8 if which == "diffing" else 12)  # exclusive only by default
    assert ["tt1", "base only + chat control", 1] in names  # inconsistent: own legend entry
    assert not any(n == "not exclusive" for _, n, _ in names) or which == "diffing_gl"
    title = driver.execute_script("return document.getElementById('plot').layout.title.text")
    if which == "diffing":
        assert "org/tiny-base / org/tiny-chat, residual stream post-layer 2" in title
        assert "layer 2" in driver.find_element("tag name", "h1").text
    else:
        assert driver.execute_script(
            "return !!document.getElementById('plot')._fullLayout._glcanvas"
        )

    driver.execute_script(
        "window.__opened = [];"
        "window.open = function (url, target, features) {"
        "  window.__opened.push([String(url), String(target)]); return null; };"
    )
    trace, point = _trace_of_feature(driver, 3)
    prime_hover(driver, trace, point, 1)
    detail = driver.find_element("id", "detail").text
    assert XSS in detail and "</script><script>alert(2)</script>" in detail
    assert "also active on chat's control prompts" in detail
    text = mouse_hover(driver, trace, point)
    assert "Feature 3" in text and "Difference: " in text
    assert XSS in text and "base target: " in text
    assert_safe(driver)

    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).click().perform()
    opened = driver.execute_script("return window.__opened")
    assert opened == [[f"https://www.neuronpedia.org/{NEURONPEDIA_ID}/3", "_blank"]]

    trace, point = _trace_of_feature(driver, 5)
    mouse_hover(driver, trace, point)
    wait_for(driver, "document.getElementById('detail').textContent.indexOf('desc 5') >= 0")


def test_diffing_metric_select(driver, pages):
    open_page(driver, pages["diffing"])
    driver.execute_script(
        "var s = document.getElementById('metric'); s.value = '1';"
        "s.dispatchEvent(new Event('change'));"
    )
    wait_for(
        driver,
        "document.getElementById('plot').layout.xaxis.title.text === 'base: Activation Sparsity'",
    )
    rng = driver.execute_script("return document.getElementById('plot').layout.yaxis.range")
    assert rng == driver.execute_script("return document.getElementById('plot').layout.xaxis.range")


def test_dashboard_page(driver, pages):
    open_page(driver, pages["dashboard"])
    wait_for(driver, "window.SAEFLOW_SHOWN !== undefined")
    first = driver.execute_script("return window.SAEFLOW_SHOWN")
    assert driver.find_element("css selector", "#geo-dash h2").text == f"Feature {first}"
    driver.find_element("id", "geo-token").send_keys("king")
    wait_for(driver, "window.SAEFLOW_SEARCHED >= 1")
    hits = [b.text for b in driver.find_elements("css selector", "#geo-results button")]
    assert len(hits) == 1 and hits[0].startswith("#0 ")
    driver.find_element("id", "geo-id").send_keys("2")
    wait_for(driver, "document.querySelectorAll('#geo-results button').length === 1")
    driver.find_element("css selector", "#geo-results button").click()
    wait_for(driver, "window.SAEFLOW_SHOWN === 2")
    examples = driver.find_element("id", "geo-dash").text
    assert XSS in examples and "</script><script>alert(2)</script>" in examples
    assert severe(driver.get_log("browser")) == []
    assert_safe(driver)


def test_decoder_umap_page(driver, pages):
    open_page(driver, pages["decoder"])
    assert shown_points(driver, 0) == 4 and shown_points(driver, 1) == 4
    prime_hover(driver, 0, 0, 1)
    assert "b #0 (corr 0.9, mutual)" in driver.find_element("id", "geo-partner").text
    assert shown_points(driver, 2) == 2  # the line to the partner
    assert mouse_hover(driver, 0, 0).startswith("a #0top logits: l0")
    prime_hover(driver, 0, 1, 2)
    assert XSS in mouse_hover(driver, 0, 1)
    driver.find_element("id", "geo-token").send_keys("king")
    wait_for(driver, "window.SAEFLOW_SEARCHED >= 1")
    assert driver.find_element("id", "geo-count").text == "2 feature(s) found"
    assert severe(driver.get_log("browser")) == []
    assert_safe(driver)


def test_mfa_page_any_axis_pair(driver, pages):
    open_page(driver, pages["mfa"])
    assert driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length") == 3
    before = driver.execute_script("return document.getElementById('mfa-subspace-0').data[0].x")
    driver.execute_script(
        'var s = document.querySelector(\'select.mfa-axis[data-plot="mfa-subspace-0"]'
        "[data-axis=\"x\"]'); s.value = '3'; s.dispatchEvent(new Event('change'));"
    )
    wait_for(driver, "window.SAEFLOW_AXES >= 1")
    gd = "document.getElementById('mfa-subspace-0')"
    assert driver.execute_script(f"return {gd}.layout.xaxis.title.text") == "u3"
    assert driver.execute_script(f"return {gd}.data[0].x") != before
    assert XSS in driver.find_element("tag name", "body").text
    assert_safe(driver)


def test_dashboard_at_131k_features_loads_shards_on_demand(driver, tmp_path_factory):
    """The seed-size dashboard opens from file:// loading one feature shard; search and id
    lookups load only the shards they need."""
    from test_report_scale import big_dashboard_frames

    from saeflow.report import write_dashboard_page

    index, examples = big_dashboard_frames()
    page = write_dashboard_page(
        tmp_path_factory.mktemp("big") / "geometry-big.html",
        index,
        examples,
        analysis={"name": "big"},
    )
    open_page(driver, page)
    wait_for(driver, "window.SAEFLOW_SHOWN !== undefined")
    shards = "return document.querySelectorAll('script[src*=\"geometry-big.data/\"]').length"
    assert driver.execute_script(shards) == 1
    typed = "var e = document.getElementById(arguments[0]); e.value = arguments[1];"
    typed += "e.dispatchEvent(new Event('input'));"
    driver.execute_script(typed, "geo-token", "t19999")
    wait_for(driver, "window.SAEFLOW_SEARCHED >= 1")
    hits = [b.text for b in driver.find_elements("css selector", "#geo-results button")]
    want = sorted(
        int(f)
        for f, t in zip(index["feature_id"], index["top_tokens"], strict=True)
        if " t19999" in t
    )
    assert sorted(int(h.split()[0][1:]) for h in hits) == want
    driver.execute_script(typed, "geo-id", "131071")
    first_hit = "document.querySelector('#geo-results button').textContent"
    wait_for(driver, first_hit + ".indexOf('#131071 ') === 0")
    driver.find_element("css selector", "#geo-results button").click()
    wait_for(driver, "window.SAEFLOW_SHOWN === 131071")
    assert driver.execute_script(shards) == 3  # first feature, one token shard, the last feature
    assert severe(driver.get_log("browser")) == []


def test_dashboard_links_features_to_their_families(driver, tmp_path_factory):
    """A dashboard loads the families' links files beside it and links a child feature to its
    parent's tree (from file://)."""
    from test_report_scale import big_dashboard_frames

    from saeflow.report import write_dashboard_page

    index, examples = big_dashboard_frames()
    out = tmp_path_factory.mktemp("fam")
    (out / "families-fams.links.js").write_text(
        'saeflowFamilyLinks({"name": "fams", "page": "families-fams.html", "sae": "small", '
        '"parents": [7], "child_sae": "big", "children": {"3": [7]}});\n'
    )
    page = write_dashboard_page(
        out / "geometry-big.html",
        index,
        examples,
        analysis={"name": "big", "sae": "big"},
        families=["fams"],
    )
    open_page(driver, page)
    wait_for(driver, "window.SAEFLOW_SHOWN !== undefined")
    typed = "var e = document.getElementById('geo-id'); e.value = '3';"
    driver.execute_script(typed + "e.dispatchEvent(new Event('input'));")
    wait_for(driver, "document.querySelector('#geo-results button') !== null")
    driver.find_element("css selector", "#geo-results button").click()
    wait_for(driver, "window.SAEFLOW_SHOWN === 3")
    wait_for(driver, "document.querySelector('#geo-fam a') !== null")
    href = driver.execute_script("return document.querySelector('#geo-fam a').getAttribute('href')")
    assert href == "families-fams.html#p7"
    assert severe(driver.get_log("browser")) == []


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
