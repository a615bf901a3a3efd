"""The dual-codebook audio tokenizer: front ends, the vq02 and vq06 encoders, the interleave."""
