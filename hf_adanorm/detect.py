"""Find the LayerNorm-like modules of any model by what they compute.

A class-name list goes stale with every new architecture, so each leaf module
that could be a norm (only 1-D parameters of one size, or a parameter-free module
whose class name says "norm") is run once, on a private CPU copy with known
random parameters, against four references over the last dimension::

    layernorm:  s * (x - mean(x)) / sqrt(var(x) + eps) + b
    rmsnorm:    s * x / sqrt(mean(x**2) + eps) + b

with ``s`` in {w, 1 + w, 1} (Gemma-style norms store ``w`` with the 1 removed) and
``b`` in {bias, 0}.  The copy shares no tensors or hooks with the model, so
probing never changes it, works on the ``meta`` device and draws nothing from
the global random generator.  A module whose ``forward`` takes more than the one
tensor (a gated RMSNorm's ``gate``) is never a candidate: its one-input
replacement could not take the extra input.

The code lives in :mod:`.portable`, which every checkpoint's remote code carries, so that
loading a checkpoint through the remote code probes the modules a record names exactly as
``hf_adanorm.from_pretrained`` does.
"""

from .portable import (HOOK_DICTS, NormInfo, classify, looks_like_norm, one_thread,  # noqa: F401
                       read_eps)
