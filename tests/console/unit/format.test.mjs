import assert from "node:assert/strict";
import { test } from "node:test";

import {
  describeProblem,
  formatBytes,
  formatDuration,
  formatNumber,
  formatProgress,
  formatTime,
} from "../../../service/console/static/format.js";

test("formatBytes uses binary units and one decimal below 10", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(1023), "1023 B");
  assert.equal(formatBytes(1536), "1.5 KB");
  assert.equal(formatBytes(20 * 1024 * 1024), "20 MB");
  assert.equal(formatBytes(3.25 * 1024 ** 3), "3.3 GB");
  assert.equal(formatBytes(-2048), "-2.0 KB");
  assert.equal(formatBytes(null), "–");
});

test("formatDuration picks seconds, minutes or hours", () => {
  assert.equal(formatDuration(0.4), "0 s");
  assert.equal(formatDuration(45), "45 s");
  assert.equal(formatDuration(185), "3 min 05 s");
  assert.equal(formatDuration(2 * 3600 + 7 * 60 + 30), "2 h 07 min");
  assert.equal(formatDuration(-5), "0 s");
  assert.equal(formatDuration(undefined), "–");
});

test("formatNumber groups integers and keeps three significant digits", () => {
  assert.equal(formatNumber(1234567), "1,234,567");
  assert.equal(formatNumber(0.123456), "0.123");
  assert.equal(formatNumber(0.0001), "1.00e-4");
  assert.equal(formatNumber(12.3456), "12.3");
  assert.equal(formatNumber(Number.NaN), "–");
});

test("formatProgress shows step, total and a floored percentage", () => {
  assert.equal(formatProgress(12, 20), "12 / 20 (60%)");
  assert.equal(formatProgress(19, 20), "19 / 20 (95%)");
  assert.equal(formatProgress(25, 20), "25 / 20 (100%)");
  assert.equal(formatProgress(undefined, undefined), "–");
  assert.equal(formatProgress(0, 20), "0 / 20 (0%)");
});

test("formatTime renders local time and rejects garbage", () => {
  const iso = "2026-12-03T14:05:09Z";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  assert.equal(formatTime(iso), `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:05:09`);
  assert.equal(formatTime("not a date"), "–");
  assert.equal(formatTime(null), "–");
});

test("describeProblem reads RFC 9457 bodies and validation errors", () => {
  assert.equal(describeProblem(404, { title: "Not Found", detail: "no dataset x" }), "Not Found: no dataset x");
  assert.equal(
    describeProblem(422, { title: "Unprocessable", errors: [{ loc: ["body", "rank"], msg: "too big" }] }),
    "Unprocessable: body.rank: too big",
  );
  assert.equal(describeProblem(502, "Bad gateway"), "HTTP 502: Bad gateway");
  assert.equal(describeProblem(500, null), "HTTP 500");
});
