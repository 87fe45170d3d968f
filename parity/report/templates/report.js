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

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { draw(); wireFilter(); });
  } else { draw(); wireFilter(); }
})();
