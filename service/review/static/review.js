// Progressive enhancement only: the page works without it.
(() => {
  // Clicking anywhere in a worklist row opens that alert (the summary link stays the keyboard target).
  document.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (!row || event.target.closest("a, button, input, select, textarea, summary")) return;
    window.location.assign(row.dataset.href);
  });

  // After an action or when an alert is opened, move focus to the detail panel for keyboard users.
  if (window.location.hash === "#detail") {
    const panel = document.getElementById("detail");
    if (panel) panel.focus({ preventScroll: false });
  }

  // A refused form (stale revision...) is answered at the form's URL: show the page's own URL instead, so a
  // reload does not post again.
  const canonical = document.body.dataset.canonical;
  if (canonical && !["/review", "/review/data-problems"].includes(window.location.pathname)) {
    window.history.replaceState(null, "", canonical.startsWith("/review?") ? `${canonical}#detail` : canonical);
  }

  // "n new": poll for alerts raised or escalated since the list was rendered; the cue swaps the fresh list
  // in without reloading the page (the detail panel and anything typed in it stay as they are).
  const live = document.querySelector(".live[data-poll]");
  const cue = document.getElementById("new-cue");
  const seconds = live ? Number(live.dataset.poll) : 0;
  if (!live || !cue || !(seconds > 0)) return;
  const query = live.dataset.query;
  const since = () => Number(document.getElementById("list")?.dataset.since || 0);

  async function poll() {
    try {
      const url = `/api/review/updates?${query}${query ? "&" : ""}since=${since()}`;
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const body = await response.json();
      if (body.count > 0) {
        const parts = [];
        if (body.new.length) parts.push(`${body.new.length} new`);
        if (body.escalated.length) parts.push(`${body.escalated.length} escalated`);
        cue.textContent = `${parts.join(", ")} alert${body.count === 1 ? "" : "s"}: show`;
        cue.hidden = false;
      }
    } catch (error) {
      // network hiccup: try again at the next tick
    }
  }

  cue.addEventListener("click", async () => {
    const params = new URLSearchParams(window.location.search);
    params.delete("cursor");
    params.delete("done");
    params.set("fragment", "list");
    const response = await fetch(`/review?${params}`, { credentials: "same-origin" });
    if (!response.ok) return;
    const holder = document.createElement("div");
    holder.innerHTML = await response.text();
    const fresh = holder.querySelector("#list");
    const current = document.getElementById("list");
    if (!fresh || !current) return;
    current.replaceWith(fresh);
    cue.hidden = true;
    cue.textContent = "";
    document.getElementById("list-h")?.focus();
  });

  window.setInterval(poll, seconds * 1000);
})();
