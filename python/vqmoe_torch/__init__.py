"""vqmoe models in PyTorch: load a run directory of the Swift engine as a torch.nn.Module.

    import vqmoe_torch
    model = vqmoe_torch.load_run("runs/main/vqmoe")      # best.safetensors + best.json
    logits = model(tokens)                               # (B, T, vocab), `vqmoe eval`'s logits
"""
from .loading import architecture, load_run, load_weights, read_safetensors
from .model import Attention, Block, ExpertBank, MoELayer, RelativeAttention, VQMoEModel

__all__ = [
    "Attention", "Block", "ExpertBank", "MoELayer", "RelativeAttention", "VQMoEModel",
    "architecture", "load_run", "load_weights", "read_safetensors",
]
