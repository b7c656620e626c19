"""The fast paths behind ``lorakernels.functional``: Triton kernels, the oneDNN LoRA linear for
fp32 CPU tensors, and the chunked LM-head loss. Each op's file holds its kernels, their
launchers and its autograd.Function."""
