"""The config class of a model that :func:`hf_adanorm.from_pretrained` loaded.

A patched checkpoint's config.json is guarded (see :func:`.portable.guard_config_dict`): its stock
config class refuses to read it, so that ``BertModel.from_pretrained(path)`` cannot build the model
without its patch. Code that re-reads the folder a model came from through the model's own config
class, ``type(model.config).from_pretrained(model.name_or_path)`` (PEFT's ``save_pretrained``, to
compare vocabulary sizes; so every Trainer checkpoint of a LoRA run), then failed with
"Validation error for field 'hidden_size'".

The loaded model's config is therefore an instance of :func:`reading_config_class` ``(BertConfig)``: a
subclass that adds only an unguarding ``get_config_dict``. It keeps the stock class's ``__name__``,
because transformers looks its Auto classes up by that name (``AutoModel.from_config(model.config)``
works as before), and ``isinstance(config, BertConfig)`` holds. The stock class itself is untouched,
so ``BertModel.from_pretrained(path)`` is still refused.
"""

from __future__ import annotations

import transformers

from . import portable

_SUFFIX = "_ReadsPatchedCheckpoints"
_CLASSES: dict = {}


def reading_config_class(stock: type) -> type:
    """``stock`` (a transformers config class) that also reads a patched checkpoint's config.json.

    Only for classes that ``transformers`` exports under their own name: pickle finds the subclass
    here by that name (:func:`__getattr__`). Any other class is returned as it is."""
    if getattr(transformers, stock.__name__, None) is not stock:
        return stock
    if stock not in _CLASSES:
        def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
            config_dict, kwargs = stock.get_config_dict.__func__(cls, pretrained_model_name_or_path, **kwargs)
            return portable.unguard_config_dict(config_dict), kwargs

        _CLASSES[stock] = type(stock.__name__, (stock,), {
            "get_config_dict": classmethod(get_config_dict), "__module__": __name__,
            "__qualname__": stock.__name__ + _SUFFIX, "__doc__": stock.__doc__})
    return _CLASSES[stock]


def __getattr__(name: str):
    """The subclass of a stock class by its qualified name (``BertConfig_ReadsPatchedCheckpoints``):
    how a pickled or ``torch.save``-d config finds its class in a new process."""
    stock = getattr(transformers, name[:-len(_SUFFIX)], None) if name.endswith(_SUFFIX) else None
    if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedConfig):
        cls = reading_config_class(stock)
        if cls is not stock:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
