"""The base model: bundled assets, hub snapshots, loading (dtype, QLoRA), attention/liger kernels chosen by device and
dtype, varlen attention for packed rows, and the guard that keeps Hub kernels off unless asked."""
