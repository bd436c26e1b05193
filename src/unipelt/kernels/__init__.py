"""Fused GPU kernels for methods whose many small operations dominate a training step.

Each kernel module keeps a plain PyTorch reference of the same function, which is what runs on the CPU,
without Triton, or when ``UNIPELT_FUSED=0`` is set; the kernels are used only where they compute the
same function in the same precision as that reference.
"""
