#!/usr/bin/env python3
"""Command line front end of the PyTorch reference (kvq_ref), for debugging
kvqd.

  kvq_ref_cli.py logits MODEL --ids "1 403 407" --out logits.npy
      all-position logits (n_tokens x n_vocab, float64) to a .npy file
      (--raw-f32 FILE: also write them as kvqd --dump-logits does:
      float32 little-endian, one row per position)
  kvq_ref_cli.py greedy MODEL --n 200 [--ids "1"] [--text]
      greedy ids after the prompt (default: BOS), space-separated
  kvq_ref_cli.py info MODEL
      hyper-parameters and tensors
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_ids(s):
    try:
        return [int(t) for t in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("ids must be integers separated by "
                                         "spaces: %r" % s)


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch reference of kvqd's "
                                 "llama/qwen2 forward pass")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits", help="logits of every position")
    p.add_argument("model")
    p.add_argument("--ids", type=parse_ids, required=True)
    p.add_argument("--out", required=True, help=".npy output (float64)")
    p.add_argument("--raw-f32", help="also write raw float32 little-endian")
    p.add_argument("--float32", action="store_true",
                   help="compute in float32 instead of float64")
    p = sub.add_parser("greedy", help="greedy generation")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--ids", type=parse_ids, default=None,
                   help="prompt ids (default: the BOS id)")
    p.add_argument("--no-stop", action="store_true",
                   help="do not stop at the EOS id")
    p.add_argument("--text", action="store_true",
                   help="also print the detokenized text (to stderr)")
    p.add_argument("--float32", action="store_true")
    p = sub.add_parser("info", help="hyper-parameters and tensors")
    p.add_argument("model")
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from kvq_gguf import GGUFReader, VType
    from kvq_ref import RefModel

    if a.cmd == "info":
        with GGUFReader(a.model) as r:
            for k, v in r.fields.items():
                if k.startswith("tokenizer.") and v.vtype == VType.ARRAY:
                    print("%s: array of %d" % (k, len(v.value)))
                else:
                    print("%s: %r" % (k, v.value))
            for t in r.tensors:
                print("tensor %-28s %-6s ne=%s" % (t.name, t.type_name,
                                                   list(t.ne)))
        print(RefModel(a.model).hp)
        return 0

    dtype = torch.float32 if a.float32 else torch.float64
    m = RefModel(a.model, dtype=dtype)
    if a.cmd == "logits":
        lg = m.logits(a.ids)
        np.save(a.out, lg)
        if a.raw_f32:
            lg.astype("<f4").tofile(a.raw_f32)
        print("%d x %d logits -> %s (max |logit| %.4g)"
              % (lg.shape[0], lg.shape[1], a.out, np.abs(lg).max()),
              file=sys.stderr)
        return 0
    prompt = a.ids
    if prompt is None:
        if m.hp.bos_id is None:
            ap.error("the model has no BOS id: give --ids")
        prompt = [int(m.hp.bos_id)]
    ids = m.greedy(prompt, a.n, stop_at_eos=not a.no_stop)
    print(" ".join(str(i) for i in ids))
    if a.text:
        print(m.detokenize(ids), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
