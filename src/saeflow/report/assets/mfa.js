/* MFA page (saeflow.report.mfa_page): draw every figure, then let two menus per subspace
   scatter pick any pair of loading axes. */
"use strict";

/* {x, y} columns of the chosen axis pair from a component's packed per-axis columns. */
function mfaPair(axes, xi, yi) {
  return {x: saeflowUnpack(axes[xi]), y: saeflowUnpack(axes[yi])};
}

function mfaPage() {
  saeflowPlotAll(FIGS).then(function () {
    var selects = document.querySelectorAll("select.mfa-axis");
    Array.prototype.forEach.call(selects, function (sel) {
      sel.addEventListener("change", function () {
        var id = sel.getAttribute("data-plot"), pick = {};
        Array.prototype.forEach.call(selects, function (s) {
          if (s.getAttribute("data-plot") === id) {
            pick[s.getAttribute("data-axis")] = parseInt(s.value, 10);
          }
        });
        var xy = mfaPair(EXTRA.axes[id], pick.x, pick.y);
        Plotly.update(id, {x: [xy.x], y: [xy.y], name: ["u" + pick.x + " vs u" + pick.y]},
          {"xaxis.title.text": "u" + pick.x, "yaxis.title.text": "u" + pick.y})
          .then(function () { window.SAEFLOW_AXES = (window.SAEFLOW_AXES || 0) + 1; })
          .catch(saeflowFail);
      });
    });
  }).catch(saeflowFail);
}

if (typeof document !== "undefined" && typeof FIGS !== "undefined") { mfaPage(); }
