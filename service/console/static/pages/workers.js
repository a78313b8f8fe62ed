// Workers and queue: the caller's view of live workers (GET /workers), refreshed every 5 s.

import { api } from "../api.js";
import { h, notice, table } from "../dom.js";
import { formatTime } from "../format.js";

const REFRESH_MS = 5000;

export async function showWorkers(page, { signal }) {
  const body = h("div", { "aria-live": "polite" });
  page.append(h("h1", {}, "Workers and queue"), body);
  const load = async () => {
    const [workers, queued] = await Promise.all([api("/workers"), api("/jobs?status=queued&limit=100")]);
    body.replaceChildren(
      workers.data.length
        ? table(
            "Live workers",
            ["Worker", "Queues", "Base model", "Device", "Current job", "Info", "Heartbeat"],
            workers.data.map((w) => [
              h("code", {}, w.id),
              w.queues.join(", "),
              w.base_model || "any",
              w.device || "–",
              w.current_job_id ? h("a", { href: `#/jobs/${w.current_job_id}` }, w.current_job_id) : "idle",
              h("code", {}, JSON.stringify(w.info)),
              formatTime(w.heartbeat_at),
            ]),
          )
        : notice("No live worker: queued jobs wait until one starts.", "error"),
      h("h2", {}, "Your queued jobs"),
      queued.data.length
        ? table(
            null,
            ["Job", "Kind", "Queue", "Position", "Queued"],
            queued.data.map((j) => [
              h("a", { href: `#/jobs/${j.id}` }, j.id),
              j.kind,
              j.queue,
              j.queue_position ?? "–",
              formatTime(j.queued_at),
            ]),
          )
        : notice("Nothing queued."),
    );
  };
  await load();
  const timer = setInterval(() => load().catch(() => {}), REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}
