/* attnformat explorer: an edge site as a node-link drawing (SVG). Nodes at the file's node_x/node_y
   when it stores them, else on a circle (in node order: deterministic). Each edge source -> target
   carries its value (data-weight); width and opacity grow with it. Hovering a node shows the
   weights of its incoming edges (what that node attends to); a click keeps them shown. */
(function () {
  "use strict";

  var MAX_LABELLED = 60;  // more nodes than this: labels on hover only
  var chosenExtra = {};   // per site: the time step (or node) shown
  var lockedNode = {};    // per site: the node whose incoming edges stay highlighted

  function edgesOf(site) {
    return site && site.extras && site.extras.edges ? site.extras.edges : null;
  }

  // Weights of every edge for the state (a head, or the mean of the heads' 8-bit values).
  function edgeValues(edges, state, extra, kit) {
    var variable = edges.variables.indexOf(state.variable) >= 0 ? state.variable : edges.variables[0];
    var key = variable + "/s" + (state.sample || 0) + "/t" + (state.step || 0) + "/l" + (state.layer || 0);
    var encoded = edges.values[key];
    if (!encoded) return null;
    var all = kit.decode(encoded);
    var count = edges.source.length, heads = edges.head_index.length;
    var out = new Float32Array(count);
    var mean = state.head === "mean" && heads > 1;
    var head = mean ? 0 : Math.max(0, edges.head_index.indexOf(Number(state.head)));
    for (var e = 0; e < count; e++) {
      if (!mean) {
        out[e] = all[(extra * heads + head) * count + e];
        continue;
      }
      var total = 0, n = 0;
      for (var h = 0; h < heads; h++) {
        var v = all[(extra * heads + h) * count + e];
        if (!isNaN(v)) { total += v; n += 1; }
      }
      out[e] = n ? total / n : NaN;
    }
    return {values: out, variable: variable, max_error: encoded.max_error, mean: mean};
  }

  function layout(edges, size, pad) {
    var n = edges.nodes.length, xs = [], ys = [], i;
    if (edges.x && edges.y) {
      var xr = [Infinity, -Infinity], yr = [Infinity, -Infinity];
      for (i = 0; i < n; i++) {
        xr = [Math.min(xr[0], edges.x[i]), Math.max(xr[1], edges.x[i])];
        yr = [Math.min(yr[0], edges.y[i]), Math.max(yr[1], edges.y[i])];
      }
      var span = Math.max(xr[1] - xr[0], yr[1] - yr[0]) || 1;
      for (i = 0; i < n; i++) {
        xs.push(pad + (size - 2 * pad) * ((edges.x[i] - xr[0]) / span));
        ys.push(size - pad - (size - 2 * pad) * ((edges.y[i] - yr[0]) / span));  // y grows upwards in the file
      }
    } else {
      for (i = 0; i < n; i++) {
        var angle = -Math.PI / 2 + 2 * Math.PI * i / Math.max(n, 1);
        xs.push(size / 2 + (size / 2 - pad) * Math.cos(angle));
        ys.push(size / 2 + (size / 2 - pad) * Math.sin(angle));
      }
    }
    return {x: xs, y: ys};
  }

  function render(container, ctx) {
    var kit = window.afViewKit, el = kit.el, svg = kit.svg;
    var site = ctx.site, state = ctx.state, edges = edgesOf(site);
    var root = el("div", {id: "af-graph-view", "class": "af-graph-view"});
    container.appendChild(root);
    var extra = 0;
    if (edges.extra) {
      extra = chosenExtra[site.name] || 0;
      if (extra >= edges.extra.labels.length) extra = 0;
      var controls = el("div", {"class": "af-graph-controls", style: {margin: "4px 0"}});
      controls.appendChild(el("label", {"for": "af-graph-extra"}, edges.extra.dim + ": "));
      var select = el("select", {id: "af-graph-extra"});
      edges.extra.labels.forEach(function (label, index) {
        var option = el("option", {value: index}, label);
        if (index === extra) option.selected = true;
        select.appendChild(option);
      });
      select.addEventListener("change", function () {
        chosenExtra[site.name] = Number(select.value);
        container.textContent = "";
        render(container, ctx);
      });
      controls.appendChild(select);
      root.appendChild(controls);
    }
    var found = edgeValues(edges, state, extra, kit);
    if (!found) {
      var status = el("p", {"class": "af-note"}, "reading the edge values…");
      root.appendChild(status);
      return kit.fetchLayer(ctx, site, "edges", state).then(function (asked) {
        if (!root.isConnected) return;  // the page moved on meanwhile
        if (asked && edgeValues(edges, state, extra, kit)) {
          container.textContent = "";
          return render(container, ctx);
        }
        status.textContent = "these edge values are not in the page (size budget: attnformat serve shows every layer)";
      }, function (error) { status.textContent = "edge values not available: " + error.message; });
    }
    var values = found.values;
    var range = kit.finiteRange(values);
    var signed = range[0] < 0 && (site.signed_variables ? !!site.signed_variables[found.variable] : true);
    var sc = kit.scale(signed ? range[0] : Math.min(0, range[0]), range[1], signed, ctx);
    var what = found.variable + (found.mean ? " (mean of heads)" : "") + ": source → target (what the target attends to)";
    root.appendChild(kit.colorbar(sc, what, "af-graph-colorbar", ctx));

    var size = 480, pad = 46, radius = 9;
    var pos = layout(edges, size, pad);
    var drawing = svg("svg", {id: "af-graph", width: size, height: size, viewBox: "0 0 " + size + " " + size,
                              role: "img", "aria-label": "node-link drawing of " + site.name,
                              "data-extra": edges.extra ? extra : null,
                              style: {border: "1px solid #ccc", background: "#fff"}});
    var defs = svg("defs");
    var marker = svg("marker", {id: "af-graph-arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
                                markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse",
                                orient: "auto-start-reverse"});
    marker.appendChild(svg("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#555"}));
    defs.appendChild(marker);
    drawing.appendChild(defs);
    var edgeLayer = svg("g", {"class": "af-graph-edges"});
    var nodeLayer = svg("g", {"class": "af-graph-nodes"});
    drawing.appendChild(edgeLayer);
    drawing.appendChild(nodeLayer);
    var tip = kit.tooltip(root, "af-graph-tip");
    var peak = Math.max(Math.abs(range[0]), Math.abs(range[1])) || 1;
    var edgeNodes = [];
    var labels = edges.nodes;
    for (var e = 0; e < edges.source.length; e++) {
      var s = edges.source[e], t = edges.target[e], v = values[e];
      var absent = isNaN(v);
      var strength = absent ? 0 : Math.abs(v) / peak;
      var d;
      if (s === t) {  // a self-loop: a small circle outside the node, away from the centre
        var ox = pos.x[s] - size / 2, oy = pos.y[s] - size / 2, len = Math.sqrt(ox * ox + oy * oy) || 1;
        var cx = pos.x[s] + ox / len * radius * 1.6, cy = pos.y[s] + oy / len * radius * 1.6;
        d = "M " + (cx - 0.1) + " " + (cy - radius * 0.8) + " A " + radius * 0.8 + " " + radius * 0.8 +
            " 0 1 1 " + cx + " " + (cy - radius * 0.8);
      } else {  // bend to the right of the direction so that s -> t and t -> s do not overlap
        var x1 = pos.x[s], y1 = pos.y[s], x2 = pos.x[t], y2 = pos.y[t];
        var dx = x2 - x1, dy = y2 - y1, dist = Math.sqrt(dx * dx + dy * dy) || 1;
        var ux = dx / dist, uy = dy / dist;
        x1 += ux * radius; y1 += uy * radius; x2 -= ux * (radius + 2); y2 -= uy * (radius + 2);
        var mx = (x1 + x2) / 2 - uy * dist * 0.12, my = (y1 + y2) / 2 + ux * dist * 0.12;
        d = "M " + x1.toFixed(1) + " " + y1.toFixed(1) + " Q " + mx.toFixed(1) + " " + my.toFixed(1) + " " +
            x2.toFixed(1) + " " + y2.toFixed(1);
      }
      var path = svg("path", {"class": "af-edge" + (absent ? " af-absent" : ""), d: d, fill: "none",
                              "data-edge": e, "data-source": s, "data-target": t,
                              "data-weight": absent ? "absent" : kit.fmt(v, ctx),
                              stroke: absent ? "#999" : sc.css(v), "stroke-width": (0.6 + 5 * strength).toFixed(2),
                              "stroke-opacity": (0.25 + 0.75 * strength).toFixed(3),
                              "stroke-dasharray": absent ? "3 3" : null,
                              "marker-end": s === t ? null : "url(#af-graph-arrow)"});
      path.appendChild(svg("title", null, labels[s] + " → " + labels[t] + ": " + (absent ? "absent" : kit.fmt(v, ctx))));
      (function (s, t, v, absent) {
        path.addEventListener("mousemove", function (event) {
          tip.show(labels[s] + " → " + labels[t] + ": " + (absent ? "absent (not captured)" : kit.fmt(v, ctx)), event);
        });
        path.addEventListener("mouseleave", tip.hide);
      })(s, t, v, absent);
      edgeLayer.appendChild(path);
      edgeNodes.push(path);
    }

    var panel = el("div", {id: "af-graph-incoming", "class": "af-graph-incoming",
                           style: {font: "12px sans-serif", minWidth: "220px", marginLeft: "12px"}});
    function showIncoming(node) {
      panel.textContent = "";
      edgeNodes.forEach(function (path) {
        var incoming = node !== null && Number(path.getAttribute("data-target")) === node;
        path.classList.toggle("af-highlight", incoming);
        path.style.opacity = node === null || incoming ? "" : "0.12";
      });
      nodeLayer.querySelectorAll(".af-node").forEach(function (g) {
        g.classList.toggle("af-highlight", node !== null && Number(g.getAttribute("data-node")) === node);
      });
      if (node === null) {
        panel.appendChild(el("p", {"class": "af-note"}, "hover a node to list the weights of its incoming edges; click to keep them"));
        return;
      }
      panel.appendChild(el("div", {style: {fontWeight: "bold", marginBottom: "4px"}}, labels[node] + " attends to:"));
      var rows = [];
      for (var e = 0; e < edges.source.length; e++) if (edges.target[e] === node) rows.push(e);
      rows.sort(function (a, b) {
        var va = isNaN(values[a]) ? -Infinity : values[a], vb = isNaN(values[b]) ? -Infinity : values[b];
        return vb - va || a - b;
      });
      if (!rows.length) panel.appendChild(el("div", null, "no incoming edges"));
      var list = el("table", {"class": "af-graph-list"});
      rows.forEach(function (e) {
        var v = values[e];
        var row = el("tr", {"class": "af-incoming", "data-edge": e, "data-source": edges.source[e],
                            "data-target": node, "data-weight": isNaN(v) ? "absent" : kit.fmt(v, ctx)});
        row.appendChild(el("td", null, labels[edges.source[e]]));
        row.appendChild(el("td", {style: {textAlign: "right", paddingLeft: "8px"}}, isNaN(v) ? "absent" : kit.fmt(v, ctx)));
        list.appendChild(row);
      });
      panel.appendChild(list);
    }

    labels.forEach(function (label, i) {
      var g = svg("g", {"class": "af-node", "data-node": i, tabindex: 0, style: {cursor: "pointer"}});
      g.appendChild(svg("circle", {cx: pos.x[i].toFixed(1), cy: pos.y[i].toFixed(1), r: radius,
                                   fill: "#f0f0f0", stroke: "#333", "stroke-width": 1.2}));
      var ox = pos.x[i] - size / 2, oy = pos.y[i] - size / 2, len = Math.sqrt(ox * ox + oy * oy) || 1;
      var tx = pos.x[i] + ox / len * (radius + 14), ty = pos.y[i] + oy / len * (radius + 14) + 4;
      // Many nodes: labels would overlap, so each node names itself on hover (its title) instead.
      g.appendChild(svg("text", {"class": "af-node-label", x: tx.toFixed(1), y: ty.toFixed(1), "text-anchor": "middle",
                                 "font-size": 11, "font-family": "sans-serif",
                                 visibility: labels.length > MAX_LABELLED ? "hidden" : null}, label));
      g.appendChild(svg("title", null, label));
      g.addEventListener("mouseenter", function () { showIncoming(i); });
      g.addEventListener("focus", function () { showIncoming(i); });
      g.addEventListener("keydown", function (event) {
        if (event.key === "Enter") g.dispatchEvent(new MouseEvent("click"));
      });
      g.addEventListener("mouseleave", function () {
        showIncoming(lockedNode[site.name] === undefined ? null : lockedNode[site.name]);
      });
      g.addEventListener("click", function () {
        lockedNode[site.name] = lockedNode[site.name] === i ? undefined : i;
        showIncoming(lockedNode[site.name] === undefined ? null : lockedNode[site.name]);
      });
      nodeLayer.appendChild(g);
    });
    var row = el("div", {style: {display: "flex", alignItems: "flex-start"}});
    row.appendChild(drawing);
    row.appendChild(panel);
    root.appendChild(row);
    var locked = lockedNode[site.name];
    showIncoming(locked === undefined || locked >= labels.length ? null : locked);
    var notes = [edges.x ? "nodes at the file's node_x/node_y" : "nodes on a circle, in node order",
                 "edge width and opacity grow with |value|; arrows point from source to target",
                 "values are 8-bit (± " + kit.fmt(found.max_error, ctx) + ")", edges.absent || ""];
    root.appendChild(el("p", {"class": "af-note", style: {fontSize: "11px", color: "#555"}},
                        notes.filter(Boolean).join("; ")));
  }

  var spec = {label: "graph", supports: function (site) { return !!edgesOf(site); }, render: render};
  if (window.attnExplorer && window.attnExplorer.registerView) window.attnExplorer.registerView("graph", spec);
  else document.addEventListener("DOMContentLoaded", function () { window.attnExplorer.registerView("graph", spec); });
})();
