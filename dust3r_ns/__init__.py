"""dust3r_ns: DUSt3R pose-free reconstruction (network, pair inference, global alignment) for nerfstudio."""

__version__ = "0.1.0"
