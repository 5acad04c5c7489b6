"""Run the global-alignment benchmark (baseline vs fast): `python tests/bench/bench_align.py --n 8 16 --source toy`.

Same options as `dust3r-ns bench align` (see dust3r_ns.bench.align.AlignBenchConfig).
"""

from dust3r_ns.bench.align import main

if __name__ == "__main__":
    main()
