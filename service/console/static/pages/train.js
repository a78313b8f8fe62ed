// Train: a form built from the API's Hyperparameters schema, presets, a dry-run plan, start.

import { api, openapi } from "../api.js";
import { facts, h, labelled, notice, table } from "../dom.js";
import { formatBytes, formatDuration, formatNumber } from "../format.js";
import { describeLimits, fieldsFromSchema, parseFieldValue } from "../schema.js";

/** Starting points; every value stays editable and the API validates the result. */
export const PRESETS = {
  "CPU smoke test (tiny model)": { max_steps: 20, resolution: 64, rank: 4, learning_rate: 0.001, checkpoint_every: 10 },
  "Style, SD 1.5": { max_steps: 1500, resolution: 512, rank: 16, learning_rate: 0.0001, lr_scheduler: "cosine", warmup_steps: 100, random_flip: true },
  "Subject, SD 1.5": { max_steps: 800, resolution: 512, rank: 32, learning_rate: 0.0001, snr_gamma: 5, center_crop: true },
};

export async function showTrain(page, { params }) {
  const [schema, datasets, workers] = await Promise.all([
    openapi(),
    api("/datasets?limit=100"),
    api("/workers").catch(() => ({ data: [] })),
  ]);
  const fields = fieldsFromSchema(schema, "Hyperparameters");
  const inputs = new Map();

  const dataset = h(
    "select",
    { name: "dataset_id", required: true },
    datasets.data.map((d) =>
      h("option", { value: d.id, selected: d.id === params.get("dataset") }, `${d.name} (${d.pair_count} pairs)`),
    ),
  );
  const adapterName = h("input", { type: "text", name: "adapter_name", required: true, pattern: "[a-z0-9][a-z0-9._-]{0,99}" });
  const baseModels = [...new Set(workers.data.map((w) => w.base_model).filter(Boolean))];
  const baseModel = h(
    "select",
    { name: "base_model" },
    h("option", { value: "" }, "default (first configured)"),
    baseModels.map((m) => h("option", { value: m }, m)),
  );
  const preset = h(
    "select",
    { name: "preset" },
    h("option", { value: "" }, "API defaults"),
    Object.keys(PRESETS).map((name) => h("option", { value: name }, name)),
  );
  preset.addEventListener("change", () => applyPreset(inputs, fields, PRESETS[preset.value] || {}));

  const grid = h("div", { class: "grid" });
  for (const field of fields) grid.append(fieldControl(field, inputs));
  const evaluation = evaluationFields(schema, "TrainJobCreate");

  const plan = h("div", { "aria-live": "polite", class: "plan" });
  const planButton = h("button", { type: "button", name: "plan" }, "Plan (dry run)");
  const startButton = h("button", { type: "submit", name: "start" }, "Start training");
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "train-title", novalidate: true },
    h("h1", { id: "train-title" }, "Train a LoRA"),
    datasets.data.length ? null : notice("Upload a dataset first.", "error"),
    h(
      "div",
      { class: "row" },
      labelled("Dataset", dataset),
      labelled("Adapter name", adapterName, "lower-case letters, digits, . _ -; new or existing"),
      labelled("Base model", baseModel),
      labelled("Preset", preset),
    ),
    h("fieldset", {}, h("legend", {}, "Hyperparameters (defaults and limits from the API schema)"), grid),
    evaluation.element,
    h("div", { class: "actions" }, planButton, " ", startButton),
    plan,
  );

  const body = (dryRun) => {
    const hyperparameters = {};
    for (const field of fields) {
      const input = inputs.get(field.name);
      const value = parseFieldValue(field, field.kind === "boolean" ? input.checked : input.value);
      if (value !== undefined && !(field.kind === "boolean" && value === field.default)) {
        hyperparameters[field.name] = value;
      }
    }
    return {
      dataset_id: dataset.value,
      adapter_name: adapterName.value.trim(),
      base_model: baseModel.value || null,
      hyperparameters,
      ...evaluation.read(),
      dry_run: dryRun,
    };
  };

  planButton.addEventListener("click", async () => {
    plan.replaceChildren(notice("Planning…"));
    try {
      plan.replaceChildren(planView(await api("/jobs", { method: "POST", body: body(true) })));
    } catch (error) {
      plan.replaceChildren(notice(error.message, "error"));
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const job = await api("/jobs", { method: "POST", body: body(false) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      plan.replaceChildren(notice(error.message, "error"));
    }
  });
  page.append(form);
}

/**
 * The evaluation fieldset (docs/evaluation.md): every field of the API's Evaluation schema,
 * select (metric and mode) from CheckpointSelect, and `publish` from the request schema named
 * (TrainJobCreate or ExperimentCreate). read() answers {evaluation?, publish}: no evaluation
 * when every field is empty (the API then evaluates nothing).
 */
export function evaluationFields(schema, requestName) {
  const fields = fieldsFromSchema(schema, "Evaluation").filter((f) => f.name !== "select");
  const selectFields = fieldsFromSchema(schema, "CheckpointSelect");
  const publishField = fieldsFromSchema(schema, requestName).find((f) => f.name === "publish");
  const inputs = new Map();
  const grid = h("div", { class: "grid" });
  for (const field of fields) grid.append(fieldControl(field, inputs, "eval"));
  for (const field of selectFields) grid.append(fieldControl({ ...field, label: `Select: ${field.label}` }, inputs, "select"));
  grid.append(fieldControl(publishField, inputs));
  const element = h(
    "fieldset",
    { "data-testid": "evaluation" },
    h("legend", {}, "Evaluation: base vs LoRA at the same seeds, at every checkpoint (optional)"),
    grid,
  );
  const read = () => {
    const evaluation = {};
    for (const field of fields) {
      const value = readField(field, inputs.get(`eval.${field.name}`));
      if (value !== undefined && !(field.kind === "boolean" && value === field.default)) evaluation[field.name] = value;
    }
    const select = {};
    for (const field of selectFields) select[field.name] = inputs.get(`select.${field.name}`).value;
    const publish = inputs.get("publish").value;
    if (!Object.keys(evaluation).length) return { publish };
    return { evaluation: { ...evaluation, select }, publish };
  };
  return { element, read };
}

/** A control's value as the API takes it (undefined: leave the API's default). */
export function readField(field, input) {
  if (field.kind === "list" && field.itemKind === "enum") {
    const picked = [...input.querySelectorAll("input:checked")].map((box) => box.value);
    return picked.length ? picked : undefined;
  }
  return parseFieldValue(field, field.kind === "boolean" ? input.checked : input.value);
}

export function fieldControl(field, inputs, prefix = "") {
  const key = prefix ? `${prefix}.${field.name}` : field.name;
  const name = prefix ? `${prefix}_${field.name}` : field.name;
  let control;
  const items = field.kind === "list" ? [field.minItems ? `at least ${field.minItems}` : "", field.maxItems ? `at most ${field.maxItems}` : ""] : [];
  const hint = [field.description, describeLimits(field), ...items, field.default !== null ? `default ${JSON.stringify(field.default)}` : ""]
    .filter(Boolean)
    .join("; ");
  switch (field.kind) {
    case "boolean":
      control = h("input", { type: "checkbox", name, checked: field.default === true });
      break;
    case "enum":
      control = h(
        "select",
        { name },
        field.nullable ? h("option", { value: "" }, "default") : null,
        field.options.map((o) => h("option", { value: o, selected: o === field.default }, o)),
      );
      break;
    case "integer":
    case "number": {
      const min = field.min ?? field.exclusiveMin;
      control = h("input", {
        type: "number",
        name,
        step: field.step,
        min: min ?? null,
        max: field.max ?? field.exclusiveMax ?? null,
        placeholder: field.default === null ? "default" : String(field.default),
      });
      break;
    }
    case "list":
      if (field.itemKind === "enum") {
        const boxes = field.itemOptions.map((o) =>
          h("label", { class: "inline" }, h("input", { type: "checkbox", name, value: o }), ` ${o} `),
        );
        control = h("fieldset", { class: "choices" }, h("legend", {}, field.label), boxes, h("small", { class: "hint" }, hint || "none ticked: the API's default"));
        inputs.set(key, control);
        return control;
      }
      control = h("textarea", {
        name,
        rows: 2,
        placeholder: field.itemKind === "integer" ? "one number per line" : "one per line",
      });
      break;
    case "choice-or-list": {
      const listId = `${field.name}-options`;
      control = h("input", { type: "text", name, list: listId, placeholder: String(field.default ?? "") });
      inputs.set(key, control);
      return h(
        "div",
        {},
        labelled(field.label, control, `${hint}; one of ${field.options.join(", ")} or a comma-separated list`),
        h("datalist", { id: listId }, field.options.map((o) => h("option", { value: o }))),
      );
    }
    default:
      control = h("input", { type: "text", name });
  }
  inputs.set(key, control);
  return labelled(field.label, control, hint);
}

function applyPreset(inputs, fields, values) {
  for (const field of fields) {
    const input = inputs.get(field.name);
    const value = values[field.name];
    if (field.kind === "boolean") input.checked = value ?? field.default === true;
    else if (field.kind === "enum") input.value = value ?? field.default ?? "";
    else if (field.kind === "list") input.value = (value || []).join("\n");
    else input.value = value ?? "";
  }
}

function planView(plan) {
  const params = Object.entries(plan.trainable_params || {});
  return h(
    "section",
    { class: "card", "aria-labelledby": "plan-title", "data-testid": "plan" },
    h("h2", { id: "plan-title" }, "Plan"),
    facts([
      ["Base model", plan.base_model],
      ["Total steps", formatNumber(plan.total_steps)],
      ["Adapter file", formatBytes(plan.adapter_file_bytes)],
      ["Peak memory", formatBytes(plan.peak_memory_bytes)],
      ["Seconds per step", formatNumber(plan.seconds_per_step)],
      ["Estimated duration", formatDuration(plan.estimated_duration_s)],
    ]),
    params.length ? table("Trainable parameters", ["Part", "Parameters"], params.map(([k, v]) => [k, formatNumber(v)])) : null,
    Object.keys(plan.memory || {}).length
      ? table("Memory estimate", ["Part", "Bytes"], Object.entries(plan.memory).map(([k, v]) => [k, formatBytes(v)]))
      : null,
  );
}
