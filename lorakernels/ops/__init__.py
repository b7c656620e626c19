"""Triton kernels. Each op's file holds its kernels, their launchers and its autograd.Function."""
