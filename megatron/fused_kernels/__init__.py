"""Fused rotary embedding and LayerNorm / RMSNorm: CUDA extension, Triton, apex, or reference.

`rope`, `layer_norm` and `rms_norm` take plain tensors and numbers (this package imports
nothing of the model or the config) and pick an implementation per call; see `dispatch.py`
and docs/fused_kernels.md. `used` maps each kind of op to the implementation it last
announced in the log.
"""

from megatron.fused_kernels import reference
from megatron.fused_kernels.dispatch import KINDS, layer_norm, reset, rms_norm, rope, used

__all__ = ["KINDS", "layer_norm", "reference", "reset", "rms_norm", "rope", "used"]
