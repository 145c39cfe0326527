/* saeflow report pages: shared helpers. FIG and EXTRA are set by the page. */
"use strict";

/* Draw FIG into #plot; resolves with the graph div once Plotly has rendered. */
function saeflowPlot(fig) {
  var gd = document.getElementById("plot");
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

/* Words of a filter string: lower-cased, split on white space. */
function saeflowWords(text) {
  return String(text || "").toLowerCase().split(/\s+/).filter(function (w) { return w.length; });
}
