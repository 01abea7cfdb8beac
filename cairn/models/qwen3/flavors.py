"""Qwen3 sizes: the published shapes of the Qwen3 release (2025-04; Hugging Face ``Qwen/Qwen3-*``
config.json: rope_theta 1e6, rms_norm_eps 1e-6, head_dim 128, vocabulary 151936), plus debug sizes.

0.6B, 1.7B and 4B tie the output projection to the embedding. The MoE sizes route every layer's
tokens to 8 of 128 experts (no shared expert) with the top-8 probabilities renormalized, and
train with a load-balancing loss of weight 0.001.
"""

from cairn.models.moe import MoEArgs
from cairn.models.qwen3.model import Qwen3ModelArgs

_QWEN3 = dict(head_dim=128, vocab_size=151936, rope_theta=1_000_000.0, norm_eps=1e-6)
_QWEN3_MOE = dict(num_experts=128, top_k=8, norm_topk_prob=True, aux_loss_coeff=0.001)

qwen3_flavors: dict[str, Qwen3ModelArgs] = {
    # Debug sizes: seconds per step on a CPU. vocab_size is replaced by the tokenizer's.
    "debugmodel": Qwen3ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=768,
                                 vocab_size=2048, rope_theta=1_000_000.0, tie_word_embeddings=True),
    # A few experts, top-2, auxiliary-loss-free balancing on (its bias is state every checkpoint keeps).
    "moe_debugmodel": Qwen3ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=192,
                                     vocab_size=2048, rope_theta=1_000_000.0,
                                     moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=32, norm_topk_prob=True,
                                                 aux_loss_coeff=0.001, load_balance_coeff=0.001)),
    "0.6B": Qwen3ModelArgs(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072,
                           tie_word_embeddings=True, **_QWEN3),
    "1.7B": Qwen3ModelArgs(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144,
                           tie_word_embeddings=True, **_QWEN3),
    "4B": Qwen3ModelArgs(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728,
                         tie_word_embeddings=True, **_QWEN3),
    "8B": Qwen3ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12288, **_QWEN3),
    "14B": Qwen3ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17408, **_QWEN3),
    "32B": Qwen3ModelArgs(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25600, **_QWEN3),
    "30B-A3B": Qwen3ModelArgs(dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, hidden_dim=6144,
                              moe=MoEArgs(hidden_dim=768, **_QWEN3_MOE), **_QWEN3),
    "235B-A22B": Qwen3ModelArgs(dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, hidden_dim=12288,
                                moe=MoEArgs(hidden_dim=1536, **_QWEN3_MOE), **_QWEN3),
    # The largest Qwen3-MoE that trains on one 141 GB GPU with fp32 AdamW (16 bytes a parameter
    # plus activations): 30B-A3B's shapes with 16 of its 48 layers and 64 of its 128 experts,
    # 5.6B parameters (90 GB of weights, gradients and moments). For the checkpoint benchmark.
    "30B-A3B-L16-E64": Qwen3ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=4, hidden_dim=6144,
                                      moe=MoEArgs(hidden_dim=768, **{**_QWEN3_MOE, "num_experts": 64}), **_QWEN3),
}
