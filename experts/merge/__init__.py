"""Merging task vectors: the method registry (``@merge_method``, one file per method in ``methods/``),
the per-parameter merge into a base checkpoint (``checkpoint``) and the exact LoRA concatenation (``lora``)."""

from deltaserve.experts.merge.registry import MERGE_METHODS, METHOD_ALIASES, MergeMethod, get_merge_method, merge_method

__all__ = ["MERGE_METHODS", "METHOD_ALIASES", "MergeMethod", "get_merge_method", "merge_method"]
