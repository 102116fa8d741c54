"""Pallas GPU kernels; each module holds a kernel, its pure-JAX reference and a benchmark."""
