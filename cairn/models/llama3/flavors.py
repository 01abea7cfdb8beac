"""Llama 3 sizes. 1B/3B are Llama 3.2 (tied embeddings), 8B/70B/405B are Llama 3.1 shapes."""

from cairn.models.llama3.model import TransformerModelArgs

_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}

llama3_flavors: dict[str, TransformerModelArgs] = {
    # Tiny: trains in seconds on a CPU. vocab_size is replaced by the tokenizer's.
    "debugmodel": TransformerModelArgs(dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2048,
                                       rope_theta=500000.0, max_seq_len=2048),
    # Smaller still, for tests: 4 layers so two pipeline stages of two (or four of one) fit.
    "tiny": TransformerModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048,
                                 rope_theta=500000.0, max_seq_len=2048),
    "1B": TransformerModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                               multiple_of=256, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                               tie_word_embeddings=True),
    "3B": TransformerModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                               multiple_of=256, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                               tie_word_embeddings=True),
    "8B": TransformerModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                               multiple_of=1024, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    "70B": TransformerModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                                multiple_of=4096, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    "405B": TransformerModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                                 multiple_of=4096, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
}
