import assert from "node:assert/strict";
import { test } from "node:test";

import { formatTick, niceTicks, pathData, scalePoints } from "../../../service/console/static/chart.js";

test("niceTicks covers the range with round steps", () => {
  assert.deepEqual(niceTicks(0, 0.93, 5), [0, 0.25, 0.5, 0.75, 1]);
  assert.deepEqual(niceTicks(10, 20, 6), [10, 12, 14, 16, 18, 20]);
  assert.deepEqual(niceTicks(1, 100, 5), [0, 25, 50, 75, 100]);
  const ticks = niceTicks(0.1123, 0.1178, 4);
  assert.ok(ticks[0] <= 0.1123 && ticks[ticks.length - 1] >= 0.1178, ticks.join());
});

test("niceTicks widens a single value instead of dividing by zero", () => {
  const ticks = niceTicks(5, 5, 4);
  assert.ok(ticks.length >= 2);
  assert.ok(ticks[0] < 5 && ticks[ticks.length - 1] > 5);
  assert.deepEqual(niceTicks(Number.NaN, 1), []);
});

test("scalePoints maps the domain onto the padded box, y pointing down", () => {
  const points = [
    { x: 0, y: 0 },
    { x: 10, y: 1 },
  ];
  const scaled = scalePoints(points, { width: 120, height: 60, pad: 10 });
  assert.deepEqual(scaled, [
    { x: 10, y: 50 },
    { x: 110, y: 10 },
  ]);
  const one = scalePoints([{ x: 3, y: 3 }], { width: 100, height: 100 });
  assert.deepEqual(one, [{ x: 50, y: 50 }]);
});

test("scalePoints honours an explicit domain", () => {
  const [p] = scalePoints([{ x: 5, y: 0.5 }], { width: 100, height: 100, xDomain: [0, 10], yDomain: [0, 1] });
  assert.deepEqual(p, { x: 50, y: 50 });
});

test("pathData starts with a move and rounds to 0.1 px", () => {
  assert.equal(
    pathData([
      { x: 1, y: 2 },
      { x: 3.14159, y: 4.06 },
    ]),
    "M1.0 2.0 L3.1 4.1",
  );
  assert.equal(pathData([]), "");
});

test("formatTick keeps three significant digits without exponents for rates", () => {
  assert.equal(formatTick(0.0009000000001), "0.0009");
  assert.equal(formatTick(1.23456), "1.23");
  assert.equal(formatTick(1200), "1200");
});
