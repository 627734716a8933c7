// What every client script shares: the gateway it talks to (from the environment that
// tests/test_clients_node.py sets), the cases it asks of the mock upstream, and one way to run
// the cases and print what the user saw as one JSON object on stdout, for pytest to assert on.
//
// A case never throws out of the runner: an exception is what the user saw, so it is recorded
// (its class, message and status) next to whatever arrived before it.

export const env = {
  baseURL: required("GATEWAY_BASE_URL"), // .../api/v1
  key: required("GATEWAY_KEY"),
  spentKey: required("GATEWAY_SPENT_KEY"), // a key whose bucket pytest has already emptied
  badKey: "sk-not-a-key-of-this-gateway",
  model: "grok-4",
};

export const PROMPT = [{ role: "user", content: "What is the meaning of life?" }];

// The mock's options for each case (gateway/mock/upstream.py): asked for in the request
// body under "mock", as the Python tests do with extra_body.
export const WEATHER_ARGS = { location: "Paris, France", unit: "celsius" };
export const CITIES = { cities: ["Paris", "Lyon", "Nice"], count: 3 };
export const MOCK = {
  tools: { tool_arguments: WEATHER_ARGS },
  object: { json: CITIES },
  // The upstream sends an error event after 3 text chunks; the gateway relays it as its frame.
  errorEvent: { error_after: 3 },
  // The upstream's connection drops after 3 text chunks; the gateway ends the stream with its
  // own error frame.
  reset: { disconnect_after: 3, chunk_delay: 0.05 },
};
// The Responses API streams 4 events before its first text delta (created, in_progress,
// output_item.added, content_part.added): its faults come 4 events later, after 3 deltas too.
export const RESPONSES_MOCK = {
  ...MOCK,
  errorEvent: { error_after: 7 },
  reset: { disconnect_after: 7, chunk_delay: 0.05 },
};

export const WEATHER_SCHEMA = {
  type: "object",
  properties: {
    location: { type: "string" },
    unit: { type: "string", enum: ["celsius", "fahrenheit"] },
  },
  required: ["location", "unit"],
  additionalProperties: false,
};

export const CITIES_SCHEMA = {
  type: "object",
  properties: { cities: { type: "array", items: { type: "string" } }, count: { type: "integer" } },
  required: ["cities", "count"],
  additionalProperties: false,
};

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/test_clients_node.py sets it)`);
  return value;
}

// A fetch that adds the mock's options for the running case to each JSON body it sends: the
// AI SDK has no per-call way to add a body field, and the providers all accept `fetch`. The
// request is otherwise the SDK's own: its URL, headers and the rest of its body.
let currentMock = null;
export function withMock(mock, run) {
  currentMock = mock;
  return run().finally(() => { currentMock = null; });
}
export async function mockFetch(url, init) {
  if (currentMock && init && typeof init.body === "string") {
    init = { ...init, body: JSON.stringify({ ...JSON.parse(init.body), mock: currentMock }) };
  }
  return fetch(url, init);
}

// What the user was shown: the error's class (`name`), message and status. The AI SDK's errors
// carry their class in `name` ("AI_APICallError"), since its bundle may rename a class
// ("_TypeValidationError"); openai's in the constructor's name. A plain object ("Object") is
// an error event's payload as the provider parsed it.
export function describeError(error) {
  if (error == null || typeof error !== "object") return { name: typeof error, message: String(error) };
  const aiSdkName = typeof error.name === "string" && error.name.startsWith("AI_") ? error.name.slice(3) : null;
  return {
    name: aiSdkName ?? error.constructor?.name ?? "Object",
    message: String(error.message ?? JSON.stringify(error)),
    status: error.status ?? error.statusCode ?? null,
  };
}

// Runs each case in turn and prints {case: result}. A result is what the case returned, or
// {thrown: {name, message, status}}.
export async function runCases(cases) {
  const results = {};
  for (const [name, run] of Object.entries(cases)) {
    try {
      results[name] = await run();
    } catch (error) {
      results[name] = { thrown: describeError(error) };
    }
  }
  process.stdout.write(JSON.stringify(results) + "\n");
}
