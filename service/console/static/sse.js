// Server-sent events over fetch(): EventSource cannot send an Authorization header.

/** An incremental text/event-stream parser: feed() chunks, get complete events back. */
export class SSEParser {
  constructor() {
    this.buffer = "";
  }

  feed(chunk) {
    this.buffer += chunk.replace(/\r\n?/g, "\n");
    const events = [];
    let end;
    while ((end = this.buffer.indexOf("\n\n")) !== -1) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const event = parseBlock(block);
      if (event) events.push(event);
    }
    return events;
  }
}

function parseBlock(block) {
  let type = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are keep-alives
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return null;
  return { type, id, data: data.join("\n") };
}

/**
 * Stream events from url with the given headers until the server ends the stream or the
 * signal aborts. onEvent gets {type, id, data}. Resolves with the last id seen.
 */
export async function streamEvents(url, { headers, signal, onEvent }) {
  const response = await fetch(url, {
    headers: { ...headers, Accept: "text/event-stream" },
    signal,
  });
  if (!response.ok) {
    const error = new Error(`HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  let lastId = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return lastId;
    for (const event of parser.feed(value)) {
      if (event.id !== null) lastId = event.id;
      onEvent(event);
    }
  }
}
