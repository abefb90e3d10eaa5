"""Command line of the Fisher sidecar tools (run as `python3 -m fim` with
PYTHONPATH=tools, or tools/fim/kvq-fim).

  calibrate    E[g^2] from forward/backward passes over a text
  import-adam  a PyTorch optimizer checkpoint's exp_avg_sq
  import-json  a {"by_tensor": {name: score}} map
  verify       check a sidecar against its model
  show         per-tensor traces of a sidecar, largest first

Exit status: 0 done, 1 bad input (the message names the tensor), 2 usage.
"""

import argparse
import json
import os
import sys

from . import sidecar


def _default_out(model):
    base = model[:-5] if model.endswith(".gguf") else model
    return base + ".fim.gguf"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="kvq-fim", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="E[g^2] from a calibration text")
    p.add_argument("model", help="llama or qwen2 GGUF file")
    p.add_argument("-o", "--out", help="sidecar (default MODEL.fim.gguf)")
    p.add_argument("--text", help="calibration text (default: the built-in "
                   "sample)")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("auto", "full", "rows"),
                   default="auto", help="full diagonal, row sums, or auto: "
                   "full up to %d model elements" % (1 << 26))
    p.add_argument("--threads", type=int)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("import-adam", help="exp_avg_sq of a PyTorch "
                       "optimizer checkpoint")
    p.add_argument("checkpoint", help="torch.save()d optimizer state_dict, "
                   "or a dict holding one (and the model state_dict)")
    p.add_argument("model", help="the GGUF the checkpoint was converted to")
    p.add_argument("-o", "--out")
    p.add_argument("--param-names", help="file of parameter names, one a "
                   "line, in optimizer order")
    p.add_argument("--rope-layout", choices=("hf", "gguf"),
                   help="row order of Q/K in the checkpoint (default: the "
                   "checkpoint's rope_layout key, else hf)")
    p.add_argument("--rows", action="store_true", help="write row sums")
    p.add_argument("--bias-correct", action="store_true",
                   help="divide by 1 - beta2^step")
    p.add_argument("--tokens", type=int, help="tokens seen (default: the "
                   "checkpoint's tokens_seen key)")
    p.add_argument("--dataset")

    p = sub.add_parser("import-json", help="per-tensor scores from JSON")
    p.add_argument("json")
    p.add_argument("model")
    p.add_argument("-o", "--out")
    p.add_argument("--dataset")

    p = sub.add_parser("verify", help="check a sidecar against a model")
    p.add_argument("sidecar")
    p.add_argument("model")

    p = sub.add_parser("show", help="per-tensor traces")
    p.add_argument("sidecar")
    p.add_argument("--json", action="store_true")

    a = ap.parse_args(argv)
    try:
        return _run(a)
    except (sidecar.SidecarError, OSError, ValueError) as e:
        print("kvq-fim %s: error: %s" % (a.cmd, e), file=sys.stderr)
        return 1


def _run(a):
    if a.cmd == "calibrate":
        from . import calibrate
        out = a.out or _default_out(a.model)
        facts = calibrate.run(a.model, out, a.text, a.sequences, a.seq_len,
                              a.seed, a.layout, a.threads,
                              None if a.quiet else calibrate.stderr_log)
        print("%s: calibration over %d tokens (%s layout, mean loss %.4f) "
              "in %.1f s" % (out, facts["tokens"], facts["layout"],
                             facts["mean_loss"], facts["seconds"]))
        return 0
    if a.cmd == "import-adam":
        from . import adam
        out = a.out or _default_out(a.model)
        facts = adam.run(a.checkpoint, a.model, out, a.param_names,
                         a.rope_layout, a.rows, a.bias_correct, a.tokens,
                         a.dataset)
        print("%s: exp_avg_sq after %d steps (rope layout %s)"
              % (out, facts["step_count"], facts["rope_layout"]))
        return 0
    if a.cmd == "import-json":
        from . import scores
        out = a.out or _default_out(a.model)
        facts = scores.run(a.json, a.model, out, a.dataset)
        print("%s: %d tensor scores" % (out, facts["tensors"]))
        return 0
    if a.cmd == "verify":
        meta = sidecar.verify(a.sidecar, a.model)
        print("%s matches %s (source %s, %d tokens)"
              % (a.sidecar, os.path.basename(a.model), meta["fim.source"],
                 meta["fim.token_count"]))
        return 0
    if a.cmd == "show":
        meta, vals = sidecar.read(a.sidecar)
        tr = sorted(sidecar.traces(vals).items(), key=lambda kv: -kv[1])
        if a.json:
            print(json.dumps({"meta": {k: v for k, v in meta.items()
                                       if isinstance(v, (str, int, float))},
                              "trace": dict(tr)}, indent=1))
        else:
            for k in ("fim.source", "fim.dataset", "fim.token_count",
                      "fim.step_count", "fim.model.name", "fim.layout"):
                print("%-22s %s" % (k, meta.get(k)))
            for name, t in tr:
                print("%-32s %12.6g" % (name, t))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
