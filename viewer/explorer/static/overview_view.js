/* attnformat explorer: the layer x head overview, and the small kit the other views of this
   directory share (window.afViewKit: elements, SVG, colours, colour bars, tooltips, decoding).
   Hand-written, no library; every label goes in with textContent. */
(function () {
  "use strict";

  // ---- the kit --------------------------------------------------------------------------------

  // The SVG namespace, taken from an element the HTML parser made (no address written here).
  var SVG_NS = new DOMParser().parseFromString("<svg></svg>", "text/html").body.firstChild.namespaceURI;

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (name) {
      var value = attrs[name];
      if (value === undefined || value === null || value === false) return;
      if (name === "style" && typeof value === "object") {
        Object.keys(value).forEach(function (p) { node.style[p] = value[p]; });
      } else {
        node.setAttribute(name, String(value));
      }
    });
  }

  // 6 significant digits, as the token view writes data-weight (ctx.fmt when the core gives one).
  function fmt(value, ctx) {
    if (value === null || value === undefined || (typeof value === "number" && isNaN(value))) return "";
    if (ctx && typeof ctx.fmt === "function") return ctx.fmt(value);
    return String(Number(Number(value).toPrecision(6)));
  }

  function short(value) {
    if (value === null || value === undefined || isNaN(value)) return "–";
    var a = Math.abs(value);
    if (a !== 0 && (a < 0.01 || a >= 1000)) return Number(value).toExponential(1);
    return String(Number(Number(value).toPrecision(3)));
  }

  function base64Bytes(text) {
    var binary = atob(text);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // An encode_map() dict -> Float32Array (row-major), NaN where the code is 255 (no value).
  function decode(encoded) {
    if (!encoded) return null;
    var core = window.attnExplorer;
    if (core && typeof core.decode === "function") return core.decode(encoded);
    var codes = base64Bytes(encoded.q);
    var out = new Float32Array(codes.length);
    for (var i = 0; i < codes.length; i++) {
      out[i] = codes[i] === 255 ? NaN : encoded.offset + encoded.scale * codes[i];
    }
    return out;
  }

  // An encode_ints() dict -> Int16Array / Int32Array (little-endian, as every browser is).
  function decodeInts(encoded) {
    if (!encoded) return null;
    var bytes = base64Bytes(encoded.b64);
    var buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    return encoded.dtype === "int32" ? new Int32Array(buffer) : new Int16Array(buffer);
  }

  // Viridis at 9 stops, linearly interpolated (used when the core gives no colours).
  var VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                 [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];

  function ramp(stops, t) {
    t = Math.max(0, Math.min(1, t));
    var x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    return [0, 1, 2].map(function (c) { return Math.round(stops[i][c] + f * (stops[i + 1][c] - stops[i][c])); });
  }

  var DIVERGING = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247],
                   [253, 219, 199], [239, 138, 98], [178, 24, 43]];

  // A colour scale: {min, max, diverging, rgb(v) -> [r,g,b], css(v, alpha)}.
  function scale(min, max, diverging, ctx) {
    var colors = ctx && ctx.colors;
    if (diverging) {
      var m = Math.max(Math.abs(min), Math.abs(max)) || 1;
      min = -m; max = m;
    } else if (!(max > min)) {
      max = min + (min === 0 ? 1 : Math.abs(min));
    }
    function rgb(v) {
      if (v === null || v === undefined || isNaN(v)) return null;
      if (diverging) {
        var d = Math.max(-1, Math.min(1, v / max));
        return colors && colors.diverging ? colors.diverging(d) : ramp(DIVERGING, (d + 1) / 2);
      }
      var t = (v - min) / (max - min);
      return colors && colors.sequential ? colors.sequential(Math.max(0, Math.min(1, t))) : ramp(VIRIDIS, t);
    }
    return {
      min: min, max: max, diverging: !!diverging, rgb: rgb,
      css: function (v, alpha) {
        var c = rgb(v);
        if (!c) return null;
        c = c.map(Math.round);
        return alpha === undefined ? "rgb(" + c.join(",") + ")" : "rgba(" + c.join(",") + "," + alpha + ")";
      },
      ink: function (v) {  // black or white text on the colour of v
        var c = rgb(v);
        if (!c) return "#333";
        return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) > 140 ? "#111" : "#fff";
      }
    };
  }

  function finiteRange(values) {
    var lo = Infinity, hi = -Infinity;
    for (var i = 0; i < values.length; i++) {
      var v = values[i];
      if (v === null || v === undefined || isNaN(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    return lo <= hi ? [lo, hi] : [0, 1];
  }

  // A horizontal colour bar: gradient, min and max (6 significant digits) and what the colour means.
  function colorbar(sc, label, id, ctx) {
    var box = el("div", {"class": "af-colorbar af-view-colorbar", id: id || null,
                         "data-min": fmt(sc.min, ctx), "data-max": fmt(sc.max, ctx),
                         style: {display: "flex", alignItems: "center", gap: "6px", margin: "6px 0",
                                 fontSize: "12px"}});
    var canvas = el("canvas", {width: 160, height: 12, style: {border: "1px solid #999"}});
    var g = canvas.getContext("2d");
    for (var x = 0; x < 160; x++) {
      var v = sc.min + (sc.max - sc.min) * x / 159;
      g.fillStyle = sc.css(v);
      g.fillRect(x, 0, 1, 12);
    }
    box.appendChild(el("span", {"class": "af-colorbar-min"}, fmt(sc.min, ctx)));
    box.appendChild(canvas);
    box.appendChild(el("span", {"class": "af-colorbar-max"}, fmt(sc.max, ctx)));
    if (label) box.appendChild(el("span", {"class": "af-colorbar-label"}, label));
    return box;
  }

  // One floating tooltip per view container; show(text, event) / hide().
  function tooltip(container, id) {
    var tip = el("div", {"class": "af-view-tip", id: id || null, role: "tooltip",
                         style: {position: "fixed", display: "none", pointerEvents: "none", zIndex: 20,
                                 background: "rgba(255,255,255,0.96)", border: "1px solid #888",
                                 padding: "3px 6px", font: "12px sans-serif", whiteSpace: "pre",
                                 borderRadius: "3px", boxShadow: "0 1px 3px rgba(0,0,0,0.3)"}});
    container.appendChild(tip);
    return {
      node: tip,
      show: function (text, event) {
        tip.textContent = text;
        tip.style.display = "block";
        if (event) {
          tip.style.left = (event.clientX + 12) + "px";
          tip.style.top = (event.clientY + 12) + "px";
        }
      },
      hide: function () { tip.style.display = "none"; }
    };
  }

  function register(name, spec) {
    function go() { window.attnExplorer.registerView(name, spec); }
    if (window.attnExplorer && window.attnExplorer.registerView) go();
    else document.addEventListener("DOMContentLoaded", go);
  }

  // The map key of the page ("weights/s0/t0/l3/h5"), from a state.
  function mapKey(state, variable) {
    return [variable || state.variable, "s" + (state.sample || 0), "t" + (state.step || 0),
            "l" + (state.layer || 0), "h" + (state.head === undefined || state.head === null ? 0 : state.head)].join("/");
  }

  // The current map: the core's decoded map object (map.at(q, k) -> value or null, pooled blocks
  // and server windows included), embedded or served; null when the page does not have it.
  function currentMap(ctx, state) {
    state = state || ctx.state;
    var key = mapKey(state);
    if (ctx.map && ctx.map.key === key) return Promise.resolve(ctx.map);
    var get = ctx.getMap || (window.attnExplorer && window.attnExplorer.getMap);
    if (!get) return Promise.resolve(null);
    return Promise.resolve(get(key)).then(function (map) { return map || null; }, function () { return null; });
  }

  // Served pages embed only the first layers of a site's edges, top-k rows or statistics: ask the
  // server for one (sample, step, layer) and keep the answer in the site's extras.
  var layerRequests = {};
  function fetchLayer(ctx, site, kind, state) {
    var payload = ctx.payload || (window.attnExplorer && window.attnExplorer.payload) || {};
    if (payload.mode !== "server") return Promise.resolve(false);
    var params = "site=" + encodeURIComponent(site.name) + "&kind=" + kind + "&sample=" + (state.sample || 0) +
                 "&step=" + (state.step || 0) + "&layer=" + (state.layer || 0);
    if (!layerRequests[params]) {
      layerRequests[params] = fetch("api/extras?" + params).then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body && body.error ? body.error : "HTTP " + response.status);
          var target = site.extras[kind];
          var field = kind === "edges" ? "values" : "rows";
          Object.keys(body[field] || {}).forEach(function (key) { target[field][key] = body[field][key]; });
          return true;
        });
      });
      layerRequests[params].catch(function () { delete layerRequests[params]; });
    }
    return layerRequests[params];
  }

  function labelOf(list, index) {
    return list && list[index] !== undefined && list[index] !== null ? String(list[index]) : String(index);
  }

  window.afViewKit = {
    el: el, svg: svg, fmt: fmt, short: short, decode: decode, decodeInts: decodeInts, scale: scale,
    finiteRange: finiteRange, colorbar: colorbar, tooltip: tooltip, register: register, mapKey: mapKey,
    currentMap: currentMap, labelOf: labelOf, fetchLayer: fetchLayer
  };

  // ---- the overview ---------------------------------------------------------------------------

  var chosenStatistic = {};   // per site: the statistic the cells are coloured by
  var showMaps = {};          // per site: small multiples (each cell shows its map) on or off

  // A map drawn small into a canvas (every n-th cell when it is large), on its own colour scale.
  function thumbnail(map, ctx, side) {
    var kit = window.afViewKit;
    var stride = Math.max(1, Math.ceil(Math.max(map.rows, map.cols) / 64));
    var rows = Math.ceil(map.rows / stride), cols = Math.ceil(map.cols / stride);
    var canvas = kit.el("canvas", {width: cols, height: rows, "class": "af-overview-thumb",
                                   style: {width: side + "px", height: side + "px", imageRendering: "pixelated",
                                           display: "block", margin: "0 auto"}});
    var sc = kit.scale(map.min === null || map.min === undefined ? 0 : map.min,
                       map.max === null || map.max === undefined ? 1 : map.max, false, ctx);
    var g = canvas.getContext("2d");
    var image = g.createImageData(cols, rows);
    for (var r = 0; r < rows; r++) {
      for (var c = 0; c < cols; c++) {
        var v = map.value(r * stride, c * stride);
        var rgb = v === null ? [200, 200, 200] : sc.rgb(v);
        var i = 4 * (r * cols + c);
        image.data[i] = rgb[0]; image.data[i + 1] = rgb[1]; image.data[i + 2] = rgb[2]; image.data[i + 3] = 255;
      }
    }
    g.putImageData(image, 0, 0);
    return canvas;
  }
  var fetched = {};           // server pages: summaries asked for, per site/sample/step

  function summaryOf(site) {
    return site && site.extras && site.extras.summary ? site.extras.summary : null;
  }

  function serverSummary(ctx, site, key, sample, step) {
    var id = site.name + "|" + key;
    if (!fetched[id]) {
      var url = "api/summary?site=" + encodeURIComponent(site.name) + "&sample=" + sample + "&step=" + step;
      fetched[id] = fetch(url).then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body && body.error ? body.error : "HTTP " + response.status);
          return body;
        });
      });
      fetched[id].catch(function () { delete fetched[id]; });  // a failure is asked again next time
    }
    return fetched[id];
  }

  // Training steps (seed 002): the chosen statistic of the selected layer and head at every step, as
  // points on a line; a point opens that step. Null when the site has one step or none.
  function acrossSteps(ctx, summary, stat, sample) {
    var kit = window.afViewKit, svg = kit.svg, state = ctx.state, site = ctx.site;
    if (!site.steps || site.steps.length < 2) return null;
    var li = summary.layer_index.indexOf(state.layer);
    if (li < 0) return null;
    var heads = state.head === "mean" ? summary.head_index.map(function (h, j) { return j; })
                                      : [summary.head_index.indexOf(Number(state.head))];
    if (heads[0] < 0) return null;
    var points = [];
    site.steps.forEach(function (label, t) {
      var table = summary.values["s" + sample + "/t" + t];
      if (!table) return;
      var total = 0, count = 0;
      heads.forEach(function (j) {
        var v = table[stat][li][j];
        if (v !== null && v !== undefined) { total += v; count += 1; }
      });
      points.push({step: t, label: label, value: count ? total / count : null});
    });
    if (points.length < 2) return null;
    var values = points.map(function (p) { return p.value; });
    var range = kit.finiteRange(values);
    var low = range[0], high = range[1] > range[0] ? range[1] : range[0] + 1;
    var width = 380, height = 90, left = 56, bottom = 18, top = 8;
    var box = kit.el("div", {id: "af-overview-steps", "class": "af-overview-steps", style: {marginTop: "8px"}});
    var what = (summary.labels[stat] || stat) + " of layer " + summary.layers[li] + ", " +
               (state.head === "mean" ? "mean of the heads' values" : "head " + summary.heads[heads[0]]) + ", across steps";
    box.appendChild(kit.el("div", {style: {fontSize: "12px"}}, what));
    var chart = svg("svg", {width: width + left + 10, height: height + top + bottom});
    chart.appendChild(svg("text", {x: left - 4, y: top + 8, "text-anchor": "end", "font-size": 10}, kit.short(high)));
    chart.appendChild(svg("text", {x: left - 4, y: top + height, "text-anchor": "end", "font-size": 10}, kit.short(low)));
    function x(i) { return left + width * i / (points.length - 1); }
    function y(v) { return top + height - height * (v - low) / (high - low); }
    var path = "";
    points.forEach(function (p, i) {
      if (p.value === null) return;
      path += (path ? " L " : "M ") + x(i).toFixed(1) + " " + y(p.value).toFixed(1);
    });
    chart.appendChild(svg("path", {d: path, fill: "none", stroke: "#777", "stroke-width": 1.5}));
    var tip = kit.tooltip(box, "af-overview-steps-tip");
    points.forEach(function (p, i) {
      chart.appendChild(svg("text", {x: x(i).toFixed(1), y: top + height + bottom - 2, "text-anchor": "middle",
                                     "font-size": 10}, p.label));
      if (p.value === null) return;
      var current = p.step === (state.step || 0);
      var dot = svg("circle", {"class": "af-overview-step", "data-step": p.step, "data-value": kit.fmt(p.value, ctx),
                               cx: x(i).toFixed(1), cy: y(p.value).toFixed(1), r: current ? 6 : 4,
                               fill: current ? "#000" : "#fff", stroke: "#000", style: {cursor: "pointer"}});
      var text = "step " + p.label + ": " + kit.fmt(p.value, ctx);
      dot.addEventListener("mousemove", function (event) { tip.show(text, event); });
      dot.addEventListener("mouseleave", tip.hide);
      dot.addEventListener("click", function () { ctx.setState({step: p.step}); });
      chart.appendChild(dot);
    });
    box.appendChild(chart);
    return box;
  }

  // A cell opens the token view; sites without one (graphs, top-k rows, statistics) open their own.
  function openingView() {
    var order = ["token", "graph", "topk", "statistics", "image", "matrix"];
    for (var i = 0; i < order.length; i++) {
      if (document.querySelector('button.af-tab[data-view="' + order[i] + '"]')) return order[i];
    }
    return "token";
  }

  function renderOverview(container, ctx) {
    var kit = window.afViewKit;
    var site = ctx.site, state = ctx.state, summary = summaryOf(site);
    var root = el("div", {id: "af-overview", "class": "af-overview"});
    container.appendChild(root);
    var sample = state.sample || 0, step = state.step || 0;
    var key = "s" + sample + "/t" + step;
    var values = summary.values ? summary.values[key] : null;
    if (!values) {
      var payload = ctx.payload || (window.attnExplorer && window.attnExplorer.payload) || {};
      if (payload.mode === "server") {
        root.appendChild(el("p", {"class": "af-note", id: "af-overview-status"}, "computing the layer × head summary…"));
        return serverSummary(ctx, site, key, sample, step).then(function (answer) {
          summary.values = summary.values || {};
          summary.values[key] = answer.values[key];
          ["statistics", "labels", "from", "rows", "layers", "heads", "layer_index", "head_index"].forEach(function (n) {
            if (answer[n] !== undefined) summary[n] = answer[n];
          });
          summary.deferred = false;
          if (!root.isConnected) return;  // the page moved on meanwhile: its own render is shown
          container.textContent = "";
          return renderOverview(container, ctx);
        }, function (error) {
          root.textContent = "";
          root.appendChild(el("p", {"class": "af-error"}, "summary not available: " + error.message));
        });
      }
      root.appendChild(el("p", {"class": "af-note"}, "no summary for this sample and step in the page"));
      return;
    }
    var stats = summary.statistics;
    var stat = chosenStatistic[site.name];
    if (stats.indexOf(stat) < 0) stat = stats[0];

    var controls = el("div", {"class": "af-overview-controls", style: {margin: "4px 0"}});
    controls.appendChild(el("label", {"for": "af-overview-stat"}, "colour: "));
    var select = el("select", {id: "af-overview-stat"});
    stats.forEach(function (name) {
      var option = el("option", {value: name}, summary.labels[name] || name);
      if (name === stat) option.selected = true;
      select.appendChild(option);
    });
    select.addEventListener("change", function () {
      chosenStatistic[site.name] = select.value;
      container.textContent = "";
      renderOverview(container, ctx);
    });
    controls.appendChild(select);
    var payloadNow = ctx.payload || (window.attnExplorer && window.attnExplorer.payload) || {};
    var canShowMaps = site.layout === "dense" || (payloadNow.mode !== "server" && (site.layout === "topk" || site.layout === "edges"));
    if (canShowMaps && site.variables && site.variables.length) {
      var toggle = el("input", {type: "checkbox", id: "af-overview-maps"});
      toggle.checked = !!showMaps[site.name];
      toggle.addEventListener("change", function () {
        showMaps[site.name] = toggle.checked;
        container.textContent = "";
        renderOverview(container, ctx);
      });
      controls.appendChild(el("span", {style: {marginLeft: "12px"}}));
      controls.appendChild(toggle);
      controls.appendChild(el("label", {"for": "af-overview-maps"}, " show each head's map (small multiples, each on its own scale)"));
    }
    root.appendChild(controls);

    var table = values[stat];
    var flat = [];
    table.forEach(function (row) { row.forEach(function (v) { flat.push(v); }); });
    var range = kit.finiteRange(flat);
    var sc = kit.scale(range[0], range[1], false, ctx);
    root.appendChild(kit.colorbar(sc, summary.labels[stat] || stat, "af-overview-colorbar", ctx));

    var layers = summary.layer_index, heads = summary.head_index;
    var grid = el("div", {"class": "af-overview-grid", role: "grid",
                          style: {display: "inline-grid", gap: "2px", alignItems: "center",
                                  gridTemplateColumns: "max-content repeat(" + heads.length + ", 44px)"}});
    grid.appendChild(el("div", {"class": "af-overview-corner", style: {fontSize: "11px"}}, "layer \\ head"));
    heads.forEach(function (h, j) {
      grid.appendChild(el("div", {"class": "af-overview-head", style: {textAlign: "center", fontSize: "11px"}},
                          summary.heads[j]));
    });
    var tip = kit.tooltip(root, "af-overview-tip");
    var pending = [];   // cells waiting for their map (small multiples)
    var headMean = site.head_reduction === "mean" && !(site.dims && site.dims.head);
    layers.forEach(function (layer, i) {
      grid.appendChild(el("div", {"class": "af-overview-layer", style: {fontSize: "11px", paddingRight: "4px"}},
                          summary.layers[i]));
      heads.forEach(function (head, j) {
        var v = table[i][j];
        var headValue = headMean ? "mean" : head;
        var attrs = {"class": "af-overview-cell" + (v === null ? " af-absent" : ""), role: "gridcell",
                     "data-layer": layer, "data-head": headValue, "data-metric": stat,
                     "data-value": v === null ? "absent" : fmt(v, ctx), tabindex: 0,
                     style: {background: v === null ? "repeating-linear-gradient(45deg,#ddd,#ddd 3px,#fff 3px,#fff 6px)" : sc.css(v),
                             color: sc.ink(v), fontSize: "10px", textAlign: "center", padding: "6px 0",
                             cursor: "pointer", borderRadius: "2px"}};
        stats.forEach(function (name) {
          var w = values[name][i][j];
          attrs["data-" + name] = w === null ? "absent" : fmt(w, ctx);
        });
        if (state.layer === layer && (state.head === headValue || String(state.head) === String(headValue))) {
          attrs.style.outline = "2px solid #000";
          attrs["aria-selected"] = "true";
        }
        var thumbs = !!showMaps[site.name];
        if (thumbs) { attrs.style.padding = "3px"; attrs.style.width = "38px"; }
        var cell = el("div", attrs, thumbs ? null : kit.short(v));
        if (thumbs) pending.push({cell: cell, layer: layer, head: headValue});
        var lines = ["layer " + summary.layers[i] + ", head " + summary.heads[j]];
        stats.forEach(function (name) {
          var w = values[name][i][j];
          lines.push((summary.labels[name] || name) + ": " + (w === null ? "not captured" : fmt(w, ctx)));
        });
        var text = lines.join("\n");
        cell.addEventListener("mousemove", function (event) { tip.show(text, event); });
        cell.addEventListener("mouseleave", tip.hide);
        function open() { ctx.setState({layer: layer, head: headValue, view: openingView()}); }
        cell.addEventListener("click", open);
        cell.addEventListener("keydown", function (event) { if (event.key === "Enter") open(); });
        grid.appendChild(cell);
      });
    });
    root.appendChild(grid);
    root.appendChild(acrossSteps(ctx, summary, stat, sample) || el("span"));
    if (pending.length) {
      grid.style.gridTemplateColumns = "max-content repeat(" + heads.length + ", 44px)";
      var loads = pending.map(function (item) {
        var key = kit.mapKey({variable: state.variable, sample: sample, step: step, layer: item.layer, head: item.head});
        var get = ctx.getMap || window.attnExplorer.getMap;
        // A server page: a whole-map window pooled to 64 a side (a window has its own cache entry,
        // apart from the full-resolution map the token and matrix views fetch).
        var options = payloadNow.mode === "server" && site.dims.query && site.dims.key ?
          {max: 64, window: {q0: 0, q1: site.dims.query, k0: 0, k1: site.dims.key}} : undefined;
        return Promise.resolve(get(key, options)).then(function (map) {
          if (map) item.cell.appendChild(thumbnail(map, ctx, 38));
          else item.cell.appendChild(el("span", {"class": "af-note"}, "–"));
        }, function () { item.cell.appendChild(el("span", {"class": "af-note"}, "–")); });
      });
      root.appendChild(el("p", {"class": "af-note", style: {fontSize: "11px", color: "#555"}},
                          "cell border colour: the chosen statistic; inside: the head's " + state.variable +
                          " map (" + (payloadNow.mode === "server" ? "served at most 64 cells a side" : "every " +
                          "n-th cell when larger than 64") + ")"));
      return Promise.all(loads).then(function () { appendNote(); });
    }
    appendNote();

    function appendNote() {
      var where = [summary.from, summary.rows].filter(Boolean).join("; ");
      root.appendChild(el("p", {"class": "af-note", style: {fontSize: "11px", color: "#555"}},
                          where + ". Click a cell to open that layer and head (" + openingView() + " view)."));
    }
  }

  register("overview", {
    label: "overview",
    supports: function (site) {
      var summary = summaryOf(site);
      return !!(summary && (summary.deferred || (summary.statistics && summary.statistics.length)));
    },
    render: renderOverview
  });
})();
