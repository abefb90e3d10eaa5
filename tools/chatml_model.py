#!/usr/bin/env python3
"""Write a small random-weight llama model with a ChatML chat template.

The vocabulary is another GGUF's (stories260K's by default) plus ChatML's two
control tokens, and the template is Qwen2's; the weights come from
gen_model.py.  Tests use it to reach the chat endpoints with a model that
has a template.

  chatml_model.py OUT.gguf [--vocab-from GGUF]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvq_gguf import GGUFReader, GGUFValue, GGUFWriter, VType  # noqa: E402
from gen_model import DEFAULT_VOCAB  # noqa: E402

TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_vocab(src, dst):
    with GGUFReader(src) as r:
        fields = [(k, v) for k, v in r.fields.items()
                  if k.startswith("tokenizer.")]
    w = GGUFWriter(dst)
    for k, v in fields:
        if k == "tokenizer.ggml.tokens":
            v = GGUFValue(VType.ARRAY,
                          list(v.value) + ["<|im_start|>", "<|im_end|>"],
                          VType.STRING)
        elif k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            a = np.asarray(v.value)
            add = (np.zeros(2, a.dtype) if k.endswith("scores")
                   else np.full(2, 3, a.dtype))
            v = GGUFValue(VType.ARRAY, np.concatenate([a, add]), v.subtype)
        w.add(k, v)
    w.add_string("tokenizer.chat_template", TEMPLATE)
    w.write()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--vocab-from", default=DEFAULT_VOCAB)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.gguf")
        write_vocab(a.vocab_from, vocab)
        gen = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "gen_model.py")
        return subprocess.call([sys.executable, gen, "-q", "--out", a.out,
                                "--arch", "llama", "--type", "F32", "--dim",
                                "64", "--layers", "2", "--heads", "4",
                                "--ffn", "128", "--ctx", "256",
                                "--vocab-from", vocab])


if __name__ == "__main__":
    sys.exit(main())
