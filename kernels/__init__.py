"""Hot-path kernels. Each module holds a Triton kernel (``_name_kernel``), its
host wrapper (``name``) and a plain-torch reference (``ref_name``) with the same
signature; ``ops`` picks the Triton path for CUDA tensors and the reference
elsewhere."""
