from cairn.models.llama3.flavors import llama3_flavors
from cairn.models.llama3.model import Transformer, TransformerModelArgs, init_weights

__all__ = ["Transformer", "TransformerModelArgs", "init_weights", "llama3_flavors", "get_spec"]


def get_spec():
    # Imported here: parallelism and HF code load only when a spec is asked for.
    from cairn.models import ModelSpec
    from cairn.models.llama3.parallelize import parallelize_llama, pipeline_llama
    from cairn.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    return ModelSpec(name="llama3", flavors=llama3_flavors, model_cls=Transformer, init_weights=init_weights,
                     parallelize=parallelize_llama, pipeline=pipeline_llama,
                     state_dict_adapter=Llama3StateDictAdapter)
