import assert from "node:assert/strict";
import { test } from "node:test";

import { checkpointRef, metricColumns, parseAxisValues, parseGridValues, sortRows } from "../../../service/console/static/evaluation.js";

test("checkpoint refs name the adapter or the job", () => {
  assert.equal(checkpointRef("squares", 400), "squares@ckpt:400");
  assert.equal(checkpointRef("job_0123", 2), "job_0123@ckpt:2");
});

test("metric columns come in the report's order, unknown ones after by name", () => {
  assert.deepEqual(
    metricColumns([{ leakage: 1, clip_score: 2 }, { zeta: 0, clip_score_base: 1, alpha: 3 }, null]),
    ["clip_score", "clip_score_base", "leakage", "alpha", "zeta"],
  );
  assert.deepEqual(metricColumns([]), []);
});

test("grid axis values are typed by their kind", () => {
  assert.deepEqual(parseAxisValues("seed", "1\n 2 \n\n"), [1, 2]);
  assert.deepEqual(parseAxisValues("weight", "0.5\n-1\n4"), [0.5, -1, 4]);
  assert.deepEqual(parseAxisValues("adapter", "none\nsq@ckpt:400\nBase\nsq@best"), [null, "sq@ckpt:400", null, "sq@best"]);
  assert.deepEqual(parseAxisValues("prompt", "a cat, sitting\na dog"), ["a cat, sitting", "a dog"]);
  assert.throws(() => parseAxisValues("seed", "1\n-2"), /seed: -2/);
  assert.throws(() => parseAxisValues("seed", "1.5"), /seed/);
  assert.throws(() => parseAxisValues("weight", "5"), /weight: 5/);
  assert.throws(() => parseAxisValues("weight", "heavy"), /weight/);
  assert.throws(() => parseAxisValues("prompt", " \n "), /at least one/);
  assert.throws(() => parseAxisValues("colour", "red"), /unknown axis/);
});

test("rows sort by any column, numbers as numbers, empty cells last, ties stable", () => {
  const rows = [
    { name: "run-10", score: 0.2, ok: true },
    { name: "run-2", score: null, ok: false },
    { name: "run-1", score: 0.9, ok: true },
    { name: "run-3", score: 0.2, ok: false },
  ];
  const names = (sorted) => sorted.map((r) => r.name);
  assert.deepEqual(names(sortRows(rows, (r) => r.score)), ["run-10", "run-3", "run-1", "run-2"]);
  assert.deepEqual(names(sortRows(rows, (r) => r.score, true)), ["run-1", "run-10", "run-3", "run-2"]);
  assert.deepEqual(names(sortRows(rows, (r) => r.name)), ["run-1", "run-2", "run-3", "run-10"]);
  assert.deepEqual(names(sortRows(rows, (r) => r.ok, true)), ["run-10", "run-1", "run-2", "run-3"]);
  assert.deepEqual(names(rows), ["run-10", "run-2", "run-1", "run-3"]); // the input is untouched
});

test("experiment grid values read as JSON when they parse, else as text", () => {
  assert.deepEqual(parseGridValues("8, 32"), [8, 32]);
  assert.deepEqual(parseGridValues("false,true"), [false, true]);
  assert.deepEqual(parseGridValues("1e-4, 0.001"), [0.0001, 0.001]);
  assert.deepEqual(parseGridValues("cosine, constant"), ["cosine", "constant"]);
  assert.throws(() => parseGridValues(" "), /comma-separated/);
  assert.throws(() => parseGridValues("8,,32"), /comma-separated/);
});
