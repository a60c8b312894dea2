"""Reload a trained run as a working module: ``zoo.load(RUN)``, what ``zoo bench --ckpt RUN`` uses.

``RUN`` is a run directory (``runs/<config>/<timestamp>``, its ``export/`` is used) or an export folder.
An export written by ``CausalLMModule.export`` carries ``zoo.json``: the module class and its arguments,
so the run's own class (an objective with its adapter: DPO with LoRA, DePT, a parallel adapter, ...)
is rebuilt, then its trained tensors are loaded (the HF weights, or the original backbone plus
``zoo_state.safetensors``: soft prompts, adapters, peft tensors).
Folders without ``zoo.json`` (a plain HF model or a peft adapter from elsewhere) load as plain SFT modules.

    >>> import zoo
    >>> module = zoo.load("runs/dept/20261201-120000")     # doctest: +SKIP
    >>> module.generate_text(["What is 2 + 3?"])            # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError
from zoo.modules.base import EXPORT_MANIFEST, CausalLMModule


class LoadError(ZooError):
    """A run or export folder cannot be loaded."""


def export_folder(path: str | Path) -> Path:
    """The export folder of a run directory (``RUN/export``) or ``path`` itself when it is one."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise LoadError(f"{path}: no such run or export folder")
    export = folder / "export" if (folder / "export").is_dir() else folder
    markers = (EXPORT_MANIFEST, "config.json", "adapter_config.json")
    if not any((export / name).exists() for name in markers):
        raise LoadError(f"{path}: holds no export ({', '.join(markers)}, directly or under export/); pass "
                        "a zoo run directory or its export folder")
    return export


def import_class(path: str) -> type:
    module_name, _, name = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise LoadError(f"cannot import {path!r} named by the export: {err}") from err


def instantiate(config: dict[str, Any] | None) -> Any:
    """An object from ``{"class_path": ..., "init_args": {...}}`` (nested configs instantiated too)."""
    if config is None:
        return None
    args = {k: instantiate(v) if isinstance(v, dict) and "class_path" in v else v
            for k, v in (config.get("init_args") or {}).items()}
    return import_class(config["class_path"])(**args)


def read_manifest(export: Path) -> dict[str, Any] | None:
    path = export / EXPORT_MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def load_run(path: str | Path, model: str | None = None,
             device: str | torch.device | None = None) -> CausalLMModule:
    """The run's own module class, rebuilt from its export and holding its trained tensors, in eval mode.

    Args:
        path: a run directory or an export folder.
        model: the backbone to rebuild on, where the export does not carry one (soft prompts, adapters):
            default the run's own.
        device: where to put the module (default: stays on the CPU).
    """
    export = export_folder(path)
    manifest = read_manifest(export)
    module = _load_manifest(export, manifest, model) if manifest else _load_plain(export, model)
    if device is not None:
        module.to(device)
    return module.eval()


def _load_manifest(export: Path, manifest: dict[str, Any], model: str | None) -> CausalLMModule:
    cls = import_class(manifest["class_path"])
    init = dict(manifest["init_args"])
    adapter = instantiate(init.pop("adapter", None))
    if manifest["weights"] in ("full", "merged"):
        init["model"] = str(export)
    elif model is not None:
        init["model"] = model
    init["export"] = False
    module = cls(**init, adapter=adapter) if adapter is not None else cls(**init)
    module.export_manifest = manifest  # what was trained (e.g. the run's trainable count), for reports
    if manifest["weights"] == "peft":
        _load_peft_weights(module, export)
    module.adapter.load_export_extras(export)
    if manifest.get("state"):
        from safetensors.torch import load_file

        state = load_file(str(export / manifest["state"]))
        result = module.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise LoadError(f"{export}: saved tensors {result.unexpected_keys[:5]} match nothing in "
                            f"{cls.__name__}; the export and the code disagree")
    return module


def _load_peft_weights(module: CausalLMModule, export: Path) -> None:
    """The trained adapter tensors from peft's own files in the export (one copy on disk)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    # peft reports prompt-learning tensors as "unexpected" although it loads them: the contract matrix
    # checks the reload's NLL instead
    set_peft_model_state_dict(module.model, load_peft_weights(str(export), device="cpu"))


def _load_plain(export: Path, model: str | None) -> CausalLMModule:
    adapter_file = export / "adapter_config.json"
    if not adapter_file.exists():
        return CausalLMModule(model=str(export), export=False)
    from peft import PeftModel

    base = model or json.loads(adapter_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise LoadError(f"{export}: cannot tell the adapter's backbone; pass model=NAME (bench: --model "
                        "NAME)")
    module = CausalLMModule(model=base, export=False)
    module.model = PeftModel.from_pretrained(module.model, str(export))
    module.adapter.bind(module.model, module.tokenizer)
    return module
