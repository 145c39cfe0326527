/* Feature dashboard page (saeflow.report.geometry_pages.build_dashboard_page). */
"use strict";

function geoEl(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) { e.textContent = String(text); }
  if (cls) { e.className = cls; }
  return e;
}

function geoFmt(v) { return (v === null || v === undefined) ? "\u2014" : Number(v).toPrecision(4); }

function dashboardPage() {
  var D = EXTRA, meta = D.data, familyLinks = [];

  /* families-NAME.links.js files call this: link a feature that heads a family to its tree. */
  window.saeflowFamilyLinks = function (links) {
    familyLinks.push(links);
    if (window.SAEFLOW_SHOWN !== undefined) { showFamilies(window.SAEFLOW_SHOWN); }
  };
  (D.families || []).forEach(function (src) {
    var s = document.createElement("script");
    s.src = src;
    document.head.appendChild(s);
  });

  function showFamilies(id) {
    var box = document.getElementById("geo-fam");
    if (!box) { return; }
    box.textContent = "";
    function link(text, name, href) {
      var p = geoEl("p", text), a = geoEl("a", name);
      a.href = href;
      p.appendChild(a);
      box.appendChild(p);
    }
    familyLinks.forEach(function (links) {
      if (links.sae === D.sae && links.parents.indexOf(id) >= 0) {
        link("Splits into a family of " + links.child_sae + " features: ", links.name,
          links.page + "#p" + id);
      }
      if (links.child_sae === D.sae) {
        (links.children[String(id)] || []).forEach(function (parent) {
          link("Child of " + links.sae + " feature " + parent + " in family ", links.name,
            links.page + "#p" + parent);
        });
      }
    });
  }

  function feature(id) {
    if (id === null || id < 0 || id >= D.feat.n) { return Promise.resolve(null); }
    return saeflowItem(meta, D.feat, id);
  }

  function listIds(list, label) {
    var box = document.getElementById("geo-results");
    box.textContent = "";
    if (!list.length) { box.appendChild(geoEl("span", "no feature found")); return; }
    list.slice(0, 500).forEach(function (item) {
      var b = geoEl("button", label(item));
      b.addEventListener("click", function () { showFeature(item[0]); });
      box.appendChild(b);
    });
    if (list.length > 500) { box.appendChild(geoEl("span", (list.length - 500) + " more")); }
  }

  function topLabel(t) {
    return "#" + t[0] + "  fires on " + t[1] + " tokens  tokens: " +
      t[2].map(function (x) { return JSON.stringify(x); }).join(" ");
  }

  function logitTable(title, toks, vals) {
    var t = geoEl("table", null, "data"), head = geoEl("tr");
    head.appendChild(geoEl("th", title)); head.appendChild(geoEl("th", "logit"));
    t.appendChild(head);
    (toks || []).forEach(function (tok, i) {
      var r = geoEl("tr");
      r.appendChild(geoEl("td", JSON.stringify(tok))); r.appendChild(geoEl("td", geoFmt(vals[i])));
      t.appendChild(r);
    });
    return t;
  }

  function render(f) {
    var dash = document.getElementById("geo-dash");
    dash.textContent = "";
    dash.appendChild(geoEl("h2", "Feature " + f.id));
    dash.appendChild(geoEl("p", "fires on " + f.n + " tokens (density " + geoFmt(f.d) +
      "), max " + geoFmt(f.mx) + ", mean when active " + geoFmt(f.mean)));
    var fam = geoEl("div");
    fam.id = "geo-fam";
    dash.appendChild(fam);
    showFamilies(f.id);
    var nb = (f.hc || []).length, w = nb ? (f.hh - f.hl) / nb : 1, xs = [];
    for (var i = 0; i < nb; i++) { xs.push(f.hl + (i + 0.5) * w); }
    var done = Plotly.react("plot", [{type: "bar", x: xs, y: f.hc, marker: {color: "#ff8c00"},
      hovertemplate: "activation %{x:.3g}<br>count %{y}<extra></extra>"}],
      {title: {text: "Activation density of feature " + f.id + " (non-zero activations)"},
       xaxis: {title: {text: "activation"}}, yaxis: {title: {text: "count"}}, bargap: 0.02,
       margin: {t: 40}}, FIG.config);
    if (f.tl) {
      var cols = geoEl("div", null, "cols");
      cols.appendChild(logitTable("top logits", f.tl, f.tlv));
      cols.appendChild(logitTable("bottom logits", f.bl, f.blv));
      dash.appendChild(cols);
    }
    dash.appendChild(geoEl("h3", "Top activating examples"));
    if (!f.ex.length) {
      dash.appendChild(geoEl("p", f.n ? "no examples stored" : "this feature never fires"));
    }
    f.ex.forEach(function (e) {
      var row = geoEl("div", null, "example");
      row.appendChild(geoEl("span", geoFmt(e[0]), "act"));
      var ctx = geoEl("span");
      ctx.innerHTML = e[1];  /* escaped in Python token by token before <b>/<span> were added */
      row.appendChild(ctx);
      dash.appendChild(row);
    });
    return done;
  }

  function showFeature(id) {
    return feature(id).then(function (f) {
      if (!f) {
        document.getElementById("geo-dash").textContent = "no feature " + id;
        return null;
      }
      return render(f).then(function () { window.SAEFLOW_SHOWN = f.id; });
    }).catch(saeflowFail);
  }

  document.getElementById("geo-id").addEventListener("input", function (ev) {
    var id = geoParseId(ev.target.value);
    if (id === null) { listIds([], topLabel); return; }
    feature(id).then(function (f) {
      listIds(f ? [[f.id, f.n, f.tt.slice(0, 6)]] : [], topLabel);
    }).catch(saeflowFail);
  });
  document.getElementById("geo-token").addEventListener("input", function (ev) {
    var q = ev.target.value;
    if (!geoTokenKey(q).length) { listIds(D.top, topLabel); return; }
    var k = saeflowHash(geoTokenKey(q)) % D.tok.count;
    saeflowLoadShard(meta, D.tok.set, k).then(function (shard) {
      if (ev.target.value !== q) { return; }
      var hits = shard.keys[geoTokenKey(q)] || [];
      listIds(hits, function (h) { return "#" + h[0] + "  " + h[1] + " top-example hits"; });
      window.SAEFLOW_SEARCHED = (window.SAEFLOW_SEARCHED || 0) + 1;
    }).catch(saeflowFail);
  });
  listIds(D.top, topLabel);
  saeflowPlot(FIG).then(function () {
    if (D.first !== null) { return showFeature(D.first); }
  }).catch(saeflowFail);
}

if (typeof document !== "undefined" && typeof EXTRA !== "undefined") { dashboardPage(); }
