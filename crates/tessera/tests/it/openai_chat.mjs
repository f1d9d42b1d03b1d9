// The official OpenAI client (npm `openai`) against a Tessera coordinator: one chat completion
// whole, one streamed with usage, and one for a model that does not exist; printed as one JSON
// line for `generation.rs` to check. Usage: node openai_chat.mjs BASE_URL MODEL PROMPT MAX_TOKENS
import OpenAI from 'openai';

const [baseURL, model, prompt, maxTokens] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: 'not-needed', maxRetries: 0, timeout: 600_000 });
const messages = [{ role: 'user', content: prompt }];
const asked = { model, messages, temperature: 0, max_tokens: Number(maxTokens) };

const { data: whole, response } = await client.chat.completions.create(asked).withResponse();
const stream = await client.chat.completions.create({ ...asked, stream: true, stream_options: { include_usage: true } });
let text = '';
let usage = null;
let finish = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    text += choice.delta?.content ?? '';
    finish = choice.finish_reason ?? finish;
  }
}
let unknown = null;
try {
  await client.chat.completions.create({ ...asked, model: 'gpt-9' });
} catch (error) {
  unknown = { status: error.status, code: error.code, type: error.type, message: error.message };
}
console.log(JSON.stringify({
  whole: { text: whole.choices[0].message.content, finish: whole.choices[0].finish_reason, usage: whole.usage, spans: response.headers.get('x-tessera-spans') },
  stream: { text, finish, usage, chunks },
  unknown,
}));
