#!/bin/sh
# Every GPU kernel source compiles for AMD with hipcc: the CUDA sources are
# written once and reach HIP only through kernels/gpu_compat.h.  This is a
# compile check; kvqd's HIP build is untested on AMD hardware.
set -u
: "${KVQ_SRCDIR:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${KVQ_BUILDDIR:=$KVQ_SRCDIR}"
: "${HIPCC:=}"
: "${HIP_ARCH:=--offload-arch=gfx90a}"

if [ -z "$HIPCC" ]; then
	HIPCC=$(command -v hipcc || true)
fi
if [ -z "$HIPCC" ]; then
	echo "1..0 # SKIP hipcc is not installed"
	exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0
for src in "$KVQ_SRCDIR"/kernels/*.cu; do
	n=$((n + 1))
	name=$(basename "$src")
	# shellcheck disable=SC2086
	if "$HIPCC" -x hip -std=c++17 -O2 $HIP_ARCH -DKVQ_HIP \
		-I"$KVQ_SRCDIR" -I"$KVQ_BUILDDIR" -c "$src" -o "$tmp/$name.o" \
		> "$tmp/log" 2>&1; then
		echo "ok $n - hipcc compiles kernels/$name ($HIP_ARCH)"
	else
		echo "not ok $n - hipcc compiles kernels/$name ($HIP_ARCH)"
		grep -v "rocm_agent_enumerator\|^Traceback\|^  File\|^    " "$tmp/log" |
			sed 's/^/# /' | head -n 30
		fail=1
	fi
done
echo "1..$n"
exit $fail
