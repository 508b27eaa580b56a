"""Kernels: the dense path's restore + decode-and-add at 7B scale against copy bandwidth (``swap``)."""
