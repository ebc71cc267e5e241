"""One module per attention variant; importing this package registers every built-in.

Each module keeps its fast path and a short, obviously correct reference side by side and
calls :func:`sparse_linear_attn.registry.add` once. New modules in this folder are picked up
automatically.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
