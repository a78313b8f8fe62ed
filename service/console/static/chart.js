// A small SVG line chart for training curves (loss, learning rate). No dependencies.

const SVG_NS = "http://www.w3.org/2000/svg";

/** Round tick values covering [min, max]: niceTicks(0, 0.93, 5) -> [0, 0.2, ..., 1]. */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) {
    const pad = min === 0 ? 1 : Math.abs(min) * 0.1;
    return niceTicks(min - pad, max + pad, count);
  }
  const span = max - min;
  const raw = span / Math.max(1, count - 1);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const start = Math.floor(min / step) * step;
  const ticks = [];
  for (let v = start; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((start + ticks.length * step).toPrecision(12)));
  return ticks;
}

/** Map data points {x, y} into a box of width x height with the given padding. */
export function scalePoints(points, { width, height, pad = 0, xDomain, yDomain }) {
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  const [x0, x1] = xDomain || [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = yDomain || [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - 2 * pad);
  const sy = (y) => height - pad - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (height - 2 * pad);
  return points.map((p) => ({ x: sx(p.x), y: sy(p.y) }));
}

/** An SVG path "M x y L x y ..." through the points (coordinates rounded to 0.1 px). */
export function pathData(points) {
  return points
    .map((p, i) => `${i === 0 ? "M" : "L"}${p.x.toFixed(1)} ${p.y.toFixed(1)}`)
    .join(" ");
}

/** A tick label: at most three significant digits, no exponent for ordinary rates. */
export function formatTick(value) {
  return String(Number(value.toPrecision(3)));
}

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/**
 * A line chart that grows as points arrive: chart.add({x, y}) redraws.
 * The points are also kept in a data attribute so tests and screen readers can count them.
 */
export class LineChart {
  constructor(container, { label, width = 480, height = 200, format = formatTick } = {}) {
    this.points = [];
    this.label = label;
    this.width = width;
    this.height = height;
    this.pad = 48;
    this.format = format;
    this.svg = el("svg", {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": label,
      class: "chart",
      "data-points": 0,
    });
    this.title = el("title", {}, label);
    container.append(this.svg);
    this.draw();
  }

  add(point) {
    if (!Number.isFinite(point.x) || !Number.isFinite(point.y)) return;
    const last = this.points[this.points.length - 1];
    if (last && point.x <= last.x) return; // replayed events (a reconnect) are not drawn twice
    this.points.push(point);
    this.draw();
  }

  draw() {
    const { width, height, pad } = this;
    this.svg.replaceChildren(this.title, el("text", { x: pad, y: 16, class: "chart-title" }, this.label));
    this.svg.setAttribute("data-points", this.points.length);
    if (!this.points.length) {
      this.svg.append(el("text", { x: width / 2, y: height / 2, class: "chart-empty" }, "no data yet"));
      return;
    }
    const xs = this.points.map((p) => p.x);
    const ys = this.points.map((p) => p.y);
    const xTicks = niceTicks(Math.min(...xs), Math.max(...xs), 5);
    const yTicks = niceTicks(Math.min(...ys), Math.max(...ys), 4);
    const xDomain = [xTicks[0], xTicks[xTicks.length - 1]];
    const yDomain = [yTicks[0], yTicks[yTicks.length - 1]];
    const box = { width, height, pad, xDomain, yDomain };
    for (const t of yTicks) {
      const [{ y }] = scalePoints([{ x: xDomain[0], y: t }], box);
      this.svg.append(el("line", { x1: pad, x2: width - pad, y1: y, y2: y, class: "chart-grid" }));
      this.svg.append(el("text", { x: pad - 4, y: y + 4, class: "chart-tick-y" }, this.format(t)));
    }
    for (const t of xTicks) {
      const [{ x }] = scalePoints([{ x: t, y: yDomain[0] }], box);
      this.svg.append(el("text", { x, y: height - pad + 16, class: "chart-tick-x" }, String(t)));
    }
    const scaled = scalePoints(this.points, box);
    this.svg.append(el("path", { d: pathData(scaled), class: "chart-line" }));
    for (const p of scaled) this.svg.append(el("circle", { cx: p.x, cy: p.y, r: 2.5, class: "chart-dot" }));
  }
}
