#!/bin/bash
# test_http.sh - kvqd's HTTP API end to end: the real daemon on a free
# loopback port, driven with curl as a client would (TAP on stdout).
#
# Needs: curl, python3 (JSON checks), the shared stories260K.gguf.
# Optional: promtool (Debian's prometheus) for /metrics, python3-numpy for
# the generated ChatML model used by the chat tests.

set -u

n=0
failed=0
ok() {	# ok COND-EXIT-STATUS NAME
	n=$((n + 1))
	if [ "$1" = 0 ]; then
		echo "ok $n - $2"
	else
		echo "not ok $n - $2"
		failed=$((failed + 1))
	fi
}
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
diag() { echo "# $*"; }
skip_all() { echo "1..0 # SKIP $*"; exit 0; }

: "${KVQD:=./kvqd}"
: "${KVQ_TESTDATA:=../shared/testdata}"
MODEL="$KVQ_TESTDATA/stories260K.gguf"
[ -x "$KVQD" ] || skip_all "no kvqd binary at $KVQD"
[ -f "$MODEL" ] || skip_all "stories260K.gguf not found in $KVQ_TESTDATA"
command -v curl >/dev/null || skip_all "curl is not installed"
PY=
for p in "${PYTHON3:-}" /usr/bin/python3 python3; do
	[ -n "$p" ] && "$p" -c 'import json' 2>/dev/null && { PY=$p; break; }
done
[ -n "$PY" ] || skip_all "python3 is not installed"

DIR=$(mktemp -d "${TMPDIR:-/tmp}/kvqd-http.XXXXXX")
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf "$DIR"
}
trap cleanup EXIT

free_port() {
	"$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME MODEL [ARGS...]: sets $PORT; the daemon's log is $DIR/NAME.log
start() {
	local name=$1 model=$2 i
	shift 2
	mkdir -p "$DIR/$name"
	PORT=$(free_port)
	"$KVQD" --model "$model" --listen "127.0.0.1:$PORT" \
		--admin-socket "$DIR/$name/admin.sock" --state-dir "$DIR/$name" \
		"$@" >"$DIR/$name.log" 2>&1 &
	PIDS+=($!)
	for i in $(seq 1 200); do
		curl -s -o /dev/null "http://127.0.0.1:$PORT/health" -w '%{http_code}' |
			grep -q 200 && return 0
		kill -0 "${PIDS[-1]}" 2>/dev/null || break
		sleep 0.05
	done
	diag "kvqd ($name) did not become ready; its log:"
	sed 's/^/# /' "$DIR/$name.log"
	return 1
}

# req METHOD PATH [CURL ARGS...]: body in $DIR/body, status in $STATUS
req() {
	local m=$1 path=$2
	shift 2
	STATUS=$(curl -s -o "$DIR/body" -w '%{http_code}' -X "$m" \
		"http://127.0.0.1:$PORT$path" "$@")
}

# js EXPR: evaluates a Python expression over j (the JSON in $DIR/body)
js() {
	"$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if eval("(" + sys.argv[2] + ")") else 1)' \
		"$DIR/body" "$1" 2>/dev/null
}

# An OpenAI error body: {"error": {"message", "type", "param", "code"}}
ERR_SHAPE='set(j) == {"error"} and set(j["error"]) == {"message","type","param","code"} and j["error"]["message"]'

# sse_text FILE: concatenated text (or chat delta content) of an SSE stream
sse_text() {
	"$PY" - "$1" <<'EOF'
import json, sys
out = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.rstrip("\n")
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    j = json.loads(line[6:])
    for c in j.get("choices", []):
        out.append(c.get("text") or c.get("delta", {}).get("content") or "")
sys.stdout.write("".join(out))
EOF
}

# sse_check FILE OBJECT INCLUDE_USAGE: every event is "data: JSON" with the
# OpenAI chunk shape, the last is [DONE], usage as asked.
sse_check() {
	"$PY" - "$@" <<'EOF'
import json, sys
path, obj, inc = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
events = [l for l in open(path, encoding="utf-8").read().split("\n\n")
          if l and not l.startswith(":")]
assert all(e.startswith("data: ") and "\n" not in e for e in events), events
events = [e[6:] for e in events]
assert events and events[-1] == "[DONE]", "no [DONE] at the end"
chunks = [json.loads(e) for e in events[:-1]]
ids = {c["id"] for c in chunks}
assert len(ids) == 1, "ids differ"
for c in chunks:
    assert c["object"] == obj, c
    assert isinstance(c["created"], int) and c["model"]
    assert isinstance(c["choices"], list)
    if inc:
        assert "usage" in c
for c in chunks[:-1] if inc else chunks:
    assert len(c["choices"]) == 1
    ch = c["choices"][0]
    assert set(ch) >= {"index", "logprobs", "finish_reason"}, ch
    assert ("text" in ch) if obj == "text_completion" else ("delta" in ch)
    if inc:
        assert c["usage"] is None
fins = [c["choices"][0]["finish_reason"] for c in (chunks[:-1] if inc else chunks)]
assert fins[-1] in ("stop", "length") and all(f is None for f in fins[:-1]), fins
if obj == "chat.completion.chunk":
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
if inc:
    u = chunks[-1]
    assert u["choices"] == [] and u["usage"]["total_tokens"] == \
        u["usage"]["prompt_tokens"] + u["usage"]["completion_tokens"]
    assert "cached_tokens" in u["usage"]["prompt_tokens_details"]
EOF
}

normal='{"prompt":"Once upon a time","max_tokens":8,"seed":1}'
# after_bad NAME: a normal request right after still succeeds
after_bad() {
	req POST /v1/completions -d "$normal"
	[ "$STATUS" = 200 ] && js 'j["object"] == "text_completion"'
	ok $? "normal request after $1"
}

# ---------------------------------------------------------------- daemon 1
start main "$MODEL" --idle-timeout 2s --max-body-bytes 1M
ok $? "kvqd starts and /health turns 200"
MAIN_PID=${PIDS[-1]}
[ "$n" = 1 ] && [ "$failed" = 0 ] || { echo "1..$n"; exit 1; }

req GET /health
[ "$STATUS" = 200 ] && js 'j == {"status": "ok"}'
ok $? "GET /health is 200 {\"status\":\"ok\"}"

req GET /v1/models
[ "$STATUS" = 200 ] && js 'j["object"] == "list" and j["data"][0]["object"] == "model" and j["data"][0]["id"]'
ok $? "GET /v1/models lists the model"

# plain completion
req POST /v1/completions -H 'Content-Type: application/json' \
	-d '{"model":"x","prompt":"Once upon a time","max_tokens":24,"seed":42,"temperature":0.8}'
cp "$DIR/body" "$DIR/plain.json"
[ "$STATUS" = 200 ] && js 'j["object"] == "text_completion" and j["id"].startswith("cmpl-")
	and isinstance(j["created"], int) and j["model"]
	and len(j["choices"]) == 1 and j["choices"][0]["index"] == 0
	and j["choices"][0]["text"] and j["choices"][0]["logprobs"] is None
	and j["choices"][0]["finish_reason"] in ("stop", "length")
	and j["usage"]["prompt_tokens"] > 0 and 0 < j["usage"]["completion_tokens"] <= 24
	and j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"]
	and j["usage"]["prompt_tokens_details"]["cached_tokens"] == 0'
ok $? "POST /v1/completions answers in OpenAI's shape"
plain_text=$("$PY" -c 'import json,sys; sys.stdout.write(json.load(open(sys.argv[1]))["choices"][0]["text"])' "$DIR/plain.json")

# streaming, same seed: same text
curl -sN -o "$DIR/stream.txt" "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once upon a time","max_tokens":24,"seed":42,"temperature":0.8,"stream":true,"stream_options":{"include_usage":true}}'
sse_check "$DIR/stream.txt" text_completion 1
ok $? "streamed completion: chunks in OpenAI's shape, usage chunk, data: [DONE]"
[ "$(sse_text "$DIR/stream.txt")" = "$plain_text" ]
ok $? "streamed text equals the plain text for the same seed"

# stream events are written without jansson: quotes, backslashes, control
# characters, DEL and invalid UTF-8 (each bad byte as U+FFFD) of an echoed
# prompt of byte tokens come out as in the plain answer
esc='"prompt":[1,37,95,4,13,34,130,258,229,133,198,172,3,261,436],"max_tokens":2,"temperature":0,"echo":true'
req POST /v1/completions -d "{$esc}"
cp "$DIR/body" "$DIR/esc.json"
curl -sN -o "$DIR/esc.txt" "http://127.0.0.1:$PORT/v1/completions" -d "{$esc,\"stream\":true}"
[ "$STATUS" = 200 ] && sse_check "$DIR/esc.txt" text_completion 0 &&
	sse_text "$DIR/esc.txt" >"$DIR/esc.stream" &&
	"$PY" - "$DIR/esc.json" "$DIR/esc.stream" <<'EOF'
import json, sys
plain = json.load(open(sys.argv[1]))["choices"][0]["text"]
streamed = open(sys.argv[2], encoding="utf-8").read()
assert plain == streamed, (plain, streamed)
for ch in '"\\\x01\n\x1f\x7f\ufffd\x00':
    assert ch in plain, (ch, plain)
EOF
ok $? "streamed JSON escapes like jansson (quotes, controls, invalid UTF-8)"

curl -sN -o "$DIR/stream2.txt" "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once upon a time","max_tokens":5,"stream":true}'
sse_check "$DIR/stream2.txt" text_completion 0 && ! grep -q '"usage"' "$DIR/stream2.txt"
ok $? "stream without include_usage carries no usage"

# prompt forms, n, echo, logprobs, stop
req POST /v1/completions -d '{"prompt":[[1,403,407],[1,403]],"max_tokens":3,"n":2,"seed":7}'
[ "$STATUS" = 200 ] && js '[c["index"] for c in j["choices"]] == [0,1,2,3] and j["usage"]["prompt_tokens"] == 5'
ok $? "token-id prompts with n=2 give 4 choices"
req POST /v1/completions -d '{"prompt":["Once","The dog"],"max_tokens":3,"temperature":0}'
[ "$STATUS" = 200 ] && js 'len(j["choices"]) == 2'
ok $? "array of string prompts"
req POST /v1/completions -d '{"prompt":"Once upon","max_tokens":3,"echo":true,"logprobs":2,"seed":1}'
[ "$STATUS" = 200 ] && js 'j["choices"][0]["text"].startswith("Once upon")
	and set(j["choices"][0]["logprobs"]) == {"tokens","token_logprobs","top_logprobs","text_offset"}
	and j["choices"][0]["logprobs"]["token_logprobs"][0] is None
	and len(j["choices"][0]["logprobs"]["tokens"]) == j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"]'
ok $? "echo with logprobs returns prompt and completion token logprobs"
stop_word=$("$PY" -c 'import sys; w=sys.argv[1].split(); print(" " + w[2] if len(w) > 3 else "")' "$plain_text")
if [ -n "$stop_word" ]; then
	req POST /v1/completions -d "{\"prompt\":\"Once upon a time\",\"max_tokens\":24,\"seed\":42,\"temperature\":0.8,\"stop\":[\"$stop_word\"]}"
	[ "$STATUS" = 200 ] && js 'j["choices"][0]["finish_reason"] == "stop"' &&
		"$PY" -c 'import json,sys; t=json.load(open(sys.argv[1]))["choices"][0]["text"]; sys.exit(0 if sys.argv[2].startswith(t) and sys.argv[3] not in t else 1)' "$DIR/body" "$plain_text" "$stop_word"
	ok $? "a stop string ends the text before it (finish_reason stop)"
else
	skip "stop string" "the plain completion was too short"
fi

# tokenize / detokenize (llama.cpp shapes)
req POST /tokenize -d '{"content":"Once upon a time"}'
[ "$STATUS" = 200 ] && js 'isinstance(j["tokens"], list) and len(j["tokens"]) > 1 and all(isinstance(t, int) for t in j["tokens"])'
ok $? "POST /tokenize returns token ids"
toks=$("$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["tokens"]))' "$DIR/body")
req POST /tokenize -d '{"content":"Once upon a time","add_special":false,"with_pieces":true}'
[ "$STATUS" = 200 ] && js 'all(set(t) == {"id","piece"} for t in j["tokens"])'
ok $? "POST /tokenize with_pieces returns id and piece"
req POST /detokenize -d "{\"tokens\":$toks}"
[ "$STATUS" = 200 ] && js 'j == {"content": "Once upon a time"}'
ok $? "POST /detokenize inverts /tokenize"

# chat without a template
req POST /v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["code"] == "chat_template_missing" and "template" in j["error"]["message"]'
ok $? "chat on a model without a template: 400 with a clear error"

# metrics
curl -s -D "$DIR/mhead" -o "$DIR/metrics.txt" "http://127.0.0.1:$PORT/metrics"
grep -qi '^content-type: text/plain; version=0.0.4' "$DIR/mhead"
ok $? "GET /metrics is Prometheus text"
m_ok=0
for name in kvqd_requests_running kvqd_requests_waiting kvqd_tokens_prompt_total \
	kvqd_tokens_generated_total kvqd_tokens_sampled_gpu_total \
	kvqd_engine_step_seconds_total kvqd_gpu_busy_seconds_total \
	kvqd_ttft_seconds kvqd_inter_token_seconds \
	kvqd_kv_bytes_used kvqd_tier_bytes; do
	grep -q "^# HELP $name " "$DIR/metrics.txt" && grep -q "^# TYPE $name " "$DIR/metrics.txt" || { diag "missing $name"; m_ok=1; }
done
for t in hbm host nvme; do grep -q "^kvqd_tier_bytes{tier=\"$t\"} " "$DIR/metrics.txt" || m_ok=1; done
grep -q '^kvqd_ttft_seconds_bucket{le="+Inf"} [1-9]' "$DIR/metrics.txt" || m_ok=1
grep -q '^kvqd_tokens_generated_total [1-9]' "$DIR/metrics.txt" || m_ok=1
grep -q '^kvqd_tokens_sampled_gpu_total 0$' "$DIR/metrics.txt" || m_ok=1
grep -q '^kvqd_gpu_busy_seconds_total 0$' "$DIR/metrics.txt" || m_ok=1
grep -Eq '^kvqd_engine_step_seconds_total [0-9.]*[1-9]' "$DIR/metrics.txt" || m_ok=1
ok $m_ok "/metrics has every family with HELP and TYPE, and counts"
grep -q '^kvqd_kv_format_info{k="q8",v="q4",calibrated="no"} 1' "$DIR/metrics.txt" &&
	grep -q '^kvqd_kv_bytes_per_token 320' "$DIR/metrics.txt" &&
	grep -q '^kvqd_backend_info{device="cpu' "$DIR/metrics.txt" &&
	grep -q '^kvqd_gpu_fallback 0$' "$DIR/metrics.txt" &&
	grep -q '^kvqd_gpu_weights_kquant_compact 0$' "$DIR/metrics.txt" &&
	grep -q '^kvqd_dot_products_info{mode="exact"} 1$' "$DIR/metrics.txt"
ok $? "/metrics names the KV format (q8/q4, 320 B/token), the CPU backend (no GPU fallback, no GPU weights) and exact dot products"
if command -v promtool >/dev/null; then
	promtool check metrics <"$DIR/metrics.txt" >"$DIR/promtool.txt" 2>&1
	r=$?
	[ $r = 0 ] || sed 's/^/# /' "$DIR/promtool.txt"
	ok $r "promtool check metrics accepts /metrics"
else
	skip "promtool check metrics" "promtool (Debian's prometheus) is not installed"
fi

# ---------------------------------------------------------------- bad requests
req POST /v1/completions -d '{"prompt": "x", '
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["type"] == "invalid_request_error"'
ok $? "malformed JSON: 400 invalid_request_error"
after_bad "malformed JSON"

req POST /v1/completions -d '{"prompt":"x","max_tokens":"ten","temperature":"hot"}'
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["param"] in ("max_tokens", "temperature")'
ok $? "wrong types: 400 naming the param"
after_bad "wrong types"

req POST /v1/completions -d '{"max_tokens":5}'
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["param"] == "prompt"'
ok $? "missing prompt: 400 param prompt"
after_bad "missing prompt"

req POST /v1/completions -d '{"prompt":"x","max_tokens":-5}'
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["param"] == "max_tokens"'
ok $? "negative max_tokens: 400"
after_bad "negative max_tokens"

req POST /v1/completions -d '{"prompt":"x","max_tokens":100000000}'
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["param"] == "max_tokens"'
ok $? "huge max_tokens: 400"
after_bad "huge max_tokens"

"$PY" -c 'import json; print(json.dumps({"prompt": "Once upon a time " * 1000}))' >"$DIR/long.json"
req POST /v1/completions --data-binary @"$DIR/long.json"
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js 'j["error"]["code"] == "context_length_exceeded"'
ok $? "prompt longer than the context: 400 context_length_exceeded"
after_bad "a prompt longer than the context"

printf '{"prompt":"caf\xe9 \xff"}' >"$DIR/bad-utf8.json"
req POST /v1/completions --data-binary @"$DIR/bad-utf8.json"
[ "$STATUS" = 400 ] && js "$ERR_SHAPE" && js '"UTF-8" in j["error"]["message"]'
ok $? "invalid UTF-8: 400"
after_bad "invalid UTF-8"

head -c 20000000 /dev/zero | tr '\0' 'a' >"$DIR/big.bin"
STATUS=$(curl -s -o "$DIR/body" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/completions" --data-binary @"$DIR/big.bin")
[ "$STATUS" = 413 ] && js "$ERR_SHAPE" && js 'j["error"]["code"] == "body_too_large"'
ok $? "20 MB body: 413 with the JSON error"
after_bad "a 20 MB body"

req GET /v1/nothing
[ "$STATUS" = 404 ] && js "$ERR_SHAPE"
ok $? "unknown path: 404 with an error body"
after_bad "an unknown path"

req GET /v1/completions
[ "$STATUS" = 405 ] && js "$ERR_SHAPE"
ok $? "wrong method: 405 with an error body"
after_bad "a wrong method"

# half a request, then silence: 408 with the JSON error at the idle timeout
# (2 s); the three clients run side by side
curl -s -o "$DIR/m408a.txt" "http://127.0.0.1:$PORT/metrics"
"$PY" - "$PORT" "$DIR" <<'EOF' >"$DIR/stall.txt" 2>&1
import socket, sys, threading, time
port, d = int(sys.argv[1]), sys.argv[2]
cases = {
    "body": b'POST /v1/completions HTTP/1.1\r\nHost: x\r\n'
            b'Content-Length: 100\r\n\r\n{"pro',
    "header": b'POST /v1/completions HTTP/1.1\r\nHost: x\r\n',
    "idle": b"",
}
def client(name, out):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(cases[name])
    s.settimeout(15)
    t0, data = time.time(), b""
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
    except OSError as e:
        data += b"<" + str(e).encode() + b">"
    out[name] = (time.time() - t0, data)
res = {}
ths = [threading.Thread(target=client, args=(n, res)) for n in cases]
for t in ths:
    t.start()
for t in ths:
    t.join()
for name, (el, data) in sorted(res.items()):
    print(name, "%.2f" % el, repr(data[:400]))
    open("%s/stall-%s" % (d, name), "wb").write(data)
    open("%s/stall-%s.s" % (d, name), "w").write("%.3f" % el)
EOF
sed 's/^/# /' "$DIR/stall.txt"
# stall_408 NAME: the answer was a 408 with the JSON error, after 1.5..8 s
stall_408() {
	"$PY" - "$DIR/stall-$1" "$(cat "$DIR/stall-$1.s" 2>/dev/null)" <<'EOF'
import json, sys
data, el = open(sys.argv[1], "rb").read(), float(sys.argv[2])
head, _, body = data.partition(b"\r\n\r\n")
lines = head.decode().split("\r\n")
assert lines[0] == "HTTP/1.1 408 Request Timeout", lines[0]
h = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
assert h["content-type"] == "application/json", h
assert h["connection"] == "close", h
assert int(h["content-length"]) == len(body), (h, len(body))
j = json.loads(body)
assert set(j) == {"error"} and set(j["error"]) == {"message", "type", "param", "code"}, j
assert j["error"]["type"] == "timeout_error" and j["error"]["code"] == "request_timeout", j
assert j["error"]["message"] and j["error"]["param"] is None, j
assert 1.5 <= el < 8, el
EOF
}
stall_408 body
ok $? "a client that stalls in the body gets 408 with the JSON error at the idle timeout"
stall_408 header
ok $? "a client that stalls between header lines gets 408 with the JSON error at the idle timeout"
[ -f "$DIR/stall-idle" ] && [ ! -s "$DIR/stall-idle" ] &&
	"$PY" -c 'import sys; sys.exit(0 if 1.5 <= float(sys.argv[1]) < 8 else 1)' "$(cat "$DIR/stall-idle.s")"
ok $? "a connection that sends nothing is closed at the idle timeout without an answer"
curl -s -o "$DIR/m408b.txt" "http://127.0.0.1:$PORT/metrics"
c4xx() { sed -n 's/^kvqd_http_requests_total{code="4xx"} //p' "$1"; }
[ "$(( $(c4xx "$DIR/m408b.txt") - $(c4xx "$DIR/m408a.txt") ))" = 2 ]
ok $? "the two 408s are counted in kvqd_http_requests_total{code=\"4xx\"}"
after_bad "a stalled client"

# kvqd holds each connection's socket until evhttp has let go of it: the
# sockets of clients that hang up mid-request are closed at once
if [ -d "/proc/$MAIN_PID/fd" ]; then
	"$PY" - "$PORT" "$MAIN_PID" <<'EOF'
import os, socket, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
def sockets():
    fd, n = "/proc/%s/fd" % pid, 0
    for f in os.listdir(fd):
        try:
            n += os.readlink(os.path.join(fd, f)).startswith("socket:")
        except FileNotFoundError:
            pass  # closed between the listing and the look
    return n
base = sockets()
cs = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
for c in cs:
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{")
for _ in range(20):  # accepted: at most 1 s on a busy machine
    time.sleep(0.05)
    opened = sockets()
    if opened >= base + 20:
        break
for c in cs:
    c.close()
for _ in range(20):  # 1 s, well before the idle timeout (2 s)
    if sockets() <= base:
        break
    time.sleep(0.05)
print("sockets: %d before, %d with 20 clients, %d after" % (base, opened, sockets()))
sys.exit(0 if opened >= base + 20 and sockets() <= base else 1)
EOF
	ok $? "sockets of clients that hang up mid-request are closed at once"
else
	skip "sockets of clients that hang up mid-request are closed" "no /proc"
fi

# ---------------------------------------------------------------- concurrency
# A batch of 16 rows goes through other matrix-product kernels than one row
# (blocked, with another summation order), so logits differ in their last
# bits; a q8/q4 cache can turn that into a different code and a visibly
# different continuation.  The cache is f16 here, where such differences
# stay at rounding level and cannot change a sampled token in practice.
MAIN_PORT=$PORT
start batch "$MODEL" --kv-type-k f16 --kv-type-v f16
body_for() {
	printf '{"prompt":"Once upon a time, number %d","max_tokens":48,"seed":%d,"temperature":0.9,"stream":true}' "$1" "$1"
}
for i in $(seq 1 16); do
	curl -sN "http://127.0.0.1:$PORT/v1/completions" -d "$(body_for "$i")" -o "$DIR/alone.$i"
done
cpids=()
for i in $(seq 1 16); do
	curl -sN "http://127.0.0.1:$PORT/v1/completions" -d "$(body_for "$i")" -o "$DIR/conc.$i" &
	cpids+=($!)
done
wait_ok=0
for j in "${cpids[@]}"; do wait "$j" || wait_ok=1; done
same=0
for i in $(seq 1 16); do
	if sse_check "$DIR/conc.$i" text_completion 0 &&
		[ "$(sse_text "$DIR/conc.$i")" = "$(sse_text "$DIR/alone.$i")" ] &&
		[ -n "$(sse_text "$DIR/alone.$i")" ]; then
		same=$((same + 1))
	else
		diag "client $i: alone \"$(sse_text "$DIR/alone.$i")\" concurrent \"$(sse_text "$DIR/conc.$i")\""
	fi
done
[ $wait_ok = 0 ] && [ $same = 16 ]
ok $? "16 concurrent streaming clients finish with what each gets alone ($same/16)"
PORT=$MAIN_PORT

# a client that goes away is cancelled and its KV freed at once
curl -sN -m 0.5 "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once","max_tokens":1900,"ignore_eos":true,"stream":true}' -o /dev/null
curl -s -m 0.5 "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once","max_tokens":1900,"ignore_eos":true}' -o /dev/null
for i in $(seq 1 60); do
	curl -s "http://127.0.0.1:$PORT/metrics" -o "$DIR/m2.txt"
	grep -q '^kvqd_requests_running 0$' "$DIR/m2.txt" && grep -q '^kvqd_kv_bytes_used 0$' "$DIR/m2.txt" &&
		grep -q '^kvqd_requests_finished_total{reason="cancelled"} 2$' "$DIR/m2.txt" && break
	sleep 0.05
done
[ "$i" -le 20 ]
ok $? "disconnected clients (streamed and plain) are cancelled and their KV freed"
after_bad "disconnected clients"

# ---------------------------------------------------------------- limits
start limits "$MODEL" --api-key s3cret --max-running 1 --max-queued 1
ok $? "kvqd starts with an API key and small queue limits"
req GET /health
[ "$STATUS" = 200 ]
ok $? "/health needs no key"
req POST /v1/completions -d "$normal"
[ "$STATUS" = 401 ] && js "$ERR_SHAPE" && js 'j["error"]["code"] == "invalid_api_key"'
ok $? "no API key: 401"
req POST /v1/completions -H 'Authorization: Bearer s3cre' -d "$normal"
[ "$STATUS" = 401 ]
ok $? "wrong API key: 401"
req POST /v1/completions -H 'Authorization: Bearer s3cret' -d "$normal"
[ "$STATUS" = 200 ]
ok $? "right API key: 200"
cpids=()
for i in 1 2 3 4; do
	curl -s -o /dev/null -w '%{http_code}\n' -H 'Authorization: Bearer s3cret' \
		"http://127.0.0.1:$PORT/v1/completions" \
		-d '{"prompt":"Once","max_tokens":1000,"ignore_eos":true}' >"$DIR/q.$i" &
	cpids+=($!)
done
for j in "${cpids[@]}"; do wait "$j"; done
codes=$(cat "$DIR"/q.* | sort | tr '\n' ' ')
[ "$(grep -c 429 "$DIR"/q.* | awk -F: '{s+=$2} END {print s}')" -ge 1 ] &&
	[ "$(grep -c 200 "$DIR"/q.* | awk -F: '{s+=$2} END {print s}')" -ge 2 ]
ok $? "more requests than running + queued: 429 for the rest ($codes)"
req POST /v1/completions -H 'Authorization: Bearer s3cret' -d "$normal"
[ "$STATUS" = 200 ]
ok $? "normal request after 429s"

# ---------------------------------------------------------------- timeouts
start timeouts "$MODEL" --request-timeout 250ms
ok $? "kvqd starts with a 250 ms request timeout"
req POST /v1/completions -d '{"prompt":"Once","max_tokens":1900,"ignore_eos":true,"n":16}'
[ "$STATUS" = 504 ] && js "$ERR_SHAPE" && js 'j["error"]["code"] == "request_timeout"'
ok $? "a request over the request timeout: 504 timeout_error"
curl -sN -o "$DIR/to.txt" "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once","max_tokens":1900,"ignore_eos":true,"stream":true,"n":16,"stream_options":{"include_usage":true}}'
"$PY" - "$DIR/to.txt" <<'EOF'
import json, sys
ev = [l[6:] for l in open(sys.argv[1]).read().split("\n\n")
      if l and not l.startswith(":")]
assert ev[-1] == "[DONE]"
err = json.loads(ev[-2])
assert err["error"]["code"] == "request_timeout", err
assert sum('"error"' in e for e in ev) == 1, "more than one error event"
assert all("choices" in json.loads(e) for e in ev[:-2])
EOF
ok $? "a stream over the request timeout ends with an error event and [DONE]"
req POST /v1/completions -d "$normal"
[ "$STATUS" = 200 ]
ok $? "normal request after timeouts"

# a stream queued behind a long request outlives the idle timeout
start queue "$MODEL" --idle-timeout 1s --max-running 4
ok $? "kvqd starts with a 1 s idle timeout and four running requests"
curl -s -o /dev/null "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once","max_tokens":1900,"ignore_eos":true,"n":4}' &
cpid=$!
sleep 0.1
curl -sN -o "$DIR/queued.txt" "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once","max_tokens":100,"ignore_eos":true,"stream":true}'
wait "$cpid"
sse_check "$DIR/queued.txt" text_completion 0 && grep -q '^: keep-alive$' "$DIR/queued.txt"
ok $? "a queued stream is kept alive with SSE comments past the idle timeout"

# ---------------------------------------------------------------- chat
NPY=
for p in "${PYTHON3:-}" /usr/bin/python3 python3; do
	[ -n "$p" ] && "$p" -c 'import numpy' 2>/dev/null && { NPY=$p; break; }
done
SRC=${KVQ_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
if [ -n "$NPY" ] && [ -f "$SRC/tools/gen_model.py" ]; then
	# stories260K's vocabulary plus ChatML's two control tokens and a
	# Qwen2-style template, under random weights
	PYTHONPATH="$SRC/tools" "$NPY" "$SRC/tools/chatml_model.py" "$DIR/chatml.gguf" \
		--vocab-from "$MODEL" >"$DIR/gen.log" 2>&1
	r=$?
	[ $r = 0 ] || sed 's/^/# /' "$DIR/gen.log"
	ok $r "generate a small model with a ChatML template"
	if [ $r = 0 ] && start chat "$DIR/chatml.gguf"; then
		req POST /v1/chat/completions -d '{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"max_tokens":8,"seed":3}'
		cp "$DIR/body" "$DIR/chat.json"
		[ "$STATUS" = 200 ] && js 'j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-")
			and j["choices"][0]["message"]["role"] == "assistant"
			and isinstance(j["choices"][0]["message"]["content"], str)
			and j["choices"][0]["finish_reason"] in ("stop", "length")
			and j["usage"]["prompt_tokens"] > 10'
		ok $? "POST /v1/chat/completions answers chat.completion"
		curl -sN -o "$DIR/chat.txt" "http://127.0.0.1:$PORT/v1/chat/completions" \
			-d '{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"max_tokens":8,"seed":3,"stream":true,"stream_options":{"include_usage":true}}'
		sse_check "$DIR/chat.txt" chat.completion.chunk 1
		ok $? "streamed chat: chat.completion.chunk with role first, usage, [DONE]"
		[ "$(sse_text "$DIR/chat.txt")" = "$("$PY" -c 'import json,sys; sys.stdout.write(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"])' "$DIR/chat.json")" ]
		ok $? "streamed chat content equals the plain answer"
		req POST /v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"logprobs":true,"top_logprobs":2}'
		[ "$STATUS" = 200 ] && js 'all(set(t) == {"token","logprob","bytes","top_logprobs"} and len(t["top_logprobs"]) == 2 for t in j["choices"][0]["logprobs"]["content"])'
		ok $? "chat logprobs in OpenAI's shape"
		req GET /v1/models
		js 'j["data"][0]["meta"]["chat_template"] == "chatml"'
		ok $? "/v1/models reports the ChatML template"
	else
		skip "chat completions" "the ChatML model did not start"
	fi
else
	skip "chat completions on a ChatML model" "python3-numpy or tools/gen_model.py missing"
fi

# ---------------------------------------------------------------- KV calibration
start calib "$MODEL" --kv-type-k auto
ok $? "kvqd starts with kv_type_k = auto"
curl -s -o "$DIR/calib-metrics.txt" "http://127.0.0.1:$PORT/metrics"
grep -q '^kvqd_kv_format_info{.*calibrated="yes"} 1' "$DIR/calib-metrics.txt" &&
	grep -q '^kvqd_kv_calibration_kl{bits="4"} ' "$DIR/calib-metrics.txt" &&
	grep -q 'KV key calibration: keys' "$DIR/calib.log"
ok $? "kv_type_k = auto: calibrated while loading, logged and in /metrics"
req POST /v1/completions -d "$normal"
[ "$STATUS" = 200 ]
ok $? "a request served with calibrated key precision"

# ---------------------------------------------------------------- drain
start drain "$MODEL"
ok $? "kvqd starts (drain)"
dpid=${PIDS[-1]}
curl -sN -o "$DIR/drain.txt" "http://127.0.0.1:$PORT/v1/completions" \
	-d '{"prompt":"Once","max_tokens":1900,"ignore_eos":true,"stream":true}' &
cpid=$!
sleep 0.2
kill -TERM "$dpid"
# the drain has begun once /health says so (the signal is handled on the
# daemon's loop, which may be busy for a moment)
for i in $(seq 1 60); do
	[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health")" = 503 ] && break
	sleep 0.05
done
req POST /v1/completions -d "$normal"
[ "$STATUS" = 503 ] && js 'j["error"]["code"] == "draining"'
ok $? "SIGTERM: a new request gets 503 draining"
wait "$cpid"
sse_check "$DIR/drain.txt" text_completion 0 && js_n=$(grep -c '"finish_reason":"length"' "$DIR/drain.txt") && [ "$js_n" = 1 ]
ok $? "SIGTERM: the running stream finishes with [DONE]"
wait "$dpid"
ok $? "SIGTERM: kvqd exits 0 after the drain"

echo "1..$n"
[ "$failed" = 0 ]
