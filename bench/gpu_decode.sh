#!/bin/sh
# gpu_decode.sh - generates the 1B-parameter Llama-shaped random models
# (dim 2048, 16 layers, 32 query / 8 KV heads, ffn 8192, vocab 32000, F16
# and Q8_0) when missing and runs bench/gpu_decode over them; JSON on
# stdout.  Arguments go to gpu_decode (e.g. --batch 1 --ctx 1024).
#
# Environment: KVQ_GPU_DECODE (the program), KVQ_BENCH_OUT (model cache,
# default bench/out), KVQ_TESTDATA (for the llama vocabulary), PYTHON3.
set -eu
SRCDIR=$(cd "$(dirname "$0")/.." && pwd)
PROG=${KVQ_GPU_DECODE:-./bench/gpu_decode}
OUTD=${KVQ_BENCH_OUT:-$SRCDIR/bench/out}
TD=${KVQ_TESTDATA:-$SRCDIR/../shared/testdata}
PY=${PYTHON3:-python3}
VOCAB=$TD/vocab/ggml-vocab-llama-spm.gguf

if [ ! -x "$PROG" ]; then
	echo "gpu_decode.sh: $PROG not found (configure --with-cuda; make bench)" >&2
	exit 1
fi
mkdir -p "$OUTD"
M=
for t in F16 Q8_0; do
	f=$OUTD/llama-1b-$t.gguf
	if [ ! -s "$f" ]; then
		echo "gpu_decode.sh: generating $f" >&2
		"$PY" "$SRCDIR/tools/gen_model.py" -q --out "$f.tmp.$$" --arch llama \
			--type "$t" --dim 2048 --layers 16 --heads 32 --kv-heads 8 \
			--ffn 8192 --ctx 131072 --seed 1 --vocab-from "$VOCAB"
		mv "$f.tmp.$$" "$f"
	fi
	M="$M --model $f"
done
# shellcheck disable=SC2086
exec "$PROG" $M "$@"
