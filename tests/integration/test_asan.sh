#!/bin/sh
# The GGUF reader and the tokenizer meet untrusted files: their unit tests
# (every truncation, absurd counts, bad offsets, unknown types, all
# tokenizer vectors) run again here under AddressSanitizer and UBSan,
# built from the sources whatever this build was configured with.
set -u
: "${KVQ_SRCDIR:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${KVQ_BUILDDIR:=$KVQ_SRCDIR}"
CC=${CC:-cc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! echo 'int main(void){return 0;}' > "$tmp/t.c" ||
   ! $CC -fsanitize=address,undefined "$tmp/t.c" -o "$tmp/t" 2>/dev/null ||
   ! "$tmp/t"; then
	echo "1..0 # SKIP the compiler cannot build with AddressSanitizer"
	exit 0
fi

flags="-std=gnu11 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer
	-fno-sanitize-recover=undefined -I$KVQ_SRCDIR -I$KVQ_BUILDDIR -I$KVQ_SRCDIR/tests"
pcre=$(pkg-config --cflags --libs libpcre2-8 2>/dev/null || echo -lpcre2-8)
n=0
fail=0

run() {
	name=$1
	shift
	n=$((n + 1))
	if "$@" > "$tmp/out" 2>&1; then
		echo "ok $n - $name"
	else
		echo "not ok $n - $name"
		sed 's/^/# /' "$tmp/out" | tail -n 40
		fail=1
	fi
}

# shellcheck disable=SC2086
run "build test_gguf with ASan+UBSan" $CC $flags -o "$tmp/test_gguf" \
	"$KVQ_SRCDIR/tests/unit/test_gguf.c" "$KVQ_SRCDIR/engine/gguf.c"
run "test_gguf under ASan+UBSan (malformed files, every truncation)" \
	env ASAN_OPTIONS=detect_leaks=1 "$tmp/test_gguf"
# shellcheck disable=SC2086
run "build test_tokenizer with ASan+UBSan" $CC $flags -o "$tmp/test_tokenizer" \
	"$KVQ_SRCDIR/tests/unit/test_tokenizer.c" "$KVQ_SRCDIR/engine/tokenizer.c" \
	"$KVQ_SRCDIR/engine/pretok.c" \
	"$KVQ_SRCDIR/engine/unicode.c" "$KVQ_SRCDIR/engine/gguf.c" $pcre
run "test_tokenizer under ASan+UBSan" \
	env ASAN_OPTIONS=detect_leaks=1 "$tmp/test_tokenizer"
echo "1..$n"
exit $fail
