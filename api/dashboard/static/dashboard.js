// Live updates: the page's own URL, asked for as text/event-stream, sends its live part again when
// it changes. Without JavaScript (or EventSource) the page still works: reload it.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!live || !window.EventSource) { return; }
  var source = new EventSource(window.location.href);
  source.addEventListener("update", function (event) {
    live.innerHTML = event.data;
    live.dataset.updatedAt = String(Date.now());
    if (state) { state.textContent = "live"; state.className = "live-state on"; }
  });
  source.addEventListener("error", function () {
    // EventSource reconnects by itself; say so until it does.
    if (state) { state.textContent = "reconnecting"; state.className = "live-state off"; }
  });
})();
