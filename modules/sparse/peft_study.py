"""The PEFT-for-code study set: IA3, prompt tuning and prefix tuning through the peft passthrough.

Paper: Exploring Parameter-Efficient Fine-Tuning Techniques for Code Generation with Large Language
Models (2023). Spec: papers/34-peft-codegen.md.

Implements: configs for ``zoo.modules.PeftModule`` with the repo's per-method learning rates (IA3
3e-3, prompt tuning 3e-3, prefix tuning 3e-2) and sizes (20 prompt tokens, 10 prefix tokens); LoRA
is ``configs/lora.yaml``; QLoRA (GPU + bitsandbytes only) is ``configs/hub/qlora.yaml`` (documented,
not run here). No new code: this file only registers the configs.
Differs: prompt tuning starts from random virtual tokens instead of the repo's text initialisation
(peft's TEXT init needs a tokenizer path, which the embedded/tiny aliases do not have); prefix tuning
uses peft's plain prefix embedding (no re-parameterisation MLP), as peft's default.
Not implemented: the ICL baseline, EM@k / CodeBLEU metrics (pass@k is in ``zoo.datamodules.code``).
"""

from __future__ import annotations

from zoo.registry import register

PAPER = ("Exploring Parameter-Efficient Fine-Tuning Techniques for Code Generation with Large Language "
         "Models (2023)")
TARGET = "zoo.modules.peft_module:PeftModule"

for _name, _what in (("peft_ia3", "IA3"), ("peft_prompt", "prompt tuning"), ("peft_prefix", "prefix tuning")):
    register(name=_name, kind="module", paper=PAPER, spec="34", config=f"configs/{_name}.yaml", target=TARGET,
             scope=f"{_what} via peft passthrough; ICL baseline and EM@k/CodeBLEU left out")
