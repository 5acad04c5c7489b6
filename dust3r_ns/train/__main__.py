"""`python -m dust3r_ns.train ...` (same as `dust3r-ns train`)."""

from .loop import main

main()
