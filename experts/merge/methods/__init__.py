"""The merge methods, one module each; experts.merge.registry imports every module here on first use."""
