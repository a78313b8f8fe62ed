// Formatting helpers shared by the pages. Pure functions: unit-tested with node.

const BYTE_UNITS = ["B", "KB", "MB", "GB", "TB"];

/** 1536 -> "1.5 KB" (binary multiples, one decimal below 10). */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined || Number.isNaN(bytes)) return "–";
  let value = Math.abs(bytes);
  let unit = 0;
  while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 10 ? 0 : 1;
  return `${bytes < 0 ? "-" : ""}${value.toFixed(digits)} ${BYTE_UNITS[unit]}`;
}

/** Seconds -> "45 s", "3 min 05 s", "2 h 07 min". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const minutes = Math.floor(s / 60);
  if (minutes < 60) return `${minutes} min ${String(s % 60).padStart(2, "0")} s`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${String(minutes % 60).padStart(2, "0")} min`;
}

/** 1234567 -> "1,234,567"; small floats keep three significant digits (losses, rates). */
export function formatNumber(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 0.001 || abs >= 1e6)) return value.toExponential(2);
  return Number(value.toPrecision(3)).toString();
}

/** ISO timestamp -> "2026-12-03 14:05:09" in the browser's zone; "–" when absent. */
export function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "–";
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

/** A job's progress as "12 / 20 (60%)". */
export function formatProgress(step, total) {
  if (!total) return step ? String(step) : "–";
  const pct = Math.min(100, Math.floor((100 * (step || 0)) / total));
  return `${step || 0} / ${total} (${pct}%)`;
}

/** An RFC 9457 problem (or any error body) as one readable line. */
export function describeProblem(status, body) {
  if (body && typeof body === "object") {
    const title = body.title || `HTTP ${status}`;
    if (Array.isArray(body.errors) && body.errors.length) {
      const first = body.errors[0];
      const where = Array.isArray(first.loc) ? first.loc.join(".") : "";
      return `${title}: ${where ? `${where}: ` : ""}${first.msg || ""}`.trim();
    }
    return body.detail ? `${title}: ${body.detail}` : title;
  }
  return body ? `HTTP ${status}: ${body}` : `HTTP ${status}`;
}
