// Adapters: list and search, versions with lineage and metrics, aliases, downloads, import.

import { api, download } from "../api.js";
import { facts, h, labelled, notice, table } from "../dom.js";
import { metricColumns } from "../evaluation.js";
import { formatBytes, formatNumber, formatTime } from "../format.js";

export async function showAdapters(page) {
  const search = h("input", { type: "search", name: "search", placeholder: "name prefix" });
  const results = h("div", { "aria-live": "polite" });
  const load = async () => {
    const prefix = search.value.trim();
    const list = await api(`/adapters?limit=100${prefix ? `&prefix=${encodeURIComponent(prefix)}` : ""}`);
    results.replaceChildren(
      list.data.length
        ? table(
            `${list.data.length}${list.has_more ? "+" : ""} adapters`,
            ["Name", "Base model", "Versions", "Latest", "Best", "Aliases", "Created"],
            list.data.map((a) => [
              h("a", { href: `#/adapters/${encodeURIComponent(a.name)}` }, a.name),
              a.base_model,
              String(a.version_count),
              a.latest_version === null ? "–" : `v${a.latest_version}`,
              a.aliases.best === undefined ? "–" : `v${a.aliases.best}`,
              Object.entries(a.aliases).map(([alias, v]) => `${alias}→v${v}`).join(", ") || "–",
              formatTime(a.created_at),
            ]),
          )
        : notice(prefix ? `No adapter starts with “${prefix}”.` : "No adapters yet: train one or import a file."),
    );
  };
  let timer;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(load, 200);
  });
  page.append(h("h1", {}, "Adapters"), labelled("Search adapters", search), results, importForm());
  await load();
}

function importForm() {
  const file = h("input", { type: "file", name: "file", accept: ".safetensors", required: true });
  const name = h("input", { type: "text", name: "name", required: true, maxlength: 100 });
  const base = h("input", { type: "text", name: "base_model", required: true, value: "tiny" });
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "import-title" },
    h("h2", { id: "import-title" }, "Import a LoRA file"),
    h("div", { class: "row" }, labelled("File (.safetensors)", file), labelled("Adapter name", name), labelled("Base model", base)),
    h("button", { type: "submit" }, "Import"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = new FormData(form);
    status.replaceChildren(notice("Importing…"));
    try {
      const version = await api("/adapters/import", { method: "POST", body });
      status.replaceChildren(
        notice(`Imported as ${version.ref}.`),
        lintView(version.report),
        h("a", { href: `#/adapters/${encodeURIComponent(version.adapter)}` }, "Open the adapter"),
      );
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"), error.body?.report ? lintView(error.body.report) : "");
    }
  });
  return form;
}

/** The import lint report: format, rank/alpha, matched/unmatched keys, warnings, errors. */
export function lintView(report) {
  return h(
    "section",
    { class: "lint", "aria-label": "Lint report" },
    facts([
      ["Format", report.format || "–"],
      ["Rank", report.rank ?? "–"],
      ["Alpha", `${report.alpha ?? "–"} (${report.alpha_source || "–"})`],
      ["Parameters", formatNumber(report.param_count)],
      ["Matched keys", formatNumber((report.matched_keys || []).length)],
      ["Unmatched keys", formatNumber((report.unmatched_keys || []).length)],
      ["Ignored keys", formatNumber((report.ignored_keys || []).length)],
    ]),
    (report.warnings || []).length ? h("ul", { class: "warnings" }, report.warnings.map((w) => h("li", {}, w))) : null,
    (report.errors || []).length ? h("ul", { class: "errors" }, report.errors.map((e) => h("li", {}, e))) : null,
  );
}

export async function showAdapter(page, { args: [name] }) {
  const path = `/adapters/${encodeURIComponent(name)}`;
  const adapter = await api(path);
  const status = h("div", { "aria-live": "polite" });
  const rerender = async () => {
    page.replaceChildren();
    await showAdapter(page, { args: [name] });
  };
  const versions = [...adapter.versions].reverse().map((v) => versionView(adapter, v, status));
  page.append(
    h("h1", {}, `Adapter ${adapter.name}`),
    facts([
      ["Base model", adapter.base_model],
      ["Versions", String(adapter.version_count)],
      ["Latest", adapter.latest_version === null ? "–" : `v${adapter.latest_version}`],
      [
        "Best (by evaluation)",
        adapter.aliases.best === undefined
          ? "–"
          : h("span", { "data-testid": "best-version" }, `v${adapter.aliases.best} (${adapter.name}@best)`),
      ],
      ["Created", formatTime(adapter.created_at)],
    ]),
    status,
    aliasesView(adapter, status, rerender),
    h("h2", {}, "Versions, newest first"),
    ...versions,
  );
}

function versionView(adapter, version, status) {
  const base = `/adapters/${encodeURIComponent(adapter.name)}/versions/${version.version}/download`;
  const button = (format, label) => {
    const b = h("button", { type: "button", "data-format": format }, label);
    b.addEventListener("click", async () => {
      try {
        const size = await download(`${base}?format=${format}`, `${adapter.name}-v${version.version}-${format}.safetensors`);
        status.replaceChildren(notice(`Downloaded ${version.ref} (${format}, ${formatBytes(size)}).`));
      } catch (error) {
        status.replaceChildren(notice(error.message, "error"));
      }
    });
    return b;
  };
  const lineage = Object.entries(version.lineage || {});
  const metrics = metricRows(version.metrics || {});
  return h(
    "article",
    { class: "card version", "aria-label": `Version ${version.version}` },
    h("h3", {}, `v${version.version} `, version.aliases.map((a) => h("span", { class: a === "best" ? "tag best" : "tag" }, a))),
    facts([
      ["Ref", h("code", {}, version.ref)],
      ["Source", version.source],
      ["Job", version.job_id ? h("a", { href: `#/jobs/${version.job_id}` }, version.job_id) : "–"],
      ["Checkpoint step", version.checkpoint_step ?? "–"],
      ["Rank / alpha", `${version.rank ?? "–"} / ${version.alpha ?? "–"}`],
      ["Trainable parameters", formatNumber(version.trainable_params)],
      ["Size", formatBytes(version.size_bytes)],
      ["sha256", h("code", {}, version.sha256.slice(0, 16))],
      ["Created", formatTime(version.created_at)],
    ]),
    h(
      "p",
      { class: "actions" },
      button("diffusers", "Download (diffusers)"),
      " ",
      button("kohya", "Download (kohya / A1111)"),
      " ",
      h("a", { class: "button", href: `#/playground?adapter=${encodeURIComponent(version.ref)}` }, "Use in the playground"),
    ),
    metrics.length ? table("Metrics", ["Metric", "Value"], metrics) : null,
    version.metrics?.evaluation_per_prompt
      ? h(
          "details",
          {},
          h("summary", {}, "Evaluation per prompt"),
          h("pre", {}, JSON.stringify(version.metrics.evaluation_per_prompt, null, 2)),
        )
      : null,
    lineage.length
      ? h("details", {}, h("summary", {}, "Lineage"), h("pre", {}, JSON.stringify(version.lineage, null, 2)))
      : null,
  );
}

/** A version's metrics as rows: the evaluation's aggregates one per row, then the others. */
function metricRows(metrics) {
  const rows = [];
  const evaluation = metrics.evaluation;
  if (evaluation && typeof evaluation === "object") {
    const step = metrics.evaluation_step === undefined ? "" : ` (step ${metrics.evaluation_step})`;
    for (const name of metricColumns([evaluation])) rows.push([`evaluation${step}: ${name}`, formatNumber(evaluation[name])]);
  }
  for (const [name, value] of Object.entries(metrics)) {
    if (name.startsWith("evaluation")) continue;
    rows.push([name, typeof value === "number" ? formatNumber(value) : JSON.stringify(value)]);
  }
  return rows;
}

function aliasesView(adapter, status, rerender) {
  const path = `/adapters/${encodeURIComponent(adapter.name)}/aliases/`;
  const rows = Object.entries(adapter.aliases).map(([alias, version]) => {
    const remove = h("button", { type: "button", disabled: alias === "latest" }, `Remove ${alias}`);
    remove.addEventListener("click", async () => {
      try {
        await api(path + encodeURIComponent(alias), { method: "DELETE" });
        await rerender();
      } catch (error) {
        status.replaceChildren(notice(error.message, "error"));
      }
    });
    return [alias, `v${version}`, alias === "latest" ? "moves by itself" : remove];
  });
  const alias = h("input", { type: "text", name: "alias", required: true, placeholder: "prod" });
  const version = h(
    "select",
    { name: "version" },
    adapter.versions.map((v) => h("option", { value: v.version }, `v${v.version}`)).reverse(),
  );
  const form = h(
    "form",
    { class: "row", "aria-label": "Point an alias" },
    labelled("Alias", alias),
    labelled("Version", version),
    h("button", { type: "submit" }, "Point alias"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api(path + encodeURIComponent(alias.value.trim()), { method: "PUT", body: { version: Number(version.value) } });
      await rerender();
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"));
    }
  });
  const history = adapter.alias_history || [];
  return h(
    "section",
    { "aria-labelledby": "aliases-title" },
    h("h2", { id: "aliases-title" }, "Aliases"),
    rows.length ? table(null, ["Alias", "Version", "Action"], rows) : notice("No aliases."),
    form,
    history.length
      ? h(
          "details",
          {},
          h("summary", {}, "Alias history (roll back by pointing an alias at an earlier version)"),
          table(
            null,
            ["When", "Alias", "From", "To"],
            history.map((e) => [formatTime(e.created_at), e.alias, e.from_version === null ? "–" : `v${e.from_version}`, e.to_version === null ? "removed" : `v${e.to_version}`]),
          ),
        )
      : null,
  );
}
