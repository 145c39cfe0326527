/* Diffing page (saeflow.report.diffing_page). Pure functions first (tested under node). */
"use strict";

var DIFF_SYMBOLS = ["star", "circle", "square", "circle"];

/* Legend name of a class: cat 0 both, 1 first model only, 2 second only, 3 neither; +4 when
   the feature is also active on the other model's control prompts. */
function diffTraceName(cat, models) {
  var c = cat & 3, inc = cat >= 4;
  var name = ["both", models[0] + " only", models[1] + " only", "not exclusive"][c];
  if (inc) {
    name += " + " + (c === 1 ? models[1] : c === 2 ? models[0] : "other") + " control";
  }
  return name;
}

/* The class line of a feature's hover: exclusivity and the inconsistency note. */
function diffClassLine(cat, models) {
  var c = cat & 3, e = saeflowEsc;
  var excl = ["Target-exclusive feature for both models",
    "Target-exclusive feature for " + e(models[0]), "Target-exclusive feature for " + e(models[1]),
    "Not target-exclusive"][c];
  var note = "";
  if (cat >= 4) {
    note = "<br>This feature is also active on " + e(c === 1 ? models[1] : models[0]) +
      "'s control prompts";
  }
  return "<b>" + excl + note + "</b>";
}

/* Hover lines after the class line: counts per model and set, then the explanation; `detail`
   is the feature's feat-shard record or undefined while it loads. */
function diffDetail(tt, detail, ctx) {
  if (detail === undefined) { return "<br><i>loading counts and explanation\u2026</i>"; }
  var m = ctx.models, e = saeflowEsc, lines = [];
  var counts = detail.c[ctx.token_types[tt]], tot = ctx.totals[ctx.token_types[tt]] || [];
  if (counts) {
    var k = 0;
    m.forEach(function (model) {
      ["target", "control"].forEach(function (which, w) {
        var n = counts[k++], total = tot[w];
        var pct = total ? " (" + (100 * n / total).toFixed(1) + "%)" : "";
        lines.push(e(model) + " " + which + ": " + n + (total ? "/" + total : "") + pct);
      });
    });
  }
  lines.push("", "<b>Description:</b>", detail.e === null ? "No explanation available" : detail.e);
  return "<br>" + lines.join("<br>");
}

/* Plotly hovertemplate of one trace (token type tt, class cat): the per-point difference is
   %{text}, the per-point detail %{hovertext}. */
function diffTemplate(tt, cat, ctx) {
  var e = saeflowEsc, m = ctx.models;
  return "<b>Feature %{customdata}</b> \u00b7 " + e(ctx.token_types[tt]) + "<br>" +
    e(m[0]) + " " + e(ctx.metric) + ": %{x:.4f}<br>" + e(m[1]) + " " + e(ctx.metric) +
    ": %{y:.4f}<br>Difference: %{text}<br><br>" + diffClassLine(cat, m) +
    "%{hovertext}<extra></extra>";
}

/* The same hover as one HTML string (for the detail panel). Every dataset string in it was
   escaped in Python (explanations) or here (names). */
function diffHover(p, detail, ctx) {
  var e = saeflowEsc, m = ctx.models;
  return "<b>Feature " + p.fid + "</b> \u00b7 " + e(ctx.token_types[p.tt]) + "<br>" +
    e(m[0]) + " " + e(ctx.metric) + ": " + saeflowFmt(p.x) + "<br>" +
    e(m[1]) + " " + e(ctx.metric) + ": " + saeflowFmt(p.y) + "<br>Difference: " +
    diffValue(p.x, p.y) + "<br><br>" + diffClassLine(p.cat, m) + diffDetail(p.tt, detail, ctx);
}

function diffValue(x, y) { return x === null || y === null ? "\u2014" : saeflowFmt(y - x); }

/* Equal axis range of both axes: the data extent plus 5% on each side. */
function diffRange(xs, ys) {
  var lo = Infinity, hi = -Infinity;
  [xs, ys].forEach(function (a) {
    for (var i = 0; i < a.length; i++) {
      if (a[i] !== null) { lo = Math.min(lo, a[i]); hi = Math.max(hi, a[i]); }
    }
  });
  if (lo === Infinity) { lo = 0; hi = 1; }
  var pad = hi > lo ? 0.05 * (hi - lo) : Math.max(Math.abs(hi) * 0.05, 0.5);
  return [lo - pad, hi + pad];
}

/* Point indices grouped by (token type, class): keys "tt:cat" in plotting order. */
function diffGroups(cols) {
  var groups = {}, order = [];
  for (var i = 0; i < cols.fid.length; i++) {
    var key = cols.tt[i] + ":" + cols.cat[i];
    if (!groups[key]) { groups[key] = []; order.push(key); }
    groups[key].push(i);
  }
  order.sort(function (a, b) {
    var pa = a.split(":").map(Number), pb = b.split(":").map(Number);
    return pa[0] - pb[0] || (pa[1] & 3) - (pb[1] & 3) || pa[1] - pb[1];
  });
  return order.map(function (k) {
    var p = k.split(":").map(Number);
    return {tt: p[0], cat: p[1], idx: groups[k]};
  });
}

function diffingPage() {
  var D = EXTRA, meta = D.data, details = {}, cols;
  var packed = saeflowColumns(meta, D.points);
  cols = packed.head;
  var metric = 0, groups = diffGroups(cols), gd = null, BASE = JSON.stringify(FIG.layout);

  function ctx() {
    return {models: D.models, token_types: D.token_types, totals: D.totals,
      metric: D.metric_names[metric]};
  }
  function point(i) {
    return {fid: cols.fid[i], tt: cols.tt[i], cat: cols.cat[i], x: cols["x" + metric][i],
      y: cols["y" + metric][i]};
  }
  function detailTexts(g) {
    var loading = diffDetail(g.tt, undefined, null), c = ctx();
    return g.idx.map(function (i) {
      var d = details[cols.fid[i]];
      return d === undefined ? loading : diffDetail(g.tt, d, c);
    });
  }
  function traces() {
    var c = ctx();
    return groups.map(function (g) {
      var base = g.cat & 3, color = D.palette[g.tt % D.palette.length];
      var inc = g.cat >= 4;
      return {
        type: D.kind, mode: "markers", name: saeflowEsc(diffTraceName(g.cat, D.models)),
        legendgroup: "tt" + g.tt,
        legendgrouptitle: {text: saeflowEsc(D.token_types[g.tt])},
        x: g.idx.map(function (i) { return cols["x" + metric][i]; }),
        y: g.idx.map(function (i) { return cols["y" + metric][i]; }),
        customdata: g.idx.map(function (i) { return cols.fid[i]; }),
        text: g.idx.map(function (i) {
          return diffValue(cols["x" + metric][i], cols["y" + metric][i]);
        }),
        hovertext: detailTexts(g),
        hovertemplate: diffTemplate(g.tt, g.cat, c),
        marker: {symbol: DIFF_SYMBOLS[base], size: base === 3 ? 3 : (base === 0 ? 9 : 6),
          color: color, opacity: 0.7,
          line: {width: inc ? 1.5 : 0.3, color: inc ? D.inconsistent_color : "black"}},
        hoverlabel: {bgcolor: color, font: {color: "white"}}
      };
    });
  }
  function layout() {
    var rng = diffRange(cols["x" + metric], cols["y" + metric]), name = D.metric_names[metric];
    var L = JSON.parse(BASE);  /* a fresh object, so Plotly.react sees the new ranges */
    L.title = {text: saeflowEsc(D.plot_title + ": " + name) + "<br><sub>" +
      saeflowEsc(D.plot_subtitle) + "</sub>", x: 0.5, xanchor: "center"};
    L.xaxis.range = rng; L.yaxis.range = rng.slice();
    L.xaxis.title = {text: saeflowEsc(D.models[0] + ": " + name)};
    L.yaxis.title = {text: saeflowEsc(D.models[1] + ": " + name)};
    L.shapes = [{type: "line", xref: "x", yref: "y", x0: rng[0], y0: rng[0], x1: rng[1],
      y1: rng[1], layer: "below", line: {color: "gray", width: 2, dash: "dash"}}];
    return L;
  }
  function draw() {
    FIG.data = traces();
    FIG.layout = layout();
    if (!gd) { return saeflowPlot(FIG); }
    var rng = FIG.layout.xaxis.range.slice();
    /* react alone keeps the old x range of the scale-anchored pair: set both ranges again */
    return Plotly.react(gd, FIG.data, FIG.layout, FIG.config).then(function () {
      return Plotly.relayout(gd, {"xaxis.range": rng, "yaxis.range": rng.slice()});
    });
  }
  function status(text) { document.getElementById("saeflow-status").textContent = text; }

  draw().then(function (div) {
    gd = div;
    if (packed.rest) {
      status("loading " + (D.points.n - D.points.head_n) + " more points\u2026");
      packed.rest.then(function (full) {
        cols = full;
        groups = diffGroups(cols);
        return draw();
      }).then(function () { status(""); window.SAEFLOW_COMPLETE = true; }).catch(saeflowFail);
    } else {
      window.SAEFLOW_COMPLETE = true;
    }
    document.getElementById("metric").addEventListener("change", function (ev) {
      metric = parseInt(ev.target.value, 10);
      draw().catch(saeflowFail);
    });
    gd.on("plotly_hover", function (ev) {
      var p = ev && ev.points && ev.points[0];
      if (!p || p.customdata === undefined) { return; }
      var fid = p.customdata, box = document.getElementById("detail");
      var find = function () {
        var g = groups[p.curveNumber];
        return g ? g.idx[p.pointNumber] : undefined;
      };
      if (details[fid] !== undefined) {
        var i = find();
        if (i !== undefined) { box.innerHTML = diffHover(point(i), details[fid], ctx()); }
        return;
      }
      saeflowLoadShard(meta, D.feat.set, saeflowShardOf(fid, D.feat.per)).then(function (d) {
        var k = saeflowShardOf(fid, D.feat.per);
        d.items.forEach(function (rec, j) { details[k * D.feat.per + j] = rec; });
        var i = find();
        if (i !== undefined) { box.innerHTML = diffHover(point(i), details[fid], ctx()); }
        return Plotly.restyle(gd, {hovertext: groups.map(detailTexts)});
      }).then(function () { window.SAEFLOW_HOVERED = (window.SAEFLOW_HOVERED || 0) + 1; })
        .catch(saeflowFail);
    });
    if (D.neuronpedia_base) {
      gd.on("plotly_click", function (event) {
        var point = event && event.points && event.points[0];
        if (!point) { return; }
        var fid = point.customdata;
        if (fid === undefined && point.data && point.data.customdata) {
          fid = point.data.customdata[point.pointNumber];
        }
        if (fid === undefined || fid === null || !/^[0-9]+$/.test(String(fid))) { return; }
        window.open(D.neuronpedia_base + String(fid), "_blank", "noopener,noreferrer");
      });
    }
  }).catch(saeflowFail);
}

if (typeof document !== "undefined" && typeof EXTRA !== "undefined") { diffingPage(); }
