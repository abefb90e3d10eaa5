#!/bin/sh
# test_gpu_fwd.sh - runs tests/gpu/test_gpu_fwd under automake's TAP driver
# over the bundled model, stories260K and small random models that take the
# other paths (head_dim 128 and 64 for the fused decode kernel, Q8_0, Q4_0,
# Q4_K and Q6_K weights kept 4- and 8-bit (and a Q4_K_M mix of the two, whose
# QKV stacks mix them in some layers), qwen2's biases and neox RoPE,
# F16 weights with rows of 200 columns: cuBLAS over padded rows; F16 rows of
# 2048 and 6144 columns: the one-token products' block-per-row layouts).
#
# Without a GPU the program prints "1..0 # SKIP no GPU" and exits 77, which
# becomes 0 here (the TAP driver reports the plan as SKIP).
B=${KVQ_BUILDDIR:-.}
S=${srcdir:-.}
T=${KVQ_TESTDATA:-$S/../shared/testdata}
prog="$B/tests/gpu/test_gpu_fwd"

out=$("$prog")
rc=$?
if [ "$rc" -eq 77 ]; then
	printf '%s\n' "$out"
	exit 0
fi
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
set -- "$S/models/kvq-austen-5m.gguf" "$T/stories260K.gguf"
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/llama-q8.gguf" --arch llama --type Q8_0 --dim 512 \
	--layers 2 --heads 4 --kv-heads 2 --ffn 1024 --ctx 1024 --seed 7 &&
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/qwen2-q4.gguf" --arch qwen2 --type Q4_0 --dim 512 \
	--layers 2 --heads 4 --kv-heads 1 --ffn 1024 --ctx 1024 --seed 8 &&
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/llama-q4k.gguf" --arch llama --type Q4_K --dim 256 \
	--layers 2 --heads 4 --kv-heads 4 --ffn 768 --ctx 1024 --seed 9 &&
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/llama-q6k.gguf" --arch llama --type Q6_K --dim 256 \
	--layers 2 --heads 4 --kv-heads 2 --ffn 512 --ctx 1024 --seed 12 &&
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/llama-q4km.gguf" --arch llama --type Q4_K_M --dim 256 \
	--layers 4 --heads 4 --kv-heads 2 --ffn 512 --ctx 1024 --seed 13 &&
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/llama-f16.gguf" --arch llama --type F16 --dim 256 \
	--layers 2 --heads 4 --kv-heads 2 --ffn 200 --ctx 1024 --seed 10 &&
python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
	--out "$tmp/llama-f16w.gguf" --arch llama --type F16 --dim 2048 \
	--layers 2 --heads 16 --kv-heads 4 --ffn 6144 --ctx 1024 --seed 11 ||
	exit 1
"$prog" "$@" "$tmp/llama-q8.gguf" "$tmp/qwen2-q4.gguf" "$tmp/llama-q4k.gguf" \
	"$tmp/llama-q6k.gguf" "$tmp/llama-q4km.gguf" "$tmp/llama-f16.gguf" \
	"$tmp/llama-f16w.gguf"
