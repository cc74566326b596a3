"""The pure-tensor core: options, the formulas (dense reference and per sequence), the packed statistics
engine with its kernels, and gamma. Knows nothing of verl or of how the attention was obtained."""
