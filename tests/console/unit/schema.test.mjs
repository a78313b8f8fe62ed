import assert from "node:assert/strict";
import { test } from "node:test";

import { describeLimits, fieldsFromSchema, parseFieldValue } from "../../../service/console/static/schema.js";

const openapi = {
  components: {
    schemas: {
      Lr: { type: "string", enum: ["constant", "cosine"] },
      H: {
        properties: {
          rank: { type: "integer", default: 16, exclusiveMinimum: 0, maximum: 1024, title: "Rank" },
          resolution: { type: "integer", default: 512, minimum: 8, maximum: 4096, multipleOf: 8 },
          learning_rate: { type: "number", default: 0.0001, exclusiveMinimum: 0 },
          alpha: { anyOf: [{ type: "number", exclusiveMinimum: 0 }, { type: "null" }] },
          flip: { type: "boolean", default: false },
          scheduler: { $ref: "#/components/schemas/Lr", default: "constant" },
          prompts: { type: "array", items: { type: "string" }, maxItems: 16 },
          seeds: { type: "array", items: { type: "integer", minimum: 0 }, minItems: 1, maxItems: 8 },
          metrics: { type: "array", items: { type: "string", enum: ["clip_score", "leakage"] } },
          targets: {
            anyOf: [{ type: "string", enum: ["attn", "cross-attn-qkv"] }, { type: "array", items: { type: "string" } }],
            default: "attn",
          },
        },
      },
    },
  },
};

test("fields carry kinds, defaults and limits from the schema", () => {
  const fields = Object.fromEntries(fieldsFromSchema(openapi, "H").map((f) => [f.name, f]));
  assert.equal(fields.rank.kind, "integer");
  assert.equal(fields.rank.default, 16);
  assert.equal(fields.rank.label, "Rank");
  assert.equal(describeLimits(fields.rank), "> 0, ≤ 1024");
  assert.equal(describeLimits(fields.resolution), "≥ 8, ≤ 4096, multiple of 8");
  assert.equal(fields.learning_rate.step, "any");
  assert.equal(fields.alpha.kind, "number");
  assert.equal(fields.alpha.nullable, true);
  assert.equal(fields.flip.kind, "boolean");
  assert.deepEqual(fields.scheduler.options, ["constant", "cosine"]);
  assert.equal(fields.prompts.kind, "list");
  assert.equal(fields.prompts.maxItems, 16);
  assert.equal(fields.prompts.itemKind, "string");
  assert.equal(fields.seeds.itemKind, "integer");
  assert.equal(fields.seeds.minItems, 1);
  assert.equal(fields.metrics.itemKind, "enum");
  assert.deepEqual(fields.metrics.itemOptions, ["clip_score", "leakage"]);
  assert.equal(fields.targets.kind, "choice-or-list");
});

test("parseFieldValue leaves empty inputs to the API's defaults", () => {
  const fields = Object.fromEntries(fieldsFromSchema(openapi, "H").map((f) => [f.name, f]));
  assert.equal(parseFieldValue(fields.rank, " "), undefined);
  assert.equal(parseFieldValue(fields.rank, "4"), 4);
  assert.equal(parseFieldValue(fields.learning_rate, "1e-3"), 0.001);
  assert.equal(parseFieldValue(fields.flip, true), true);
  assert.deepEqual(parseFieldValue(fields.prompts, "a fox\n\n a cat "), ["a fox", "a cat"]);
  // Integer items become numbers; anything else is left for the API to refuse.
  assert.deepEqual(parseFieldValue(fields.seeds, "0\n 7 \nx"), [0, 7, "x"]);
  assert.equal(parseFieldValue(fields.targets, "attn"), "attn");
  assert.deepEqual(parseFieldValue(fields.targets, "to_q, to_v"), ["to_q", "to_v"]);
});
