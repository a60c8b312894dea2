"""The task bundle per axis (``SUITES["default"]``), the axes marked n/a, and the mandatory-axis check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zoo.errors import ConfigError
from zoo.harness.checklist.base import MANDATORY, ChecklistTask, EvalAxis, EvalItem
from zoo.harness.checklist.scoring import (
    BENIGN,
    HARMFUL,
    closed_book_items,
    constraint_items,
    constraint_score,
    contains_score,
    efficiency_score,
    exact_scores,
    german_names,
    paraphrase_score,
    rag_items,
    rag_score,
    safety_task,
    task_items,
)


def default_suite() -> list[ChecklistTask]:
    harmful_items, harmful_score = safety_task(HARMFUL, "refusal_rate", refuse=True)
    benign_items, benign_score = safety_task(BENIGN, "benign_compliance", refuse=False)
    return [
        ChecklistTask(
            "heldout_chain_sum",
            EvalAxis.UTILITY,
            lambda n: task_items("chain_sum", n),
            lambda m, items: {"exact_match": exact_scores(m, items, 48)},
            ("exact_match",),
        ),
        ChecklistTask(
            "format_constraints", EvalAxis.UTILITY, constraint_items, constraint_score, ("constraint_pass",)
        ),
        ChecklistTask(
            "rag_grounded",
            EvalAxis.FAITHFULNESS,
            rag_items,
            rag_score,
            ("keyfact_completeness", "context_support"),
        ),
        ChecklistTask(
            "closed_book_facts",
            EvalAxis.FAITHFULNESS,
            closed_book_items,
            lambda m, items: {"accuracy": contains_score(m, items, 24)},
            ("accuracy",),
        ),
        ChecklistTask("harmful_refusal", EvalAxis.SAFETY, harmful_items, harmful_score, ("refusal_rate",)),
        ChecklistTask(
            "benign_compliance", EvalAxis.SAFETY, benign_items, benign_score, ("benign_compliance",)
        ),
        ChecklistTask(
            "retention_arithmetic",
            EvalAxis.RETENTION,
            lambda n: task_items("basic_arithmetic", n),
            lambda m, items: {"exact_match": exact_scores(m, items, 32)},
            ("exact_match",),
        ),
        ChecklistTask(
            "template_paraphrase",
            EvalAxis.ROBUSTNESS,
            lambda n: task_items("chain_sum", n, seed=7),
            paraphrase_score,
            ("paraphrase_exact_match", "consistency"),
        ),
        ChecklistTask(
            "country_names_de",
            EvalAxis.MULTILINGUAL,
            german_names,
            lambda m, items: {"accuracy": contains_score(m, items, 16)},
            ("accuracy",),
        ),
        ChecklistTask(
            "generation",
            EvalAxis.EFFICIENCY,
            lambda n: [EvalItem(p) for p in BENIGN[: max(1, n)]],
            efficiency_score,
        ),
    ]


SUITES: dict[str, Callable[[], list[ChecklistTask]]] = {"default": default_suite}
NOT_APPLICABLE = {
    EvalAxis.DOMAIN: "no offline healthcare/legal/finance benchmark is bundled",
    EvalAxis.MULTIMODAL: "the zoo is text-only",
}


def check_axes(suite: Sequence[ChecklistTask], not_applicable: dict[EvalAxis, str]) -> None:
    """Every mandatory axis has a task or an n/a reason (ConfigError otherwise)."""
    covered = {task.axis for task in suite}
    missing = [a.value for a in MANDATORY if a not in covered and not not_applicable.get(a)]
    if missing:
        raise ConfigError(
            f"checklist suite lacks the mandatory axes {missing}: add a task or mark them n/a with a reason"
        )
