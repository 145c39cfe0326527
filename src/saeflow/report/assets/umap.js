/* UMAP page (saeflow.report.umap_page). Pure functions first (tested under node), then the
   page code, which runs only in a page (EXTRA set, a document present). */
"use strict";

/* One decoded token as hover HTML: escaped, chat markers in italics, newlines as an arrow. */
function umapTokenHtml(tok, markerRe) {
  var text = saeflowEsc(tok);
  if (new RegExp(markerRe).test(String(tok))) { return "<i>" + text + "</i>"; }
  return text.replace(/\n/g, "\u21b5");
}

/* Hover text of the point at `pos` of sequence `sid`: the `win` preceding tokens, then the
   token itself in bold, a line break every `every` tokens (as the umap stage writes it). */
function umapHover(sid, pos, toks, win, every, markerRe) {
  var start = Math.max(0, pos - win), out = [], count = 0;
  for (var i = start; i <= pos && i < toks.length; i++, count++) {
    if (count && count % every === 0) { out.push("<br>"); }
    var piece = umapTokenHtml(toks[i], markerRe);
    out.push(i === pos ? "<b>" + piece + "</b>" : piece);
  }
  return "Sequence: " + sid + "<br>Position: " + pos + "<br>Story: " + out.join("");
}

/* Plain lower-case text the filter searches for one point: its own hover context, without the
   "Sequence/Position" prefix and without the inserted line breaks. */
function umapContext(toks, pos, win) {
  return toks.slice(Math.max(0, pos - win), pos + 1).join("").toLowerCase();
}

/* Which points stay visible. pts: {seq: [...], pos: [...]}, seqToks: tokens per sequence
   index (undefined while not loaded: then only the limit applies), mode "any" (a point whose
   context contains any word) or "all" (every point of a sequence whose text has all words).
   At most `limit` sequences keep points. Returns {keep, shownSeqs, shownPoints}. */
function umapKeep(pts, seqToks, words, mode, win, limit) {
  var n = pts.seq.length, keep = new Array(n), seqAll = {}, used = {}, shown = 0;
  var points = 0;
  for (var i = 0; i < n; i++) {
    var s = pts.seq[i], ok = true;
    if (words.length && seqToks[s] !== undefined) {
      if (mode === "all") {
        if (seqAll[s] === undefined) {
          var whole = seqToks[s].join("").toLowerCase();
          seqAll[s] = words.every(function (w) { return whole.indexOf(w) >= 0; });
        }
        ok = seqAll[s];
      } else {
        var text = umapContext(seqToks[s], pts.pos[i], win);
        ok = words.some(function (w) { return text.indexOf(w) >= 0; });
      }
    }
    if (ok && !used[s]) {
      if (shown >= limit) { ok = false; } else { used[s] = true; shown++; }
    }
    keep[i] = ok;
    if (ok) { points++; }
  }
  return {keep: keep, shownSeqs: shown, shownPoints: points};
}

/* Line trace coordinates for the chosen sequences: points in order, null between sequences,
   hidden points null. */
function umapLines(pts, coords, axes, chosen, keep) {
  var want = {}, out = {}, prev = null;
  chosen.forEach(function (s) { want[s] = true; });
  axes.forEach(function (a) { out[a] = []; });
  for (var i = 0; i < pts.seq.length; i++) {
    var s = pts.seq[i];
    if (!want[s]) { continue; }
    if (prev !== null && prev !== s) { axes.forEach(function (a) { out[a].push(null); }); }
    axes.forEach(function (a) { out[a].push(keep[i] ? coords[a][i] : null); });
    prev = s;
  }
  return out;
}

function umapPage() {
  var D = EXTRA, meta = D.data, axes = ["x", "y", "z"].slice(0, D.dims);
  var coords = {}, pts = {seq: saeflowUnpack(D.cols.seq), pos: saeflowUnpack(D.cols.pos)};
  axes.forEach(function (a) { coords[a] = saeflowUnpack(D.cols[a]); });
  var roles = saeflowUnpack(D.cols.role), n = D.n, seqToks = [], texts = new Array(n);
  var starts = {};
  for (var i = 0; i < n; i++) {
    var s = pts.seq[i];
    if (starts[s] === undefined) { starts[s] = i; }
    texts[i] = "Sequence: " + D.seq_ids[s] + "<br>Position: " + pts.pos[i];
  }
  var roleColors = roles.map(function (r) { return D.role_colors[r] || D.role_colors[0]; });
  var hoverUmap = "<br>UMAP1: %{x:.2f}<br>UMAP2: %{y:.2f}" +
    (D.dims === 3 ? "<br>UMAP3: %{z:.2f}" : "") + "<extra></extra>";

  function marker(by) {
    var m = {size: D.dims === 3 ? 3 : 5, opacity: 0.8};
    if (by === "role") {
      m.color = roleColors;
      m.showscale = false;
    } else {
      m.color = pts.pos.slice();
      m.colorscale = "Viridis";
      m.showscale = true;
      m.colorbar = {title: {text: "Position Index"}};
    }
    return m;
  }

  function seqLoaded(s) { return seqToks[s] !== undefined; }

  function fillTexts(first) {
    for (var k = 0; k < first.length; k++) {
      var s = first[k], toks = seqToks[s];
      for (var i = starts[s]; i < n && pts.seq[i] === s; i++) {
        texts[i] = umapHover(D.seq_ids[s], pts.pos[i], toks, D.window, D.line_tokens, D.marker_re);
      }
    }
  }

  function loadShard(k) {
    return saeflowLoadShard(meta, D.tok.set, k).then(function (d) {
      var got = [];
      d.items.forEach(function (toks, j) {
        var s = k * D.tok.per + j;
        if (!seqLoaded(s)) { seqToks[s] = toks; got.push(s); }
      });
      fillTexts(got);
      return got.length;
    });
  }

  var keepAll = new Array(n).fill(true);
  function traces(keep) {
    var t0 = {type: D.kind, mode: "markers", name: "tokens", text: texts,
      hovertemplate: "%{text}" + hoverUmap, marker: marker(D.color), showlegend: false};
    axes.forEach(function (a) {
      t0[a] = coords[a].map(function (v, i) { return keep[i] ? v : null; });
    });
    var out = [t0];
    if (D.lines.length) {
      var l = umapLines(pts, coords, axes, D.lines, keep);
      var t1 = {type: D.dims === 3 ? "scatter3d" : D.kind, mode: "lines", name: "sequence order",
        line: {color: "rgba(0,0,0,0.3)", width: 2}, hoverinfo: "skip", showlegend: false,
        visible: document.getElementById("show-lines").checked};
      axes.forEach(function (a) { t1[a] = l[a]; });
      out.push(t1);
    }
    return out;
  }

  FIG.data = traces(keepAll);
  var gdPromise = saeflowPlot(FIG);
  var state = {keep: keepAll};

  function status(r) {
    document.getElementById("filter-status").textContent = "showing " + r.shownSeqs + " of " +
      D.seq_ids.length + " sequences (" + r.shownPoints + " tokens)";
  }

  function refresh() {
    var words = saeflowWords(document.getElementById("filter-words").value);
    var mode = document.getElementById("filter-mode").value;
    var limit = parseInt(document.getElementById("filter-limit").value, 10);
    if (!(limit >= 0)) { limit = Infinity; }
    var all = [];
    for (var k = 0; words.length && k < D.tok.count; k++) { all.push(loadShard(k)); }
    return Promise.all(all).then(function () { return gdPromise; }).then(function (gd) {
      var r = umapKeep(pts, seqToks, words, mode, D.window, limit);
      state.keep = r.keep;
      FIG.data = traces(r.keep);
      FIG.data[0].marker = marker(document.getElementById("color-by").value);
      return Plotly.react(gd, FIG.data, FIG.layout, FIG.config).then(function () {
        status(r);
        window.SAEFLOW_FILTERED = (window.SAEFLOW_FILTERED || 0) + 1;
      });
    }).catch(saeflowFail);
  }

  gdPromise.then(function (gd) {
    status(umapKeep(pts, seqToks, [], "any", D.window, Infinity));
    var timer = null;
    document.getElementById("filter-words").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(refresh, 150);
    });
    ["filter-mode", "filter-limit", "color-by", "show-lines"].forEach(function (id) {
      document.getElementById(id).addEventListener("change", refresh);
    });
    var limit = parseInt(document.getElementById("filter-limit").value, 10);
    if (limit < D.seq_ids.length) { refresh(); }
    gd.on("plotly_hover", function (ev) {
      var p = ev && ev.points && ev.points[0];
      if (!p || p.curveNumber !== 0) { return; }
      var i = p.pointNumber, s = pts.seq[i], box = document.getElementById("detail");
      if (seqLoaded(s)) { box.innerHTML = texts[i]; return; }
      loadShard(saeflowShardOf(s, D.tok.per)).then(function (got) {
        box.innerHTML = texts[i];  /* built from tokens escaped by saeflowEsc */
        if (got) {
          return Plotly.restyle(gd, {text: [texts]}, [0]);
        }
      }).then(function () { window.SAEFLOW_HOVERED = (window.SAEFLOW_HOVERED || 0) + 1; })
        .catch(saeflowFail);
    });
    if (D.prefetch) {
      var all = [];
      for (var k = 0; k < D.tok.count; k++) { all.push(loadShard(k)); }
      Promise.all(all).then(function () {
        return Plotly.restyle(gd, {text: [texts]}, [0]);
      }).then(function () { window.SAEFLOW_PREFETCHED = true; }).catch(saeflowFail);
    }
    window.saeflowRefresh = refresh;
    window.saeflowUmapLoad = function (s) { return loadShard(saeflowShardOf(s, D.tok.per)); };
  });
}

if (typeof document !== "undefined" && typeof EXTRA !== "undefined") { umapPage(); }
