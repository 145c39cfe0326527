/* Unit tests of the report pages' JavaScript (src/saeflow/report/assets), run by
   tests/test_report_js.py with `node --test`. The assets are loaded into a vm context, as the
   pages concatenate them; a fake document runs shard files from disk like script tags do. */
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const vm = require("node:vm");

const ASSETS = process.env.SAEFLOW_ASSETS;
const FIXTURES = process.env.SAEFLOW_FIXTURES;
const fixture = JSON.parse(fs.readFileSync(path.join(FIXTURES, "fixture.json"), "utf8"));

/* A context with the given assets loaded and a document whose <script> tags run files below
   `root` asynchronously (missing file -> onerror), counting the tags inserted. */
function page(files, root) {
  const ctx = vm.createContext({atob, TextEncoder, console, setTimeout, Promise});
  ctx.inserted = [];
  ctx.document = {
    createElement: () => ({}),
    head: {
      appendChild(s) {
        ctx.inserted.push(s.src);
        setImmediate(() => {
          const file = path.join(root || FIXTURES, s.src);
          if (!fs.existsSync(file)) { if (s.onerror) { s.onerror(); } return; }
          vm.runInContext(fs.readFileSync(file, "utf8"), ctx, {filename: file});
        });
      },
    },
  };
  ["common.js"].concat(files || []).forEach((f) => {
    vm.runInContext(fs.readFileSync(path.join(ASSETS, f), "utf8"), ctx, {filename: f});
  });
  return ctx;
}

test("packed columns unpack to the values Python packed", () => {
  const ctx = page();
  for (const [name, col] of Object.entries(fixture.packed)) {
    const got = ctx.saeflowUnpack(col), want = fixture.values[name];
    assert.equal(got.length, want.length, name);
    got.forEach((v, i) => {
      if (want[i] === null) { assert.equal(v, null, `${name}[${i}]`); return; }
      const tol = col.dtype === "q16" ? (col.hi - col.lo) / 65534 : col.dtype === "f32" ? 1e-6 : 0;
      assert.ok(Math.abs(v - want[i]) <= tol * 1.01 + 1e-12, `${name}[${i}]: ${v} vs ${want[i]}`);
    });
  }
});

test("saeflowHash is the FNV-1a of saeflow.report.shards.fnv1a", () => {
  const ctx = page();
  for (const [text, h] of fixture.hashes) { assert.equal(ctx.saeflowHash(text), h, text); }
});

test("shards load once, by item, and a missing shard rejects", async () => {
  const ctx = page();
  const meta = fixture.shards.meta, spec = fixture.shards.items;
  const got = await Promise.all([0, 1, 2, 6, 9].map((i) => ctx.saeflowItem(meta, spec, i)));
  assert.deepEqual(JSON.parse(JSON.stringify(got)), [0, 1, 2, 6, 9].map((i) => ({i: i, text: `item ${i} <b>`})));
  assert.equal(ctx.inserted.length, 3);  /* shards 0, 1 and 2 of 4 items each */
  await ctx.saeflowItem(meta, spec, 3);
  assert.equal(ctx.inserted.length, 3);  /* cached */
  assert.ok(ctx.inserted.every((s) => s.startsWith(meta.base + "/items-")));
  await assert.rejects(ctx.saeflowLoadShard(meta, "items", 99), /did not load/);
});

test("saeflowColumns joins the inlined head and the tail shards", async () => {
  const ctx = page();
  const c = ctx.saeflowColumns(fixture.shards.meta, fixture.shards.columns);
  assert.ok(c.head.v.length < fixture.shards.n_rows && c.rest !== null);
  const full = await c.rest;
  assert.deepEqual(Array.from(full.v), Array.from({length: fixture.shards.n_rows}, (_, i) => i));
});

test("saeflowEsc escapes markup and dollars", () => {
  const ctx = page();
  assert.equal(ctx.saeflowEsc('<img src=x onerror="a">&$'), '&lt;img src=x onerror="a"&gt;&amp;&#36;');
});

const MARKER = "^<\\|?[A-Za-z][A-Za-z0-9_]*\\|?>$";

test("umap filter: ANY word per point, never the Sequence/Position prefix", () => {
  const ctx = page(["umap.js"]);
  const toks = [[" the", " cat", " sat"], [" a", " dog", " ran"]];
  const pts = {seq: [0, 0, 0, 1, 1, 1], pos: [0, 1, 2, 0, 1, 2]};
  let r = ctx.umapKeep(pts, toks, ["cat", "dog"], "any", 50, Infinity);
  assert.deepEqual(Array.from(r.keep), [false, true, true, false, true, true]);
  r = ctx.umapKeep(pts, toks, ["cat", "dog"], "all", 50, Infinity);
  assert.deepEqual(Array.from(r.keep), [false, false, false, false, false, false]);
  r = ctx.umapKeep(pts, toks, ["cat", "sat"], "all", 50, Infinity);
  assert.deepEqual(Array.from(r.keep), [true, true, true, false, false, false]);
  for (const w of ["sequence", "position", "story", "br"]) {
    r = ctx.umapKeep(pts, toks, [w], "any", 50, Infinity);
    assert.equal(r.shownPoints, 0, w);
  }
  r = ctx.umapKeep(pts, toks, [], "any", 50, 1);
  assert.equal(r.shownSeqs, 1);
  assert.equal(r.shownPoints, 3);
  r = ctx.umapKeep(pts, toks, ["cat"], "any", 0, Infinity);  /* window 0: the token itself */
  assert.deepEqual(Array.from(r.keep), [false, true, false, false, false, false]);
});

test("umap filter finds a word the hover splits with a line break", () => {
  const ctx = page(["umap.js"]);
  const toks = Array.from({length: 20}, (_, i) => " t" + i);
  toks[14] = " inter"; toks[15] = "national";
  const hover = ctx.umapHover(7, 19, toks, 500, 15, MARKER);
  assert.ok(hover.includes(" inter<br>national"));
  assert.ok(hover.startsWith("Sequence: 7<br>Position: 19<br>Story: "));
  const r = ctx.umapKeep({seq: [0], pos: [19]}, [toks], ["international"], "any", 500, Infinity);
  assert.deepEqual(Array.from(r.keep), [true]);
});

test("umap hover escapes tokens and marks the current one", () => {
  const ctx = page(["umap.js"]);
  const toks = ["<start_of_turn>", " <img src=x onerror=alert(1)>", "\n", " end"];
  const h = ctx.umapHover(1, 3, toks, 2, 15, MARKER);
  assert.equal(h, "Sequence: 1<br>Position: 3<br>Story:  &lt;img src=x onerror=alert(1)&gt;\u21b5<b> end</b>");
  assert.ok(ctx.umapHover(1, 0, toks, 2, 15, MARKER).includes("<b><i>&lt;start_of_turn&gt;</i></b>"));
});

test("umap lines follow the filter and break between sequences", () => {
  const ctx = page(["umap.js"]);
  const pts = {seq: [0, 0, 1, 1], pos: [0, 1, 0, 1]};
  const l = ctx.umapLines(pts, {x: [1, 2, 3, 4]}, ["x"], [0, 1], [true, false, true, true]);
  assert.deepEqual(Array.from(l.x), [1, null, null, 3, 4]);
});

test("diffing hover: difference, inconsistency, explanation or none", () => {
  const ctx = page(["diffing.js"]);
  const c = {models: ["base", "<chat>"], token_types: ["model"], totals: {model: [40, 30]},
    metric: "Mean Activation"};
  const p = {fid: 3, tt: 0, cat: 1 + 4, x: 0.25, y: 0.75};
  assert.equal(ctx.diffTraceName(5, ["base", "chat"]), "base only + chat control");
  assert.equal(ctx.diffTraceName(2, ["base", "chat"]), "chat only");
  let h = ctx.diffHover(p, {c: {model: [4, 0, 1, 2]}, e: null}, c);
  assert.ok(h.includes("Difference: 0.5000"));
  assert.ok(h.includes("also active on &lt;chat&gt;'s control prompts"));
  assert.ok(h.includes("base target: 4/40 (10.0%)"));
  assert.ok(h.includes("No explanation available"));
  assert.ok(!h.includes("<chat>"));
  h = ctx.diffHover(p, {c: {}, e: "cats &amp; dogs"}, c);
  assert.ok(h.endsWith("<b>Description:</b><br>cats &amp; dogs"));
  assert.ok(ctx.diffHover(p, undefined, c).includes("loading"));
  assert.deepEqual(Array.from(ctx.diffRange([0, 1], [null, 0.5])), [-0.05, 1.05]);
});

test("token search is exact after trimming: king finds ' king', never 'talking'", async () => {
  const ctx = page(["search.js"]);
  const meta = fixture.shards.meta, spec = fixture.shards.tokens;
  const hits = async (q) => {
    const shard = await ctx.saeflowLoadShard(meta, spec.set, ctx.saeflowHash(ctx.geoTokenKey(q)) % spec.count);
    return Array.from(ctx.geoTokenHits(shard, q));
  };
  assert.deepEqual(await hits("king"), [0, 2]);
  assert.deepEqual(await hits(" king "), [0, 2]);
  assert.deepEqual(await hits("talk"), []);
  assert.deepEqual(await hits("talking"), [1]);
  assert.equal(ctx.geoParseId(" 12 "), 12);
  assert.equal(ctx.geoParseId("1x"), null);
});

test("decoder UMAP id lookup and MFA axis pairs", () => {
  const ctx = page(["search.js", "decoder_umap.js", "mfa.js"]);
  assert.equal(ctx.geoFindId([0, 2, 5, 0, 1], 0, 3, 5), 2);
  assert.equal(ctx.geoFindId([0, 2, 5, 0, 1], 3, 5, 1), 4);
  assert.equal(ctx.geoFindId([0, 2, 5], 0, 3, 3), -1);
  const axes = [0, 1, 2].map((r) => fixture.packed["axis" + r]);
  const xy = ctx.mfaPair(axes, 2, 0);
  assert.equal(xy.x[0], -5);
  assert.ok(Math.abs(xy.y[0] - 0.1) < 1e-6);
});
