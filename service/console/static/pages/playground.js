// Playground: prompt + adapters with weights -> images; "same seed, base vs adapters" compare.

import { api, imageUrl, openapi } from "../api.js";
import { h, labelled, notice } from "../dom.js";
import { parseAxisValues } from "../evaluation.js";
import { formatNumber } from "../format.js";
import { fieldsFromSchema } from "../schema.js";

const MAX_SEED = 2 ** 32 - 1;

export async function showPlayground(page, { params }) {
  const [schema, adapters] = await Promise.all([openapi(), api("/adapters?limit=100")]);
  const fields = Object.fromEntries(fieldsFromSchema(schema, "GenerateRequest").map((f) => [f.name, f]));
  const refs = await adapterRefs(adapters.data);

  const prompt = h("textarea", { name: "prompt", rows: 2, required: true }, "a red square");
  const negative = h("textarea", { name: "negative_prompt", rows: 1 });
  const seed = h("input", { type: "number", name: "seed", min: 0, max: MAX_SEED, step: 1, value: randomSeed() });
  const lock = h("input", { type: "checkbox", name: "seed_lock" });
  const width = h("input", { type: "number", name: "width", min: 8, step: 8, placeholder: "model native" });
  const height = h("input", { type: "number", name: "height", min: 8, step: 8, placeholder: "model native" });
  const steps = h("input", {
    type: "number",
    name: "num_inference_steps",
    min: fields.num_inference_steps.min ?? 1,
    step: 1,
    value: 4,
  });
  const guidance = h("input", {
    type: "number",
    name: "guidance_scale",
    min: fields.guidance_scale.min,
    max: fields.guidance_scale.max,
    step: "any",
    value: fields.guidance_scale.default,
  });
  const scheduler = h(
    "select",
    { name: "scheduler" },
    fields.scheduler.options.map((o) => h("option", { value: o, selected: o === fields.scheduler.default }, o)),
  );
  const chosen = h("ul", { class: "chosen", "aria-label": "Adapters in use" });
  const pick = h(
    "select",
    { name: "adapter_ref" },
    h("option", { value: "" }, refs.length ? "choose an adapter…" : "no adapters yet"),
    refs.map((r) => h("option", { value: r }, r)),
  );
  const addAdapter = (ref, weight = 1) => {
    if (!ref) return;
    const slider = h("input", { type: "range", min: -2, max: 2, step: 0.05, value: weight, name: "weight" });
    const shown = h("output", {}, String(weight));
    slider.addEventListener("input", () => {
      shown.textContent = slider.value;
    });
    const remove = h("button", { type: "button", "aria-label": `Remove ${ref}` }, "×");
    const item = h("li", { dataset: { ref } }, labelled(`Weight of ${ref}`, slider), shown, remove);
    remove.addEventListener("click", () => item.remove());
    chosen.append(item);
  };
  const add = h("button", { type: "button" }, "Add adapter");
  add.addEventListener("click", () => addAdapter(pick.value));
  if (params.get("adapter")) addAdapter(params.get("adapter"), 1);

  const status = h("div", { "aria-live": "polite" });
  const gallery = h("ul", { class: "gallery", "aria-label": "Results", "data-testid": "gallery" });
  const generateButton = h("button", { type: "submit" }, "Generate");
  const compareButton = h("button", { type: "button" }, "Compare: base vs these adapters");

  const request = (withAdapters) => {
    if (!lock.checked) seed.value = randomSeed();
    const body = {
      prompt: prompt.value,
      negative_prompt: negative.value.trim() || null,
      seed: Number(seed.value),
      num_inference_steps: Number(steps.value),
      guidance_scale: Number(guidance.value),
      scheduler: scheduler.value,
      adapters: withAdapters
        ? [...chosen.children].map((li) => ({ ref: li.dataset.ref, weight: Number(li.querySelector("input").value) }))
        : [],
    };
    if (width.value) body.width = Number(width.value);
    if (height.value) body.height = Number(height.value);
    return body;
  };

  const run = async (bodies, label) => {
    status.replaceChildren(notice("Generating…"));
    generateButton.disabled = compareButton.disabled = true;
    try {
      const answers = await Promise.all(bodies.map((body) => api("/generate", { method: "POST", body })));
      const row = h("li", { class: bodies.length > 1 ? "compare" : "" });
      for (const [i, answer] of answers.entries()) row.append(await resultView(answer, bodies[i]));
      gallery.prepend(row);
      status.replaceChildren(notice(`${label} done.`));
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"));
    } finally {
      generateButton.disabled = compareButton.disabled = false;
    }
  };

  const form = h(
    "form",
    { class: "card", "aria-labelledby": "play-title" },
    h("h1", { id: "play-title" }, "Playground"),
    labelled("Prompt", prompt),
    labelled("Negative prompt", negative),
    h("div", { class: "row" }, labelled("Adapter (version or alias)", pick), add),
    chosen,
    h(
      "div",
      { class: "row" },
      h("div", { class: "field" }, labelled("Seed", seed), h("label", { class: "inline" }, lock, " lock seed")),
      labelled("Width", width),
      labelled("Height", height),
      labelled("Steps", steps),
      labelled("Guidance scale", guidance),
      labelled("Scheduler", scheduler),
    ),
    h("div", { class: "actions" }, generateButton, " ", compareButton),
    status,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run([request(true)], "Generation");
  });
  compareButton.addEventListener("click", () => {
    const withAdapters = request(true);
    run([{ ...withAdapters, adapters: [] }, withAdapters], "Comparison");
  });
  const shared = () => ({
    prompt: prompt.value.trim() || null,
    negative_prompt: negative.value.trim() || null,
    adapter: chosen.firstElementChild?.dataset.ref || null,
    weight: chosen.firstElementChild ? Number(chosen.firstElementChild.querySelector("input").value) : 1,
    seed: Number(seed.value),
    num_inference_steps: Number(steps.value),
    guidance_scale: Number(guidance.value),
    scheduler: scheduler.value,
    width: width.value ? Number(width.value) : null,
    height: height.value ? Number(height.value) : null,
  });
  page.append(form, gridForm(schema, refs, params.get("adapter"), shared), h("h2", {}, "Results"), gallery);
}

/**
 * The X/Y grid (POST /grids): two axes among prompts, seeds, adapter refs and weights; every
 * other setting comes from the form above (its prompt, first adapter and weight, seed, steps,
 * size, guidance, scheduler). The grid renders as a job; the page polls it, then shows the PNG.
 */
function gridForm(schema, refs, wanted, shared) {
  const kinds = schema.components.schemas.GridAxis.properties.axis.enum;
  const axisSelect = (name, chosenKind, optional) =>
    h(
      "select",
      { name },
      optional ? h("option", { value: "" }, "none (one row)") : null,
      kinds.map((k) => h("option", { value: k, selected: k === chosenKind }, k)),
    );
  const xKind = axisSelect("grid_x_axis", "adapter", false);
  const yKind = axisSelect("grid_y_axis", "seed", true);
  const xValues = h("textarea", { name: "grid_x_values", rows: 4, "aria-describedby": "grid-values-hint" }, ["none", wanted || refs[0] || ""].filter(Boolean).join("\n"));
  const yValues = h("textarea", { name: "grid_y_values", rows: 4, "aria-describedby": "grid-values-hint" }, "1\n2");
  const status = h("div", { "aria-live": "polite" });
  const result = h("div", { "data-testid": "grid-result" });
  const submit = h("button", { type: "submit" }, "Render grid");
  const hint =
    "one value per line; adapter refs: none (the base model), name, name@3, name@best, name@ckpt:400 " +
    `(known: ${refs.slice(0, 8).join(", ") || "none yet"}); seeds: whole numbers; weights: -4 to 4`;
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "grid-title", "data-testid": "grid-form" },
    h("h2", { id: "grid-title" }, "X/Y grid"),
    h("p", {}, "One labeled image over two axes; the other settings are the playground's above."),
    h("p", { class: "hint", id: "grid-values-hint" }, hint),
    h(
      "div",
      { class: "row" },
      labelled("X axis (columns)", xKind),
      labelled("X values", xValues),
      labelled("Y axis (rows)", yKind),
      labelled("Y values", yValues),
    ),
    h("div", { class: "actions" }, submit),
    status,
    result,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let body;
    try {
      body = Object.fromEntries(Object.entries(shared()).filter(([, v]) => v !== null));
      body.x = { axis: xKind.value, values: parseAxisValues(xKind.value, xValues.value) };
      if (yKind.value) body.y = { axis: yKind.value, values: parseAxisValues(yKind.value, yValues.value) };
      for (const axis of [xKind.value, yKind.value]) if (axis) delete body[axis];
      if (body.x.axis === "adapter" || body.y?.axis === "adapter") delete body.weight;
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"));
      return;
    }
    submit.disabled = true;
    status.replaceChildren(notice("Rendering the grid…"));
    try {
      // Sent again with the same Idempotency-Key once its job ends, it answers the grid.
      const key = `console-grid-${Date.now()}-${Math.random().toString(36).slice(2)}`;
      const post = () => api("/grids", { method: "POST", body: { ...body, wait: 30 }, headers: { "Idempotency-Key": key } });
      let answer = await post();
      if (!answer.job_id) {
        // 202: the grid's job; poll it until it ends.
        let job = answer;
        while (!["succeeded", "failed", "cancelled"].includes(job.status)) {
          status.replaceChildren(notice(`Grid job ${job.id}: ${job.status}…`));
          await new Promise((resolve) => setTimeout(resolve, 1000));
          job = await api(`/jobs/${encodeURIComponent(job.id)}`);
        }
        if (job.status !== "succeeded") throw new Error(job.error ? `${job.error.code}: ${job.error.message}` : `the grid job ${job.status}`);
        answer = await post();
      }
      const imageId = answer.image_id;
      const labels = [answer.columns.join(", "), answer.rows.join(", ")].filter(Boolean).join(" by ");
      result.replaceChildren(
        h(
          "figure",
          {},
          h("img", { src: await imageUrl(`/images/${imageId}`), alt: `grid: ${labels || "done"}`, "data-testid": "grid-image" }),
          h("figcaption", {}, `Grid job `, h("a", { href: `#/jobs/${answer.job_id}` }, answer.job_id), labels ? `: ${labels}` : ""),
        ),
      );
      status.replaceChildren(notice("Grid done."));
    } catch (error) {
      status.replaceChildren(notice(error.message, "error"));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

async function adapterRefs(adapters) {
  const refs = [];
  for (const a of adapters) {
    refs.push(a.name);
    for (const alias of Object.keys(a.aliases)) if (alias !== "latest") refs.push(`${a.name}@${alias}`);
    for (let v = a.latest_version || 0; v >= 1; v -= 1) refs.push(`${a.name}@${v}`);
  }
  return refs;
}

function randomSeed() {
  return Math.floor(Math.random() * MAX_SEED);
}

async function resultView(answer, body) {
  const adapters = answer.adapters.length
    ? answer.adapters.map((a) => `${a.name}@${a.version} × ${a.weight}`).join(", ")
    : "base model";
  const images = await Promise.all(
    answer.images.map(async (image) =>
      h("img", {
        src: await imageUrl(image.url || `/images/${image.id}`),
        alt: `${body.prompt} (${adapters}, seed ${image.seed ?? answer.seed})`,
        width: image.width,
        height: image.height,
        "data-testid": "generated",
      }),
    ),
  );
  return h(
    "figure",
    {},
    ...images,
    h(
      "figcaption",
      {},
      h("strong", {}, adapters),
      h("br"),
      `“${body.prompt}” seed ${answer.seed}, ${body.num_inference_steps} steps, ${body.scheduler}, ` +
        `cfg ${body.guidance_scale}`,
      h("br"),
      Object.entries(answer.timings || {})
        .map(([name, value]) => `${name} ${formatNumber(value)}`)
        .join(", "),
    ),
  );
}
