"""Helpers for float16 training: layer conversions (more to come with MixedPrecisionTrainer)."""

import torch.nn as nn

_HALF_CONVERTIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module):
    """Cast the weight and bias of a convolution to float16 (other layers untouched)."""
    if isinstance(module, _HALF_CONVERTIBLE):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo `convert_module_to_f16`: cast a convolution's parameters back to float32."""
    if isinstance(module, _HALF_CONVERTIBLE):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
