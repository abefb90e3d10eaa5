"""kvq_ref: an independent PyTorch reference of the llama / qwen2 forward
pass over GGUF files, used to check kvqd's C engine.

The model classes are loaded on first use, so kvq_ref.testing (TAP and
environment helpers) can be imported where torch or numpy are missing.
"""

__all__ = ["ARCHS", "HParams", "KVCache", "RefModel"]


def __getattr__(name):
    if name in __all__:
        from . import model
        return getattr(model, name)
    raise AttributeError("module 'kvq_ref' has no attribute %r" % name)
