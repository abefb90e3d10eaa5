#!/bin/bash
# The official OpenAI Node.js client (npm "openai", installed by
# tools/install-deps.sh into tests/node/) runs a completion and a streamed
# chat completion against a real kvqd.
set -u
SRC=${KVQ_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
KVQD=${KVQD:-./kvqd}
TD=${KVQ_TESTDATA:-$SRC/../shared/testdata}
MODEL=$TD/stories260K.gguf
PY=${PYTHON3:-python3}
NODE_DIR=${KVQ_NODE_DIR:-$SRC/tests/node}

command -v node >/dev/null || { echo "1..0 # SKIP node is not installed"; exit 0; }
[ -d "$NODE_DIR/node_modules/openai" ] ||
	{ echo "1..0 # SKIP the npm openai package is not installed (tools/install-deps.sh installs it)"; exit 0; }
[ -f "$MODEL" ] || { echo "1..0 # SKIP $MODEL missing"; exit 0; }
command -v curl >/dev/null || { echo "1..0 # SKIP curl is not installed"; exit 0; }

DIR=$(mktemp -d)
# start runs in a command substitution, a subshell: the daemons' pids go
# to files, which the cleanup reads.
cleanup() {
	local f p
	for f in "$DIR"/*.pid; do
		[ -f "$f" ] || continue
		p=$(cat "$f")
		kill "$p" 2>/dev/null
		while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
	done
	rm -rf "$DIR"
}
trap cleanup EXIT

free_port() {
	"$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME MODEL: prints the port once kvqd answers /health with 200
start() {
	local name=$1 model=$2 port i
	port=$(free_port)
	mkdir -p "$DIR/$name"
	"$KVQD" --model "$model" --listen "127.0.0.1:$port" \
		--admin-socket "$DIR/$name/admin.sock" --state-dir "$DIR/$name" \
		>"$DIR/$name.log" 2>&1 &
	echo $! >"$DIR/$name.pid"
	for i in $(seq 1 200); do
		if curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" | grep -q 200; then
			echo "$port"
			return 0
		fi
		sleep 0.05
	done
	sed 's/^/# /' "$DIR/$name.log" >&2
	return 1
}

cport=$(start plain "$MODEL") || { echo "1..1"; echo "not ok 1 - kvqd did not start"; exit 1; }
chport=
if PYTHONPATH="$SRC/tools" "$PY" "$SRC/tools/chatml_model.py" "$DIR/chatml.gguf" \
	--vocab-from "$MODEL" >"$DIR/gen.log" 2>&1; then
	chport=$(start chat "$DIR/chatml.gguf") || chport=
fi
[ -n "$chport" ] || echo "# the ChatML model did not start: chat is not checked"
cd "$NODE_DIR" && node openai_client.mjs 127.0.0.1 "$cport" $chport
