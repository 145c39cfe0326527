/* Diffing page: a click on a feature opens its Neuronpedia page in a new tab. */
saeflowPlot(FIG).then(function (gd) {
  var base = EXTRA.neuronpedia_base;
  if (!base) { return; }
  gd.on("plotly_click", function (event) {
    if (!event || !event.points || !event.points.length) { return; }
    var point = event.points[0];
    var row = point.customdata;
    if (row === undefined && point.data && point.data.customdata) {
      var i = point.pointNumber !== undefined ? point.pointNumber : point.pointIndex;
      row = point.data.customdata[i];
    }
    var featureId = Array.isArray(row) ? row[0] : row;
    if (featureId === undefined || featureId === null || !/^[0-9]+$/.test(String(featureId))) {
      return;
    }
    window.open(base + String(featureId), "_blank", "noopener,noreferrer");
  });
});
