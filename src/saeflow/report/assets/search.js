/* Exact-token and feature-id search shared by the dashboard and decoder UMAP pages. The token
   index is split into shards by saeflowHash(key) % count (geometry_pages.token_index). */
"use strict";

/* Search key of a token: surrounding whitespace dropped, otherwise exact ("king" finds " king",
   never "talking"); mirror of geometry_pages.token_key. */
function geoTokenKey(s) { return String(s).trim(); }

/* Feature ids whose top activating tokens hold `query` exactly, most hits first, from one
   token-index shard ({keys: {token: [[id, hits], ...]}}). */
function geoTokenHits(shard, query) {
  var hits = shard.keys[geoTokenKey(query)];
  return hits ? hits.map(function (h) { return h[0]; }) : [];
}

/* A feature id typed in the search box, or null. */
function geoParseId(query) {
  var q = geoTokenKey(query);
  return /^\d+$/.test(q) ? parseInt(q, 10) : null;
}

