"""lvlm_prune: visual-token pruning and trained compensation for LLaVA-style models.

The core package is plain PyTorch + transformers; nothing in it imports Lightning.
"""

__version__ = "0.1.0"
