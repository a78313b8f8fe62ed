// The console's shell: sign-in, the hash router and the navigation.

import { session } from "./api.js";
import { h, labelled, notice } from "./dom.js";

const ROUTES = [
  [/^#\/datasets\/([^/]+)$/, () => import("./pages/datasets.js"), "showDataset"],
  [/^#\/datasets$/, () => import("./pages/datasets.js"), "showDatasets"],
  [/^#\/train$/, () => import("./pages/train.js"), "showTrain"],
  [/^#\/jobs\/([^/]+)$/, () => import("./pages/job.js"), "showJob"],
  [/^#\/jobs$/, () => import("./pages/job.js"), "showJobs"],
  [/^#\/adapters\/([^/]+)$/, () => import("./pages/adapters.js"), "showAdapter"],
  [/^#\/adapters$/, () => import("./pages/adapters.js"), "showAdapters"],
  [/^#\/experiments\/([^/]+)$/, () => import("./pages/experiments.js"), "showExperiment"],
  [/^#\/experiments$/, () => import("./pages/experiments.js"), "showExperiments"],
  [/^#\/playground$/, () => import("./pages/playground.js"), "showPlayground"],
  [/^#\/workers$/, () => import("./pages/workers.js"), "showWorkers"],
];

const view = document.getElementById("view");
let current = null; // an AbortController for the page on screen (streams, timers)

function setChrome(signedIn) {
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
}

function showSignIn(message) {
  current?.abort();
  current = null;
  setChrome(false);
  const input = h("input", {
    type: "password",
    name: "key",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
  });
  const status = h("div", { "aria-live": "polite" }, message ? notice(message, "error") : null);
  const form = h(
    "form",
    { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    h("p", {}, "Paste an API key. It stays in this tab's session storage and is sent as a Bearer token."),
    labelled("API key", input),
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    let problem = null;
    try {
      // A direct probe: a 401 here is an answer for this form, not a session expiring.
      const response = await fetch("/datasets?limit=1", { headers: { Authorization: `Bearer ${key}` } });
      if (response.status === 401) problem = "That key was not accepted.";
      else if (!response.ok) problem = `The server answered ${response.status}.`;
    } catch (error) {
      problem = `The server could not be reached: ${error.message}`;
    }
    if (problem) {
      status.replaceChildren(notice(problem, "error"));
      return;
    }
    session.key = key;
    if (!location.hash || location.hash === "#/sign-in") location.hash = "#/datasets";
    else route();
  });
  view.replaceChildren(form);
  input.focus();
}

async function route() {
  if (!session.key) {
    showSignIn();
    return;
  }
  setChrome(true);
  const hash = location.hash || "#/datasets";
  const [path, query = ""] = hash.split("?");
  for (const link of document.querySelectorAll("#nav a")) {
    const active = path.startsWith(link.getAttribute("href"));
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const match = ROUTES.find(([pattern]) => pattern.test(path));
  if (!match) {
    location.hash = "#/datasets";
    return;
  }
  const [pattern, load, name] = match;
  const args = pattern.exec(path).slice(1).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  current?.abort();
  current = new AbortController();
  const page = h("div", { class: "page" });
  view.replaceChildren(page);
  try {
    const module = await load();
    await module[name](page, { signal: current.signal, args, params });
  } catch (error) {
    if (error.name === "AbortError" || !session.key) return;
    page.append(notice(error.message, "error"));
  }
}

session.onUnauthorized = () => {
  session.key = null;
  showSignIn("The server did not accept the key (401). Sign in again.");
};

document.getElementById("sign-out").addEventListener("click", () => {
  session.key = null;
  showSignIn();
});
window.addEventListener("hashchange", route);
route();
