/* attnformat explorer core: payload decoding, state, selectors, view tabs, window.attnExplorer.
 *
 * Hand-written, no framework and no library: the page must open offline from disk and stay small
 * (a framework would cost more bytes than all of this page's code), and every label is inserted
 * with textContent only, never as HTML. Python selects and encodes the data (payload.py); this file
 * only decodes and draws. Views (token_view.js, matrix_view.js, and others) register themselves
 * with attnExplorer.registerView before the first render, which waits for DOMContentLoaded.
 */
(function () {
  "use strict";

  var started = performance.now();
  var ABSENT = 255;
  var LONG_SEQUENCE = 1024;
  var payload = JSON.parse(document.getElementById("af-data").textContent);
  var views = {};
  var viewOrder = [];
  var cache = {};
  var resolveReady, rejectReady;
  var ready = new Promise(function (resolve, reject) { resolveReady = resolve; rejectReady = reject; });
  var renderCount = 0;
  var rendering = Promise.resolve();

  // -- decoding ---------------------------------------------------------------------------------

  function bytesOf(text) {
    var binary = atob(text);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  /* The codes of an encoded map; deflated ones are inflated by the browser (DecompressionStream). */
  function codesOf(encoded) {
    var bytes = bytesOf(encoded.q);
    if (encoded.compression !== "deflate") return Promise.resolve(bytes);
    if (typeof DecompressionStream === "undefined") {
      return Promise.reject(new Error("this browser cannot inflate the page's maps (no DecompressionStream)"));
    }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(function (buffer) { return new Uint8Array(buffer); });
  }

  /* An encoded map (payload or /api/map) as an object that answers value(row, col) in its own cells. */
  function decodeMap(encoded, key, inflated) {
    var codes = inflated || bytesOf(encoded.q);
    if (!inflated && encoded.compression === "deflate") throw new Error("a deflated map: use getMap or decodeMapAsync");
    if (codes.length !== encoded.rows * encoded.cols) throw new Error("map " + key + " has " + codes.length + " codes, not " + encoded.rows + " × " + encoded.cols);
    var map = {
      key: key || null,
      rows: encoded.rows, cols: encoded.cols,
      scale: encoded.scale, offset: encoded.offset, max_error: encoded.max_error,
      min: encoded.min, max: encoded.max,
      pool_q: encoded.pool_q || 1, pool_k: encoded.pool_k || 1, pool: encoded.pool || null,
      q0: encoded.q0 || 0, k0: encoded.k0 || 0,
      codes: codes
    };
    map.q1 = encoded.q1 != null ? encoded.q1 : map.q0 + map.rows * map.pool_q;
    map.k1 = encoded.k1 != null ? encoded.k1 : map.k0 + map.cols * map.pool_k;
    // A served row or column asked with exact=1 also carries the stored float32 values ("f32").
    var exact = encoded.f32 ? new Float32Array(bytesOf(encoded.f32).buffer) : null;
    map.exact = !!exact;
    map.value = function (row, col) {
      if (row < 0 || col < 0 || row >= map.rows || col >= map.cols) return null;
      if (exact) {
        var stored = exact[row * map.cols + col];
        return isNaN(stored) ? null : stored;
      }
      var code = codes[row * map.cols + col];
      return code === ABSENT ? null : map.offset + map.scale * code;
    };
    /* The value at file position (q, k): the cell, or the pooled block, that holds it. */
    map.at = function (q, k) {
      return map.value(Math.floor((q - map.q0) / map.pool_q), Math.floor((k - map.k0) / map.pool_k));
    };
    return map;
  }

  function decodeMapAsync(encoded, key) {
    return codesOf(encoded).then(function (codes) { return decodeMap(encoded, key, codes); });
  }

  /* Values of an uncompressed encoded map (NaN where absent), synchronously, for the views' own data. */
  function decode(encoded) {
    if (encoded.compression === "deflate") throw new Error("a deflated map: use attnExplorer.decodeMapAsync");
    var codes = bytesOf(encoded.q);
    var out = new Float32Array(codes.length);
    for (var i = 0; i < codes.length; i++) {
      out[i] = codes[i] === ABSENT ? NaN : encoded.offset + encoded.scale * codes[i];
    }
    return out;
  }

  // -- helpers the views share ------------------------------------------------------------------

  function fmt(value) {
    if (value === null || value === undefined || !isFinite(value)) return "absent";
    return String(Number(value.toPrecision(6)));
  }

  var SEQUENTIAL = [[255, 255, 229], [254, 227, 145], [254, 153, 41], [217, 95, 14], [153, 52, 4], [68, 20, 4]];
  var DIVERGING_NEG = [33, 102, 172], DIVERGING_POS = [178, 24, 43];
  function lerp(a, b, t) { return [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]; }
  var colors = {
    sequential: function (t) {
      t = Math.min(Math.max(t, 0), 1) * (SEQUENTIAL.length - 1);
      var i = Math.min(Math.floor(t), SEQUENTIAL.length - 2);
      return lerp(SEQUENTIAL[i], SEQUENTIAL[i + 1], t - i);
    },
    diverging: function (t) {
      t = Math.min(Math.max(t, -1), 1);
      return t < 0 ? lerp([247, 247, 247], DIVERGING_NEG, -t) : lerp([247, 247, 247], DIVERGING_POS, t);
    },
    head: function (head, count) {
      if (head === "mean") return "hsl(0, 0%, 35%)";
      var hue = (Number(head) * 360 / Math.max(count || 1, 1) + 200) % 360;
      return "hsl(" + hue.toFixed(0) + ", 70%, 45%)";
    },
    css: function (rgb) { return "rgb(" + Math.round(rgb[0]) + "," + Math.round(rgb[1]) + "," + Math.round(rgb[2]) + ")"; }
  };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) for (var name in attrs) if (attrs[name] !== null && attrs[name] !== undefined) node.setAttribute(name, attrs[name]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // -- sites and state --------------------------------------------------------------------------

  function siteNamed(name) {
    for (var i = 0; i < payload.sites.length; i++) if (payload.sites[i].name === name) return payload.sites[i];
    return payload.sites[0];
  }
  function currentSite() { return siteNamed(api.state.site); }

  function hasMean(site) { return !!site.head_reduction || site.head_labels.length > 1; }
  function hasMaps(site) { return site.layout !== "statistics" && site.variables.length > 0; }

  function defaultState(site, previous) {
    previous = previous || {};
    var head = site.head_labels.length ? 0 : "mean";
    if (previous.head === "mean" && hasMean(site)) head = "mean";
    else if (typeof previous.head === "number" && previous.head < site.head_labels.length) head = previous.head;
    return {
      site: site.name,
      variable: site.variable,
      sample: site.samples.length ? site.samples[0] : 0,
      step: 0,
      layer: (typeof previous.layer === "number" && previous.layer < site.layer_labels.length) ? previous.layer
        : (site.embedded_layers && site.embedded_layers.length ? site.embedded_layers[0] : 0),
      head: head,
      view: null,
      locked: null,
      zoom: null
    };
  }

  function mapKey(state) {
    return state.variable + "/s" + state.sample + "/t" + state.step + "/l" + state.layer + "/h" + state.head;
  }

  function parseKey(key) {
    var parts = key.split("/");
    var head = parts[4].slice(1);
    return { variable: parts[0], sample: +parts[1].slice(1), step: +parts[2].slice(1), layer: +parts[3].slice(1),
             head: head === "mean" ? "mean" : +head };
  }

  /* A map of the current site (or options.site): embedded maps are decoded once and cached; in
   * server mode GET /api/map returns the map (or a window q0..q1 x k0..k1 of it, options.window). */
  function getMap(key, options) {
    options = options || {};
    var site = options.site ? siteNamed(options.site) : currentSite();
    var win = options.window || null;
    var cacheKey = site.name + "|" + key + (win ? "|" + [win.q0, win.q1, win.k0, win.k1].join(",") : "") +
      (options.exact ? "|exact" : "");
    if (cache[cacheKey]) return Promise.resolve(cache[cacheKey]);
    if (payload.mode === "server") {
      var parts = parseKey(key);
      var query = new URLSearchParams({ site: site.name, variable: parts.variable, sample: parts.sample, step: parts.step,
                                        layer: parts.layer, head: parts.head, max: options.max || 512 });
      if (win) { query.set("q0", win.q0); query.set("q1", win.q1); query.set("k0", win.k0); query.set("k1", win.k1); }
      if (options.exact) query.set("exact", "1");
      return fetch("api/map?" + query.toString()).then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body && body.error ? body.error : "HTTP " + response.status);
          return decodeMapAsync(body, key);
        }).then(function (map) {
          cache[cacheKey] = map;
          return map;
        });
      });
    }
    var encoded = site.maps[key];
    if (!encoded) return Promise.resolve(null);
    return decodeMapAsync(encoded, key).then(function (decoded) {
      cache[cacheKey] = decoded;
      return decoded;
    });
  }

  // -- controls -----------------------------------------------------------------------------------

  var root, controls, tabs, container, info, errorBox;

  function option(select, value, text, disabled) {
    var node = el("option", { value: String(value) }, text);
    if (disabled) node.disabled = true;
    select.appendChild(node);
    return node;
  }

  function labelled(text, control) {
    var wrap = el("label", { "class": "af-control" });
    wrap.appendChild(el("span", null, text));
    wrap.appendChild(control);
    return wrap;
  }

  function embeddedHas(site, prefix) {
    if (payload.mode === "server") return true;
    for (var key in site.maps) if (key.indexOf(prefix) === 0) return true;
    return false;
  }

  function buildControls() {
    var site = currentSite();
    var state = api.state;
    controls.textContent = "";
    var siteSelect = el("select", { id: "af-site" });
    payload.sites.forEach(function (s) { option(siteSelect, s.name, s.name + " (" + s.layout + ")"); });
    siteSelect.value = site.name;
    siteSelect.onchange = function () { setState({ site: siteSelect.value }); };
    controls.appendChild(labelled("site", siteSelect));

    var variableSelect = el("select", { id: "af-variable" });
    // A statistics site has no maps to choose among (its view shows every statistic).
    if (site.layout === "statistics") variableSelect.hidden = true;
    site.variables.forEach(function (v) {
      var shown = payload.mode === "server" || (site.embedded_variables || []).indexOf(v) >= 0;
      option(variableSelect, v, shown ? v : v + " (not embedded)", !shown);
    });
    variableSelect.value = state.variable;
    variableSelect.onchange = function () { setState({ variable: variableSelect.value }); };
    var variableControl = labelled("variable", variableSelect);
    if (site.layout === "statistics") variableControl.hidden = true;
    controls.appendChild(variableControl);

    if ((site.dims.sample || 0) > 1 || site.samples.length > 1) {
      var sampleSelect = el("select", { id: "af-sample" });
      site.samples.forEach(function (s) { option(sampleSelect, s, String(s)); });
      sampleSelect.value = String(state.sample);
      sampleSelect.onchange = function () { setState({ sample: +sampleSelect.value }); };
      controls.appendChild(labelled("sample", sampleSelect));
    }

    var layerSelect = el("select", { id: "af-layer" });
    site.layer_labels.forEach(function (label, i) {
      var shown = !hasMaps(site) || embeddedHas(site, state.variable + "/s" + state.sample + "/t" + state.step + "/l" + i + "/");
      option(layerSelect, i, shown ? label : label + " (not embedded)", !shown);
    });
    layerSelect.value = String(state.layer);
    layerSelect.onchange = function () { setState({ layer: +layerSelect.value }); };
    controls.appendChild(labelled("layer", layerSelect));

    var headSelect = el("select", { id: "af-head" });
    if (hasMean(site)) option(headSelect, "mean", site.head_reduction ? "mean (stored)" : "mean");
    site.head_labels.forEach(function (label, i) {
      var shown = !hasMaps(site) || embeddedHas(site, mapKey({ variable: state.variable, sample: state.sample, step: state.step,
                                                                   layer: state.layer, head: i }));
      var node = option(headSelect, i, shown ? label : label + " (not embedded)", !shown);
      node.style.color = colors.head(i, site.head_labels.length);
    });
    headSelect.value = String(state.head);
    headSelect.onchange = function () { setState({ head: headSelect.value === "mean" ? "mean" : +headSelect.value }); };
    controls.appendChild(labelled("head", headSelect));

    if (site.steps && site.steps.length) {
      var step = el("input", { id: "af-step", type: "range", min: "0", max: String(site.steps.length - 1), step: "1" });
      step.value = String(state.step);
      var stepText = el("span", { "class": "af-step-label" }, site.steps[state.step]);
      step.oninput = function () { stepText.textContent = site.steps[+step.value]; };
      step.onchange = function () { setState({ step: +step.value }); };
      var wrap = labelled("step", step);
      wrap.appendChild(stepText);
      controls.appendChild(wrap);
    }

    tabs.textContent = "";
    supportedViews(site).forEach(function (name) {
      var button = el("button", { "class": "af-tab", "data-view": name, type: "button" }, views[name].label || name);
      if (name === state.view) button.classList.add("af-active");
      button.onclick = function () { setState({ view: name }); };
      tabs.appendChild(button);
    });
  }

  var TAB_ORDER = ["token", "matrix", "overview", "image", "graph", "topk", "statistics"];
  function tabRank(name) { var i = TAB_ORDER.indexOf(name); return i < 0 ? TAB_ORDER.length : i; }

  function supportedViews(site) {
    return viewOrder.slice().sort(function (a, b) { return tabRank(a) - tabRank(b); }).filter(function (name) {
      try { return !!views[name].supports(site); } catch (error) { console.error(error); return false; }
    });
  }

  function describeEncoding(site, map) {
    info.textContent = "";
    var lines = [];
    lines.push(payload.source);
    if (map) {
      var encoded = payload.mode === "embedded" ? site.maps[map.key] : null;
      var text = "8-bit codes, value = offset + scale × q, largest error ± " + fmt(map.max_error) +
        "; " + map.rows + " × " + map.cols + " cells = " + (map.rows * map.cols) + " bytes per map" +
        (encoded ? ", " + encoded.q.length + " characters in this page" +
          (encoded.compression ? " (" + encoded.compression + ", base64)" : " (base64)") : "");
      if (map.pool_q * map.pool_k > 1) text += "; each cell a block of " + map.pool_q + "×" + map.pool_k + ", " + map.pool;
      lines.push(text);
    }
    if (payload.budget) {
      var budget = payload.budget;
      lines.push("embedded: " + budget.maps + " of " + budget.maps_planned + " maps, " + budget.used_bytes +
        " bytes of map text (budget " + budget.max_bytes + ")" +
        (budget.pooled_to ? "; maps pooled to at most " + budget.pooled_to + " cells a side (" + budget.pool + ")" : ""));
      if (budget.omitted && budget.omitted.length) {
        lines.push("left out (over the budget; use attnformat serve for everything): " + budget.omitted.join("; "));
      }
    }
    if (site.fixed && Object.keys(site.fixed).length) {
      lines.push("shown at first position: " + Object.keys(site.fixed).join(", "));
    }
    lines.forEach(function (line) { info.appendChild(el("div", { "class": "af-info-line" }, line)); });
  }

  // -- rendering ----------------------------------------------------------------------------------

  function normalizeState(site) {
    var state = api.state;
    if (supportedViews(site).indexOf(state.view) < 0) {
      var supported = supportedViews(site);
      var preferred = ["token", "matrix", "graph", "image", "topk", "statistics", "overview"];
      // Thousands of tokens make a slow list: long sequences open on the (pooled) matrix.
      if ((site.dims.query || 0) > LONG_SEQUENCE || (site.dims.key || 0) > LONG_SEQUENCE) preferred = ["matrix"].concat(preferred);
      state.view = null;
      for (var i = 0; i < preferred.length; i++) if (supported.indexOf(preferred[i]) >= 0) { state.view = preferred[i]; break; }
      if (!state.view && supported.length) state.view = supported[0];
    }
    if (site.variables.indexOf(state.variable) < 0) state.variable = site.variable;
    if (state.head === "mean" && !hasMean(site)) state.head = 0;
    if (state.head !== "mean" && state.head >= site.head_labels.length) state.head = hasMean(site) ? "mean" : 0;
    if (state.layer >= site.layer_labels.length) state.layer = 0;
    if (!site.steps) state.step = 0;
  }

  function render() {
    var site = currentSite();
    normalizeState(site);
    buildControls();
    var state = api.state;
    var mapPromise = hasMaps(site) ? getMap(mapKey(state)) : Promise.resolve(null);
    return mapPromise.then(function (map) {
      api.current = map;
      api.quantization = map ? { scale: map.scale, offset: map.offset, max_error: map.max_error } : null;
      describeEncoding(site, map);
      errorBox.textContent = "";
      container.textContent = "";
      container.setAttribute("data-view", state.view || "");
      if (hasMaps(site) && !map && (state.view === "token" || state.view === "matrix")) {
        var embedded = site.embedded_variables || [];
        container.appendChild(el("p", { "class": "af-note", id: "af-missing" },
          embedded.indexOf(state.variable) < 0
            ? "This page embeds " + (embedded.join(", ") || "no maps") + " of this site, not " + state.variable +
              " (attnformat view --variable " + state.variable + " writes a page with it; attnformat serve shows every map)."
            : "This map is not embedded in the page (size budget; the footer lists what was left out). " +
              "attnformat serve shows every map."));
        return null;
      }
      var view = views[state.view];
      if (!view) {
        container.appendChild(el("p", { "class": "af-note" }, "No view supports this site."));
        return null;
      }
      return view.render(container, context(site, map));
    }).then(function () {
      renderCount += 1;
      if (renderCount === 1) {
        api.firstRenderMs = performance.now() - started;
        resolveReady(api);
      }
    }, function (error) {
      errorBox.textContent = "Error: " + (error && error.message ? error.message : String(error));
      console.error(error);
      if (renderCount === 0) { renderCount = 1; api.firstRenderMs = performance.now() - started; resolveReady(api); }
    });
  }

  function context(site, map) {
    return {
      payload: payload, site: site, state: api.state, map: map, api: api,
      getMap: getMap, valueAt: valueAt, setState: setState, decode: decode, colors: colors, fmt: fmt, el: el,
      labels: { query: site.query_labels[api.state.sample] || [], key: site.key_labels[api.state.sample] || [] },
      masks: { query: site.query_mask[api.state.sample] || null, key: site.key_mask[api.state.sample] || null },
      mapKey: mapKey
    };
  }

  function setState(partial) {
    partial = partial || {};
    var site = currentSite();
    if (partial.site !== undefined && partial.site !== site.name) {
      var next = siteNamed(partial.site);
      var view = api.state.view;
      api.state = defaultState(next, api.state);
      api.state.view = view;
    }
    for (var name in partial) {
      if (name === "site") continue;
      var value = partial[name];
      if (name === "head" && value !== "mean" && value !== null) value = Number(value);
      if ((name === "layer" || name === "sample" || name === "step") && value !== null) value = Number(value);
      api.state[name] = value;
    }
    if (partial.layer !== undefined || partial.head !== undefined || partial.sample !== undefined ||
        partial.step !== undefined || partial.variable !== undefined || partial.site !== undefined) {
      if (partial.locked === undefined && partial.sample !== undefined) api.state.locked = null;
      if (partial.zoom === undefined && (partial.site !== undefined || partial.sample !== undefined)) api.state.zoom = null;
    }
    rendering = rendering.then(render, render);
    return rendering.then(function () { return api.state; });
  }

  function valueAt(q, k) {
    var map = api.current;
    if (!map) return null;
    return map.at(q, k);
  }

  function registerView(name, view) {
    if (!views[name]) viewOrder.push(name);
    views[name] = view;
    if (started && renderCount > 0) buildControls();
  }

  var api = {
    ready: ready,
    firstRenderMs: null,
    payload: payload,
    state: defaultState(payload.sites[0] || { name: "", variable: null, samples: [], layer_labels: [], head_labels: [] }),
    setState: setState,
    valueAt: valueAt,
    quantization: null,
    registerView: registerView,
    getMap: getMap,
    decode: decode,
    decodeMap: decodeMap,
    decodeMapAsync: decodeMapAsync,
    site: currentSite,
    mapKey: mapKey,
    colors: colors,
    fmt: fmt,
    current: null
  };
  window.attnExplorer = api;

  function start() {
    root = document.getElementById("af-app");
    var header = el("header", { "class": "af-header" });
    header.appendChild(el("h1", { id: "af-title" }, payload.title || "attention"));
    controls = el("div", { id: "af-controls" });
    header.appendChild(controls);
    tabs = el("nav", { id: "af-tabs" });
    errorBox = el("div", { id: "af-error", role: "alert" });
    container = el("main", { id: "af-view" });
    info = el("footer", { id: "af-info" });
    root.appendChild(header);
    root.appendChild(tabs);
    root.appendChild(errorBox);
    root.appendChild(container);
    root.appendChild(info);
    if (payload.format !== "attnformat-explorer" || !payload.sites || !payload.sites.length) {
      container.appendChild(el("p", { "class": "af-note" }, "This file has no attention site to show."));
      api.firstRenderMs = performance.now() - started;
      resolveReady(api);
      return;
    }
    rendering = render();
  }

  /* Keys: left/right step through heads (mean first), up/down through layers; Escape unlocks and unzooms. */
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (renderCount === 0 || event.altKey || event.ctrlKey || event.metaKey ||
        (target && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(target.tagName))) return;
    var site = currentSite(), state = api.state;
    var heads = (hasMean(site) ? ["mean"] : []).concat(site.head_labels.map(function (_, i) { return i; }));
    var at = heads.indexOf(state.head);
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      var next = at + (event.key === "ArrowRight" ? 1 : -1);
      if (next >= 0 && next < heads.length) { event.preventDefault(); setState({ head: heads[next] }); }
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      var layer = state.layer + (event.key === "ArrowDown" ? 1 : -1);
      if (layer >= 0 && layer < site.layer_labels.length) { event.preventDefault(); setState({ layer: layer }); }
    } else if (event.key === "Escape" && (state.locked || state.zoom)) {
      setState({ locked: null, zoom: null });
    }
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else setTimeout(start, 0);
})();
