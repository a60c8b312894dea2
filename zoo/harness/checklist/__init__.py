"""The alignment-centred evaluation checklist (spec 19): named bundles of offline harness tasks per axis, one
report with mean ± bootstrap CI per metric and per axis (and paired deltas vs the base), and the data-hygiene
contamination check (word n-gram overlap between training DataModules' train splits and every eval set).

Axes and their built-in offline tasks (``SUITES["default"]``; ``limit`` items each):

    utility       heldout_chain_sum (exact match on held-out chain_sum), format_constraints (verifiable
                  format/length/keyword rules)
    faithfulness  rag_grounded (the spec-29 pipeline: key-fact completeness and context-supported tokens),
                  closed_book_facts (ISO 3166 facts without context)
    safety        harmful_refusal (refusal rate on harmful requests) AND benign_compliance (answer rate on
                  benign look-alikes: over-refusal), by string rules
    retention     retention_arithmetic (reasoning-gym basic_arithmetic, compare with the base's row)
    robustness    template_paraphrase (chain_sum under 3 prompt templates: mean exact match, consistency)
    multilingual  country_names_de (German country names from pycountry's ISO 3166 translations)
    efficiency    generation (seconds per prompt and generated tokens/s per prompt) + trainable parameters
    domain, multimodal: n/a (no offline domain benchmark here; the zoo is text-only)

A report missing a mandatory axis (utility, faithfulness, safety, retention, efficiency) that is not
marked n/a with a reason raises ConfigError. LLM-as-judge win rates and human checks sit behind the RAG
``ModelJudge`` protocol and are not part of the offline suite.

    python -m zoo analyze checklist --models tiny-llama runs/sft/<stamp> --limit 32 \\
        --train-config configs/sft.yaml

Layout: :mod:`.base` (axes, items, tasks, refusal rule), :mod:`.scoring` (the built-in tasks' eval sets and
scorers), :mod:`.axes` (the task bundle per axis, n/a axes, mandatory check), :mod:`.report` (running a suite,
summary rows with CIs and paired deltas), :mod:`.contamination` (n-gram hygiene), :mod:`.cli` (the analyze
tool: ``HELP``, ``add_arguments``, ``run``).
"""

from zoo.harness.checklist.axes import NOT_APPLICABLE, SUITES, check_axes, default_suite
from zoo.harness.checklist.base import (
    MANDATORY,
    REFUSAL,
    ChecklistTask,
    EvalAxis,
    EvalItem,
    generate,
    is_refusal,
)
from zoo.harness.checklist.cli import HELP, add_arguments, run
from zoo.harness.checklist.contamination import (
    contamination,
    datamodule_from_config,
    eval_texts,
    ngrams,
    train_texts,
)
from zoo.harness.checklist.report import pairing_key, run_suite, summarize
from zoo.harness.checklist.scoring import BENIGN, CONSTRAINTS, HARMFUL, TEMPLATES

__all__ = [
    "BENIGN", "CONSTRAINTS", "HARMFUL", "HELP", "MANDATORY", "NOT_APPLICABLE", "REFUSAL", "SUITES",
    "TEMPLATES", "ChecklistTask", "EvalAxis", "EvalItem", "add_arguments", "check_axes", "contamination",
    "datamodule_from_config", "default_suite", "eval_texts", "generate", "is_refusal", "ngrams",
    "pairing_key", "run", "run_suite", "summarize", "train_texts",
]
