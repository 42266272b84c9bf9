"""The base model: bundled assets, hub snapshots, loading (dtype, QLoRA), attention/liger kernels."""
