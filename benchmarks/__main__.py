"""Run every benchmark module's ``main()`` in turn."""

import importlib
import pkgutil

import benchmarks

for info in pkgutil.iter_modules(benchmarks.__path__):
    if info.name.startswith("_"):
        continue
    module = importlib.import_module(f"benchmarks.{info.name}")
    if hasattr(module, "main"):
        print(f"\n## {info.name}\n")
        module.main()
