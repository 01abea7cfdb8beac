from cairn.models.qwen3.flavors import qwen3_flavors
from cairn.models.qwen3.model import Qwen3ModelArgs, Transformer

__all__ = ["Qwen3ModelArgs", "Transformer", "qwen3_flavors", "get_spec"]


def get_spec():
    # Imported here: parallelism and HF code load only when a spec is asked for.
    from cairn.models import ModelSpec
    from cairn.models.common import init_weights
    from cairn.models.qwen3.parallelize import parallelize_qwen3, pipeline_qwen3
    from cairn.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    return ModelSpec(name="qwen3", flavors=qwen3_flavors, model_cls=Transformer, init_weights=init_weights,
                     parallelize=parallelize_qwen3, pipeline=pipeline_qwen3,
                     state_dict_adapter=Qwen3StateDictAdapter)
