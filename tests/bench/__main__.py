"""`make bench`: every benchmark, side by side in one run. Each module prints its own table."""

import importlib
import platform
import sys

import numpy as np

MODULES = ["tests.bench.bench_cast", "tests.bench.bench_render", "tests.bench.bench_image",
           "tests.bench.bench_sequence", "tests.bench.bench_collection", "tests.bench.bench_inspect",
           "tests.bench.bench_train", "tests.bench.bench_clips", "tests.bench.bench_train_gpu",
           "tests.bench.bench_learn"]

if __name__ == "__main__":
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()} "
          f"python={sys.version.split()[0]} numpy={np.__version__}")
    only = sys.argv[1:]
    for name in MODULES:
        if only and not any(o in name for o in only):
            continue
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.main()
