// openai (npm) against the gateway: a stream, tool calls, structured output, errors before and
// during the stream. Prints one JSON object (common.mjs); tests/test_clients_node.py asserts.
import OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

import {
  CITIES_SCHEMA, MOCK, PROMPT, WEATHER_SCHEMA, describeError, env, runCases,
} from "./common.mjs";

const client = (apiKey = env.key) => new OpenAI({ baseURL: env.baseURL, apiKey, maxRetries: 0 });
const TOOLS = [{
  type: "function",
  function: { name: "get_weather", description: "Current weather for a place", parameters: WEATHER_SCHEMA },
}];

// The text deltas of a stream, in order, and the finish_reason it ended with (null: none came);
// an error thrown while reading is recorded with them.
async function streamText(apiKey, mock) {
  const out = { deltas: [], finishReason: null };
  try {
    // Unknown body parameters (here "mock") go to the server as they are.
    const stream = await client(apiKey).chat.completions.create({
      model: env.model, messages: PROMPT, stream: true, ...(mock ? { mock } : {}),
    });
    for await (const chunk of stream) {
      const delta = chunk.choices[0]?.delta?.content;
      if (delta) out.deltas.push(delta);
      if (chunk.choices[0]?.finish_reason) out.finishReason = chunk.choices[0].finish_reason;
    }
  } catch (error) {
    out.thrown = describeError(error);
  }
  return out;
}

await runCases({
  stream: () => streamText(env.key),

  // The SDK's stream helper gathers the call's pieces; the user reads the final message.
  tools: async () => {
    const stream = client().chat.completions.stream({
      model: env.model, messages: PROMPT, tools: TOOLS, mock: MOCK.tools,
    });
    const final = await stream.finalChatCompletion();
    const calls = final.choices[0].message.tool_calls ?? [];
    return {
      finishReason: final.choices[0].finish_reason,
      calls: calls.map((c) => ({ name: c.function.name, input: JSON.parse(c.function.arguments) })),
    };
  },

  object: async () => {
    const done = await client().chat.completions.parse({
      model: env.model, messages: PROMPT, mock: MOCK.object,
      response_format: { type: "json_schema", json_schema: { name: "cities", strict: true, schema: CITIES_SCHEMA } },
    });
    return { object: done.choices[0].message.parsed };
  },

  // The stream helper parses only a response_format it can parse itself: a zod schema's.
  // `partials`: the content deltas it reported before the whole object.
  streamedObject: async () => {
    const stream = client().chat.completions.stream({
      model: env.model, messages: PROMPT, mock: MOCK.object,
      response_format: zodResponseFormat(z.object({ cities: z.array(z.string()), count: z.number().int() }), "cities"),
    });
    let partials = 0;
    stream.on("content.delta", () => { partials += 1; });
    const final = await stream.finalChatCompletion();
    return { object: final.choices[0].message.parsed, partials };
  },

  unauthorized: () => streamText(env.badKey),
  rateLimited: () => streamText(env.spentKey),
  midStreamErrorEvent: () => streamText(env.key, MOCK.errorEvent),
  midStreamReset: () => streamText(env.key, MOCK.reset),
});
