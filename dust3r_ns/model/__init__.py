"""The DUSt3R network: RoPE, encoder/decoder blocks, heads and checkpoint I/O."""
