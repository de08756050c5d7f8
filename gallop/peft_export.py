"""Compatibility shim: the PEFT export moved to ``gallop.adapters.peft``; this module goes in gallop 0.4."""

from .adapters.peft import common_sparsity, export_peft

__all__ = ["common_sparsity", "export_peft"]
