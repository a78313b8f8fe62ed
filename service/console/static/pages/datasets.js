// Datasets: drag-and-drop upload with progress, the preflight report, thumbnails, delete.

import { api, imageUrl, upload } from "../api.js";
import { facts, h, labelled, notice, table } from "../dom.js";
import { formatBytes, formatNumber, formatTime } from "../format.js";

const THUMBNAILS_SHOWN = 24;

export async function showDatasets(page) {
  page.append(h("h1", {}, "Datasets"), uploadForm());
  const list = await api("/datasets?limit=100");
  page.append(
    list.data.length
      ? table(
          "Your datasets, newest first",
          ["Name", "Images", "Pairs", "Size", "Created"],
          list.data.map((d) => [
            h("a", { href: `#/datasets/${d.id}` }, d.name),
            formatNumber(d.image_count),
            formatNumber(d.pair_count),
            formatBytes(d.total_bytes),
            formatTime(d.created_at),
          ]),
        )
      : notice("No datasets yet: drop a zip above."),
  );
}

function uploadForm() {
  const file = h("input", { type: "file", name: "file", accept: ".zip,application/zip", required: true });
  const name = h("input", { type: "text", name: "name", required: true, maxlength: 200 });
  const caption = h("input", { type: "text", name: "caption" });
  const trigger = h("input", { type: "text", name: "trigger_word" });
  const progress = h("progress", { max: 1, value: 0, "aria-label": "Upload progress", hidden: true });
  const status = h("div", { "aria-live": "polite" });
  const drop = h(
    "div",
    { class: "drop", "data-testid": "dropzone" },
    h("p", {}, "Drop a dataset zip here, or choose one:"),
    labelled("Zip file", file),
  );
  const setFile = (chosen) => {
    if (!name.value) name.value = chosen.name.replace(/\.zip$/i, "");
  };
  file.addEventListener("change", () => file.files[0] && setFile(file.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) {
      file.files = event.dataTransfer.files;
      setFile(file.files[0]);
    }
  });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload"),
    drop,
    h(
      "div",
      { class: "row" },
      labelled("Name", name),
      labelled("Fixed caption (optional)", caption, "replaces captions found in files"),
      labelled("Trigger word (optional)", trigger, "prepended to every caption"),
    ),
    h("button", { type: "submit" }, "Upload"),
    progress,
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) {
      status.replaceChildren(notice("Choose a zip first.", "error"));
      return;
    }
    const body = new FormData();
    body.append("file", file.files[0]);
    body.append("name", name.value);
    if (caption.value.trim()) body.append("caption", caption.value);
    if (trigger.value.trim()) body.append("trigger_word", trigger.value);
    progress.hidden = false;
    progress.value = 0;
    status.replaceChildren(notice("Uploading…"));
    try {
      const dataset = await upload("/datasets", body, {
        onProgress: (fraction) => {
          progress.value = fraction;
        },
      });
      progress.value = 1;
      location.hash = `#/datasets/${dataset.id}`;
    } catch (error) {
      const report = error.body?.report;
      status.replaceChildren(notice(error.message, "error"), report ? reportView(report) : "");
    }
  });
  return form;
}

export async function showDataset(page, { args: [id] }) {
  const dataset = await api(`/datasets/${encodeURIComponent(id)}`);
  const remove = h("button", { type: "button", class: "danger" }, "Delete dataset");
  const status = h("div", { "aria-live": "polite" });
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete dataset ${dataset.name}?`)) return;
    try {
      await api(`/datasets/${encodeURIComponent(id)}`, { method: "DELETE" });
      location.hash = "#/datasets";
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"));
    }
  });
  page.append(
    h("h1", {}, `Dataset ${dataset.name}`),
    facts([
      ["Id", h("code", {}, dataset.id)],
      ["Status", dataset.status],
      ["Layout", dataset.layout || "–"],
      ["Images", formatNumber(dataset.image_count)],
      ["Captions", formatNumber(dataset.caption_count)],
      ["Pairs", formatNumber(dataset.pair_count)],
      ["Stored", formatBytes(dataset.total_bytes)],
      ["Created", formatTime(dataset.created_at)],
    ]),
    h("p", {}, h("a", { href: `#/train?dataset=${dataset.id}`, class: "button" }, "Train on this dataset"), " ", remove),
    status,
    reportView(dataset.report),
    await thumbnails(dataset),
  );
}

/** The preflight report: counts, size histogram, aspect ratios, warnings, duplicates. */
export function reportView(report) {
  const section = h("section", { class: "report", "aria-labelledby": "report-title" });
  section.append(h("h2", { id: "report-title" }, "Preflight report"));
  const warnings = report.warnings || [];
  section.append(
    warnings.length
      ? h("ul", { class: "warnings", "aria-label": "Warnings" }, warnings.map((w) => h("li", {}, w)))
      : notice("No warnings."),
  );
  const counts = report.counts || {};
  section.append(
    table(
      "Counts",
      ["What", "Count"],
      Object.entries(counts).map(([k, v]) => [k.replaceAll("_", " "), formatNumber(v)]),
    ),
  );
  const histogram = report.resolution?.min_side_histogram;
  if (histogram) section.append(histogramView("Shorter side (px)", histogram));
  const aspects = report.aspect_ratios?.buckets;
  if (aspects && Object.keys(aspects).length) section.append(histogramView("Aspect ratios (width:height)", aspects));
  const common = report.resolution?.most_common_sizes;
  if (Array.isArray(common) && common.length) {
    section.append(
      table(
        "Most common sizes",
        ["Size", "Images"],
        common.map((entry) => [entry.size, formatNumber(entry.count)]),
      ),
    );
  }
  const duplicates = report.duplicates || [];
  if (duplicates.length) {
    section.append(
      table(
        "Byte-identical duplicates",
        ["sha256", "Files"],
        duplicates.map((d) => [h("code", {}, d.sha256.slice(0, 12)), d.files.join(", ")]),
      ),
    );
  }
  for (const [key, label] of [
    ["undecodable", "Undecodable files"],
    ["caption_errors", "Caption errors"],
    ["ignored", "Ignored files"],
  ]) {
    const rows = report[key] || [];
    if (rows.length) section.append(table(label, ["File", "Reason"], rows.map((r) => [r.file, r.reason])));
  }
  if (report.captions) {
    const c = report.captions;
    section.append(
      facts([
        ["Captions", formatNumber(c.count)],
        ["Tokens (mean / max)", `${formatNumber(c.tokens?.mean)} / ${formatNumber(c.tokens?.max)}`],
        ["Over the token limit", `${formatNumber(c.over_token_limit)} (limit ${c.token_limit})`],
      ]),
    );
  }
  return section;
}

/** A horizontal bar histogram from {bucket: count}. */
export function histogramView(title, buckets) {
  const max = Math.max(1, ...Object.values(buckets));
  return h(
    "figure",
    { class: "histogram" },
    h("figcaption", {}, title),
    h(
      "ul",
      {},
      Object.entries(buckets).map(([bucket, count]) =>
        h(
          "li",
          {},
          h("span", { class: "bucket" }, bucket),
          h("span", { class: "bar", style: `--fill:${(100 * count) / max}%`, "aria-hidden": "true" }),
          h("span", { class: "count" }, formatNumber(count)),
        ),
      ),
    ),
  );
}

async function thumbnails(dataset) {
  const count = Math.min(dataset.pair_count, THUMBNAILS_SHOWN);
  const grid = h("ul", { class: "thumbs", "aria-label": "Thumbnails" });
  const section = h(
    "section",
    {},
    h("h2", {}, `Images (first ${count} of ${formatNumber(dataset.pair_count)})`),
    h("p", { class: "hint" }, "The API serves thumbnails of stored items; their captions are not exposed."),
    grid,
  );
  await Promise.all(
    Array.from({ length: count }, async (_, index) => {
      const img = h("img", { alt: `item ${index}`, width: 96, height: 96, loading: "lazy" });
      grid.append(h("li", {}, img));
      img.src = await imageUrl(`/datasets/${encodeURIComponent(dataset.id)}/images/${index}?size=128`);
    }),
  );
  return section;
}
