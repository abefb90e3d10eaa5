"""TAP output and environment helpers for kvqd's Python integration tests.

Standard library only, so a test can report a clean skip when numpy or
torch are missing.  Environment (set by `make check`): KVQD (the kvqd
binary), KVQ_SRCDIR, KVQ_BUILDDIR, KVQ_TESTDATA (shared test data; default
$KVQ_SRCDIR/../shared/testdata).
"""

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


class Tap:
    """Collects TAP lines; done() prints the plan and returns the exit
    status (0 when every test passed)."""

    def __init__(self):
        self.n = 0
        self.failed = 0

    def ok(self, cond, desc):
        self.n += 1
        if not cond:
            self.failed += 1
        desc = desc.replace("\n", " ").replace("#", "\\#")
        print("%sok %d - %s" % ("" if cond else "not ", self.n, desc),
              flush=True)
        return bool(cond)

    def skip(self, desc, reason):
        self.n += 1
        print("ok %d - %s # SKIP %s" % (self.n, desc.replace("#", "\\#"),
                                        reason), flush=True)

    def diag(self, msg):
        for line in str(msg).splitlines() or [""]:
            print("# " + line, flush=True)

    def done(self):
        print("1..%d" % self.n, flush=True)
        return 1 if self.failed else 0


def skip_all(reason):
    """Print a skip-everything plan and exit 0 (a TAP skip)."""
    print("1..0 # SKIP %s" % reason, flush=True)
    sys.exit(0)


def missing_modules(names=("numpy", "torch")):
    """The modules of @names that cannot be imported."""
    out = []
    for n in names:
        try:
            __import__(n)
        except Exception:
            out.append(n)
    return out


def srcdir():
    d = os.environ.get("KVQ_SRCDIR")
    if d:
        return os.path.abspath(d)
    return os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))


def testdata_dir():
    d = os.environ.get("KVQ_TESTDATA")
    if d:
        return d
    return os.path.join(srcdir(), "..", "shared", "testdata")


def testdata(name):
    """Path of @name in the shared test data, or None when it is missing."""
    p = os.path.join(testdata_dir(), name)
    return p if os.path.isfile(p) else None


def kvqd_path():
    """The kvqd binary ($KVQD, else ./kvqd in KVQ_BUILDDIR or the source
    tree), or None."""
    cands = []
    if os.environ.get("KVQD"):
        cands.append(os.environ["KVQD"])
    else:
        if os.environ.get("KVQ_BUILDDIR"):
            cands.append(os.path.join(os.environ["KVQ_BUILDDIR"], "kvqd"))
        cands.append(os.path.join(srcdir(), "kvqd"))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


# kvqd's one-shot modes default to the serving KV cache (quantized keys and
# values); comparisons with the reference ask for an exact f32 cache.
EXACT_KV_ARGS = "--kv-type-k f32 --kv-type-v f32"


def exact_kv_args():
    """kvqd arguments selecting an exact (f32) KV cache; override with the
    KVQ_EXACT_KV_ARGS environment variable (empty: none)."""
    return shlex.split(os.environ.get("KVQ_EXACT_KV_ARGS", EXACT_KV_ARGS))


def run(cmd, timeout=300, env=None):
    """Run @cmd (a list); returns (returncode, stdout, stderr), stdout and
    stderr as text.  A timeout is reported as returncode None."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        def txt(b):
            return b.decode("utf-8", "replace") if b else ""
        return None, txt(e.stdout), txt(e.stderr) + "\n(timed out after %ds)" % timeout
    return (p.returncode, p.stdout.decode("utf-8", "replace"),
            p.stderr.decode("utf-8", "replace"))


def tail(text, n=15):
    lines = text.rstrip().splitlines()
    return "\n".join(lines[-n:])


@contextlib.contextmanager
def tempdir(prefix="kvq-test-"):
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def setup_path():
    """Make the tools directory importable when run without PYTHONPATH."""
    tools = os.path.join(srcdir(), "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)


def require_reference_setup(model_name):
    """What a test against the PyTorch reference needs: numpy and torch,
    the test data file @model_name and the kvqd binary.  Returns (model
    path, kvqd path), or ends the test with a TAP skip naming what is
    missing."""
    miss = missing_modules()
    if miss:
        skip_all("python modules missing: %s" % ", ".join(miss))
    model = testdata(model_name)
    if model is None:
        skip_all("test data missing: %s"
                 % os.path.join(testdata_dir(), model_name))
    kvqd = kvqd_path()
    if kvqd is None:
        skip_all("kvqd binary not found (set KVQD)")
    return model, kvqd


def free_port():
    """A loopback TCP port that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    """kvqd serving @model on a free loopback port, with its state, admin
    socket and log under @tmp/@name; @extra: more command-line arguments.
    Raises RuntimeError (with the log's tail) when it does not become
    ready."""

    def __init__(self, kvqd, model, tmp, name, extra=(), ready_s=20):
        self.port = free_port()
        d = os.path.join(tmp, name)
        os.makedirs(d, exist_ok=True)
        self.log = open(os.path.join(d, "log"), "w+")
        self.p = subprocess.Popen(
            [kvqd, "--model", model, "--listen", "127.0.0.1:%d" % self.port,
             "--admin-socket", os.path.join(d, "admin.sock"),
             "--state-dir", d] + list(extra),
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2):
                    return
            except Exception:
                if self.p.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        with open(os.path.join(d, "log")) as f:
            raise RuntimeError("kvqd did not become ready: " + tail(f.read()))

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def post(self, path, body, timeout=60):
        rq = urllib.request.Request(self.url(path),
                                    data=json.dumps(body).encode(),
                                    headers={"Content-Type":
                                             "application/json"})
        with urllib.request.urlopen(rq, timeout=timeout) as f:
            return json.load(f)

    def complete(self, body, timeout=60):
        """POST /v1/completions with @body (a dict); the parsed answer."""
        return self.post("/v1/completions", body, timeout)

    def n_tokens(self, text):
        return len(self.post("/tokenize", {"content": text}, 10)["tokens"])

    def metric(self, name):
        """The value of the unlabelled sample @name in /metrics, or None."""
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as f:
            for line in f.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
        if not self.log.closed:
            self.log.close()
