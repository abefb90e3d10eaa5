#!/bin/sh
# test_ops.sh - operating kvqd as a service, against the real daemon.
#
# Starts kvqd on a free loopback port with the shared test model and checks
# what an operator relies on: --check-config, sd_notify messages on a
# socket this test owns (a path and an abstract name), kvqctl's commands in
# table and JSON form, kvqctl's messages when the daemon is down or the
# socket is not accessible, SIGHUP with a good and a bad config, and
# SIGTERM exiting 0.  TAP on stdout.
set -u

KVQD=${KVQD:-${KVQ_BUILDDIR:-.}/kvqd}
KVQCTL=${KVQCTL:-${KVQ_BUILDDIR:-.}/kvqctl}
PY=${PYTHON3:-python3}
MODEL=${KVQ_TESTDATA:-../shared/testdata}/stories260K.gguf

if [ ! -f "$MODEL" ]; then
	echo "1..0 # SKIP test model not found: $MODEL"
	exit 0
fi
if ! "$PY" -c 'import socket' 2>/dev/null; then
	echo "1..0 # SKIP no python3 (needed for the notify socket)"
	exit 0
fi

T=$(mktemp -d /tmp/kvq-test-ops.XXXXXX)
N=0
FAILED=0
DAEMON_PID=
NOTIFY_PID=

cleanup() {
	[ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null
	[ -n "$NOTIFY_PID" ] && kill "$NOTIFY_PID" 2>/dev/null
	wait 2>/dev/null
	[ -n "${KEEP:-}" ] || rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

ok() {
	N=$((N + 1))
	echo "ok $N - $1"
}
not_ok() {
	N=$((N + 1))
	FAILED=$((FAILED + 1))
	echo "not ok $N - $1"
}
skip() {
	N=$((N + 1))
	echo "ok $N - $1 # SKIP $2"
}
# check NAME COMMAND...: ok when COMMAND succeeds.
check() {
	name=$1
	shift
	if "$@"; then ok "$name"; else not_ok "$name"; fi
}
diag() {
	sed 's/^/# /' "$@"
}
# wait_for FILE PATTERN [SECONDS]: until grep finds PATTERN in FILE.
wait_for() {
	i=0
	while [ $i -lt $((${3:-30} * 10)) ]; do
		grep -q -- "$2" "$1" 2>/dev/null && return 0
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}
# json FILE EXPR: evaluates a Python expression over the JSON in FILE (j).
json() {
	"$PY" -c 'import json, sys
j = json.load(open(sys.argv[1]))
sys.exit(0 if eval(sys.argv[2]) else 1)' "$1" "$2"
}

free_port() {
	"$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# notify_listen NAME OUT: receive sd_notify datagrams on NAME (a path, or
# an abstract name starting with @) into OUT, one message per block.
notify_listen() {
	"$PY" -c 'import socket, sys, time
name, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + name[1:] if name.startswith("@") else name)
s.settimeout(0.5)
open(out + ".ready", "w").close()
end = time.time() + 300
with open(out, "a") as f:
    while time.time() < end:
        try:
            m = s.recv(65536)
        except socket.timeout:
            continue
        f.write(m.decode() + "\n--\n")
        f.flush()' "$1" "$2" &
	NOTIFY_PID=$!
	wait_for_file "$2.ready"
}
wait_for_file() {
	i=0
	while [ ! -e "$1" ] && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
}

# start_daemon CONF LOG [extra args]: kvqd in the background, notifying
# $NOTIFY_SOCKET.
start_daemon() {
	conf=$1
	log=$2
	shift 2
	"$KVQD" --config "$conf" "$@" >"$log.out" 2>"$log" &
	DAEMON_PID=$!
}
# stop_daemon: SIGTERM, wait, and return kvqd's exit status.
stop_daemon() {
	kill -TERM "$DAEMON_PID"
	wait "$DAEMON_PID"
	st=$?
	DAEMON_PID=
	return $st
}

chmod 755 "$T"
mkdir -p "$T/state" "$T/run"
chmod 755 "$T/run"
PORT=$(free_port)
SOCK=$T/run/kvqd.sock
CONF=$T/kvqd.conf
write_conf() {
	cat >"$CONF" <<EOF
# test configuration
model = $MODEL
listen = 127.0.0.1:$PORT
state_dir = $T/state
admin_socket = $SOCK
threads = 1
max_running = 4
drain_timeout = 60s
log_level = $1
max_queued = $2
EOF
}
write_conf info 8

# ---------------------------------------------------------- --check-config
"$KVQD" --config "$CONF" --check-config >"$T/check.out" 2>&1
st=$?
check "check_config_good_exits_0" [ $st -eq 0 ]
check "check_config_good_says_ok" grep -q "configuration OK" "$T/check.out"

cat >"$T/bad.conf" <<EOF
model = $MODEL
state_dir = $T/state
threads = many
bogus_key = 1
listen = 127.0.0.1:99999
EOF
"$KVQD" --config "$T/bad.conf" --check-config >"$T/check.out" 2>&1
st=$?
check "check_config_bad_exits_1" [ $st -eq 1 ]
check "check_config_bad_names_file_line_key" \
	grep -q "^$T/bad.conf:3: threads: 'many' is not a whole number" "$T/check.out"
check "check_config_bad_reports_every_line" \
	sh -c "grep -q 'bad.conf:4: unknown key' '$T/check.out' && grep -q 'bad.conf:5: listen' '$T/check.out'"
[ $st -eq 1 ] || diag "$T/check.out"

echo "this is not a GGUF file" >"$T/junk.gguf"
printf 'model = junk.gguf\nstate_dir = %s\n' "$T/state" >"$T/junk.conf"
"$KVQD" --config "$T/junk.conf" --check-config >"$T/check.out" 2>&1
st=$?
check "check_config_bad_model_file" \
	sh -c "[ $st -eq 1 ] && grep -q 'junk.conf:1: model: ' '$T/check.out'"

"$KVQD" --config "$T/missing.conf" --check-config >"$T/check.out" 2>&1
st=$?
check "check_config_missing_file" \
	sh -c "[ $st -eq 1 ] && grep -q 'missing.conf: cannot read' '$T/check.out'"

"$KVQD" --config "$CONF" --check-config --threads -1 >"$T/check.out" 2>&1
st=$?
check "check_config_bad_override_names_option" \
	sh -c "[ $st -eq 1 ] && grep -q 'command line: --threads' '$T/check.out'"

# --------------------------------------------------------- start, notify
NOTIFY=$T/notify.sock
notify_listen "$NOTIFY" "$T/notify.log"
NOTIFY_SOCKET=$NOTIFY start_daemon "$CONF" "$T/kvqd.log"
if wait_for "$T/notify.log" "READY=1" 60; then
	ok "notify_ready_after_load"
else
	not_ok "notify_ready_after_load"
	diag "$T/kvqd.log"
fi
check "notify_status_while_loading" grep -q "STATUS=Loading model" "$T/notify.log"
check "notify_status_serving" grep -q "STATUS=Serving" "$T/notify.log"
check "log_lines_have_syslog_prefix" \
	sh -c "[ -s '$T/kvqd.log' ] && ! grep -qv '^<[0-7]>' '$T/kvqd.log'"
check "log_says_cpu_once" \
	sh -c "[ \$(grep -c 'running on the CPU\\|device: cpu' '$T/kvqd.log') -eq 1 ]"

if command -v curl >/dev/null 2>&1; then
	check "http_health_ok_when_ready" \
		curl -sf "http://127.0.0.1:$PORT/health" -o /dev/null
else
	skip "http_health_ok_when_ready" "no curl"
fi

mode=$(stat -c %a "$SOCK" 2>/dev/null)
check "admin_socket_mode_0660" [ "$mode" = "660" ]

# ------------------------------------------------------------------ kvqctl
"$KVQCTL" --socket "$SOCK" status >"$T/out" 2>&1
check "kvqctl_status_table" \
	sh -c "grep -q '^state: *ready' '$T/out' && grep -q '^model: .*stories260K' '$T/out' && grep -q '^device: *cpu' '$T/out'"
check "kvqctl_status_kv_format_and_attention_device" \
	sh -c "grep -q '^kv format: *keys q8, values q4, 320 bytes per token; attention on cpu' '$T/out'"
check "kvqctl_status_dot_products_exact" \
	sh -c "grep -q '^dot products: exact$' '$T/out'"
check "kvqctl_status_steps_without_device_time_on_cpu" \
	sh -c "grep -Eq '^steps: +[0-9]+, [0-9]+\.[0-9]{3} s$' '$T/out'"
"$KVQCTL" --socket "$SOCK" --json status >"$T/out.json" 2>&1
check "kvqctl_status_json" json "$T/out.json" \
	'j["state"] == "ready" and j["model"]["n_layers"] == 5 and j["requests"]["running"] == 0 and j["listen"].endswith(":'"$PORT"'")'
check "kvqctl_status_json_step_and_device_seconds" json "$T/out.json" \
	'j["requests"]["step_seconds"] >= 0 and j["requests"]["device_seconds"] == 0'
check "kvqctl_status_json_kv_format" json "$T/out.json" \
	'j["kv"]["type_k"] == "q8" and j["kv"]["type_v"] == "q4" and j["kv"]["bytes_per_token"] == 320 and j["kv"]["attention"].startswith("cpu")'

"$KVQCTL" --socket "$SOCK" tiers >"$T/out" 2>&1
check "kvqctl_tiers_table" \
	sh -c "grep -q '^host' '$T/out' && grep -q '^token_embd.weight  *weight  *host  *F32' '$T/out' && grep -q '^scores: ' '$T/out'"
"$KVQCTL" --socket "$SOCK" --json tiers >"$T/out.json" 2>&1
check "kvqctl_tiers_json_every_tensor_in_host" json "$T/out.json" \
	'len([o for o in j["objects"] if o["kind"] == "weight"]) == 48 and all(o["tier"] == "host" and o["bytes"] > 0 and isinstance(o["score"], float) and o["type"] for o in j["objects"]) and j["tiers"][0]["name"] == "host" and "bytes_capacity" in j["kv"]'

"$KVQCTL" --socket "$SOCK" requests >"$T/out" 2>&1
check "kvqctl_requests_table_empty" grep -q "no requests" "$T/out"
"$KVQCTL" --socket "$SOCK" --json requests >"$T/out.json" 2>&1
check "kvqctl_requests_json" json "$T/out.json" 'j["requests"] == []'

"$KVQCTL" --socket "$SOCK" config >"$T/out" 2>&1
check "kvqctl_config_table" \
	sh -c "grep -q '^log_level  *info  *$T/kvqd.conf:9  *live' '$T/out' && grep -q '^model .* restart' '$T/out'"
"$KVQCTL" --socket "$SOCK" --json config >"$T/out.json" 2>&1
check "kvqctl_config_json" json "$T/out.json" \
	'{k["key"]: k["value"] for k in j["keys"]}["threads"] == "1" and len(j["keys"]) >= 24'

echo '{"cmd":"nonsense"}' >"$T/req"
"$PY" -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"{\"cmd\":\"nonsense\"}\nstatus\n{bad json\n")
f = s.makefile()
for _ in range(3):
    print(f.readline().strip())' "$SOCK" >"$T/out" 2>&1
check "admin_protocol_errors_and_bare_words" \
	sh -c "sed -n 1p '$T/out' | grep -q '\"code\": *\"unknown_command\"' && sed -n 2p '$T/out' | grep -q '\"ok\": *true' && sed -n 3p '$T/out' | grep -q 'malformed JSON'"

# ------------------------------------------------------------------ SIGHUP
KEY=test-key-0123456789
write_conf debug 9
sed -i "s/^listen = .*/listen = 127.0.0.1:1/" "$CONF"
echo "api_key = $KEY" >>"$CONF"
kill -HUP "$DAEMON_PID"
if wait_for "$T/kvqd.log" "reload: done" 20; then
	ok "sighup_good_config_reloads"
else
	not_ok "sighup_good_config_reloads"
	diag "$T/kvqd.log"
fi
check "sighup_changes_log_level" grep -q "reload: log_level: info -> debug" "$T/kvqd.log"
check "sighup_changes_max_queued" grep -q "reload: max_queued: 8 -> 9" "$T/kvqd.log"
check "sighup_restart_key_kept" grep -q "reload: listen: changed to '127.0.0.1:1', which needs a restart" "$T/kvqd.log"
if command -v curl >/dev/null 2>&1; then
	code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/models")
	code2=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" \
		"http://127.0.0.1:$PORT/v1/models")
	check "sighup_sets_api_key_live" sh -c "[ '$code' = 401 ] && [ '$code2' = 200 ]"
	check "sighup_api_key_not_logged" sh -c "! grep -q '$KEY' '$T/kvqd.log'"
else
	skip "sighup_sets_api_key_live" "no curl"
	skip "sighup_api_key_not_logged" "no curl"
fi
check "notify_reloading_with_monotonic_usec" \
	sh -c "grep -q 'RELOADING=1' '$T/notify.log' && grep -q 'MONOTONIC_USEC=[0-9]' '$T/notify.log'"
"$KVQCTL" --socket "$SOCK" --json config >"$T/out.json" 2>&1
check "kvqctl_config_hides_api_key" sh -c "! grep -q '$KEY' '$T/out.json'"
check "kvqctl_config_after_reload" json "$T/out.json" \
	'(lambda k: k["log_level"]["value"] == "debug" and k["api_key"]["value"] == "(set)" and k["listen"]["value"].endswith(":'"$PORT"'") and k["listen"]["pending_restart"] == "127.0.0.1:1")({k["key"]: k for k in j["keys"]})'

cp "$CONF" "$T/good.conf"
printf 'log_level = info\nthreads = many\n' >"$CONF"
kill -HUP "$DAEMON_PID"
if wait_for "$T/kvqd.log" "configuration refused; keeping the old one" 20; then
	ok "sighup_bad_config_refused"
else
	not_ok "sighup_bad_config_refused"
	diag "$T/kvqd.log"
fi
check "sighup_bad_config_says_why" grep -q "reload: $T/kvqd.conf:2: threads" "$T/kvqd.log"
"$KVQCTL" --socket "$SOCK" --json status >"$T/out.json" 2>&1
check "sighup_bad_config_keeps_old" json "$T/out.json" \
	'j["log_level"] == "debug" and j["reloads"]["count"] == 2 and j["reloads"]["failed"] == 1 and j["reloads"]["last"].startswith("refused")'
check "http_still_serving_after_reloads" \
	sh -c "! command -v curl >/dev/null || curl -sf http://127.0.0.1:$PORT/health -o /dev/null"

# ------------------------------------------------------- kvqctl failures
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null 2>&1; then
	cp "$KVQCTL" "$T/kvqctl"
	chmod 755 "$T/kvqctl"
	setpriv --reuid=65534 --regid=65534 --clear-groups \
		"$T/kvqctl" --socket "$SOCK" status >"$T/out" 2>&1
	st=$?
	check "kvqctl_permission_denied_exit_4" [ $st -eq 4 ]
	check "kvqctl_permission_denied_names_group" \
		sh -c "grep -q 'permission denied on $SOCK' '$T/out' && grep -q \"member of group 'root'\" '$T/out'"
	[ $st -eq 4 ] || diag "$T/out"
else
	skip "kvqctl_permission_denied_exit_4" "needs root and setpriv"
	skip "kvqctl_permission_denied_names_group" "needs root and setpriv"
fi

# ------------------------------------- requests in flight, SIGTERM drains
STREAMS=
if command -v curl >/dev/null 2>&1; then
	for i in 1 2; do
		curl -sN "http://127.0.0.1:$PORT/v1/completions" \
			-H "Authorization: Bearer $KEY" \
			-d '{"prompt": "Once upon a time", "max_tokens": 2000, "stream": true, "ignore_eos": true, "seed": '$i'}' \
			>"$T/stream$i.out" 2>&1 &
		STREAMS="$STREAMS $!"
	done
	wait_for "$T/stream1.out" "data:" 30
	wait_for "$T/stream2.out" "data:" 30
	"$KVQCTL" --socket "$SOCK" --json requests >"$T/req.json" 2>&1
	"$KVQCTL" --socket "$SOCK" requests >"$T/req.out" 2>&1
	"$KVQCTL" --socket "$SOCK" --json tiers >"$T/tiers.json" 2>&1
fi
stop_daemon
st=$?
check "sigterm_exits_0" [ $st -eq 0 ]
[ $st -eq 0 ] || diag "$T/kvqd.log"
check "notify_stopping" grep -q "STOPPING=1" "$T/notify.log"
check "sigterm_drains" grep -q "drain: all requests finished" "$T/kvqd.log"
if [ -n "$STREAMS" ]; then
	# shellcheck disable=SC2086
	wait $STREAMS
	check "kvqctl_requests_in_flight_json" json "$T/req.json" \
		'len(j["requests"]) >= 1 and all(r["state"] in ("queued", "prefill", "decode") and r["max_tokens"] == 2000 for r in j["requests"])'
	check "kvqctl_requests_in_flight_table" \
		grep -q "^ *[0-9][0-9]*  *\(queued\|prefill\|decode\) .* 2000 " "$T/req.out"
	check "kvqctl_tiers_kv_chunks_in_flight" json "$T/tiers.json" \
		'any(o["kind"] == "kv" and o["tier"] == "host" and o["bytes"] > 0 for o in j["objects"])'
	check "sigterm_finishes_running_streams" \
		sh -c "tail -n 3 '$T/stream1.out' | grep -q '^data: \[DONE\]' && tail -n 3 '$T/stream2.out' | grep -q '^data: \[DONE\]' && grep -q '\"finish_reason\": *\"length\"' '$T/stream1.out'"
else
	for t in kvqctl_requests_in_flight_json kvqctl_requests_in_flight_table \
		 kvqctl_tiers_kv_chunks_in_flight sigterm_finishes_running_streams; do
		skip "$t" "no curl"
	done
fi
check "admin_socket_removed" [ ! -e "$SOCK" ]

"$KVQCTL" --socket "$SOCK" status >"$T/out" 2>&1
st=$?
check "kvqctl_daemon_down_exit_3" [ $st -eq 3 ]
check "kvqctl_daemon_down_message" \
	grep -q "kvqd is not running (no socket at $SOCK)" "$T/out"

"$PY" -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])' "$T/stale.sock"
"$KVQCTL" --socket "$T/stale.sock" status >"$T/out" 2>&1
st=$?
check "kvqctl_stale_socket_not_running" \
	sh -c "[ $st -eq 3 ] && grep -q 'kvqd is not running' '$T/out'"

# ------------------------------------ abstract notify socket, SIGINT stop
kill "$NOTIFY_PID" 2>/dev/null
wait "$NOTIFY_PID" 2>/dev/null
NOTIFY_PID=
ABSTRACT="@kvq-test-ops-$$"
notify_listen "$ABSTRACT" "$T/notify2.log"
cp "$T/good.conf" "$CONF"
NOTIFY_SOCKET=$ABSTRACT start_daemon "$CONF" "$T/kvqd2.log" --listen "127.0.0.1:$PORT"
check "notify_abstract_socket_ready" wait_for "$T/notify2.log" "READY=1" 60
kill -INT "$DAEMON_PID"
wait "$DAEMON_PID"
st=$?
DAEMON_PID=
check "sigint_exits_0" [ $st -eq 0 ]

# The admin socket of a live daemon is not taken over by a second one.
# (This one runs in the int8 dot mode, which kvqctl status names.)
export KVQ_DOT=int8
start_daemon "$CONF" "$T/kvqd3.log" --listen "127.0.0.1:$PORT"
unset KVQ_DOT
wait_for "$T/kvqd3.log" "ready:" 60
"$KVQCTL" --socket "$SOCK" status >"$T/out" 2>&1
check "kvqctl_status_dot_products_int8" \
	sh -c "grep -q '^dot products: int8 (' '$T/out'"
"$KVQD" --config "$CONF" --listen "127.0.0.1:$(free_port)" >"$T/out" 2>&1
st=$?
check "second_daemon_refuses_live_admin_socket" \
	sh -c "[ $st -ne 0 ] && grep -q 'another kvqd is listening there' '$T/out'"

# A second SIGTERM while draining cancels what runs and exits 0 at once.
STREAMS=
if command -v curl >/dev/null 2>&1; then
	for i in 1 2; do
		curl -sN "http://127.0.0.1:$PORT/v1/completions" \
			-H "Authorization: Bearer $KEY" \
			-d '{"prompt": "Once", "max_tokens": 2000, "stream": true, "ignore_eos": true}' \
			>"$T/cstream$i.out" 2>&1 &
		STREAMS="$STREAMS $!"
	done
	wait_for "$T/cstream1.out" "data:" 30
fi
kill -TERM "$DAEMON_PID"
wait_for "$T/kvqd3.log" "SIGTERM: stopping" 10
stop_daemon
check "second_sigterm_exits_0" [ $? -eq 0 ]
check "second_sigterm_stops_now" grep -q "SIGTERM again: stopping now" "$T/kvqd3.log"
if [ -n "$STREAMS" ]; then
	# shellcheck disable=SC2086
	wait $STREAMS
	check "second_sigterm_streams_end_cleanly" \
		sh -c "tail -n 3 '$T/cstream1.out' | grep -q '^data: \[DONE\]'"
fi

echo "1..$N"
[ $FAILED -eq 0 ]
