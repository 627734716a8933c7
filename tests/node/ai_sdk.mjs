// The AI SDK (`ai`) against the gateway, through one provider named by the first argument:
//   openai  @ai-sdk/openai: `openai.chat(model)` (chat completions) and `openai.responses(model)`
//   xai     @ai-sdk/xai:    `xai(model)` (chat completions) and `xai.responses(model)`
// For each model: a stream, tool calls, generateObject and streamObject, errors before and
// during the stream. Prints {"<api>.<case>": result} (common.mjs) for tests/test_clients_node.py.
import { createOpenAI } from "@ai-sdk/openai";
import { createXai } from "@ai-sdk/xai";
import { generateObject, jsonSchema, streamObject, streamText, tool } from "ai";

import {
  CITIES_SCHEMA, MOCK, PROMPT, RESPONSES_MOCK, WEATHER_SCHEMA, describeError, env, mockFetch, runCases,
  withMock,
} from "./common.mjs";

const PROVIDERS = {
  openai: (apiKey) => {
    const p = createOpenAI({ baseURL: env.baseURL, apiKey, fetch: mockFetch });
    return { chat: p.chat(env.model), responses: p.responses(env.model) };
  },
  xai: (apiKey) => {
    const p = createXai({ baseURL: env.baseURL, apiKey, fetch: mockFetch });
    return { chat: p(env.model), responses: p.responses(env.model) };
  },
};
const provider = PROVIDERS[process.argv[2]];
if (!provider) throw new Error(`usage: node ai_sdk.mjs ${Object.keys(PROVIDERS).join("|")}`);

const TOOLS = {
  get_weather: tool({ description: "Current weather for a place", inputSchema: jsonSchema(WEATHER_SCHEMA) }),
};
const CITIES = jsonSchema(CITIES_SCHEMA);

// Reads a streamText result as a user would: the text parts in order, the error parts, and how
// the stream says it finished. An exception out of the stream is recorded too.
async function readStream(result) {
  const out = { deltas: [], errors: [], finishReason: null };
  try {
    for await (const part of result.fullStream) {
      if (part.type === "text-delta") out.deltas.push(part.text);
      else if (part.type === "error") out.errors.push(describeError(part.error));
      else if (part.type === "finish") out.finishReason = part.finishReason;
    }
  } catch (error) {
    out.thrown = describeError(error);
  }
  return out;
}

const stream = (model, mock = null) => withMock(mock, () => readStream(
  streamText({ model, messages: PROMPT, maxRetries: 0, onError: () => {} })));

// Only `textStream`, as the AI SDK's first examples read a stream: does a failure show?
const textOnly = (model, mock) => withMock(mock, async () => {
  const out = { deltas: [], errors: [] };
  const result = streamText({
    model, messages: PROMPT, maxRetries: 0, onError: ({ error }) => out.errors.push(describeError(error)),
  });
  try {
    for await (const text of result.textStream) out.deltas.push(text);
  } catch (error) {
    out.thrown = describeError(error);
  }
  return out;
});

function casesFor(api, model, badModel, spentModel, MOCK) {
  return {
    [`${api}.stream`]: () => stream(model),

    [`${api}.tools`]: () => withMock(MOCK.tools, async () => {
      const result = streamText({ model, messages: PROMPT, tools: TOOLS, maxRetries: 0 });
      const calls = await result.toolCalls;
      return {
        finishReason: await result.finishReason,
        calls: calls.map((c) => ({ name: c.toolName, input: c.input })),
      };
    }),

    [`${api}.object`]: () => withMock(MOCK.object, async () => {
      const { object } = await generateObject({ model, messages: PROMPT, schema: CITIES, maxRetries: 0 });
      return { object };
    }),

    // `partials`: how many partial objects the user saw before the whole one (streamed, not
    // one block at the end).
    [`${api}.streamedObject`]: () => withMock(MOCK.object, async () => {
      const result = streamObject({ model, messages: PROMPT, schema: CITIES, maxRetries: 0, onError: () => {} });
      let partials = 0;
      for await (const _ of result.partialObjectStream) partials += 1;
      return { object: await result.object, partials };
    }),

    [`${api}.unauthorized`]: () => stream(badModel),
    [`${api}.rateLimited`]: () => stream(spentModel),
    [`${api}.midStreamErrorEvent`]: () => stream(model, MOCK.errorEvent),
    [`${api}.midStreamReset`]: () => stream(model, MOCK.reset),
    [`${api}.midStreamTextStream`]: () => textOnly(model, MOCK.errorEvent),
  };
}

const good = provider(env.key);
const bad = provider(env.badKey);
const spent = provider(env.spentKey);
await runCases({
  ...casesFor("chat", good.chat, bad.chat, spent.chat, MOCK),
  ...casesFor("responses", good.responses, bad.responses, spent.responses, RESPONSES_MOCK),
});
