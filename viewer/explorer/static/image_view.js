/* attnformat explorer: a ViT site's attention of one query over the image's patches.
   The stored image (or a plain grid when the file has none) with the query's row of the current
   map drawn over its patches; one element per patch carries the value. No library, no network. */
(function () {
  "use strict";

  var chosenQuery = {};   // per site: the query row shown
  var opacity = {};       // per site: the overlay's opacity
  var chosenSource = {};  // per site: "map" (the chosen layer and head) or "rollout" (every layer)

  // The rollout matrix of (sample, step) as a map-like object (at(q, k) -> value or null).
  function rolloutMap(patches, state, kit) {
    var encoded = patches.rollout && patches.rollout["s" + (state.sample || 0) + "/t" + (state.step || 0)];
    if (!encoded) return null;
    var values = kit.decode(encoded);
    return {rows: encoded.rows, cols: encoded.cols, pool_q: 1, pool_k: 1, max_error: encoded.max_error,
            at: function (q, k) {
              if (q < 0 || k < 0 || q >= encoded.rows || k >= encoded.cols) return null;
              var v = values[q * encoded.cols + k];
              return isNaN(v) ? null : v;
            }};
  }

  function patchesOf(site) {
    return site && site.extras && site.extras.patches ? site.extras.patches : null;
  }

  // A per-sample entry; coordinates shared by every sample are stored once (as s0).
  function perSample(table, sample, shared) {
    if (!table) return null;
    if (table["s" + sample]) return table["s" + sample];
    return shared ? table[Object.keys(table)[0]] : null;
  }

  function render(container, ctx) {
    var kit = window.afViewKit, el = kit.el;
    var site = ctx.site, state = ctx.state, patches = patchesOf(site);
    var sample = state.sample || 0;
    var root = el("div", {id: "af-image-view", "class": "af-image-view"});
    container.appendChild(root);
    var queryLabels = (site.query_labels && site.query_labels[sample]) || [];
    var keyLabels = (site.key_labels && site.key_labels[sample]) || [];
    var query = chosenQuery[site.name];
    if (state.locked && state.locked.side === "query") query = state.locked.index;
    if (query === undefined || query === null || query >= queryLabels.length) query = patches.default_query || 0;

    var controls = el("div", {"class": "af-image-controls", style: {margin: "4px 0"}});
    controls.appendChild(el("label", {"for": "af-image-query"}, "query: "));
    var select = el("select", {id: "af-image-query"});
    queryLabels.forEach(function (label, index) {
      var option = el("option", {value: index}, kit.labelOf(queryLabels, index));
      if (index === query) option.selected = true;
      select.appendChild(option);
    });
    select.addEventListener("change", function () {
      chosenQuery[site.name] = Number(select.value);
      if (state.locked && state.locked.side === "query") {
        ctx.setState({locked: null});  // the chooser wins over a locked token from the token view
      } else {
        container.textContent = "";
        render(container, ctx);
      }
    });
    controls.appendChild(select);
    var alpha = opacity[site.name] === undefined ? 0.5 : opacity[site.name];
    var png = perSample(patches.images, sample, !!patches.image_shared);
    if (png) {
      controls.appendChild(el("label", {"for": "af-image-alpha", style: {marginLeft: "12px"}}, "overlay opacity: "));
      var slider = el("input", {id: "af-image-alpha", type: "range", min: 0, max: 1, step: 0.05, value: alpha});
      slider.addEventListener("input", function () {
        opacity[site.name] = Number(slider.value);
        root.querySelectorAll(".af-patch").forEach(function (cell) {
          cell.style.opacity = slider.value;
        });
      });
      controls.appendChild(slider);
    }
    var source = patches.rollout && chosenSource[site.name] === "rollout" ? "rollout" : "map";
    if (patches.rollout) {
      controls.appendChild(el("label", {"for": "af-image-source", style: {marginLeft: "12px"}}, "show: "));
      var sourceSelect = el("select", {id: "af-image-source"});
      [["map", "this layer and head"], ["rollout", "rollout over all layers (head mean)"]].forEach(function (pair) {
        var option = el("option", {value: pair[0]}, pair[1]);
        if (pair[0] === source) option.selected = true;
        sourceSelect.appendChild(option);
      });
      sourceSelect.addEventListener("change", function () {
        chosenSource[site.name] = sourceSelect.value;
        container.textContent = "";
        render(container, ctx);
      });
      controls.appendChild(sourceSelect);
    }
    root.appendChild(controls);
    var status = el("p", {"class": "af-note"}, "reading the map…");
    root.appendChild(status);

    var reading = source === "rollout" ? Promise.resolve(rolloutMap(patches, state, kit)) : kit.currentMap(ctx);
    return reading.then(function (map) {
      status.remove();
      if (!map) {
        root.appendChild(el("p", {"class": "af-note"}, source === "rollout" ?
          "the rollout of this sample and step is not in the page" : "this map is not in the page"));
        return;
      }
      var rowsOf = perSample(patches.key_row, sample, true), colsOf = perSample(patches.key_col, sample, true);
      var gridRows = patches.grid[0], gridCols = patches.grid[1];
      var poolQ = map.pool_q || 1, poolK = map.pool_k || 1;
      var cells = [];   // {row, col, key, value}
      var values = [];
      for (var k = 0; k < rowsOf.length; k++) {
        if (rowsOf[k] < 0 || colsOf[k] < 0) continue;
        var v = map.at(query, k);
        v = v === null || v === undefined ? NaN : v;
        cells.push({row: rowsOf[k], col: colsOf[k], key: k, value: v});
        values.push(v);
      }
      var range = kit.finiteRange(values);
      var signed = source === "map" && (site.signed_variables ? !!site.signed_variables[state.variable] : !!site.signed);
      var sc = kit.scale(range[0], range[1], signed && range[0] < 0, ctx);
      var label = (source === "rollout" ? "rollout" : state.variable) + " of " + kit.labelOf(queryLabels, query) + " → patches";
      root.appendChild(kit.colorbar(sc, label, "af-image-colorbar", ctx));

      var side = 360;
      var aspect = patches.image_shape ? patches.image_shape[1] / patches.image_shape[0] : gridCols / gridRows;
      var width = aspect >= 1 ? side : Math.round(side * aspect);
      var height = aspect >= 1 ? Math.round(side / aspect) : side;
      var frame = el("div", {id: "af-image", "data-query": query, "data-source": source, "data-rows": gridRows, "data-cols": gridCols,
                             "data-pool-q": poolQ, "data-pool-k": poolK,
                             style: {position: "relative", width: width + "px", height: height + "px",
                                     border: "1px solid #999", background: "#f4f4f4"}});
      if (png) {
        frame.appendChild(el("img", {src: "data:image/png;base64," + png, alt: "the stored input image",
                                     "class": "af-image-picture",
                                     style: {position: "absolute", left: 0, top: 0, width: "100%", height: "100%",
                                             imageRendering: "pixelated"}}));
      }
      var tip = kit.tooltip(root, "af-image-tip");
      cells.forEach(function (cell) {
        var absent = isNaN(cell.value);
        var patch = el("div", {"class": "af-patch" + (absent ? " af-absent" : ""),
                               "data-row": cell.row, "data-col": cell.col, "data-key": cell.key,
                               "data-weight": absent ? "absent" : kit.fmt(cell.value, ctx),
                               style: {position: "absolute",
                                       left: (100 * cell.col / gridCols) + "%", top: (100 * cell.row / gridRows) + "%",
                                       width: (100 / gridCols) + "%", height: (100 / gridRows) + "%",
                                       boxSizing: "border-box", border: png ? "none" : "1px solid #fff",
                                       opacity: png ? alpha : 1,
                                       background: absent ? "repeating-linear-gradient(45deg,#bbb,#bbb 3px,transparent 3px,transparent 6px)"
                                                          : sc.css(cell.value)}});
        var text = kit.labelOf(queryLabels, query) + " → " + kit.labelOf(keyLabels, cell.key) +
                   " (patch " + cell.row + "," + cell.col + "): " + (absent ? "no value" : kit.fmt(cell.value, ctx));
        if (poolQ * poolK > 1) text += "\nblock of " + poolQ + "×" + poolK + ", " + (map.pool || "mean");
        patch.addEventListener("mousemove", function (event) { tip.show(text, event); });
        patch.addEventListener("mouseleave", tip.hide);
        frame.appendChild(patch);
      });
      root.appendChild(frame);
      var notes = [];
      if (png && patches.image_note) notes.push(patches.image_note);
      if (!png) notes.push(patches.image ? "the image of this sample is not in the page: patches drawn on their grid"
                                         : "the file stores no image: patches drawn on their grid");
      var outside = rowsOf.length - cells.length;
      if (outside > 0) notes.push(outside + " key(s) are no patch (e.g. CLS) and are not drawn");
      if (poolQ * poolK > 1) notes.push("map shown in blocks of " + poolQ + "×" + poolK);
      if (source === "rollout") notes.push((patches.rollout_note || "attention rollout") + "; 8-bit (± " +
                                           kit.fmt(map.max_error, ctx) + "); the layer and head selectors do not apply");
      root.appendChild(el("p", {"class": "af-note", style: {fontSize: "11px", color: "#555"}}, notes.join("; ")));
    });
  }

  var spec = {label: "image", supports: function (site) { return !!patchesOf(site); }, render: render};
  if (window.attnExplorer && window.attnExplorer.registerView) window.attnExplorer.registerView("image", spec);
  else document.addEventListener("DOMContentLoaded", function () { window.attnExplorer.registerView("image", spec); });
})();
