// Jobs: the list, and one job live over server-sent events (status, curves, log, checkpoints).

import { api, imageUrl, jobEvents } from "../api.js";
import { LineChart } from "../chart.js";
import { facts, h, notice, table } from "../dom.js";
import { checkpointRef, metricColumns } from "../evaluation.js";
import { formatDuration, formatNumber, formatProgress, formatTime } from "../format.js";

/** Column headings of the evaluation aggregates (docs/evaluation.md); others show their name. */
export const METRIC_LABELS = {
  clip_score: "CLIP score (LoRA)",
  clip_score_base: "CLIP score (base)",
  clip_score_gain: "CLIP gain",
  fidelity_dino: "Fidelity (DINO)",
  fidelity_clip_i: "Fidelity (CLIP-I)",
  strength: "Strength",
  leakage: "Leakage",
  cmmd: "CMMD",
};

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export async function showJobs(page) {
  const jobs = await api("/jobs?limit=100");
  page.append(
    h("h1", {}, "Jobs"),
    jobs.data.length
      ? table(
          "Newest first",
          ["Job", "Kind", "Status", "Adapter", "Progress", "Queued"],
          jobs.data.map((j) => [
            h("a", { href: `#/jobs/${j.id}` }, j.id),
            j.kind,
            h("span", { class: `status ${j.status}` }, j.status),
            j.adapter_name || "–",
            formatProgress(j.progress?.step, j.progress?.total_steps),
            formatTime(j.queued_at),
          ]),
        )
      : notice("No jobs yet."),
  );
}

export async function showJob(page, { signal, args: [id] }) {
  let job = await api(`/jobs/${encodeURIComponent(id)}`);
  const status = h("span", { class: `status ${job.status}`, "data-testid": "job-status" }, job.status);
  const progress = h("progress", { max: 1, value: 0, "aria-label": "Training progress" });
  const summary = h("div", {});
  const result = h("div", {});
  const cancel = h("button", { type: "button", class: "danger" }, "Cancel job");
  const message = h("div", { "aria-live": "polite" });
  const log = h("ol", { class: "log", "aria-label": "Events log", "data-testid": "events" });
  const checkpoints = h("div", {});
  const evaluated = new Map(); // step -> the aggregates of that evaluated step
  const evaluation = h("div", { "data-testid": "evaluation-table" });
  const samples = h("ul", { class: "gallery", "aria-label": "Validation samples" });
  const charts = h("div", { class: "charts" });
  const loss = new LineChart(charts, { label: "Loss by step" });
  const lr = new LineChart(charts, { label: "Learning rate by step" });
  loss.svg.dataset.testid = "loss-chart";
  lr.svg.dataset.testid = "lr-chart";

  const render = () => {
    status.textContent = job.status;
    status.className = `status ${job.status}`;
    const p = job.progress || {};
    progress.value = p.total_steps ? (p.step || 0) / p.total_steps : job.status === "succeeded" ? 1 : 0;
    summary.replaceChildren(
      facts([
        ["Kind", job.kind],
        ["Adapter", job.adapter_name ? h("a", { href: `#/adapters/${job.adapter_name}` }, job.adapter_name) : "–"],
        ["Dataset", job.dataset_id ? h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id) : "–"],
        ["Step", h("span", { "data-testid": "job-step" }, formatProgress(p.step, p.total_steps))],
        ["Loss", formatNumber(p.loss)],
        ["ETA", FINAL.has(job.status) ? "–" : formatDuration(p.eta_s)],
        ["Queue position", job.queue_position ?? "–"],
        ["Attempts", `${job.attempts} / ${job.max_attempts}`],
        ["Queued", formatTime(job.queued_at)],
        ["Finished", formatTime(job.finished_at)],
      ]),
    );
    cancel.hidden = FINAL.has(job.status);
    if (job.error) result.replaceChildren(notice(`${job.error.code}: ${job.error.message}`, "error"));
    else if (job.result) result.replaceChildren(resultView(job.result));
  };

  cancel.addEventListener("click", async () => {
    try {
      job = await api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      render();
    } catch (error) {
      message.replaceChildren(notice(error.message, "error"));
    }
  });

  page.append(
    h("h1", {}, "Job ", h("code", {}, id), " ", status),
    progress,
    summary,
    h("p", {}, cancel),
    message,
    result,
    h("section", { "aria-labelledby": "curves-title" }, h("h2", { id: "curves-title" }, "Curves"), charts),
    h("section", { "aria-labelledby": "ckpt-title" }, h("h2", { id: "ckpt-title" }, "Checkpoints"), checkpoints),
    job.params?.evaluation
      ? h(
          "section",
          { "aria-labelledby": "eval-title" },
          h("h2", { id: "eval-title" }, "Evaluation by step"),
          evaluation,
        )
      : null,
    h("section", { "aria-labelledby": "samples-title" }, h("h2", { id: "samples-title" }, "Validation samples"), samples),
    h("section", { "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Events"), log),
  );
  const refresh = async () => {
    const list = await refreshCheckpoints(id, checkpoints, job);
    for (const c of list) if (c.metrics?.evaluation) evaluated.set(c.step, c.metrics.evaluation);
    for (const c of job.result?.evaluation?.checkpoints || []) evaluated.set(c.step, c.metrics);
    if (job.params?.evaluation) evaluation.replaceChildren(evaluationTable(job, evaluated));
  };
  render();
  await refresh();

  const onEvent = async ({ type, data }) => {
    const event = JSON.parse(data);
    const d = event.data || {};
    log.append(
      h(
        "li",
        { class: event.level },
        h("time", {}, formatTime(event.created_at)),
        ` ${event.type} `,
        h("code", {}, JSON.stringify(d)),
      ),
    );
    if (type === "metrics" && d.evaluation) {
      // An evaluated step (docs/evaluation.md): its same-seed grid, with the aggregates.
      evaluated.set(d.step, d.evaluation);
      evaluation.replaceChildren(evaluationTable(job, evaluated));
      samples.append(await evaluationView(d));
    } else if (type === "metrics") {
      loss.add({ x: d.step, y: d.loss });
      lr.add({ x: d.step, y: d.lr });
      job.progress = d;
      render();
    } else if (type === "checkpoint") {
      await refresh();
    } else if (type === "sample") {
      samples.append(await sampleView(d));
    } else if (type === "state") {
      job = await api(`/jobs/${encodeURIComponent(id)}`, { signal });
      render();
      await refresh();
    }
  };
  // The stream ends with the job; a dropped connection resumes after the last event seen.
  let after = 0;
  while (!signal.aborted) {
    try {
      const last = await jobEvents(id, { after, signal, onEvent });
      if (last !== null) after = Number(last);
    } catch (error) {
      if (signal.aborted || error.status === 401) return;
      message.replaceChildren(notice(`Event stream: ${error.message}; retrying`, "error"));
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    job = await api(`/jobs/${encodeURIComponent(id)}`, { signal });
    render();
    if (FINAL.has(job.status)) break;
  }
  await refresh();
}

/** A checkpoint's ref: by adapter name when the job trains one, else by job id. */
function stepRef(job, step) {
  return checkpointRef(job.adapter_name || job.id, step);
}

/** One row per evaluated step: its aggregates, the best step marked, a playground link. */
function evaluationTable(job, evaluated) {
  if (!evaluated.size) return notice("No step evaluated yet.");
  const steps = [...evaluated.keys()].sort((a, b) => a - b);
  const names = metricColumns(steps.map((step) => evaluated.get(step)));
  const summary = job.result?.evaluation;
  const select = summary?.select || job.params?.evaluation?.select;
  const best = summary?.best_step;
  const rows = steps.map((step) => {
    const metrics = evaluated.get(step);
    return [
      String(step),
      ...names.map((name) => formatNumber(metrics[name])),
      step === best ? h("strong", { class: "tag best" }, "best") : "",
      h("a", { href: `#/playground?adapter=${encodeURIComponent(stepRef(job, step))}` }, "Use in the playground"),
    ];
  });
  return h(
    "div",
    {},
    select ? h("p", {}, `Best by ${select.metric} (${select.mode}).`) : null,
    h("div", { class: "table-scroll" }, table(null, ["Step", ...names.map((n) => METRIC_LABELS[n] || n), "Best", "Try it"], rows)),
  );
}

function resultView(result) {
  const name = result.adapter_name;
  const ref = name && result.version ? `${name}@${result.version}` : null;
  return h(
    "section",
    { class: "card", "aria-labelledby": "result-title" },
    h("h2", { id: "result-title" }, "Result"),
    ref
      ? h(
          "p",
          {},
          "Published ",
          h("a", { href: `#/adapters/${name}` }, ref),
          " ",
          h("a", { class: "button", href: `#/playground?adapter=${encodeURIComponent(ref)}` }, "Use in the playground"),
        )
      : null,
    h("pre", {}, JSON.stringify(result, null, 2)),
  );
}

async function refreshCheckpoints(jobId, container, job) {
  const list = await api(`/jobs/${encodeURIComponent(jobId)}/checkpoints`);
  if (!list.data.length) {
    container.replaceChildren(notice("No checkpoints yet."));
    return list.data;
  }
  const status = h("div", { "aria-live": "polite" });
  const rows = list.data.map((c) => {
    const promote = h("button", { type: "button" }, `Promote step ${c.step}`);
    promote.addEventListener("click", async () => {
      try {
        const version = await api(`/jobs/${encodeURIComponent(jobId)}/checkpoints/${c.step}/promote`, { method: "POST" });
        status.replaceChildren(
          notice(`Promoted to ${version.ref}.`),
          h("a", { href: `#/playground?adapter=${encodeURIComponent(version.ref)}` }, "Use in the playground"),
        );
      } catch (error) {
        status.replaceChildren(notice(error.message, "error"));
      }
    });
    const ref = stepRef(job, c.step);
    const play = h("a", { class: "button", href: `#/playground?adapter=${encodeURIComponent(ref)}` }, "Use in the playground");
    return [
      String(c.step),
      formatNumber(c.metrics?.loss),
      formatNumber(c.metrics?.evaluation?.clip_score),
      formatNumber(c.metrics?.evaluation?.clip_score_base),
      formatTime(c.created_at),
      h("code", {}, ref),
      h("span", {}, job.adapter_name ? promote : "", " ", play),
    ];
  });
  container.replaceChildren(
    h("div", { class: "table-scroll" }, table(null, ["Step", "Loss", "CLIP score (LoRA)", "CLIP score (base)", "Saved", "Ref", "Action"], rows)),
    status,
  );
  return list.data;
}

async function evaluationView(record) {
  const figure = h("figure", { class: "pair" });
  const grid = record.grid?.image_id;
  if (grid) figure.append(h("img", { src: await imageUrl(`/images/${grid}`), alt: `evaluation grid, step ${record.step}` }));
  const figures = Object.entries(record.evaluation).map(([name, value]) => `${name} ${formatNumber(value)}`);
  figure.append(h("figcaption", {}, `evaluation, step ${record.step}: ${figures.join(", ")}`));
  return h("li", {}, figure);
}

async function sampleView(sample) {
  const figure = h("figure", { class: "pair" });
  const pair = await Promise.all(
    [["base", sample.base_image_id], ["LoRA", sample.lora_image_id]].map(async ([label, imageId]) =>
      imageId ? h("img", { src: await imageUrl(`/images/${imageId}`), alt: `${label}: ${sample.prompt}` }) : null,
    ),
  );
  figure.append(...pair.filter(Boolean), h("figcaption", {}, `step ${sample.step}, seed ${sample.seed}: ${sample.prompt}`));
  return h("li", {}, figure);
}
