// Experiments: a grid of training runs (POST /experiments), their comparison, the reports.

import { api, download, openapi } from "../api.js";
import { facts, h, labelled, notice } from "../dom.js";
import { metricColumns, parseGridValues, sortRows } from "../evaluation.js";
import { formatBytes, formatDuration, formatNumber, formatTime } from "../format.js";
import { fieldsFromSchema } from "../schema.js";
import { METRIC_LABELS } from "./job.js";
import { evaluationFields, fieldControl, readField } from "./train.js";

const ACTIVE = new Set(["queued", "running"]);

export async function showExperiments(page) {
  const [schema, list, datasets] = await Promise.all([
    openapi(),
    api("/experiments?limit=100"),
    api("/datasets?limit=100"),
  ]);
  page.append(
    h("h1", {}, "Experiments"),
    list.data.length
      ? experimentList(list)
      : notice("No experiments yet: one trains a run per combination of a hyperparameter grid."),
    createForm(schema, datasets.data),
  );
}

function experimentList(list) {
  const rows = list.data.map((e) => [
    h("a", { href: `#/experiments/${e.id}` }, e.id),
    e.adapter_name,
    h("span", { class: `status ${e.status}` }, e.status),
    String(e.runs.length),
    Object.entries(e.grid).map(([name, values]) => `${name}: ${values.map((v) => JSON.stringify(v)).join(", ")}`).join("; "),
    e.best_run === null ? "–" : `run ${e.best_run}`,
    formatTime(e.created_at),
  ]);
  return h(
    "table",
    { "data-testid": "experiments" },
    h("caption", {}, `Newest first${list.has_more ? " (the first 100)" : ""}`),
    h("thead", {}, h("tr", {}, ["Experiment", "Prefix", "Status", "Runs", "Grid", "Best", "Created"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))),
  );
}

function createForm(schema, datasets) {
  const hyperFields = fieldsFromSchema(schema, "Hyperparameters");
  const dataset = h(
    "select",
    { name: "dataset_id", required: true },
    datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.pair_count} pairs)`)),
  );
  const prefix = h("input", { type: "text", name: "adapter_name", required: true, pattern: "[a-z0-9][a-z0-9._-]{0,89}" });

  // The grid: one row per hyperparameter that varies, with its values.
  const gridRows = h("div", { class: "grid-rows" });
  const addGridRow = (name = "rank", values = "") => {
    const param = h(
      "select",
      { name: "grid_param" },
      hyperFields.map((f) => h("option", { value: f.name, selected: f.name === name }, f.name)),
    );
    const text = h("input", { type: "text", name: "grid_values", value: values, placeholder: "8, 32" });
    const remove = h("button", { type: "button", "aria-label": "Remove this parameter" }, "×");
    const row = h("div", { class: "row" }, labelled("Hyperparameter", param), labelled("Values (comma-separated)", text), remove);
    remove.addEventListener("click", () => row.remove());
    gridRows.append(row);
  };
  addGridRow("rank", "4, 8");
  const addRow = h("button", { type: "button" }, "Add a parameter");
  addRow.addEventListener("click", () => addGridRow(hyperFields[0]?.name, ""));

  // What every run shares: any hyperparameter, from the schema (empty: the API's default).
  const inputs = new Map();
  const shared = h("div", { class: "grid" });
  for (const field of hyperFields) shared.append(fieldControl(field, inputs, "hp"));
  const evaluation = evaluationFields(schema, "ExperimentCreate");
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-exp-title", novalidate: true, "data-testid": "experiment-form" },
    h("h2", { id: "new-exp-title" }, "New experiment"),
    datasets.length ? null : notice("Upload a dataset first.", "error"),
    h("div", { class: "row" }, labelled("Dataset", dataset), labelled("Adapter prefix", prefix, "run i trains PREFIX-i")),
    h("fieldset", {}, h("legend", {}, "Grid: one run per combination of these values"), gridRows, addRow),
    h("details", {}, h("summary", {}, "Hyperparameters every run shares (defaults and limits from the API schema)"), shared),
    evaluation.element,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Start experiment")),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const grid = {};
    try {
      for (const row of gridRows.children) {
        const name = row.querySelector("select").value;
        grid[name] = parseGridValues(row.querySelector("input").value);
      }
    } catch (error) {
      status.replaceChildren(notice(`Grid: ${error.message}`, "error"));
      return;
    }
    const hyperparameters = {};
    for (const field of hyperFields) {
      const value = readField(field, inputs.get(`hp.${field.name}`));
      if (value !== undefined && !(field.kind === "boolean" && value === field.default)) hyperparameters[field.name] = value;
    }
    const body = {
      dataset_id: dataset.value,
      adapter_name: prefix.value.trim(),
      hyperparameters,
      grid,
      ...evaluation.read(),
    };
    status.replaceChildren(notice("Queuing the runs…"));
    try {
      const experiment = await api("/experiments", { method: "POST", body });
      location.hash = `#/experiments/${experiment.id}`;
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"));
    }
  });
  return form;
}

export async function showExperiment(page, { signal, args: [id] }) {
  const path = `/experiments/${encodeURIComponent(id)}`;
  let experiment = await api(path, { signal });
  const summary = h("div", {});
  const runs = h("div", {});
  const message = h("div", { "aria-live": "polite" });
  const sort = { column: "run", descending: false };
  const report = (format) => {
    const button = h("button", { type: "button", "data-format": format }, `Download report (${format})`);
    button.addEventListener("click", async () => {
      try {
        const size = await download(`${path}/report?format=${format}`, `${id}.${format}`);
        message.replaceChildren(notice(`Downloaded the ${format} report (${formatBytes(size)}).`));
      } catch (error) {
        message.replaceChildren(notice(error.message, "error"));
      }
    });
    return button;
  };
  const render = () => {
    const select = experiment.select ? `${experiment.select.metric} (${experiment.select.mode})` : "–";
    summary.replaceChildren(
      facts([
        ["Status", h("span", { class: `status ${experiment.status}`, "data-testid": "experiment-status" }, experiment.status)],
        ["Dataset", experiment.dataset_id ? h("a", { href: `#/datasets/${experiment.dataset_id}` }, experiment.dataset_id) : "–"],
        ["Base model", experiment.base_model],
        ["Adapters", `${experiment.adapter_name}-<run>`],
        ["Best by", select],
        ["Best run", experiment.best_run === null ? "–" : `run ${experiment.best_run}`],
        ["Created", formatTime(experiment.created_at)],
      ]),
    );
    runs.replaceChildren(runsTable(experiment, sort, render));
  };
  page.append(
    h("h1", {}, "Experiment ", h("code", {}, id)),
    summary,
    h("p", { class: "actions" }, report("md"), " ", report("csv")),
    message,
    h("section", { "aria-labelledby": "runs-title" }, h("h2", { id: "runs-title" }, "Runs"), runs),
  );
  render();
  // Refresh while runs are under way.
  while (ACTIVE.has(experiment.status) && !signal.aborted) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    if (signal.aborted) return;
    experiment = await api(path, { signal });
    render();
  }
}

/** The runs: every column sortable (click its heading), the best run marked. */
function runsTable(experiment, sort, rerender) {
  const gridNames = Object.keys(experiment.grid);
  const metricNames = metricColumns(experiment.runs.map((r) => r.metrics));
  const columns = [
    ["run", "Run", (r) => r.index, (r) => String(r.index)],
    ["adapter", "Adapter", (r) => r.adapter_name, (r) => h("a", { href: `#/adapters/${encodeURIComponent(r.adapter_name)}` }, r.adapter_name)],
    ...gridNames.map((name) => [`grid.${name}`, name, (r) => r.parameters[name], (r) => JSON.stringify(r.parameters[name])]),
    ["status", "Status", (r) => r.status, (r) => h("a", { href: `#/jobs/${r.job_id}`, class: `status ${r.status}` }, r.status)],
    ["trainable_params", "Trainable params", (r) => r.trainable_params, (r) => formatNumber(r.trainable_params)],
    ["adapter_file_bytes", "File", (r) => r.adapter_file_bytes, (r) => formatBytes(r.adapter_file_bytes)],
    ["duration_s", "Duration", (r) => r.duration_s, (r) => formatDuration(r.duration_s)],
    ["final_loss", "Final loss", (r) => r.final_loss, (r) => formatNumber(r.final_loss)],
    ["best_step", "Best step", (r) => r.best_step, (r) => (r.best_step === null ? "–" : String(r.best_step))],
    ...metricNames.map((name) => [`metric.${name}`, METRIC_LABELS[name] || name, (r) => r.metrics[name], (r) => formatNumber(r.metrics[name])]),
  ];
  const column = columns.find(([key]) => key === sort.column) || columns[0];
  const rows = sortRows(experiment.runs, column[2], sort.descending);
  const heading = ([key, label]) => {
    const active = key === column[0];
    const button = h("button", { type: "button", class: "sort", "data-sort": key }, label, active ? (sort.descending ? " ▼" : " ▲") : "");
    button.addEventListener("click", () => {
      sort.descending = active ? !sort.descending : false;
      sort.column = key;
      rerender();
    });
    return h("th", { scope: "col", "aria-sort": active ? (sort.descending ? "descending" : "ascending") : null }, button);
  };
  const wide = h(
    "table",
    { "data-testid": "runs" },
    h("caption", {}, "Metrics are those of each run's best checkpoint; click a heading to sort."),
    h("thead", {}, h("tr", {}, columns.map(heading), h("th", { scope: "col" }, "Best"))),
    h(
      "tbody",
      {},
      rows.map((r) => {
        const best = r.index === experiment.best_run;
        return h(
          "tr",
          { class: best ? "best-run" : null, "data-run": r.index },
          columns.map(([, , , cell]) => h("td", {}, cell(r))),
          h("td", {}, best ? h("strong", { class: "tag best" }, "best") : ""),
        );
      }),
    ),
  );
  return h("div", { class: "table-scroll" }, wide);
}
