// Evaluation helpers shared by the pages: checkpoint refs, grid axes, metric columns, sorting.
// Pure functions: unit-tested with node.

/** The order metric columns take in tables (the API's report order); others follow by name. */
export const METRIC_ORDER = [
  "clip_score",
  "clip_score_base",
  "clip_score_gain",
  "fidelity_dino",
  "fidelity_clip_i",
  "strength",
  "leakage",
  "cmmd",
];

/** A checkpoint as a ref /generate and /grids take: "name@ckpt:400" (or "<job id>@ckpt:400"). */
export function checkpointRef(nameOrJobId, step) {
  return `${nameOrJobId}@ckpt:${step}`;
}

/** Every metric name present in a list of {metric: value} objects, in METRIC_ORDER first. */
export function metricColumns(metricObjects) {
  const present = new Set();
  for (const metrics of metricObjects) for (const name of Object.keys(metrics || {})) present.add(name);
  const known = METRIC_ORDER.filter((name) => present.has(name));
  const rest = [...present].filter((name) => !METRIC_ORDER.includes(name)).sort();
  return [...known, ...rest];
}

const AXIS_KINDS = ["prompt", "seed", "adapter", "weight"];

/**
 * The values of one grid axis from a text field: one per line (prompts and adapter refs may
 * hold commas). Seeds are integers, weights numbers in [-4, 4]; for adapters an empty line is
 * skipped and "none" or "base" is null, the base model. Throws an Error with a readable message.
 */
export function parseAxisValues(kind, text) {
  if (!AXIS_KINDS.includes(kind)) throw new Error(`unknown axis ${kind}`);
  const lines = String(text ?? "")
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
  if (!lines.length) throw new Error(`${kind}: give at least one value, one per line`);
  return lines.map((line) => {
    if (kind === "seed") {
      if (!/^\d+$/.test(line)) throw new Error(`seed: ${line} is not a whole number ≥ 0`);
      return Number(line);
    }
    if (kind === "weight") {
      const value = Number(line);
      if (!Number.isFinite(value) || value < -4 || value > 4) throw new Error(`weight: ${line} is not a number from -4 to 4`);
      return value;
    }
    if (kind === "adapter" && ["none", "base"].includes(line.toLowerCase())) return null;
    return line;
  });
}

/** A cell's value for sorting: numbers as numbers, booleans as 0/1, empty as null. */
function sortValue(value) {
  if (value === null || value === undefined || value === "") return null;
  if (typeof value === "boolean") return value ? 1 : 0;
  return value;
}

/**
 * Rows sorted by key(row), ascending or descending; empty values always last; ties keep their
 * order (a stable sort). Numbers compare as numbers, text in natural order ("run-2" < "run-10").
 */
export function sortRows(rows, key, descending = false) {
  const sign = descending ? -1 : 1;
  return rows
    .map((row, index) => ({ row, index, value: sortValue(key(row)) }))
    .sort((a, b) => {
      if (a.value === null || b.value === null) {
        if (a.value === b.value) return a.index - b.index;
        return a.value === null ? 1 : -1;
      }
      let order;
      if (typeof a.value === "number" && typeof b.value === "number") order = a.value - b.value;
      else order = String(a.value).localeCompare(String(b.value), "en", { numeric: true });
      return order ? sign * order : a.index - b.index;
    })
    .map(({ row }) => row);
}

/** An experiment grid's values from "8, 32" or "false,true": JSON when a value parses, else text. */
export function parseGridValues(text) {
  const parts = String(text ?? "")
    .split(",")
    .map((part) => part.trim());
  if (!parts.some(Boolean) || parts.some((part) => !part)) throw new Error("give comma-separated values, e.g. 8, 32");
  return parts.map((part) => {
    try {
      return JSON.parse(part);
    } catch {
      return part;
    }
  });
}
