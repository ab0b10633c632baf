// Weir dashboard: cumulative totals arrive once a second over SSE
// (/dashboard/events); rates and quantiles are the differences between two.
"use strict";
(function () {
  var WINDOW = 300; // points kept: five minutes at one a second
  var cols = { t: [], rps: [], p50: [], p99: [], t50: [], t99: [], tokens: [], cost: [], hit: [], coal: [], err: {} };
  var prev = null;
  var charts = {};
  var palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

  function quantile(prevB, curB, q) {
    // Cumulative bucket counts [le, count] now and a second ago → the q-quantile of that second.
    var total = 0, i, d = [];
    for (i = 0; i < curB.length; i++) {
      var before = prevB && prevB[i] ? prevB[i][1] : 0;
      d.push([curB[i][0], curB[i][1] - before]);
    }
    if (!d.length) return null;
    total = d[d.length - 1][1];
    if (total <= 0) return null;
    var rank = q * total, lo = 0, below = 0;
    for (i = 0; i < d.length; i++) {
      if (d[i][1] >= rank) {
        var hi = d[i][0] === "+Inf" ? lo : d[i][0];
        var inBucket = d[i][1] - below;
        return inBucket > 0 ? lo + (hi - lo) * (rank - below) / inBucket : hi;
      }
      lo = d[i][0]; below = d[i][1];
    }
    return lo;
  }

  function make(id, series) {
    var el = document.getElementById("chart-" + id);
    if (!el) return null;
    var opts = {
      width: Math.max(260, el.clientWidth || 360), height: 160,
      series: [{}].concat(series.map(function (s, i) { return { label: s, stroke: palette[i % palette.length], width: 1.5 }; })),
      axes: [{}, { size: 60 }],
      legend: { show: true },
    };
    var data = [[]].concat(series.map(function () { return []; }));
    var u = new uPlot(opts, data, el);
    el.setAttribute("data-points", "0");
    return u;
  }

  function push(arr, v) { arr.push(v); if (arr.length > WINDOW) arr.shift(); }

  function update(id, data) {
    var u = charts[id];
    if (!u) return;
    u.setData(data);
    u.root.parentNode.setAttribute("data-points", String(data[0].length));
  }

  function onSnapshot(s) {
    if (prev) {
      var dt = Math.max(0.001, s.t - prev.t);
      push(cols.t, s.t);
      push(cols.rps, (s.requests - prev.requests) / dt);
      push(cols.p50, quantile(prev.duration, s.duration, 0.5));
      push(cols.p99, quantile(prev.duration, s.duration, 0.99));
      push(cols.t50, quantile(prev.ttft, s.ttft, 0.5));
      push(cols.t99, quantile(prev.ttft, s.ttft, 0.99));
      push(cols.tokens, (s.tokens - prev.tokens) / dt);
      push(cols.cost, (s.cost_usd - prev.cost_usd) / dt * 3600);
      var n = s.requests - prev.requests;
      var hits = (s.cache.hit || 0) - (prev.cache.hit || 0);
      var coal = (s.cache.coalesced || 0) - (prev.cache.coalesced || 0);
      push(cols.hit, n > 0 ? hits / n : null);
      push(cols.coal, n > 0 ? coal / n : null);
      var codes = Object.keys(s.errors);
      codes.forEach(function (c) {
        if (!cols.err[c]) { cols.err[c] = cols.t.slice(0, -1).map(function () { return 0; }); }
      });
      Object.keys(cols.err).forEach(function (c) {
        push(cols.err[c], ((s.errors[c] || 0) - (prev.errors[c] || 0)) / dt);
      });
      update("rps", [cols.t, cols.rps]);
      update("latency", [cols.t, cols.p50, cols.p99]);
      update("ttft", [cols.t, cols.t50, cols.t99]);
      update("tokens", [cols.t, cols.tokens]);
      update("cost", [cols.t, cols.cost]);
      update("ratios", [cols.t, cols.hit, cols.coal]);
      var errCodes = Object.keys(cols.err).sort();
      if (!charts.errors || charts.errors._codes !== errCodes.join(",")) {
        var el = document.getElementById("chart-errors");
        if (el) { el.textContent = ""; }
        charts.errors = make("errors", errCodes.length ? errCodes : ["errors"]);
        if (charts.errors) charts.errors._codes = errCodes.join(",");
      }
      update("errors", [cols.t].concat(errCodes.length ? errCodes.map(function (c) { return cols.err[c]; }) : [cols.t.map(function () { return 0; })]));
    }
    prev = s;
    var status = document.getElementById("status");
    if (status) status.textContent = s.inflight + " in flight · " + Math.round(s.requests) + " requests";
  }

  charts.rps = make("rps", ["req/s"]);
  charts.latency = make("latency", ["p50", "p99"]);
  charts.ttft = make("ttft", ["p50", "p99"]);
  charts.tokens = make("tokens", ["tokens/s"]);
  charts.cost = make("cost", ["USD/h"]);
  charts.ratios = make("ratios", ["hit", "coalesced"]);
  charts.errors = make("errors", ["errors"]);
  if (charts.errors) charts.errors._codes = "";

  var source = new EventSource("/dashboard/events");
  source.onmessage = function (ev) { onSnapshot(JSON.parse(ev.data)); };
  source.onerror = function () {
    var status = document.getElementById("status");
    if (status) status.textContent = "reconnecting…";
  };
})();
