"""codellama: Code Llama end to end — models, infilling, long context, chat, training recipe, evaluation."""

__version__ = "0.1.0"
