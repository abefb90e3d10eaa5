// The official OpenAI Node.js client against kvqd: a completion and a
// streamed chat completion, read back through the client's own types.
// Usage: node openai_client.mjs BASE_URL COMPLETION_MODEL_PORT CHAT_PORT
import OpenAI from "openai";

const [, , host, cport, chport] = process.argv;
let failed = 0;
let n = 0;
function ok(cond, what) {
	n++;
	if (!cond)
		failed++;
	console.log(`${cond ? "" : "not "}ok ${n} - ${what}`);
}

const comp = new OpenAI({ baseURL: `http://${host}:${cport}/v1`, apiKey: "unused", maxRetries: 0 });
try {
	const r = await comp.completions.create({
		model: "kvqd", prompt: "Once upon a time", max_tokens: 16,
		temperature: 0, seed: 1,
	});
	ok(r.object === "text_completion" && typeof r.choices[0].text === "string" &&
	   r.choices[0].text.length > 0 && r.usage.completion_tokens > 0,
	   `completions.create: "${r.choices[0].text.slice(0, 40)}" (${r.usage.completion_tokens} tokens)`);
	const models = await comp.models.list();
	ok(models.data.length >= 1 && typeof models.data[0].id === "string",
	   `models.list: ${models.data.map((m) => m.id).join(", ")}`);
} catch (e) {
	ok(false, `completion through the client: ${e}`);
}

if (chport) {
	const chat = new OpenAI({ baseURL: `http://${host}:${chport}/v1`, apiKey: "unused", maxRetries: 0 });
	try {
		const stream = await chat.chat.completions.create({
			model: "kvqd", stream: true, max_tokens: 8, seed: 3,
			stream_options: { include_usage: true },
			messages: [{ role: "user", content: "Hello" }],
		});
		let text = "", chunks = 0, usage = null, role = null, finish = null;
		for await (const c of stream) {
			chunks++;
			if (c.usage)
				usage = c.usage;
			if (c.choices.length) {
				role = role || c.choices[0].delta.role;
				text += c.choices[0].delta.content || "";
				finish = c.choices[0].finish_reason || finish;
			}
		}
		ok(chunks > 1 && role === "assistant" && finish && usage && usage.completion_tokens > 0,
		   `streamed chat: ${chunks} chunks, role ${role}, finish ${finish}, ${usage ? usage.completion_tokens : "?"} tokens, "${text.slice(0, 30)}"`);
	} catch (e) {
		ok(false, `streamed chat through the client: ${e}`);
	}
}
console.log(`1..${n}`);
process.exit(failed ? 1 : 0);
