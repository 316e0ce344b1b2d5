"""Triton kernels (GPU); each also runs on CPU tensors under TRITON_INTERPRET=1."""
