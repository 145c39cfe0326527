/* saeflow report pages: helpers shared by every page. The page sets FIG (a Plotly figure) and
   EXTRA (its data) before this file runs. Pure functions here have no DOM dependency, so
   tests/test_report_js.py runs them under node. */
"use strict";

/* Draw a figure into #plot (or `id`); resolves with the graph div once Plotly has rendered. */
function saeflowPlot(fig, id) {
  var gd = document.getElementById(id || "plot");
  if (typeof Plotly === "undefined") {
    var msg = document.createElement("p");
    msg.id = "plotly-missing";
    msg.textContent = "plotly.min.js was not found next to this page: copy it from the " +
      "plotly Python package (plotly/package_data/plotly.min.js) into this folder.";
    gd.appendChild(msg);
    return new Promise(function () {});
  }
  return Plotly.newPlot(gd, fig.data, fig.layout, fig.config).then(function () {
    window.SAEFLOW_READY = true;
    return gd;
  });
}

/* Draw every figure of a Page (FIGS: {id, data, layout, config}) into its own div. */
function saeflowPlotAll(figs) {
  if (typeof Plotly === "undefined") { return saeflowPlot({}, figs[0].id); }
  return Promise.all(figs.map(function (f) {
    return Plotly.newPlot(f.id, f.data, f.layout, f.config);
  })).then(function (gds) {
    window.SAEFLOW_READY = true;
    return gds;
  });
}

/* Words of a filter string: lower-cased, split on white space. */
function saeflowWords(text) {
  return String(text || "").toLowerCase().split(/\s+/).filter(function (w) { return w.length; });
}

/* Escape text for a Plotly label or innerHTML (mirror of saeflow.report.common.esc_label). */
function saeflowEsc(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/\$/g, "&#36;");
}

/* Short human form of a number; missing values show as an em dash. */
function saeflowFmt(v, digits) {
  if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) { return "\u2014"; }
  return Number(v).toFixed(digits === undefined ? 4 : digits);
}

/* ---- packed columns: typed arrays as little-endian base64 (saeflow.report.shards.pack) ---- */

function saeflowBytes(b64) {
  var bin = atob(b64), out = new Uint8Array(bin.length);
  for (var i = 0; i < bin.length; i++) { out[i] = bin.charCodeAt(i); }
  return out;
}

/* A plain Array from a packed column {dtype, n, b64}; f32 NaN and the u16 code 65535 of a
   quantised column ("q16", with lo/hi) become null. */
function saeflowUnpack(col) {
  var bytes = saeflowBytes(col.b64), view = new DataView(bytes.buffer), n = col.n, out = new Array(n);
  var i;
  if (col.dtype === "u8") {
    for (i = 0; i < n; i++) { out[i] = bytes[i]; }
  } else if (col.dtype === "u16") {
    for (i = 0; i < n; i++) { out[i] = view.getUint16(2 * i, true); }
  } else if (col.dtype === "u32") {
    for (i = 0; i < n; i++) { out[i] = view.getUint32(4 * i, true); }
  } else if (col.dtype === "f32") {
    for (i = 0; i < n; i++) {
      var f = view.getFloat32(4 * i, true);
      out[i] = isNaN(f) ? null : f;
    }
  } else if (col.dtype === "q16") {
    var step = (col.hi - col.lo) / 65534;
    for (i = 0; i < n; i++) {
      var q = view.getUint16(2 * i, true);
      out[i] = q === 65535 ? null : col.lo + q * step;
    }
  } else {
    throw new Error("saeflow: unknown packed dtype " + col.dtype);
  }
  return out;
}

/* ---- shards: detail data beside the page, loaded on demand with <script> tags ----
   A shard file `{base}/{set}-{k}.js` holds one call `saeflowShard(page, set, k, data)`. Script
   tags work from file:// where fetch/XHR do not. Each shard loads once; callers get a Promise. */

var SAEFLOW_SHARDS = {};

function saeflowEntry(key) {
  var e = SAEFLOW_SHARDS[key];
  if (!e) {
    e = {};
    e.promise = new Promise(function (resolve, reject) { e.resolve = resolve; e.reject = reject; });
    SAEFLOW_SHARDS[key] = e;
  }
  return e;
}

/* Called by every shard file. */
function saeflowShard(page, set, k, data) {
  var e = saeflowEntry(page + "/" + set + "/" + k);
  e.data = data;
  e.resolve(data);
}

/* Load shard k of `set` for the page described by meta {page, base}; resolves with its data. */
function saeflowLoadShard(meta, set, k) {
  var e = saeflowEntry(meta.page + "/" + set + "/" + k);
  if (e.script || e.data !== undefined) { return e.promise; }
  var s = document.createElement("script");
  s.charset = "utf-8";
  s.src = meta.base + "/" + set + "-" + k + ".js";
  s.onerror = function () {
    e.reject(new Error("saeflow: data file " + s.src + " did not load"));
  };
  e.script = s;
  document.head.appendChild(s);
  return e.promise;
}

/* Shard index of item i when each shard holds `per` consecutive items. */
function saeflowShardOf(i, per) { return Math.floor(i / per); }

/* Load every shard of a set ({set, count}), resolving with the list of their data in order. */
function saeflowLoadAll(meta, spec) {
  var all = [];
  for (var k = 0; k < spec.count; k++) { all.push(saeflowLoadShard(meta, spec.set, k)); }
  return Promise.all(all);
}

/* The item `i` of a set whose shards hold `per` items each as data.items (a list). */
function saeflowItem(meta, spec, i) {
  var k = saeflowShardOf(i, spec.per);
  return saeflowLoadShard(meta, spec.set, k).then(function (d) { return d.items[i - k * spec.per]; });
}

/* Packed columns from PageData.columns: {head, rest}. head holds the rows inlined in the page
   (plain arrays by name); rest is null, or a Promise of every row once the tail shards loaded. */
function saeflowColumns(meta, spec) {
  var head = {}, names = Object.keys(spec.head);
  names.forEach(function (k) { head[k] = saeflowUnpack(spec.head[k]); });
  if (!spec.tail.count) { return {head: head, rest: null}; }
  var rest = saeflowLoadAll(meta, spec.tail).then(function (parts) {
    var full = {};
    names.forEach(function (k) {
      var out = head[k].slice();
      parts.forEach(function (p) {
        var more = saeflowUnpack(p.cols[k]);
        for (var i = 0; i < more.length; i++) { out.push(more[i]); }
      });
      full[k] = out;
    });
    return full;
  });
  return {head: head, rest: rest};
}

/* FNV-1a (32 bit) of the UTF-8 bytes of a string: the token search index is split by it. */
function saeflowHash(text) {
  var bytes = new TextEncoder().encode(String(text)), h = 0x811c9dc5;
  for (var i = 0; i < bytes.length; i++) {
    h ^= bytes[i];
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

/* Show an error in the page's status line instead of failing silently. */
function saeflowFail(err) {
  var box = document.getElementById("saeflow-status");
  if (box) { box.textContent = String(err && err.message ? err.message : err); }
  if (typeof console !== "undefined") { console.error(err); }
}
