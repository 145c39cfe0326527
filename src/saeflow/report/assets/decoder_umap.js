/* Decoder UMAP page (saeflow.report.geometry_pages.build_decoder_umap_page); uses the token
   search helpers of dashboard.js. */
"use strict";

/* Index of `fid` in the sorted ids[lo, hi), or -1. */
function geoFindId(ids, lo, hi, fid) {
  while (lo < hi) {
    var mid = (lo + hi) >> 1;
    if (ids[mid] < fid) { lo = mid + 1; } else { hi = mid; }
  }
  return ids[lo] === fid ? lo : -1;
}

function decoderUmapPage() {
  var D = EXTRA, meta = D.data, axes = ["x", "y", "z"].slice(0, D.dims), gd = null;
  var packed = saeflowColumns(meta, D.points), cols = packed.head, texts = {};
  var nSae = D.saes.length, HL = nSae, SR = nSae + 1;

  function nPoints() { return cols.fid.length; }
  function hoverOf(i) { return texts[i] !== undefined ? texts[i] : D.saes[saeOf(i)] + " #" +
    cols.fid[i]; }
  function saeOf(i) {
    for (var s = 0; s < nSae; s++) { if (i < D.starts[s + 1]) { return s; } }
    return nSae - 1;
  }
  function coords(i) { return axes.map(function (a) { return cols[a][i]; }); }
  function indexOf(sae, fid) {
    var s = D.saes.indexOf(sae);
    if (s < 0) { return -1; }
    return geoFindId(cols.fid, D.starts[s], Math.min(D.starts[s + 1], nPoints()), fid);
  }
  function traces() {
    var out = [];
    D.saes.forEach(function (sae, s) {
      var lo = D.starts[s], hi = Math.min(D.starts[s + 1], nPoints()), t = {
        type: D.kind, mode: "markers", name: saeflowEsc(sae), hoverinfo: "text", hovertext: [],
        marker: {size: D.dims === 3 ? 3 : 4, opacity: 0.7, color: D.colors[s % D.colors.length]}};
      axes.forEach(function (a) { t[a] = cols[a].slice(lo, hi); });
      for (var i = lo; i < hi; i++) { t.hovertext.push(hoverOf(i)); }
      out.push(t);
    });
    var empty = function (t) { axes.forEach(function (a) { t[a] = []; }); return t; };
    out.push(empty({type: D.dims === 3 ? "scatter3d" : "scatter", mode: "lines+markers",
      name: "matched partner", hovertext: [], hoverinfo: "text",
      line: {color: "black", width: 2},
      marker: {size: 10, color: "rgba(0,0,0,0)", line: {color: "black", width: 2}}}));
    out.push(empty({type: D.dims === 3 ? "scatter3d" : "scatter", mode: "markers",
      name: "search hits", hoverinfo: "skip",
      marker: {size: 12, symbol: "circle-open", color: "#ff00ff", line: {width: 2}}}));
    return out;
  }
  function setTrace(ti, pts, text) {
    var upd = {};
    axes.forEach(function (a, j) { upd[a] = [pts.map(function (p) { return p[j]; })]; });
    if (text) { upd.hovertext = [text]; }
    return Plotly.restyle(gd, upd, [ti]);
  }

  var current = null;
  function onHover(ev) {
    var p = ev.points[0];
    if (!p || p.curveNumber >= nSae) { return; }
    var i = D.starts[p.curveNumber] + p.pointNumber, sae = D.saes[p.curveNumber];
    var key = sae + ":" + cols.fid[i];
    if (key === current) { return; }
    current = key;
    var k = saeflowHash(key) % D.par.count;
    Promise.all([saeflowLoadShard(meta, D.par.set, k),
      saeflowLoadShard(meta, D.hover.set, saeflowShardOf(i, D.hover.per))]).then(function (r) {
      var hk = saeflowShardOf(i, D.hover.per), fresh = false;
      r[1].items.forEach(function (t, j) {
        if (texts[hk * D.hover.per + j] === undefined) { texts[hk * D.hover.per + j] = t; fresh = true; }
      });
      var partners = r[0].keys[key] || [], pts = [], text = [], here = coords(i);
      partners.forEach(function (m) {
        var j = indexOf(m[0], m[1]);
        if (j < 0) { return; }
        pts.push(here); text.push("");
        pts.push(coords(j));
        text.push(saeflowEsc(m[0]) + " #" + m[1] + " corr " + m[2] + (m[3] ? " (mutual)" : ""));
        pts.push(axes.map(function () { return null; })); text.push("");
      });
      document.getElementById("geo-partner").textContent = partners.length ?
        key + " matched to " + partners.map(function (m) {
          return m[0] + " #" + m[1] + " (corr " + m[2] + (m[3] ? ", mutual" : "") + ")";
        }).join(", ") : key + ": no matched partner";
      var done = setTrace(HL, pts, text);
      if (fresh) {
        done = done.then(function () {
          var lo = D.starts[p.curveNumber], hi = Math.min(D.starts[p.curveNumber + 1], nPoints());
          var h = [];
          for (var x = lo; x < hi; x++) { h.push(hoverOf(x)); }
          return Plotly.restyle(gd, {hovertext: [h]}, [p.curveNumber]);
        });
      }
      return done;
    }).then(function () { window.SAEFLOW_HOVERED = (window.SAEFLOW_HOVERED || 0) + 1; })
      .catch(saeflowFail);
  }

  function search() {
    var idq = document.getElementById("geo-id").value;
    var tq = document.getElementById("geo-token").value;
    var sae = document.getElementById("geo-sae").value;
    var found;
    if (geoTokenKey(tq).length) {
      var k = saeflowHash(geoTokenKey(tq)) % D.tok.count;
      found = saeflowLoadShard(meta, D.tok.set, k).then(function (shard) {
        return (shard.keys[geoTokenKey(tq)] || []).filter(function (i) { return i < nPoints(); });
      });
    } else {
      var id = geoParseId(idq), hits = [];
      if (id !== null) {
        D.saes.forEach(function (s) {
          var j = indexOf(s, id);
          if (j >= 0) { hits.push(j); }
        });
      }
      found = Promise.resolve(hits);
    }
    return found.then(function (hits) {
      if (sae) { hits = hits.filter(function (i) { return D.saes[saeOf(i)] === sae; }); }
      document.getElementById("geo-count").textContent = hits.length + " feature(s) found";
      return setTrace(SR, hits.map(coords));
    }).then(function () { window.SAEFLOW_SEARCHED = (window.SAEFLOW_SEARCHED || 0) + 1; })
      .catch(saeflowFail);
  }

  FIG.data = traces();
  saeflowPlot(FIG).then(function (div) {
    gd = div;
    gd.on("plotly_hover", onHover);
    ["geo-id", "geo-token", "geo-sae"].forEach(function (id) {
      document.getElementById(id).addEventListener("input", search);
    });
    if (packed.rest) {
      packed.rest.then(function (full) {
        cols = full;
        FIG.data = traces();
        return Plotly.react(gd, FIG.data, FIG.layout, FIG.config);
      }).then(function () { window.SAEFLOW_COMPLETE = true; }).catch(saeflowFail);
    } else {
      window.SAEFLOW_COMPLETE = true;
    }
  }).catch(saeflowFail);
}

if (typeof document !== "undefined" && typeof EXTRA !== "undefined") { decoderUmapPage(); }
