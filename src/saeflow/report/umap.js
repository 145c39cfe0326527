/* UMAP page: word filter and sequence limit. Hidden points get null coordinates, so the
   per-point colour arrays of the colour toggle keep their length. */
(function () {
  var axes = EXTRA.axes;
  var seqText = EXTRA.seq_text;
  var full = FIG.data.map(function (trace) {
    var copy = {customdata: trace.customdata.slice()};
    axes.forEach(function (a) { copy[a] = trace[a].slice(); });
    return copy;
  });

  function keepMask() {
    var words = saeflowWords(document.getElementById("filter-words").value);
    var limit = parseInt(document.getElementById("filter-limit").value, 10);
    if (!(limit >= 0)) { limit = Infinity; }
    var keep = new Array(seqText.length);
    var shown = 0;
    for (var i = 0; i < seqText.length; i++) {
      var text = seqText[i];
      var ok = shown < limit && words.every(function (w) { return text.indexOf(w) >= 0; });
      keep[i] = ok;
      if (ok) { shown++; }
    }
    return {keep: keep, shown: shown};
  }

  function filtered(keep) {
    var update = {};
    axes.forEach(function (a) { update[a] = []; });
    var nPoints = 0;
    full.forEach(function (trace, t) {
      axes.forEach(function (a) {
        update[a].push(trace[a].map(function (v, j) {
          var s = trace.customdata[j];
          return s !== null && keep[s] ? v : null;
        }));
      });
      if (t === 0) {
        nPoints = trace.customdata.filter(function (s) { return keep[s]; }).length;
      }
    });
    return {update: update, nPoints: nPoints};
  }

  function status(mask, nPoints) {
    document.getElementById("filter-status").textContent =
      "showing " + mask.shown + " of " + seqText.length + " sequences (" + nPoints + " tokens)";
  }

  var mask = keepMask();
  var first = filtered(mask.keep);
  FIG.data.forEach(function (trace, t) {
    axes.forEach(function (a) { trace[a] = first.update[a][t]; });
  });
  status(mask, first.nPoints);

  saeflowPlot(FIG).then(function (gd) {
    var timer = null;
    function refresh() {
      var m = keepMask();
      var f = filtered(m.keep);
      var traces = FIG.data.map(function (_, t) { return t; });
      return Plotly.restyle(gd, f.update, traces).then(function () {
        status(m, f.nPoints);
        window.SAEFLOW_FILTERED = (window.SAEFLOW_FILTERED || 0) + 1;
      });
    }
    document.getElementById("filter-words").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(refresh, 150);
    });
    document.getElementById("filter-limit").addEventListener("change", refresh);
    window.saeflowRefresh = refresh;
  });
})();
