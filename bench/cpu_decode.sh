#!/bin/sh
# cpu_decode.sh - CPU prompt and decode speed of kvqd against memory bandwidth.
#
# Why this file exists: decoding one token on the CPU reads every weight
# once, so tokens per second times weight bytes is the bandwidth the forward
# pass achieves.  This script measures that for F16, Q8_0 and Q4_0 copies of
# a generated ~0.5B-parameter llama (and of a smaller shape that matches
# published llama.cpp figures), measures the STREAM triad in the same
# invocation (before and after the models; the better figure counts), and
# prints one JSON document that relates the two.
#
# Usage: bench/cpu_decode.sh [--types "F16 Q8_0 Q4_0"] [--shapes "main peer"]
#            [--max-tokens 64] [--runs 1] [--threads N]
# Run it from a build directory (one configured without --enable-asan) after
# `make bench`, or point it at the programs through the environment:
#   KVQD            the kvqd binary (default ./kvqd)
#   KVQ_STREAM      the triad binary (default ./bench/stream)
#   PY              a python3 with numpy, for tools/gen_model.py
#   KVQ_BENCH_OUT   where generated models are cached (default SRCDIR/bench/out)
#   KVQ_TESTDATA    shared test data (default SRCDIR/../shared/testdata)
# Models are generated once and reused; the JSON goes to stdout and progress
# to stderr.  With --runs N, each model runs N times and the run with the
# best decode speed is reported.

set -eu

SRCDIR=$(cd "$(dirname "$0")/.." && pwd)
TYPES="F16 Q8_0 Q4_0"
SHAPES="main peer"
MAX_TOKENS=64
RUNS=1
THREADS=0
PROMPT="The history of the printing press begins in the middle of the fifteenth century, when a goldsmith in Mainz combined movable metal type, oil-based ink and a wooden screw press into a system that could produce books faster and more cheaply than any scribe. Within fifty years presses were working in more than two hundred cities across Europe, and the number of books in circulation grew from thousands to millions. Explain, step by step, how this change affected science, religion and politics."

usage() {
	sed -n '/^# Usage:/,/^# Models/p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

while [ $# -gt 0 ]; do
	case $1 in
	--types) TYPES=$2; shift 2 ;;
	--shapes) SHAPES=$2; shift 2 ;;
	--max-tokens) MAX_TOKENS=$2; shift 2 ;;
	--runs) RUNS=$2; shift 2 ;;
	--threads) THREADS=$2; shift 2 ;;
	-h|--help) usage ;;
	*) echo "cpu_decode.sh: unknown argument $1" >&2; usage ;;
	esac
done

KVQD=${KVQD:-./kvqd}
KVQ_STREAM=${KVQ_STREAM:-./bench/stream}
KVQ_BENCH_OUT=${KVQ_BENCH_OUT:-$SRCDIR/bench/out}
KVQ_TESTDATA=${KVQ_TESTDATA:-$SRCDIR/../shared/testdata}
VOCAB=$KVQ_TESTDATA/vocab/ggml-vocab-llama-spm.gguf

if [ -z "${PY:-}" ]; then
	for p in ${PYTHON3:-} /usr/bin/python3 python3; do
		if "$p" -c 'import numpy' >/dev/null 2>&1; then
			PY=$p
			break
		fi
	done
fi
PY=${PY:-python3}

for f in "$KVQD" "$KVQ_STREAM"; do
	if [ ! -x "$f" ]; then
		echo "cpu_decode.sh: $f not found or not executable (make bench, or set KVQD / KVQ_STREAM)" >&2
		exit 1
	fi
done
if [ ! -f "$VOCAB" ]; then
	echo "cpu_decode.sh: vocabulary $VOCAB not found (set KVQ_TESTDATA)" >&2
	exit 1
fi

mkdir -p "$KVQ_BENCH_OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvq-cpu-decode.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# shape_args NAME: generator arguments of a named shape.
shape_args() {
	case $1 in
	main) echo "--dim 1536 --layers 24 --heads 12 --kv-heads 4 --ffn 4096" ;;
	peer) echo "--dim 1024 --layers 24 --heads 16 --kv-heads 4 --ffn 2816" ;;
	*) echo "cpu_decode.sh: unknown shape $1 (main, peer)" >&2; exit 2 ;;
	esac
}

# model_path SHAPE TYPE: the cached model, generated when missing.
model_path() {
	args=$(shape_args "$1")
	tag=$(echo "$args" | sed 's/--kv-heads /kv/; s/--dim /d/; s/--layers /l/; s/--heads /h/; s/--ffn /f/; s/ /-/g')
	f=$KVQ_BENCH_OUT/llama-$tag-$2.gguf
	if [ ! -s "$f" ]; then
		echo "cpu_decode.sh: generating $f" >&2
		# shellcheck disable=SC2086
		"$PY" "$SRCDIR/tools/gen_model.py" --out "$f.tmp.$$" --arch llama \
			--type "$2" $args --ctx 2048 --seed 1 \
			--vocab-from "$VOCAB" >&2
		mv "$f.tmp.$$" "$f"
	fi
	echo "$f"
}

echo "cpu_decode.sh: STREAM triad" >&2
"$KVQ_STREAM" --threads "$THREADS" >"$WORK/triad-before.json"

: >"$WORK/runs.tsv"
for shape in $SHAPES; do
	for type in $TYPES; do
		model=$(model_path "$shape" "$type")
		run=1
		while [ "$run" -le "$RUNS" ]; do
			log=$WORK/$shape-$type-$run.log
			echo "cpu_decode.sh: $shape $type run $run" >&2
			rc=0
			"$KVQD" --model "$model" --prompt "$PROMPT" \
				--max-tokens "$MAX_TOKENS" --temperature 0 \
				--threads "$THREADS" --bench-json \
				>"$log" 2>&1 || rc=$?
			printf '%s\t%s\t%s\t%s\t%s\n' "$shape" "$type" "$model" \
				"$log" "$rc" >>"$WORK/runs.tsv"
			run=$((run + 1))
		done
	done
done

echo "cpu_decode.sh: STREAM triad again" >&2
"$KVQ_STREAM" --threads "$THREADS" >"$WORK/triad-after.json"

"$PY" - "$WORK" "$MAX_TOKENS" "$THREADS" <<'EOF'
import json
import os
import platform
import sys

work, max_tokens, threads = sys.argv[1:4]
SHAPES = {
    "main": {"dim": 1536, "layers": 24, "heads": 12, "kv_heads": 4,
             "ffn": 4096, "vocab": 32000},
    "peer": {"dim": 1024, "layers": 24, "heads": 16, "kv_heads": 4,
             "ffn": 2816, "vocab": 32000},
}
PEER = {
    "what": "llama.cpp CPU decode on this class of machine, as published; "
            "not measured here",
    "shape": {"dim": 1024, "layers": 24},
    "decode_tps": {"F16": 25.0, "Q8_0": 44.0, "Q4_0": 74.0},
}


def bench_line(path):
    """The last JSON object with decode_tps that kvqd printed, or None."""
    found = None
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{") and "decode_tps" in line:
                try:
                    found = json.loads(line)
                except ValueError:
                    pass
    return found


def tail(path, n=5):
    with open(path, errors="replace") as f:
        return [l.rstrip("\n") for l in f.readlines()[-n:]]


# The triad runs before and after the models; the better one is the bound.
triad = []
for when in ("before", "after"):
    with open(os.path.join(work, "triad-%s.json" % when)) as f:
        triad.append(dict(json.load(f), when=when))
triad_gbps = max(t["triad_gbps"] for t in triad)

results = {}
for row in open(os.path.join(work, "runs.tsv")):
    shape, typ, model, log, rc = row.rstrip("\n").split("\t")
    res = results.setdefault(shape, {})
    j = bench_line(log) if rc == "0" else None
    if j is None:
        if typ not in res:
            res[typ] = {"error": "kvqd exited %s without a bench line" % rc,
                        "log_tail": tail(log)}
        continue
    prev = res.get(typ)
    if prev and "decode_tps" in prev and prev["decode_tps"] >= j["decode_tps"]:
        continue
    wread = j["weight_bytes"] * j["decode_tps"] / 1e9
    res[typ] = {
        "prompt_tokens": j.get("prompt_tokens"),
        "prompt_tps": j["prompt_tps"],
        "decode_tokens": j.get("decode_tokens"),
        "decode_tps": j["decode_tps"],
        "weight_bytes": j["weight_bytes"],
        "weight_read_gbps": round(wread, 3),
        "fraction_of_triad": round(wread / triad_gbps, 4) if triad_gbps else None,
        "peak_rss_bytes": j.get("peak_rss_bytes"),
        "file_bytes": os.path.getsize(model),
        "simd": j.get("simd"),
    }

doc = {
    "bench": "cpu_decode",
    "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
    "threads": int(threads),
    "max_tokens": int(max_tokens),
    "triad_gbps": triad_gbps,
    "triad_runs": triad,
    "shapes": {s: {"shape": SHAPES[s], "results": results[s]}
               for s in results},
    "peer_reference_published": PEER,
}
if "peer" in results:
    doc["peer_comparison"] = {
        t: {"measured_decode_tps": r["decode_tps"],
            "peer_reference_published_decode_tps": PEER["decode_tps"][t],
            "ratio": round(r["decode_tps"] / PEER["decode_tps"][t], 3)}
        for t, r in results["peer"].items()
        if "decode_tps" in r and t in PEER["decode_tps"]
    }
json.dump(doc, sys.stdout, indent=2)
sys.stdout.write("\n")
EOF
