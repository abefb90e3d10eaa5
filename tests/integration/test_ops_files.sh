#!/bin/sh
# test_ops_files.sh - the files an operator installs: the systemd unit
# (systemd-analyze verify), the sysusers.d and tmpfiles.d entries (applied
# to a scratch root), the man pages (mandoc -Tlint, else groff -ww), the
# example config (kvqd --check-config accepts it once a model is set), and
# `make install` putting everything in place under DESTDIR.
# Each check is skipped when its tool is missing.  TAP on stdout.
set -u

B=${KVQ_BUILDDIR:-.}
S=${KVQ_SRCDIR:-.}
KVQD=${KVQD:-$B/kvqd}
MODEL=${KVQ_TESTDATA:-../shared/testdata}/stories260K.gguf
T=$(mktemp -d /tmp/kvq-test-files.XXXXXX)
N=0
FAILED=0
trap 'rm -rf "$T"' EXIT

ok() { N=$((N + 1)); echo "ok $N - $1"; }
not_ok() { N=$((N + 1)); FAILED=$((FAILED + 1)); echo "not ok $N - $1"; }
skip() { N=$((N + 1)); echo "ok $N - $1 # SKIP $2"; }
check() {
	name=$1
	shift
	if "$@"; then ok "$name"; else not_ok "$name"; fi
}
diag() { sed 's/^/# /' "$@"; }

# ------------------------------------------------------------- man pages
for page in kvqd.8 kvqctl.1 kvqd.conf.5; do
	if command -v mandoc >/dev/null 2>&1; then
		mandoc -Tlint -W warning "$S/man/$page" >"$T/lint" 2>&1
		st=$?
		check "man_${page}_mandoc_lint_clean" \
			sh -c "[ $st -eq 0 ] && [ ! -s '$T/lint' ]"
		[ -s "$T/lint" ] && diag "$T/lint"
	elif command -v groff >/dev/null 2>&1; then
		groff -mdoc -ww -z "$S/man/$page" >"$T/lint" 2>&1
		check "man_${page}_groff_clean" [ ! -s "$T/lint" ]
		[ -s "$T/lint" ] && diag "$T/lint"
	else
		skip "man_${page}_lint" "neither mandoc nor groff"
	fi
done

# Every config key is documented in kvqd.conf(5) and the example config.
"$KVQD" --help >"$T/help" 2>&1
keys=$(sed -n 's/^  --\([a-z-]*\) .*/\1/p' "$T/help" | tr - _ |
       grep -v '^config$\|^check_config$\|^help$\|^version$')
missing=
for k in $keys; do
	grep -q "^\.It Cm $k " "$S/man/kvqd.conf.5" || missing="$missing man:$k"
	grep -q "^#$k = " "$S/systemd/kvqd.conf" || missing="$missing example:$k"
done
check "every_key_documented" sh -c "[ -n '$keys' ] && [ -z '$missing' ]"
[ -z "$missing" ] || echo "# undocumented:$missing"

# --------------------------------------------------------------- the unit
UNIT=$B/systemd/kvqd.service
if [ ! -f "$UNIT" ]; then
	not_ok "unit_built"
elif ! command -v systemd-analyze >/dev/null 2>&1; then
	skip "unit_systemd_analyze_verify" "no systemd-analyze"
else
	# verify needs the binaries the unit names to exist.
	mkdir -p "$T/unit"
	sbin=$(sed -n 's|^ExecStart=\(.*\)/kvqd .*|\1|p' "$UNIT")
	sed "s|$sbin/kvqd|$KVQD|g" "$UNIT" >"$T/unit/kvqd.service"
	systemd-analyze verify --man=no "$T/unit/kvqd.service" >"$T/verify" 2>&1
	st=$?
	check "unit_systemd_analyze_verify" \
		sh -c "[ $st -eq 0 ] && ! grep -qi 'unknown\|invalid\|ignoring' '$T/verify'"
	diag "$T/verify"
fi
check "unit_is_type_notify_with_check_config" \
	sh -c "grep -q '^Type=notify$' '$UNIT' && grep -q '^ExecStartPre=.*kvqd .*--check-config' '$UNIT' && grep -q '^ExecReload=/bin/kill -HUP \$MAINPID' '$UNIT'"
check "unit_keeps_gpu_devices_reachable" \
	sh -c "! grep -q '^PrivateDevices=yes' '$UNIT' && grep -q '^DeviceAllow=char-nvidia-uvm' '$UNIT' && grep -q '^LimitMEMLOCK=infinity' '$UNIT'"

# ------------------------------------------------ sysusers.d, tmpfiles.d
if [ "$(id -u)" -eq 0 ] && command -v systemd-sysusers >/dev/null 2>&1 &&
   command -v systemd-tmpfiles >/dev/null 2>&1; then
	mkdir -p "$T/root/etc"
	systemd-sysusers --root="$T/root" "$S/systemd/kvqd.sysusers" >"$T/su" 2>&1
	check "sysusers_creates_kvqd" \
		sh -c "grep -q '^kvqd:' '$T/root/etc/passwd' && grep -q '^kvqd:' '$T/root/etc/group'"
	systemd-tmpfiles --root="$T/root" --create "$S/systemd/kvqd.tmpfiles" >"$T/tf" 2>&1
	check "tmpfiles_creates_state_dir" \
		sh -c "[ \"\$(stat -c %a '$T/root/var/lib/kvqd')\" = 750 ]"
	diag "$T/tf"
else
	skip "sysusers_creates_kvqd" "needs root, systemd-sysusers and systemd-tmpfiles"
	skip "tmpfiles_creates_state_dir" "needs root, systemd-sysusers and systemd-tmpfiles"
fi

# ---------------------------------------------------- the example config
if [ -f "$MODEL" ]; then
	mkdir -p "$T/state"
	{ cat "$S/systemd/kvqd.conf"
	  echo "model = $MODEL"
	  echo "state_dir = $T/state"; } >"$T/example.conf"
	"$KVQD" --config "$T/example.conf" --check-config >"$T/cc" 2>&1
	check "example_config_is_valid" [ $? -eq 0 ]
	diag "$T/cc"
else
	skip "example_config_is_valid" "test model not found"
fi

# ------------------------------------------------------------ make install
mkvar() { sed -n "s/^$1 = //p" "$B/Makefile"; }
if [ -f "$B/Makefile" ] && command -v make >/dev/null 2>&1; then
	D=$T/dest
	prefix=$(mkvar prefix)
	for v in exec_prefix datarootdir sbindir bindir mandir sysconfdir; do
		eval "$v=\"$(mkvar $v)\""
	done
	env -u MAKEFLAGS -u MFLAGS make -s -C "$B" install DESTDIR="$D" \
		systemdsystemunitdir=/usr/lib/systemd/system \
		sysusersdir=/usr/lib/sysusers.d tmpfilesdir=/usr/lib/tmpfiles.d \
		>"$T/install" 2>&1
	st=$?
	check "make_install_succeeds" [ $st -eq 0 ]
	[ $st -eq 0 ] || diag "$T/install"
	missing=
	for f in "$sbindir/kvqd" "$bindir/kvqctl" "$mandir/man8/kvqd.8" \
		 "$mandir/man1/kvqctl.1" "$mandir/man5/kvqd.conf.5" \
		 /usr/lib/systemd/system/kvqd.service /usr/lib/sysusers.d/kvqd.conf \
		 /usr/lib/tmpfiles.d/kvqd.conf "$sysconfdir/kvqd/kvqd.conf" \
		 "$sysconfdir/kvqd/kvqd.conf.example"; do
		[ -e "$D$f" ] || missing="$missing $f"
	done
	check "make_install_puts_everything_in_place" [ -z "$missing" ]
	[ -z "$missing" ] || echo "# missing:$missing"
	check "installed_unit_names_installed_paths" \
		grep -q "^ExecStart=$sbindir/kvqd --config $sysconfdir/kvqd/kvqd.conf\$" \
		"$D/usr/lib/systemd/system/kvqd.service"
	env -u MAKEFLAGS -u MFLAGS make -s -C "$B" uninstall DESTDIR="$D" \
		systemdsystemunitdir=/usr/lib/systemd/system \
		sysusersdir=/usr/lib/sysusers.d tmpfilesdir=/usr/lib/tmpfiles.d \
		>"$T/uninstall" 2>&1
	left=$(find "$D" -type f | sed "s|^$D||")
	check "make_uninstall_removes_everything" [ -z "$left" ]
	[ -z "$left" ] || echo "# left:" $left
else
	for t in make_install_succeeds make_install_puts_everything_in_place \
		 installed_unit_names_installed_paths make_uninstall_removes_everything; do
		skip "$t" "no Makefile in $B"
	done
fi

echo "1..$N"
[ $FAILED -eq 0 ]
