"""GPU kernels of the attention statistics. Import `triton_stats` only where triton is installed."""
