/* attnformat explorer: sites that keep less than the whole map.
   topk: per query row, the kept keys with their weights (largest first) and the mass left out, as a
   stacked bar and as text; keys not kept are absent (their weight is unknown), never drawn as 0.
   statistics: per query row, the stored entropy, max, sink and local weight as profiles along the
   rows, and each row's top key. Every drawn value carries data-* attributes with the number. */
(function () {
  "use strict";

  function extra(site, name) {
    return site && site.extras && site.extras[name] ? site.extras[name] : null;
  }

  function rowKey(state) {
    return "s" + (state.sample || 0) + "/t" + (state.step || 0) + "/l" + (state.layer || 0) + "/h" + state.head;
  }

  // Long sequences: tables list PAGE rows at a time (a chooser picks which), so the page stays light.
  var PAGE = 256;
  var rowPage = {};   // per site: the first row listed

  function pageChooser(root, el, site, count, rerender) {
    var first = rowPage[site.name] || 0;
    if (first >= count) first = 0;
    if (count <= PAGE) return [0, count];
    var wrap = el("div", {style: {margin: "4px 0", fontSize: "12px"}});
    wrap.appendChild(el("label", {"for": "af-reduced-rows"}, "query rows: "));
    var select = el("select", {id: "af-reduced-rows"});
    for (var start = 0; start < count; start += PAGE) {
      var option = el("option", {value: start}, start + "–" + (Math.min(count, start + PAGE) - 1));
      if (start === first) option.selected = true;
      select.appendChild(option);
    }
    select.addEventListener("change", function () {
      rowPage[site.name] = Number(select.value);
      rerender();
    });
    wrap.appendChild(select);
    wrap.appendChild(el("span", {style: {color: "#555"}}, " of " + count + " (" + PAGE + " at a time)"));
    root.appendChild(wrap);
    return [first, Math.min(count, first + PAGE)];
  }

  function note(el, text) {
    return el("p", {"class": "af-note", style: {fontSize: "11px", color: "#555"}}, text);
  }

  // The row's entry (a promise): from the page, or asked of the server; null (with a message) when
  // the state names no single stored head or the page does not have it.
  function entryFor(ctx, kind, state, site, el, root, what) {
    if (state.head === "mean" && !(site.head_reduction === "mean")) {
      root.appendChild(el("p", {"class": "af-note", id: "af-reduced-choose-head"},
                          what + " are stored per head: choose a head to see its rows"));
      return Promise.resolve(null);
    }
    var key = rowKey({sample: state.sample, step: state.step, layer: state.layer,
                      head: state.head === "mean" ? 0 : state.head});
    var rows = site.extras[kind].rows;
    if (rows[key]) return Promise.resolve(rows[key]);
    var status = el("p", {"class": "af-note"}, "reading " + what + "…");
    root.appendChild(status);
    return window.afViewKit.fetchLayer(ctx, site, kind, state).then(function (asked) {
      status.remove();
      if (rows[key]) return rows[key];
      root.appendChild(el("p", {"class": "af-note"}, what + " of this layer and head are not in the page" +
                          (asked ? "" : " (size budget: attnformat serve shows every layer)")));
      return null;
    }, function (error) {
      status.textContent = what + " not available: " + error.message;
      return null;
    });
  }

  // ---- top-k ------------------------------------------------------------------------------------

  function renderTopk(container, ctx) {
    var kit = window.afViewKit, el = kit.el;
    var site = ctx.site, state = ctx.state, topk = extra(site, "topk");
    var root = el("div", {id: "af-topk", "class": "af-topk", "data-top-k": topk.top_k, "data-key-count": topk.key_count});
    container.appendChild(root);
    return entryFor(ctx, "topk", state, site, el, root, "top-k rows").then(function (entry) {
      if (entry) drawTopk(root, ctx, topk, entry);
    });
  }

  function drawTopk(root, ctx, topk, entry) {
    var kit = window.afViewKit, el = kit.el;
    var site = ctx.site, state = ctx.state;
    var k = topk.top_k;
    var weights = kit.decode(entry.weights), index = kit.decodeInts(entry.key_index);
    var omitted = entry.omitted ? kit.decode(entry.omitted) : null;
    var queries = entry.weights.rows;
    var sample = state.sample || 0;
    var queryLabels = (site.query_labels && site.query_labels[sample]) || [];
    var keyLabels = (site.key_labels && site.key_labels[sample]) || [];
    var queryMask = site.query_mask && site.query_mask[sample];
    var range = kit.finiteRange(weights);
    var sc = kit.scale(0, Math.max(range[1], 1e-12), false, ctx);
    root.appendChild(kit.colorbar(sc, "kept weight (top " + k + " of " + topk.key_count + " keys per row)",
                                  "af-topk-colorbar", ctx));
    var legend = el("div", {"class": "af-topk-legend", style: {fontSize: "11px", margin: "2px 0 6px"}});
    legend.appendChild(el("span", {style: {display: "inline-block", width: "14px", height: "10px", marginRight: "4px",
                                           background: "repeating-linear-gradient(45deg,#999,#999 2px,#eee 2px,#eee 5px)"}}));
    legend.appendChild(el("span", null, "omitted mass: the weights of the keys not kept, together (each unknown, none above the smallest kept)"));
    root.appendChild(legend);
    var tip = kit.tooltip(root, "af-topk-tip");
    var table = el("table", {"class": "af-topk-table", style: {borderCollapse: "collapse", font: "12px sans-serif"}});
    var head = el("tr");
    ["query", "kept weights and omitted mass (row sums to 1)", "kept keys (largest first)", "omitted"].forEach(function (t) {
      head.appendChild(el("th", {style: {textAlign: "left", padding: "2px 6px"}}, t));
    });
    table.appendChild(head);
    var span = pageChooser(root, el, site, queries, function () { root.textContent = ""; drawTopk(root, ctx, topk, entry); });
    for (var q = span[0]; q < span[1]; q++) {
      if (queryMask && queryMask[q] === 0) continue;  // padding rows hold no statistics
      var om = omitted ? omitted[q] : NaN;
      var row = el("tr", {"class": "af-topk-row", "data-query": q,
                          "data-omitted": isNaN(om) ? "absent" : kit.fmt(om, ctx)});
      row.appendChild(el("td", {"class": "af-topk-label", style: {padding: "1px 6px", whiteSpace: "nowrap"}},
                         kit.labelOf(queryLabels, q)));
      var bar = el("div", {"class": "af-topk-bar", style: {display: "flex", width: "260px", height: "14px",
                                                          border: "1px solid #ccc", background: "#fff"}});
      var words = el("td", {"class": "af-topk-keys", style: {padding: "1px 6px"}});
      var captured = false;
      for (var r = 0; r < k; r++) {
        var w = weights[q * k + r], key = index[q * k + r];
        if (isNaN(w) || key < 0) {  // nothing kept at this rank (a short row, or not captured)
          words.appendChild(el("span", {"class": "af-topk-cell af-absent", "data-query": q, "data-rank": r,
                                        "data-key": -1, "data-weight": "absent", style: {color: "#999", marginRight: "6px"}},
                               "—"));
          continue;
        }
        captured = true;
        var text = kit.labelOf(queryLabels, q) + " → " + kit.labelOf(keyLabels, key) + " (rank " + (r + 1) + "): " + kit.fmt(w, ctx);
        var segment = el("div", {"class": "af-topk-segment", "data-query": q, "data-rank": r, "data-key": key,
                                 "data-weight": kit.fmt(w, ctx),
                                 style: {width: (100 * Math.max(0, w)) + "%", background: sc.css(w),
                                         borderRight: "1px solid #fff", boxSizing: "border-box"}});
        var cell = el("span", {"class": "af-topk-cell", "data-query": q, "data-rank": r, "data-key": key,
                               "data-weight": kit.fmt(w, ctx), style: {marginRight: "8px", whiteSpace: "nowrap"}},
                      kit.labelOf(keyLabels, key) + " " + kit.short(w));
        [segment, cell].forEach(function (node) {
          var t = text;
          node.addEventListener("mousemove", function (event) { tip.show(t, event); });
          node.addEventListener("mouseleave", tip.hide);
        });
        bar.appendChild(segment);
        words.appendChild(cell);
      }
      if (!isNaN(om)) {
        var rest = el("div", {"class": "af-topk-omitted", "data-query": q, "data-omitted": kit.fmt(om, ctx),
                              style: {width: (100 * Math.max(0, om)) + "%",
                                      background: "repeating-linear-gradient(45deg,#999,#999 2px,#eee 2px,#eee 5px)"}});
        var omText = kit.labelOf(queryLabels, q) + ": omitted mass " + kit.fmt(om, ctx) + " over " +
                     (topk.key_count - k) + " keys not kept";
        rest.addEventListener("mousemove", function (event) { tip.show(omText, event); });
        rest.addEventListener("mouseleave", tip.hide);
        bar.appendChild(rest);
      }
      var barCell = el("td", {style: {padding: "1px 6px"}});
      barCell.appendChild(bar);
      row.appendChild(barCell);
      row.appendChild(words);
      row.appendChild(el("td", {"class": "af-topk-omitted-text", style: {padding: "1px 6px", textAlign: "right"}},
                         isNaN(om) ? (captured ? "—" : "not captured") : kit.fmt(om, ctx)));
      table.appendChild(row);
    }
    root.appendChild(table);
    var notes = ["weights are 8-bit (± " + kit.fmt(entry.weights.max_error, ctx) + ")",
                 topk.absent || "", topk.note || ""];
    root.appendChild(note(el, notes.filter(Boolean).join("; ")));
  }

  // ---- statistics -------------------------------------------------------------------------------

  var PROFILE = ["entropy", "max_weight", "sink_weight", "local_weight"];

  function renderStatistics(container, ctx) {
    var kit = window.afViewKit, el = kit.el, svg = kit.svg;
    var site = ctx.site, state = ctx.state, stats = extra(site, "statistics");
    var root = el("div", {id: "af-statistics", "class": "af-statistics"});
    container.appendChild(root);
    return entryFor(ctx, "statistics", state, site, el, root, "row statistics").then(function (entry) {
      if (entry) drawStatistics(root, ctx, stats, entry);
    });
  }

  function drawStatistics(root, ctx, stats, entry) {
    var kit = window.afViewKit, el = kit.el, svg = kit.svg;
    var site = ctx.site, state = ctx.state;
    var sample = state.sample || 0;
    var queryLabels = (site.query_labels && site.query_labels[sample]) || [];
    var keyLabels = (site.key_labels && site.key_labels[sample]) || [];
    var queryMask = site.query_mask && site.query_mask[sample];
    var tip = kit.tooltip(root, "af-statistics-tip");
    var shown = PROFILE.filter(function (name) { return entry[name]; });
    var width = 560, height = 70, left = 48;
    shown.forEach(function (name) {
      var values = kit.decode(entry[name]);
      var n = values.length;
      var range = kit.finiteRange(values);
      var low = Math.min(0, range[0]), high = name === "entropy" ? Math.max(range[1], 1e-12) : Math.max(1, range[1]);
      var box = el("div", {"class": "af-statistics-profile", "data-statistic": name, style: {margin: "4px 0"}});
      box.appendChild(el("div", {style: {font: "12px sans-serif"}},
                         (stats.labels[name] || name) + "  (8-bit, ± " + kit.fmt(entry[name].max_error, ctx) + ")"));
      var chart = svg("svg", {width: width + left, height: height + 14, "class": "af-statistics-chart"});
      chart.appendChild(svg("text", {x: left - 4, y: 10, "text-anchor": "end", "font-size": 10}, kit.short(high)));
      chart.appendChild(svg("text", {x: left - 4, y: height, "text-anchor": "end", "font-size": 10}, kit.short(low)));
      chart.appendChild(svg("line", {x1: left, y1: height, x2: left + width, y2: height, stroke: "#999"}));
      var step = width / Math.max(n, 1);
      for (var q = 0; q < n; q++) {
        if (queryMask && queryMask[q] === 0) continue;
        var v = values[q];
        var absent = isNaN(v);
        var h = absent ? height : (height - 4) * (v - low) / ((high - low) || 1);
        var rect = svg("rect", {"class": "af-statistics-bar" + (absent ? " af-absent" : ""),
                                "data-query": q, "data-statistic": name, "data-value": absent ? "absent" : kit.fmt(v, ctx),
                                x: (left + q * step + 0.5).toFixed(2), width: Math.max(0.5, step - 1).toFixed(2),
                                y: (height - h).toFixed(2), height: h.toFixed(2),
                                fill: absent ? "none" : "#4a78a8", stroke: absent ? "#bbb" : null,
                                "stroke-dasharray": absent ? "2 2" : null});
        var text = kit.labelOf(queryLabels, q) + ": " + (stats.labels[name] || name) + " = " +
                   (absent ? "not captured" : kit.fmt(v, ctx));
        (function (t) {
          rect.addEventListener("mousemove", function (event) { tip.show(t, event); });
          rect.addEventListener("mouseleave", tip.hide);
        })(text);
        chart.appendChild(rect);
      }
      box.appendChild(chart);
      root.appendChild(box);
    });
    if (shown.length && entry[shown[0]].cols <= 64) {  // query labels under the profiles when they fit
      var n = entry[shown[0]].cols, step = width / Math.max(n, 1);
      var axis = svg("svg", {width: width + left, height: 60, "class": "af-statistics-axis"});
      for (var q = 0; q < n; q++) {
        if (queryMask && queryMask[q] === 0) continue;
        var x = left + (q + 0.5) * step;
        axis.appendChild(svg("text", {x: x.toFixed(1), y: 4, "font-size": 10, "text-anchor": "end",
                                      transform: "rotate(-60 " + x.toFixed(1) + " 4)"}, kit.labelOf(queryLabels, q)));
      }
      root.appendChild(axis);
    }
    if (entry.top_key) {
      var keys = kit.decodeInts(entry.top_key);
      var box = el("div", {"class": "af-statistics-topkey", "data-statistic": "top_key", style: {margin: "6px 0"}});
      box.appendChild(el("div", {style: {font: "12px sans-serif"}}, (stats.labels.top_key || "top key") + " per row"));
      var span = pageChooser(box, el, site, keys.length, function () { root.textContent = ""; drawStatistics(root, ctx, stats, entry); });
      var list = el("table", {style: {font: "12px sans-serif", borderCollapse: "collapse"}});
      for (var q = span[0]; q < span[1]; q++) {
        if (queryMask && queryMask[q] === 0) continue;
        var key = keys[q];
        var row = el("tr", {"class": "af-statistics-row", "data-query": q, "data-statistic": "top_key",
                            "data-value": key < 0 ? "absent" : String(key)});
        row.appendChild(el("td", {style: {padding: "0 6px"}}, kit.labelOf(queryLabels, q)));
        row.appendChild(el("td", {style: {padding: "0 6px", color: "#555"}}, "→"));
        row.appendChild(el("td", {style: {padding: "0 6px"}}, key < 0 ? "not captured" : kit.labelOf(keyLabels, key)));
        row.appendChild(el("td", {style: {padding: "0 6px", color: "#777"}}, key < 0 ? "" : "key " + key));
        list.appendChild(row);
      }
      box.appendChild(list);
      root.appendChild(box);
    }
    var notes = ["stored by the capture; nothing recomputed"];
    if (stats.local_window !== null && stats.local_window !== undefined) notes.push("local window ±" + stats.local_window);
    root.appendChild(note(el, notes.join("; ")));
  }

  function register(name, spec) {
    if (window.attnExplorer && window.attnExplorer.registerView) window.attnExplorer.registerView(name, spec);
    else document.addEventListener("DOMContentLoaded", function () { window.attnExplorer.registerView(name, spec); });
  }

  register("topk", {label: "top-k", supports: function (site) { return !!extra(site, "topk"); }, render: renderTopk});
  register("statistics", {label: "statistics", supports: function (site) { return !!extra(site, "statistics"); },
                          render: renderStatistics});
})();
