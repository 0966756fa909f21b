/* Matrix view: the map as a heatmap on a canvas, with a tooltip (labels and value), a colour bar
 * with its min and max, a diverging scale for signed variables (logits, bias), hatched cells where
 * there is no value (masked, padding, not an edge, not kept; a causal site's zero weights above the
 * diagonal), and zoom (drag a box, mouse wheel; double-click resets). Long sequences: an embedded
 * page holds pooled maps and labels each cell "block of a×b, mean"; under `attnformat serve` a
 * zoomed window is fetched again from the file at full resolution (or pooled to 512 a side). */
(function () {
  "use strict";
  var explorer = window.attnExplorer;
  var PLOT = 640, LABEL_MARGIN = 90, MIN_LABEL_CELL = 9, SERVER_MAX = 512;

  function supports(site) {
    return site.layout !== "statistics" && site.variables.length > 0;
  }

  function hatch(pen) {
    var tile = document.createElement("canvas");
    tile.width = tile.height = 8;
    var t = tile.getContext("2d");
    t.fillStyle = "#d9d9d9";
    t.fillRect(0, 0, 8, 8);
    t.strokeStyle = "#8c8c8c";
    t.lineWidth = 1;
    t.beginPath();
    t.moveTo(0, 8); t.lineTo(8, 0);
    t.moveTo(-2, 2); t.lineTo(2, -2);
    t.moveTo(6, 10); t.lineTo(10, 6);
    t.stroke();
    return pen.createPattern(tile, "repeat");
  }

  function render(container, ctx) {
    var site = ctx.site, state = ctx.state, el = ctx.el;
    var queries = ctx.labels.query, keys = ctx.labels.key;
    var nq = queries.length || (ctx.map ? ctx.map.q1 : 0), nk = keys.length || (ctx.map ? ctx.map.k1 : 0);
    var zoom = state.zoom;
    if (zoom) {
      zoom = { q0: clamp(zoom.q0, 0, nq - 1), q1: clamp(zoom.q1, 1, nq), k0: clamp(zoom.k0, 0, nk - 1), k1: clamp(zoom.k1, 1, nk) };
      if (zoom.q1 <= zoom.q0 || zoom.k1 <= zoom.k0) zoom = null;
    }
    var win = zoom || { q0: 0, q1: nq, k0: 0, k1: nk };
    var mapPromise = Promise.resolve(ctx.map);
    if (zoom && ctx.payload.mode === "server") {
      mapPromise = ctx.getMap(ctx.mapKey(state), { window: zoom, max: SERVER_MAX });
    }
    return mapPromise.then(function (map) { draw(container, ctx, map, win, nq, nk); });
  }

  function clamp(v, lo, hi) { return Math.max(lo, Math.min(hi, Math.round(Number(v)))); }

  function draw(container, ctx, map, win, nq, nk) {
    var site = ctx.site, state = ctx.state, el = ctx.el;
    var queries = ctx.labels.query, keys = ctx.labels.key;
    var signed = !!(site.signed_variables && site.signed_variables[state.variable]) || (map && map.min < 0);
    var rowsShown = win.q1 - win.q0, colsShown = win.k1 - win.k0;
    var cell = Math.min(PLOT / colsShown, PLOT / rowsShown, 48);
    var width = cell * colsShown, height = cell * rowsShown;
    var showLabels = cell >= MIN_LABEL_CELL;
    var left = showLabels ? LABEL_MARGIN : 4, top = showLabels ? LABEL_MARGIN : 4;

    var toolbar = el("div", { "class": "af-matrix-toolbar" });
    var reset = el("button", { id: "af-zoom-reset", type: "button" }, "reset zoom");
    reset.disabled = !state.zoom;
    reset.onclick = function () { ctx.setState({ zoom: null }); };
    toolbar.appendChild(reset);
    toolbar.appendChild(el("span", { "class": "af-zoom-text" },
      "queries " + win.q0 + "–" + (win.q1 - 1) + ", keys " + win.k0 + "–" + (win.k1 - 1) +
      " of " + nq + " × " + nk + " (drag a box or use the wheel to zoom; double-click resets)"));
    container.appendChild(toolbar);

    var frame = el("div", { "class": "af-matrix-frame" });
    var canvas = el("canvas", { id: "af-matrix" });
    canvas.width = Math.ceil(left + width + 2);
    canvas.height = Math.ceil(top + height + 2);
    frame.appendChild(canvas);
    var band = el("div", { "class": "af-band" });
    band.style.display = "none";
    frame.appendChild(band);
    var tooltip = el("div", { id: "af-tooltip", role: "status" });
    tooltip.style.display = "none";
    frame.appendChild(tooltip);
    container.appendChild(frame);

    var low = 0, high = 1, zoomedRange = false;
    if (map && map.min !== null && map.min !== undefined) {
      low = map.min; high = map.max;
      if (state.zoom) {
        // Zoomed in, the colours span the window's own values: detail a whole-map range would wash out.
        var seen = windowRange(map, win);
        if (seen) { low = seen[0]; high = seen[1]; zoomedRange = true; }
      }
      if (signed) { high = Math.max(Math.abs(low), Math.abs(high)); low = -high; }
    }
    container.appendChild(colorbar(ctx, low, high, signed, map, zoomedRange));

    var pen = canvas.getContext("2d");
    pen.fillStyle = hatch(pen);
    pen.fillRect(left, top, width, height);
    if (map) {
      var r0 = Math.max(0, Math.floor((win.q0 - map.q0) / map.pool_q));
      var r1 = Math.min(map.rows, Math.ceil((win.q1 - map.q0) / map.pool_q));
      var c0 = Math.max(0, Math.floor((win.k0 - map.k0) / map.pool_k));
      var c1 = Math.min(map.cols, Math.ceil((win.k1 - map.k0) / map.pool_k));
      if (r1 > r0 && c1 > c0) {
        var image = document.createElement("canvas");
        image.width = c1 - c0; image.height = r1 - r0;
        var imagePen = image.getContext("2d");
        var pixels = imagePen.createImageData(c1 - c0, r1 - r0);
        var data = pixels.data;
        var span = high - low;
        var causalShift = nk - nq;
        var exact = map.pool_q === 1 && map.pool_k === 1;
        for (var r = r0; r < r1; r++) {
          for (var c = c0; c < c1; c++) {
            var v = map.value(r, c);
            var at = ((r - r0) * (c1 - c0) + (c - c0)) * 4;
            // A causal site's weights above the diagonal are its mask, not attention: hatch them too.
            if (v === null || (site.causal && exact && v === 0 && (map.k0 + c) > (map.q0 + r) + causalShift)) {
              data[at + 3] = 0;
              continue;
            }
            var rgb = signed ? ctx.colors.diverging(high > 0 ? v / high : 0)
              : ctx.colors.sequential(span > 0 ? (v - low) / span : 0.5);
            data[at] = rgb[0]; data[at + 1] = rgb[1]; data[at + 2] = rgb[2]; data[at + 3] = 255;
          }
        }
        imagePen.putImageData(pixels, 0, 0);
        pen.save();
        pen.beginPath();
        pen.rect(left, top, width, height);
        pen.clip();
        pen.imageSmoothingEnabled = false;
        var x = left + ((map.k0 + c0 * map.pool_k) - win.k0) * cell;
        var y = top + ((map.q0 + r0 * map.pool_q) - win.q0) * cell;
        pen.drawImage(image, x, y, (c1 - c0) * map.pool_k * cell, (r1 - r0) * map.pool_q * cell);
        pen.restore();
      }
    }
    pen.strokeStyle = "#555";
    pen.lineWidth = 1;
    pen.strokeRect(left - 0.5, top - 0.5, width + 1, height + 1);
    drawGroups(pen, site, win, cell, left, top, width, height);
    if (showLabels) drawLabels(pen, queries, keys, win, cell, left, top);

    function cellAt(event) {
      var box = canvas.getBoundingClientRect();
      var x = (event.clientX - box.left) * (canvas.width / box.width) - left;
      var y = (event.clientY - box.top) * (canvas.height / box.height) - top;
      if (x < 0 || y < 0 || x >= width || y >= height) return null;
      return { q: win.q0 + Math.floor(y / cell), k: win.k0 + Math.floor(x / cell), x: x, y: y };
    }

    var dragStart = null;
    canvas.addEventListener("mousemove", function (event) {
      var hit = cellAt(event);
      if (dragStart && hit) {
        var q0 = Math.min(dragStart.q, hit.q), q1 = Math.max(dragStart.q, hit.q) + 1;
        var k0 = Math.min(dragStart.k, hit.k), k1 = Math.max(dragStart.k, hit.k) + 1;
        band.style.display = "block";
        band.style.left = (left + (k0 - win.k0) * cell) + "px";
        band.style.top = (top + (q0 - win.q0) * cell) + "px";
        band.style.width = ((k1 - k0) * cell) + "px";
        band.style.height = ((q1 - q0) * cell) + "px";
      }
      if (!hit || !map) { tooltip.style.display = "none"; return; }
      var row = Math.floor((hit.q - map.q0) / map.pool_q), col = Math.floor((hit.k - map.k0) / map.pool_k);
      var qStart = map.q0 + row * map.pool_q, kStart = map.k0 + col * map.pool_k;
      var value = map.value(row, col);
      var pooled = map.pool_q * map.pool_k > 1;
      var text = label(queries, pooled ? qStart : hit.q) + " → " + label(keys, pooled ? kStart : hit.k) + ": " +
        (value === null ? "absent (" + site.absent_note.replace(/^absent: /, "") + ")" : ctx.fmt(value));
      if (pooled) {
        text += "; block of " + map.pool_q + "×" + map.pool_k + ", " + map.pool + " (queries " + qStart + "–" +
          (Math.min(qStart + map.pool_q, nq) - 1) + ", keys " + kStart + "–" + (Math.min(kStart + map.pool_k, nk) - 1) + ")";
      } else if (site.causal && value === 0 && hit.k > hit.q + (nk - nq)) {
        text += " (causal mask)";
      }
      tooltip.textContent = text;
      tooltip.setAttribute("data-q", String(pooled ? qStart : hit.q));
      tooltip.setAttribute("data-k", String(pooled ? kStart : hit.k));
      tooltip.setAttribute("data-value", value === null ? "" : ctx.fmt(value));
      tooltip.style.display = "block";
      tooltip.style.left = Math.min(left + hit.x + 14, canvas.width - 40) + "px";
      tooltip.style.top = (top + hit.y + 14) + "px";
    });
    canvas.addEventListener("mouseleave", function () { tooltip.style.display = "none"; });
    canvas.addEventListener("mousedown", function (event) {
      dragStart = cellAt(event);
      event.preventDefault();
    });
    canvas.addEventListener("mouseup", function (event) {
      var start = dragStart, end = cellAt(event);
      dragStart = null;
      band.style.display = "none";
      if (!start || !end || (start.q === end.q && start.k === end.k)) return;
      ctx.setState({ zoom: { q0: Math.min(start.q, end.q), q1: Math.max(start.q, end.q) + 1,
                             k0: Math.min(start.k, end.k), k1: Math.max(start.k, end.k) + 1 } });
    });
    canvas.addEventListener("dblclick", function () { ctx.setState({ zoom: null }); });
    canvas.addEventListener("wheel", function (event) {
      var hit = cellAt(event);
      if (!hit) return;
      event.preventDefault();
      var factor = event.deltaY < 0 ? 0.6 : 1 / 0.6;
      var rows = Math.max(1, Math.round(rowsShown * factor)), cols = Math.max(1, Math.round(colsShown * factor));
      if (rows >= nq && cols >= nk) { if (ctx.state.zoom) ctx.setState({ zoom: null }); return; }
      rows = Math.min(rows, nq); cols = Math.min(cols, nk);
      var q0 = clamp(hit.q - (hit.q - win.q0) * rows / rowsShown, 0, nq - rows);
      var k0 = clamp(hit.k - (hit.k - win.k0) * cols / colsShown, 0, nk - cols);
      ctx.setState({ zoom: { q0: q0, q1: q0 + rows, k0: k0, k1: k0 + cols } });
    }, { passive: false });
  }

  function windowRange(map, win) {
    var r0 = Math.max(0, Math.floor((win.q0 - map.q0) / map.pool_q)), r1 = Math.min(map.rows, Math.ceil((win.q1 - map.q0) / map.pool_q));
    var c0 = Math.max(0, Math.floor((win.k0 - map.k0) / map.pool_k)), c1 = Math.min(map.cols, Math.ceil((win.k1 - map.k0) / map.pool_k));
    var low = Infinity, high = -Infinity;
    for (var r = r0; r < r1; r++) {
      for (var c = c0; c < c1; c++) {
        var v = map.value(r, c);
        if (v !== null) { if (v < low) low = v; if (v > high) high = v; }
      }
    }
    return low <= high ? [low, high] : null;
  }

  function label(labels, index) {
    return labels[index] !== undefined ? labels[index] : String(index);
  }

  function drawLabels(pen, queries, keys, win, cell, left, top) {
    pen.fillStyle = "#222";
    pen.font = Math.min(12, Math.floor(cell * 0.9)) + "px sans-serif";
    pen.textBaseline = "middle";
    pen.textAlign = "right";
    for (var q = win.q0; q < win.q1; q++) {
      pen.fillText(clip(label(queries, q)), left - 4, top + (q - win.q0 + 0.5) * cell);
    }
    pen.save();
    pen.textAlign = "left";
    for (var k = win.k0; k < win.k1; k++) {
      pen.save();
      pen.translate(left + (k - win.k0 + 0.5) * cell, top - 4);
      pen.rotate(-Math.PI / 2);
      pen.fillText(clip(label(keys, k)), 0, 0);
      pen.restore();
    }
    pen.restore();
  }

  function clip(text) { return text.length > 12 ? text.slice(0, 11) + "…" : text; }

  function drawGroups(pen, site, win, cell, left, top, width, height) {
    pen.strokeStyle = "rgba(0, 0, 0, 0.55)";
    pen.lineWidth = 1;
    pen.setLineDash([4, 3]);
    (site.groups.query || []).forEach(function (group) {
      if (group.start > win.q0 && group.start < win.q1) {
        var y = top + (group.start - win.q0) * cell;
        pen.beginPath(); pen.moveTo(left, y); pen.lineTo(left + width, y); pen.stroke();
      }
    });
    (site.groups.key || []).forEach(function (group) {
      if (group.start > win.k0 && group.start < win.k1) {
        var x = left + (group.start - win.k0) * cell;
        pen.beginPath(); pen.moveTo(x, top); pen.lineTo(x, top + height); pen.stroke();
      }
    });
    pen.setLineDash([]);
  }

  function colorbar(ctx, low, high, signed, map, zoomedRange) {
    var el = ctx.el, site = ctx.site;
    var bar = el("div", { id: "af-colorbar" });
    var stops = [];
    for (var i = 0; i <= 10; i++) {
      var rgb = signed ? ctx.colors.diverging(-1 + i / 5) : ctx.colors.sequential(i / 10);
      stops.push(ctx.colors.css(rgb) + " " + (i * 10) + "%");
    }
    var ramp = el("div", { "class": "af-ramp" });
    ramp.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
    bar.appendChild(el("span", { "class": "af-cb-min" }, ctx.fmt(low)));
    bar.appendChild(ramp);
    bar.appendChild(el("span", { "class": "af-cb-max" }, ctx.fmt(high)));
    bar.appendChild(el("span", { "class": "af-cb-what" },
      ctx.state.variable + (signed ? " (diverging, centred on 0)" : "") +
      (zoomedRange ? "; colours span the zoomed window" : "") +
      (map && map.pool_q * map.pool_k > 1 ? "; cells are blocks of " + map.pool_q + "×" + map.pool_k + ", " + map.pool : "")));
    var absent = el("span", { "class": "af-cb-absent" });
    absent.appendChild(el("span", { "class": "af-swatch af-hatched" }));
    absent.appendChild(document.createTextNode("hatched: no value (" + site.absent_note.replace(/^absent: /, "") +
      (site.causal ? "; causal mask above the diagonal" : "") + ")"));
    bar.appendChild(absent);
    return bar;
  }

  explorer.registerView("matrix", { label: "matrix", supports: supports, render: render });
})();
