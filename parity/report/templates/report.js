(function () {
  "use strict";
  // Draw every embedded figure: a script element of type application/json with data-figure="DIV_ID"
  // holding {data, layout}.
  var config = {responsive: true, displaylogo: false, scrollZoom: false, displayModeBar: "hover",
                modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"]};
  function draw() {
    var blocks = document.querySelectorAll("script[data-figure]");
    for (var i = 0; i < blocks.length; i++) {
      var id = blocks[i].getAttribute("data-figure");
      var div = document.getElementById(id);
      if (!div) { continue; }
      if (typeof Plotly === "undefined") {
        div.textContent = "(chart not drawn: plotly.js is not included in this file)";
        div.className += " empty";
        continue;
      }
      try {
        var fig = JSON.parse(blocks[i].textContent);
        Plotly.newPlot(div, fig.data, fig.layout, config);
      } catch (e) {
        div.textContent = "chart failed to draw: " + e;
        console.error("parity report: chart " + id + " failed: " + e);
      }
    }
  }

  // Module table: "only exceeded" toggle and a text filter.
  function wireFilter() {
    var table = document.getElementById("modules-table");
    if (!table) { return; }
    var only = document.getElementById("only-exceeded");
    var text = document.getElementById("module-filter");
    var rows = table.tBodies[0].rows;
    function apply() {
      var q = (text && text.value || "").toLowerCase();
      for (var i = 0; i < rows.length; i++) {
        var r = rows[i];
        var show = true;
        if (only && only.checked && !r.classList.contains("bad") && !r.classList.contains("first")) { show = false; }
        if (show && q && r.textContent.toLowerCase().indexOf(q) < 0) { show = false; }
        r.style.display = show ? "" : "none";
      }
    }
    if (only) { only.addEventListener("change", apply); }
    if (text) { text.addEventListener("input", apply); }
  }

  // plotly.js is inlined gzip+base64 (a quarter of its size): inflate it with the browser's own
  // DecompressionStream, run it as a script, then draw.
  function loadPlotly() {
    var packed = document.getElementById("plotly-gz");
    if (!packed || typeof Plotly !== "undefined") { return Promise.resolve(); }
    if (typeof DecompressionStream === "undefined") {
      return Promise.reject(new Error("this browser has no DecompressionStream"));
    }
    var bin = atob(packed.textContent.trim());
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(function (js) {
      var s = document.createElement("script");
      s.textContent = js;
      document.head.appendChild(s);
    });
  }

  function start() {
    wireFilter();
    loadPlotly().then(draw, function (e) {
      console.error("parity report: plotly.js could not be loaded: " + e);
      draw();
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else { start(); }
})();
