"""`zfabric dashboard`: a web page that follows a fabric live (layer 5: the ``observe`` extra's aiohttp).

The rule it keeps: like `zfabric top` it only reads the scheduler's status (once a second, however many
browsers look), and keeps the task rate of the last ten minutes for the chart. The page is one file with
its script inline: it loads nothing from anywhere else, and polls ``/api/status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

POLL_S = 1.0
HISTORY = 600
"""Seconds of task rate the chart shows."""


def require_aiohttp() -> Any:
    try:
        import aiohttp.web
    except ImportError:
        raise ConfigError("zfabric dashboard needs aiohttp, in the 'observe' extra: "
                          "pip install 'zfabric[observe]'") from None
    return aiohttp.web


class Watch:
    """The latest status and the rates seen, for every page that asks."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.error = ""
        self.rates: deque[tuple[float, float]] = deque(maxlen=HISTORY)  # (wall time, tasks finished a second)
        self._last: tuple[float, int] | None = None

    def add(self, status: dict[str, Any], now: float) -> None:
        finished = status["done"] + status["failed"]
        if self._last is not None and now > self._last[0]:
            self.rates.append((round(now, 3), round(max(0, finished - self._last[1]) / (now - self._last[0]), 1)))
        self._last = (now, finished)
        self.status, self.error = status, ""

    def payload(self) -> dict[str, Any]:
        """What ``/api/status`` answers: task ids as hex strings (a browser's numbers stop at 2**53)."""
        status = dict(self.status or {})
        if "recent_failures" in status:
            status["recent_failures"] = [{**f, "task": f"{f['task']:#x}"} for f in status["recent_failures"]]
        return {"status": status, "rates": list(self.rates), "error": self.error, "now": time.time()}


async def watch(client: Any, seen: Watch, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            seen.add(await client.status(5.0), time.time())
        except asyncio.TimeoutError:
            seen.error = "the scheduler did not answer within 5 s"
        except Exception as exc:  # keep watching: the page says what is wrong
            log.warning("dashboard: status failed: %s", exc)
            seen.error = f"status failed: {type(exc).__name__}: {exc}"[:300]
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass


def make_app(seen: Watch, hosts: set[str] | None = None) -> Any:
    """The page and its data. With ``hosts``, a request naming any other Host is refused: a web page
    elsewhere that rebinds its own name to this address must not read the fabric's status."""
    web = require_aiohttp()

    @web.middleware
    async def only_our_host(request: Any, handler: Any) -> Any:
        if hosts is not None and request.host.rsplit(":", 1)[0].strip("[]") not in hosts:
            return web.Response(status=403, text=f"this dashboard answers for {', '.join(sorted(hosts))} only")
        return await handler(request)

    async def index(request: Any) -> Any:
        return web.Response(text=PAGE, content_type="text/html")

    async def api_status(request: Any) -> Any:
        return web.json_response(seen.payload(), headers={"Cache-Control": "no-store"})

    app = web.Application(middlewares=[only_our_host])
    app.router.add_get("/", index)
    app.router.add_get("/api/status", api_status)
    return app


async def serve(client: Any, host: str, port: int, ready: Any = None) -> None:
    """Serve the dashboard of `client`'s fabric at http://HOST:PORT/ until cancelled."""
    web = require_aiohttp()
    seen = Watch()
    stop = asyncio.Event()
    watching = asyncio.create_task(watch(client, seen, stop))
    allowed = {host, "localhost", "127.0.0.1", "::1"} if host not in ("0.0.0.0", "::", "") else None
    runner = web.AppRunner(make_app(seen, allowed), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
        if ready is not None:
            bound = site._server.sockets[0].getsockname()[1] if port == 0 and site._server else port  # type: ignore[attr-defined]
            ready(f"http://{host}:{bound}/")
        await asyncio.Event().wait()
    finally:
        stop.set()
        await watching
        await runner.cleanup()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zfabric</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d232b; }
header { background: #1d232b; color: #fff; padding: 10px 20px; display: flex; gap: 24px; align-items: baseline; }
header h1 { font-size: 18px; margin: 0; } header span { opacity: .8; }
main { padding: 16px 20px; display: grid; gap: 16px; grid-template-columns: 1fr 1fr; }
section { background: #fff; border-radius: 6px; padding: 12px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
section.wide { grid-column: 1 / -1; }
h2 { font-size: 14px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .04em; color: #5a6572; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { min-width: 110px; } .card b { display: block; font-size: 22px; } .card.bad b { color: #c62828; }
table { width: 100%; border-collapse: collapse; } th, td { text-align: left; padding: 4px 8px; }
th { color: #5a6572; font-weight: 600; border-bottom: 1px solid #dde1e6; } td.n { text-align: right; }
tr + tr td { border-top: 1px solid #f0f2f4; } .err { color: #c62828; font-family: ui-monospace, monospace; }
svg { width: 100%; height: 160px; } #chart polyline { fill: none; stroke: #1e88e5; stroke-width: 2; }
.muted { color: #8a94a0; } #problem { color: #c62828; }
</style></head>
<body>
<header><h1>zfabric</h1><span id="address">connecting...</span><span id="uptime"></span><span id="problem"></span></header>
<main>
<section class="wide"><h2>Tasks</h2><div class="cards" id="cards"></div></section>
<section class="wide"><h2>Tasks finished per second <span class="muted" id="rate"></span>
<span class="muted" id="span"></span></h2>
<svg id="chart" viewBox="0 0 1000 160" preserveAspectRatio="none"><polyline id="line" points=""></polyline></svg></section>
<section><h2>Workers <span class="muted" id="nworkers"></span></h2><table id="workers"><thead><tr>
<th>worker</th><th>host</th><th>pid</th><th class="n">running</th><th class="n">free</th><th class="n">done</th><th></th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Queue</h2><div id="queue"></div></section>
<section class="wide"><h2>Recent failures</h2><table id="failures"><thead><tr>
<th>when</th><th>task</th><th>worker</th><th>error</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const fmt = n => Number(n).toLocaleString("en-US");
function el(tag, text, cls) { const e = document.createElement(tag); e.textContent = text; if (cls) e.className = cls; return e; }
function row(cells) { const tr = document.createElement("tr"); for (const [t, c] of cells) tr.appendChild(el("td", t, c)); return tr; }
function fill(id, rows) { const body = document.querySelector("#" + id + " tbody"); body.replaceChildren(...rows); }
function render(data) {
  const s = data.status;
  document.getElementById("problem").textContent = data.error || "";
  if (!s.address) return;
  document.getElementById("address").textContent = s.address;
  document.getElementById("uptime").textContent = "up " + Math.round(s.uptime_s) + " s";
  const cards = [["queued", s.queued], ["running", s.running], ["done", s.done], ["failed", s.failed, s.failed > 0],
                 ["lost", s.lost, s.lost > 0], ["redelivered", s.redelivered], ["workers", s.workers.length],
                 ["clients", s.clients]];
  document.getElementById("cards").replaceChildren(...cards.map(([name, value, bad]) => {
    const d = el("div", name, "card" + (bad ? " bad" : "")); d.prepend(el("b", fmt(value))); return d; }));
  fill("workers", s.workers.map(w => row([[w.name], [w.host], [String(w.pid)], [fmt(w.running), "n"],
    [fmt(w.free), "n"], [fmt(w.done), "n"], [w.draining ? "draining" : (w.tags || []).join(", ")]])));
  document.getElementById("nworkers").textContent = s.workers.length;
  const queue = [el("div", fmt(s.queued) + " queued, " + fmt(s.delayed) + " waiting out a retry's back-off, "
                     + fmt(s.suspects) + " suspects")];
  for (const r of s.waiting || []) {
    const needs = [r.tags.length ? "tags " + r.tags.join(", ") : "",
                   Object.keys(r.resources).length ? "resources " + Object.entries(r.resources).map(([k, v]) => k + "=" + v).join(", ") : ""]
                  .filter(Boolean).join(" and ");
    const who = r.workers ? r.workers + " live worker" + (r.workers > 1 ? "s" : "") + " can take them, " + r.busy + " busy"
                          : "no live worker can take them";
    queue.push(el("div", fmt(r.queued) + " tasks waiting for " + needs + " (" + who + ")", "err"));
  }
  document.getElementById("queue").replaceChildren(...queue);
  fill("failures", (s.recent_failures || []).slice().reverse().map(f => row([
    [new Date(f.t * 1000).toLocaleTimeString()], [f.task], [f.worker || "-"], [f.type + ": " + f.message, "err"]])));
  const rates = data.rates, top = Math.max(1, ...rates.map(r => r[1]));
  const span = Math.min(600, Math.max(60, rates.length ? data.now - rates[0][0] : 60)), t0 = data.now - span;
  document.getElementById("line").setAttribute("points",
    rates.map(([t, v]) => ((t - t0) / span * 1000).toFixed(1) + "," + (158 - v / top * 150).toFixed(1)).join(" "));
  document.getElementById("span").textContent = "last " + Math.round(span) + " s";
  document.getElementById("rate").textContent = rates.length ? fmt(rates[rates.length - 1][1]) + " now, peak " + fmt(top) : "";
}
async function poll() {
  try { render(await (await fetch("api/status", {cache: "no-store"})).json()); }
  catch (e) { document.getElementById("problem").textContent = "dashboard unreachable: " + e; }
  setTimeout(poll, 1000);
}
poll();
</script>
</body></html>
"""
