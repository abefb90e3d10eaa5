#!/bin/sh
# Installs what building and testing kvqd needs on Debian 12 (bookworm).
# Run as root, or as a user who may use sudo.
set -eu

pkgs="
	build-essential autoconf automake pkg-config
	libevent-dev libjansson-dev liburing-dev libnuma-dev libpcre2-dev libxxhash-dev
	python3 python3-numpy python3-torch python3-sentencepiece
	curl socat mandoc prometheus
	hipcc
"
# Node.js and npm: Debian's, unless a Node.js with its own npm is there
# (Debian's npm conflicts with such builds).
command -v npm >/dev/null 2>&1 || pkgs="$pkgs nodejs npm"

if [ "$(id -u)" -eq 0 ]; then
	SUDO=
else
	SUDO=sudo
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
# The official OpenAI Node.js client, for tests/integration/test_openai_node.sh.
root=$(cd "$(dirname "$0")/.." && pwd)
if command -v npm >/dev/null; then
	npm install --prefix "$root/tests/node" --no-audit --no-fund --loglevel=error >/dev/null ||
		echo "install-deps: npm could not install the openai package; its test will be skipped" >&2
fi
echo "install-deps: done"
