"""codellama: Code Llama end to end — models, infilling, long context, chat, training recipe, evaluation.

    import codellama
    gen = codellama.load()          # the embedded default model, offline
    print(gen.complete("def fibonacci(n):", max_new_tokens=48))
"""

__version__ = "0.1.0"


def load(spec=None, device=None, dtype=None, max_seq_len=None, quantize=None, lookup=0, kv_dtype=None):
    """See codellama.generate.load (imported lazily so `import codellama` stays light)."""
    from codellama.generate import load as _load

    return _load(spec, device=device, dtype=dtype, max_seq_len=max_seq_len, quantize=quantize, lookup=lookup,
                 kv_dtype=kv_dtype)
