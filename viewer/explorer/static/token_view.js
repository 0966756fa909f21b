/* Token view: queries in one column, keys in the other. Hovering a token shows, on every token of
 * the other side, its weight (data-weight, background opacity, a line); a click locks the choice.
 * Labels come from the file (cross-attention sites show their key_site's tokens as keys); token
 * groups (modalities, frames, prompt/generated) are marked; padding tokens are greyed. */
(function () {
  "use strict";
  var explorer = window.attnExplorer;

  function supports(site) {
    return (site.layout === "dense" || site.layout === "topk") && site.variables.length > 0 &&
      (site.dims.query || 0) > 0;
  }

  function render(container, ctx) {
    var site = ctx.site, state = ctx.state, map = ctx.map, el = ctx.el;
    var queries = ctx.labels.query, keys = ctx.labels.key;
    var signed = !!(site.signed_variables && site.signed_variables[state.variable]);
    var headColor = ctx.colors.head(state.head, site.head_labels.length);
    var view = el("div", { "class": "af-token-view" });
    var legend = el("p", { "class": "af-legend" });
    legend.appendChild(el("span", { "class": "af-swatch", style: "background:" + headColor }));
    legend.appendChild(document.createTextNode(
      "head " + (state.head === "mean" ? "mean" : site.head_labels[state.head]) + ": hover a token to see " +
      (signed ? "its values (red positive, blue negative)" : "its weights") + ", click to lock. " +
      (site.key_site ? "Keys are tokens of " + site.key_site + ". " : "") +
      (map && map.pool_q * map.pool_k > 1 ? "Values are blocks of " + map.pool_q + "×" + map.pool_k + ", " + map.pool + ". " : "")));
    var heads = site.head_labels.length;
    var allHeads = !!state.allHeads && heads > 1;
    if (heads > 1) {
      // Every head at once (one coloured cell per head beside each token), as bertviz shows them.
      var toggle = el("label", { "class": "af-all-heads" });
      var box = el("input", { type: "checkbox", id: "af-all-heads" });
      box.checked = allHeads;
      box.onchange = function () { ctx.setState({ allHeads: box.checked }); };
      toggle.appendChild(box);
      toggle.appendChild(document.createTextNode(" all heads"));
      legend.appendChild(toggle);
    }
    container.appendChild(legend);
    var queryColumn = el("div", { "class": "af-col af-col-query" });
    var keyColumn = el("div", { "class": "af-col af-col-key" });
    queryColumn.appendChild(el("div", { "class": "af-col-title" }, "queries" + (site.key_site ? " (" + site.name + ")" : "")));
    keyColumn.appendChild(el("div", { "class": "af-col-title" }, "keys" + (site.key_site ? " (" + site.key_site + ")" : "")));
    // Lines from the hovered token to the other side's tokens, drawn on a canvas between the columns.
    // The canvas sits absolutely inside its grid cell, so drawing on it never changes the layout.
    var gutter = el("div", { "class": "af-gutter" });
    var lines = el("canvas", { "class": "af-lines" });
    gutter.appendChild(lines);
    view.appendChild(queryColumn);
    view.appendChild(gutter);
    view.appendChild(keyColumn);
    container.appendChild(view);

    var tokens = { query: fill(queryColumn, "query", queries, site.groups.query, ctx.masks.query),
                   key: fill(keyColumn, "key", keys, site.groups.key, ctx.masks.key) };

    function fill(column, side, labels, groups, mask) {
      var starts = {};
      (groups || []).forEach(function (group, index) { starts[group.start] = { name: group.name, index: index }; });
      var spans = [];
      var groupIndex = -1;
      for (var i = 0; i < labels.length; i++) {
        if (starts[i]) {
          groupIndex = starts[i].index;
          column.appendChild(el("div", { "class": "af-group-label", "data-group": starts[i].name }, starts[i].name));
        }
        var span = el("span", { "class": "af-token", "data-side": side, "data-index": String(i) }, labels[i]);
        if (groupIndex >= 0) span.classList.add(groupIndex % 2 ? "af-group-odd" : "af-group-even");
        if (mask && !mask[i]) span.classList.add("af-pad");
        if (allHeads) {
          var row = el("div", { "class": "af-token-row" });
          var strip = el("span", { "class": "af-head-strip" });
          for (var h = 0; h < heads; h++) {
            strip.appendChild(el("span", { "class": "af-head-cell", "data-head": String(h) }));
          }
          span.strip = strip;
          // Strips next to the gutter, so each head's cells line up in a column.
          if (side === "query") { row.appendChild(span); row.appendChild(strip); }
          else { row.appendChild(strip); row.appendChild(span); }
          column.appendChild(row);
        } else {
          column.appendChild(span);
        }
        spans.push(span);
      }
      return spans;
    }

    var exact = map && map.pool_q === 1 && map.pool_k === 1;
    var pending = 0;

    /* The values along one token's row (query) or column (key). A served page whose map came back
     * pooled asks the server for that row or column at full resolution (one small read). */
    function valuesOf(side, index, head) {
      var count = tokens[side === "query" ? "key" : "query"].length;
      var source = map;
      if (head !== undefined && head !== state.head) {
        var key = ctx.mapKey({ variable: state.variable, sample: state.sample, step: state.step, layer: state.layer, head: head });
        return ctx.getMap(key).then(function (whole) {
          if (!whole || (whole.pool_q === 1 && whole.pool_k === 1) || ctx.payload.mode !== "server") return from(whole);
          return ctx.getMap(key, { window: rowWindow(), max: Math.max(count, 1), exact: true }).then(from);
        });
      }
      function rowWindow() {
        return side === "query" ? { q0: index, q1: index + 1, k0: 0, k1: count } : { q0: 0, q1: count, k0: index, k1: index + 1 };
      }
      function from(source) {
        var out = [];
        for (var other = 0; other < count; other++) {
          out.push(!source ? null : side === "query" ? source.at(index, other) : source.at(other, index));
        }
        return out;
      }
      if (!source || exact || ctx.payload.mode !== "server") return Promise.resolve(from(source));
      // exact=1: the server adds the stored float32 values of that one row or column.
      return ctx.getMap(ctx.mapKey(state), { window: rowWindow(), max: Math.max(count, 1), exact: true }).then(from);
    }

    function clear() {
      ["query", "key"].forEach(function (side) {
        tokens[side].forEach(function (span) {
          span.removeAttribute("data-weight");
          span.classList.remove("af-active", "af-locked", "af-absent");
          span.style.backgroundColor = "";
          if (span.strip) {
            for (var h = 0; h < span.strip.childNodes.length; h++) {
              var cell = span.strip.childNodes[h];
              cell.style.backgroundColor = "";
              cell.removeAttribute("data-weight");
              cell.classList.remove("af-absent");
            }
          }
        });
      });
      var pen = lines.getContext("2d");
      pen.clearRect(0, 0, lines.width, lines.height);
    }

    function highlight(side, index, locked) {
      clear();
      var source = tokens[side][index];
      if (!source) return Promise.resolve();
      source.classList.add(locked ? "af-locked" : "af-active");
      var ticket = ++pending;
      var painted = valuesOf(side, index).then(function (values) {
        if (ticket === pending && source.isConnected) paint(side, index, source, values);
      });
      if (allHeads) {
        var each = [];
        for (var h = 0; h < heads; h++) each.push(valuesOf(side, index, h));
        painted = Promise.all([painted, Promise.all(each)]).then(function (results) {
          if (ticket === pending && source.isConnected) paintHeads(side, results[1]);
        });
      }
      return painted.catch(function (error) { console.error(error); });
    }

    function paint(side, index, source, values) {
      var otherSide = side === "query" ? "key" : "query";
      var scale = 0;
      values.forEach(function (v) { if (v !== null) scale = Math.max(scale, Math.abs(v)); });
      var sourceBox = source.getBoundingClientRect();
      var linesBox = lines.getBoundingClientRect();
      lines.width = Math.max(1, Math.round(linesBox.width));
      lines.height = Math.max(1, Math.round(linesBox.height));
      var pen = lines.getContext("2d");
      // Read every position first, then write: interleaving would force a layout per token.
      var centres = tokens[otherSide].map(function (span, other) {
        if (values[other] === null || scale <= 0 || Math.abs(values[other]) / scale <= 0.02) return null;
        var targetBox = span.getBoundingClientRect();
        return targetBox.top + targetBox.height / 2 - linesBox.top;
      });
      var y1 = sourceBox.top + sourceBox.height / 2 - linesBox.top;
      tokens[otherSide].forEach(function (span, other) {
        var v = values[other];
        if (v === null) {
          span.setAttribute("data-weight", "");
          span.classList.add("af-absent");
          return;
        }
        span.setAttribute("data-weight", ctx.fmt(v));
        var t = scale > 0 ? Math.abs(v) / scale : 0;
        var colour = signed ? ctx.colors.css(ctx.colors.diverging(scale > 0 ? v / scale : 0)) : headColor;
        span.style.backgroundColor = signed ? colour : withAlpha(headColor, t);
        if (centres[other] !== null) {
          pen.globalAlpha = Math.min(1, 0.1 + t);
          pen.strokeStyle = colour;
          pen.lineWidth = 1 + 2 * t;
          pen.beginPath();
          pen.moveTo(side === "query" ? 0 : lines.width, y1);
          pen.lineTo(side === "query" ? lines.width : 0, centres[other]);
          pen.stroke();
        }
      });
    }

    function paintHeads(side, perHead) {
      var otherSide = side === "query" ? "key" : "query";
      perHead.forEach(function (values, head) {
        var scale = 0;
        values.forEach(function (v) { if (v !== null) scale = Math.max(scale, Math.abs(v)); });
        var colour = ctx.colors.head(head, heads);
        tokens[otherSide].forEach(function (span, other) {
          var cell = span.strip && span.strip.childNodes[head];
          if (!cell) return;
          var v = values[other];
          cell.classList.toggle("af-absent", v === null);
          cell.style.backgroundColor = v === null ? "" : signed
            ? ctx.colors.css(ctx.colors.diverging(scale > 0 ? v / scale : 0)) : withAlpha(colour, scale > 0 ? Math.abs(v) / scale : 0);
          cell.setAttribute("data-weight", v === null ? "" : ctx.fmt(v));
        });
      });
    }

    function withAlpha(hsl, t) {
      return hsl.replace("hsl(", "hsla(").replace(")", ", " + (0.08 + 0.92 * t).toFixed(3) + ")");
    }

    // One listener per view, not per token: thousands of tokens stay cheap to build.
    var hovered = null;
    function tokenOf(event) {
      var span = event.target && event.target.closest ? event.target.closest("span.af-token") : null;
      if (!span || !view.contains(span)) return null;
      return { side: span.getAttribute("data-side"), index: +span.getAttribute("data-index"), span: span };
    }

    view.addEventListener("mouseover", function (event) {
      var token = tokenOf(event);
      if (!token || token.span === hovered) return;
      hovered = token.span;
      if (state.locked) return;
      highlight(token.side, token.index, false);
    });

    view.addEventListener("mouseout", function (event) {
      var token = tokenOf(event);
      if (!token) return;
      var next = event.relatedTarget && event.relatedTarget.closest ? event.relatedTarget.closest("span.af-token") : null;
      if (next === token.span) return;
      hovered = null;
      if (state.locked) return;
      pending++;
      clear();
    });

    view.addEventListener("click", function (event) {
      var token = tokenOf(event);
      if (token) onClick({ side: token.side, index: token.index });
    });

    function onClick(token) {
      var locked = state.locked;
      if (locked && locked.side === token.side && locked.index === token.index) {
        state.locked = null;
        pending++;
        clear();
        return;
      }
      state.locked = token;
      highlight(token.side, token.index, true);
    }

    if (state.locked && tokens[state.locked.side] && tokens[state.locked.side][state.locked.index]) {
      return highlight(state.locked.side, state.locked.index, true);
    }
    return null;
  }

  explorer.registerView("token", { label: "tokens", supports: supports, render: render });
})();
