"""Built-in model registrations: one module per model (`lam`, `idm`, `worldmodel`, `decoder`), each
calling ``wm_pipeline.training.registry.register_model``. Imported by the registry before a model name is looked up."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
