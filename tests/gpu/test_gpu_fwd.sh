#!/bin/sh
# test_gpu_fwd.sh - runs tests/gpu/test_gpu_fwd under automake's TAP driver
# over the bundled model, stories260K and small random models that take the
# other paths (head_dim 128 and 64 for the fused decode kernel, BF16 (one
# model with a weight beyond f16's range), Q8_0, Q4_0,
# Q4_K and Q6_K weights kept 4- and 8-bit (and a Q4_K_M mix of the two, whose
# QKV stacks mix them in some layers), qwen2's biases and neox RoPE,
# F16 weights with rows of 200 columns: cuBLAS over padded rows; F16,
# Q8_0 and Q4_0 rows of 2048 and 6144 columns: the one-token products'
# two-warp and block-per-row layouts, the 8- and 4-bit ones with their
# loads fetched ahead; the 8- and 4-bit models' gate/up go through
# mv_pairs_kernel(), one warp a pair below 2048 columns and two at 2048;
# in the int8 dot mode every 8- and 4-bit model's one-token gate/up goes
# through mv_q8a_kernel(), and on the two models with a weight past f16's
# range in the embedding every one-token product: single rows, and QKV;
# and a step of three sequences through tcq_kernel(), the int8 tensor-core
# product of 2-8 tokens).
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
# gen NAME ARCH TYPE DIM LAYERS HEADS KV_HEADS FFN SEED: $tmp/NAME.gguf,
# appended to the models to test.
gen() {
	n=$1
	python3 "$S/tools/gen_model.py" -q --vocab-from "$T/stories260K.gguf" \
		--out "$tmp/$1.gguf" --arch "$2" --type "$3" --dim "$4" \
		--layers "$5" --heads "$6" --kv-heads "$7" --ffn "$8" \
		--ctx 1024 --seed "$9" ${10:+--outlier "${10}"} || exit 1
	models="$models $tmp/$n.gguf"
}
models=
gen llama-q8 llama Q8_0 512 2 4 2 1024 7
gen qwen2-q4 qwen2 Q4_0 512 2 4 1 1024 8
gen llama-q4k llama Q4_K 256 2 4 4 768 9
gen llama-q6k llama Q6_K 256 2 4 2 512 12
gen llama-q4km llama Q4_K_M 256 4 4 2 512 13
gen llama-f16 llama F16 256 2 4 2 200 10
gen llama-f16w llama F16 2048 2 16 4 6144 11
gen llama-q8w llama Q8_0 2048 2 16 4 6144 18
gen llama-q4w llama Q4_0 2048 2 16 4 6144 19
# BF16 as f16 on the GPU; one weight past f16's range keeps its matrix f32
gen llama-bf16 llama BF16 256 2 4 2 512 14
gen llama-bf16-big llama BF16 256 2 4 2 512 15 blk.0.ffn_down.weight=100000
# and so do Q8_0 and Q4_0 rows (expanded to f16 values in registers): here
# the BOS token's embedding, which every prompt starts with.  (Where 1e5
# multiplies a computed value instead -- in a product, with the last
# layer's down projection or an output projection -- the GPU's f16 rounding
# of the other 8/4-bit weights, a flipped q4 code of the cache, or a
# prompt's f16 keys come out 1e5 times larger: no tolerance holds such a
# model to the CPU's.  bf16-big above has exact weights, so it may.)
gen llama-q8-big llama Q8_0 256 2 4 2 512 16 token_embd.weight@1=100000
gen llama-q4-big llama Q4_0 256 2 4 2 512 17 token_embd.weight@1=100000
# shellcheck disable=SC2086
"$prog" "$@" $models
