// Progressive enhancement only: the page works without it.
// Clicking anywhere in a worklist row opens that alert (the summary link stays the keyboard target).
document.addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-href]");
  if (!row || event.target.closest("a, button, input, select, textarea")) return;
  window.location.assign(row.dataset.href);
});
// After an action or when an alert is opened, move focus to the detail panel for keyboard users.
if (window.location.hash === "#detail") {
  const panel = document.getElementById("detail");
  if (panel) panel.focus({ preventScroll: false });
}
