import assert from "node:assert/strict";
import { test } from "node:test";

import { SSEParser } from "../../../service/console/static/sse.js";

test("events split across chunks come out whole", () => {
  const parser = new SSEParser();
  assert.deepEqual(parser.feed("id: 1\nevent: metr"), []);
  assert.deepEqual(parser.feed('ics\ndata: {"step": 1}\n\nid: 2\n'), [
    { type: "metrics", id: "1", data: '{"step": 1}' },
  ]);
  assert.deepEqual(parser.feed("event: state\ndata: {}\n\n"), [{ type: "state", id: "2", data: "{}" }]);
});

test("comments are keep-alives, CRLF is accepted, data lines join", () => {
  const parser = new SSEParser();
  const events = parser.feed(": keep-alive\n\r\ndata: a\r\ndata: b\r\n\r\n");
  assert.deepEqual(events, [{ type: "message", id: null, data: "a\nb" }]);
});
