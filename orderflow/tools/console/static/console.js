// Live flow figures: the server sends one snapshot a second (/live); each cell
// is found by the function and field it names, so the page never reloads.
(function () {
  const table = document.getElementById("functions");
  if (!table || !window.EventSource) return;
  const source = new EventSource("/live");
  source.addEventListener("flow", function (message) {
    const snapshot = JSON.parse(message.data);
    for (const [name, figures] of Object.entries(snapshot.functions)) {
      const row = table.querySelector(`tr[data-function="${CSS.escape(name)}"]`);
      if (!row) continue;
      for (const cell of row.querySelectorAll("td[data-field]")) {
        const value = figures[cell.dataset.field];
        const none = cell.dataset.field === "last_error" ? "" : "\u2013";
        cell.textContent = value === null || value === undefined ? none : String(value);
      }
    }
    for (const [edge, count] of Object.entries(snapshot.edges)) {
      const cell = document.querySelector(
        `#edges tr[data-edge="${CSS.escape(edge)}"] td[data-field="events"]`);
      if (cell) cell.textContent = String(count);
    }
    const taken = document.getElementById("taken");
    if (taken) taken.textContent = snapshot.taken;
  });
})();
