#!/bin/bash
# kvqd's one-shot command line on real and broken files: tokenizing with
# vocabulary-only GGUF files, generating from an empty prompt, and one clear
# error (naming the file and what is wrong, exit status 1, no crash) for a
# missing file, a truncated file, a GGUF v1 file, an unsupported
# architecture and an unsupported tensor type.
set -u
SRC=${KVQ_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
KVQD=${KVQD:-./kvqd}
TD=${KVQ_TESTDATA:-$SRC/../shared/testdata}
PY=${PYTHON3:-python3}
S260=$TD/stories260K.gguf
[ -f "$S260" ] || { echo "1..0 # SKIP $S260 missing"; exit 0; }
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
n=0
fail=0
ok() {
	n=$((n + 1))
	if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; fail=1; fi
}

# expect_error NAME FILE PATTERN: exit 1, one stderr line naming FILE and PATTERN
expect_error() {
	"$KVQD" --model "$2" --prompt x --max-tokens 1 >"$DIR/out" 2>"$DIR/err"
	rc=$?
	r=1
	if [ $rc = 1 ] && [ ! -s "$DIR/out" ] && grep -q -- "$2" "$DIR/err" &&
		grep -q -- "$3" "$DIR/err" && [ "$(wc -l <"$DIR/err")" -le 2 ]; then
		r=0
	fi
	[ $r = 0 ] || sed 's/^/# /' "$DIR/err"
	ok $r "$1: $(head -n 1 "$DIR/err")"
}

for v in gpt-2 llama-spm; do
	f=$TD/vocab/ggml-vocab-$v.gguf
	if [ -f "$f" ]; then
		got=$("$KVQD" --model "$f" --tokenize "Hello world" 2>"$DIR/err")
		# the test vector for "Hello world"
		want=$("$PY" - "$f.inp" "$f.out" <<'PYEOF'
import sys
inp = open(sys.argv[1], encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
out = open(sys.argv[2]).read().split("\n")
print(out[inp.index("Hello world")].strip())
PYEOF
)
		[ -n "$got" ] && [ "$got" = "$want" ]
		ok $? "--tokenize on the vocabulary-only $v file: '$got' = '$want'"
	else
		echo "ok $((n += 1)) - $v vocabulary # SKIP missing"
	fi
done

out=$("$KVQD" --model "$S260" --prompt "" --max-tokens 20 --temperature 0 2>"$DIR/err")
echo "$out" | grep -q "Once upon a time"
ok $? "empty prompt starts from BOS: '$out'"
out1=$("$KVQD" --model "$S260" --prompt "The cat" --max-tokens 20 --temperature 0.9 --seed 7 2>/dev/null)
out2=$("$KVQD" --model "$S260" --prompt "The cat" --max-tokens 20 --temperature 0.9 --seed 7 2>/dev/null)
out3=$("$KVQD" --model "$S260" --prompt "The cat" --max-tokens 20 --temperature 0.9 --seed 8 2>/dev/null)
[ -n "$out1" ] && [ "$out1" = "$out2" ] && [ "$out1" != "$out3" ]
ok $? "same seed, same text; another seed, other text"
out=$("$KVQD" --model "$S260" --prompt "" --max-tokens 60 --temperature 0 --stop "Lily" 2>/dev/null)
[ -n "$out" ] && ! echo "$out" | grep -q Lily
ok $? "a stop string ends the text before it: '$out'"

# No --model: the bundled model (installed, or this source tree's).
out=$("$KVQD" --prompt "It is a truth universally acknowledged" --max-tokens 12 \
	--temperature 0 --verbose 2>"$DIR/err")
rc=$?
[ $rc = 0 ] && [ -n "$out" ] && grep -q "kvq-austen-5m" "$DIR/err"
ok $? "no --model: the bundled model answers: '$out'"

expect_error "missing file" "$DIR/none.gguf" "No such file"
head -c 100000 "$S260" >"$DIR/trunc.gguf"
expect_error "truncated file" "$DIR/trunc.gguf" "truncated"
printf 'GGUF\001\000\000\000' >"$DIR/v1.gguf"
head -c 64 /dev/zero >>"$DIR/v1.gguf"
expect_error "GGUF v1" "$DIR/v1.gguf" "v1 is not supported"
expect_error "vocabulary-only file as a model" "$TD/vocab/ggml-vocab-gpt-2.gguf" 'unsupported architecture "gpt2"'
if "$PY" -c 'import numpy' 2>/dev/null; then
	PYTHONPATH="$SRC/tools" "$PY" "$SRC/tools/gen_model.py" -q --out "$DIR/q4k.gguf" \
		--arch llama --type Q4_K --dim 256 --layers 1 --heads 4 --ffn 256 \
		--ctx 64 --vocab-from "$S260" >/dev/null 2>&1
	PYTHONPATH="$SRC/tools" "$PY" - "$DIR/q4k.gguf" "$DIR/q5k.gguf" <<'PYEOF'
import sys
import numpy as np
from kvq_gguf import GGUFReader, GGUFWriter
Q5_K = 13
with GGUFReader(sys.argv[1]) as r:
    w = GGUFWriter(sys.argv[2])
    for k, v in r.fields.items():
        if not k.startswith("general.alignment"):
            w.add(k, v)
    for t in r.tensors:
        if t.name == "blk.0.attn_q.weight":
            rows = t.shape[0]
            w.add_tensor(t.name, np.zeros(rows * t.shape[1] // 256 * 176, np.uint8),
                         Q5_K, shape=t.shape)
        else:
            w.add_tensor(t.name, r.tensor_bytes(t), t.type, shape=t.shape)
    w.write()
PYEOF
	expect_error "unsupported tensor type" "$DIR/q5k.gguf" "unsupported tensor type Q5_K in tensor blk.0.attn_q.weight"
else
	echo "ok $((n += 1)) - unsupported tensor type # SKIP numpy missing"
fi
echo "1..$n"
exit $fail
