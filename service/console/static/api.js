// The console's only way to the server: the public API with the key as a Bearer token.

import { describeProblem } from "./format.js";
import { streamEvents } from "./sse.js";

const KEY_STORAGE = "lorastack.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(describeProblem(status, body));
    this.status = status;
    this.body = body;
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  },
  /** Called with no arguments when the server answers 401: the app shows sign-in. */
  onUnauthorized: () => {},
};

function authHeaders() {
  return session.key ? { Authorization: `Bearer ${session.key}` } : {};
}

async function readBody(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) return response.json();
  return response.text();
}

async function check(response) {
  if (response.ok) return response;
  const body = await readBody(response).catch(() => null);
  if (response.status === 401) session.onUnauthorized();
  throw new ApiError(response.status, body);
}

/** A JSON request; body objects are sent as JSON. Answers the parsed body (null for 204). */
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers }, signal };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await check(await fetch(path, init));
  if (response.status === 204) return null;
  return readBody(response);
}

/** A binary resource (image, adapter file) fetched with the key, as a Blob. */
export async function fetchBlob(path) {
  const response = await check(await fetch(path, { headers: authHeaders() }));
  return response.blob();
}

/** An <img> source for an authenticated image URL (object URLs are revoked on unload). */
export async function imageUrl(path) {
  return URL.createObjectURL(await fetchBlob(path));
}

/** Save an authenticated download under the name the server suggests (or fallbackName). */
export async function download(path, fallbackName) {
  const response = await check(await fetch(path, { headers: authHeaders() }));
  const disposition = response.headers.get("content-disposition") || "";
  const match = /filename="?([^";]+)"?/.exec(disposition);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = match ? match[1] : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  return blob.size;
}

/**
 * A multipart upload with progress (fetch() has no upload progress; XMLHttpRequest does).
 * onProgress gets a fraction in [0, 1].
 */
export function upload(path, formData, { onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = xhr.responseText;
      try {
        body = JSON.parse(body);
      } catch {
        // not JSON: keep the text for the error message
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        if (xhr.status === 401) session.onUnauthorized();
        reject(new ApiError(xhr.status, body));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network error")));
    xhr.send(formData);
  });
}

/** A job's events as they happen (resumes after `after`); ends with the job. */
export async function jobEvents(jobId, { after = 0, signal, onEvent }) {
  try {
    return await streamEvents(`/jobs/${encodeURIComponent(jobId)}/events?after=${after}`, {
      headers: authHeaders(),
      signal,
      onEvent,
    });
  } catch (error) {
    if (error.status === 401) session.onUnauthorized();
    throw error;
  }
}

let openapiPromise = null;
/** The API's OpenAPI document (defaults and limits for the forms), fetched once. */
export function openapi() {
  openapiPromise ||= fetch("/openapi.json").then((r) => r.json());
  return openapiPromise;
}
