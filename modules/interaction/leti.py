"""LeTI: learning to generate from textual interactions (sample -> execute -> fine-tune on feedback).

Paper: LeTI: Learning to Generate from Textual Interactions (2023). Spec: papers/23-leti.md.
Implements: the four special tokens (added once through :mod:`zoo.tokens`, so the export carries them); the
outer loop (:class:`LeTILoop`): at the start of every ``epochs_per_iteration``-th epoch (the first too),
sample ``samples_per_problem`` programs per training problem from the current policy through the zoo's one
decoder (conditioned on ``<|good|>``, temperature / top-p, the paper's stop words), run them against the
problem's tests through an executor (:class:`SandboxExecutor`: :func:`zoo.sandbox.run_many`, a confined
child process per program; :class:`FakeExecutor` for tests, which runs nothing), and rebuild the training
set from ``R + F + prompt + program`` with ``R`` = ``<|good|>`` / ``<|bad|>`` and ``F`` the normalised
interpreter feedback between ``<|lang_feedback|>`` tokens (``feedback="binary"``: the coarse-only ablation,
F = ""); the feedback-conditioned loss is the causal LM loss over every non-pad token
(:class:`LeTIDataModule` sets labels = input ids). Inference prepends ``<|good|>``
(:class:`FeedbackConditionedLM`). No ground-truth solution is trained on; pass@1 / pass@k of each
iteration's samples are logged (the code task's estimator) and HumanEval pass@k is the harness's (the code
task's sandboxed metrics).
Problems: the zoo's synthetic code tasks (``synthetic_code``), or any built-in reasoning task turned into
"write ``solve()`` returning the answer" with an equality test.
Differs from the official code: chat-rendered texts (the reward token opens the user turn); the optimizer
and the constant lr carry across iterations (the paper's constant schedule; no reset option).
Not implemented: the continued-pretraining mix (no code corpus offline), the optional KL term, the
post-processing heuristic feedback. Every rank samples the whole problem set (identical under a shared seed).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from zoo import backbone
from zoo.chat import render_prompt_ids
from zoo.datamodules.code import (
    SYNTHETIC,
    CodeDataModule,
    build_program,
    pass_at_k,
    task_as_code_problem,  # noqa: F401  (re-exported: LeTI's problems from built-in tasks)
)
from zoo.datamodules.sft import (
    SEGMENT_ANSWER,
    SEGMENT_PROMPT,
    DataError,
    EncodedDataset,
    encode_example,
    fit_length,
)
from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule
from zoo.registry import register_method
from zoo.sandbox import Program, SandboxResult, run_many
from zoo.tokens import add_special_tokens, extend_vocabulary

GOOD, BAD, FEEDBACK_OPEN, FEEDBACK_CLOSE = "<|good|>", "<|bad|>", "<|lang_feedback|>", "<|/lang_feedback|>"
LETI_TOKENS = [GOOD, BAD, FEEDBACK_OPEN, FEEDBACK_CLOSE]
STOP_WORDS = ("\nclass", "\nassert", "\nif", "\nprint", '\n"""', "\n```")  # the paper's, plus a closing fence


def _world(module: L.LightningModule) -> tuple[int, int]:
    """(world size, rank) to share the sampling over: torch.distributed's under DDP, else (1, 0). Sharded
    strategies (FSDP, DeepSpeed) are left out: there every forward is a collective, so the ranks must decode
    the same prompts for the same number of steps."""
    from lightning.pytorch.strategies import DDPStrategy

    trainer = module._trainer
    # exactly DDP: DeepSpeed and XLA subclass it, and ZeRO-3 makes every forward a collective too
    if trainer is not None and type(trainer.strategy) is DDPStrategy:
        return trainer.world_size, trainer.global_rank
    return 1, 0


# ---------------------------------------------------------------------------- executors
@dataclass(frozen=True)
class Execution:
    """Verdict of one program: ``passed`` and the textual ``feedback`` ("" when there is none)."""

    passed: bool
    feedback: str = ""


class CodeExecutor:
    """Runs programs against their tests: ``run(programs) -> [Execution]``, in order."""

    def run(self, programs: list[Program]) -> list[Execution]:
        raise NotImplementedError


_LAUNCHER_FRAME = re.compile(r'^\s*File "<string>", line \d+, in [^\n]+\n', re.MULTILINE)
_PATH = re.compile(r'File "(?:[^"]*/)?([^"/]+)"')


def normalize_feedback(result: SandboxResult, timeout: float, max_chars: int = 500) -> str:
    """The interpreter's message for a failed run, without machine-specific text: the sandbox launcher's
    frames dropped, file paths reduced to their names, at most ``max_chars`` (the tail: the error)."""
    if result.passed:
        return ""
    if result.status == "timeout":
        return f"Timeout: the program did not finish within {timeout:g} seconds"
    if result.status == "memory":
        return "MemoryError: the program ran out of memory"
    text = _PATH.sub(r'File "\1"', _LAUNCHER_FRAME.sub("", result.stderr)).strip()
    if not text:
        text = ("the program exited before its tests finished" if result.status == "failed"
                else f"the program was killed ({result.status})")
    return text[-max_chars:]


class SandboxExecutor(CodeExecutor):
    """The real executor: every program runs in :mod:`zoo.sandbox`'s confined child process (time, memory
    and file limits, no network, a temporary directory); nothing runs in this process."""

    def __init__(self, timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                 max_feedback_chars: int = 500) -> None:
        """
        Args:
            timeout: wall-clock seconds per program.
            memory_mb: address-space limit per program.
            workers: programs run at the same time.
            max_feedback_chars: longest feedback kept (the tail of the traceback).
        """
        self.timeout, self.memory_mb, self.workers = timeout, memory_mb, workers
        self.max_feedback_chars = max_feedback_chars

    def run(self, programs: list[Program]) -> list[Execution]:
        results = run_many(programs, workers=self.workers, timeout=self.timeout, memory_mb=self.memory_mb)
        limit = self.max_feedback_chars
        return [Execution(r.passed, normalize_feedback(r, self.timeout, limit)) for r in results]


FAKE_ERRORS = ("NameError: name 'y' is not defined", "AssertionError",
               "TypeError: unsupported operand type(s) for +: 'int' and 'str'", "SyntaxError: invalid syntax")


class FakeExecutor(CodeExecutor):
    """A deterministic stand-in for tests: the verdict and the message are a function of the program's text
    (its SHA-256), nothing is executed. ``pass_rate`` is the share of digests that pass."""

    def __init__(self, pass_rate: float = 0.5) -> None:
        """
        Args:
            pass_rate: fraction of the digest space that passes (0: every program fails, 1: every one passes).
        """
        self.pass_rate = pass_rate

    def verdict(self, program: Program) -> Execution:
        digest = hashlib.sha256(f"{program.source}\0{program.test}".encode()).digest()
        if int.from_bytes(digest[:4], "big") / 2**32 < self.pass_rate:
            return Execution(True, "")
        return Execution(False, FAKE_ERRORS[digest[4] % len(FAKE_ERRORS)])

    def run(self, programs: list[Program]) -> list[Execution]:
        return [self.verdict(p) for p in programs]


# ---------------------------------------------------------------------------- FCFT texts
def fcft_prompt(prompt: str, execution: Execution, coarse_only: bool = False) -> str:
    """``R + F + prompt``: the reward token of the verdict, the feedback span when there is feedback (never
    in the coarse-only mode), then the problem (any sampling-time ``<|good|>`` removed as a prefix)."""
    reward = GOOD if execution.passed else BAD
    feedback = (f"{FEEDBACK_OPEN}{execution.feedback}{FEEDBACK_CLOSE}"
                if execution.feedback and not coarse_only else "")
    return reward + feedback + prompt.removeprefix(GOOD)


def encode_fcft(tokenizer, prefix: str, program: str,
                system_prompt: str | None = None) -> dict[str, list[int]]:
    """One training row: chat-rendered ``prefix`` (the user turn) + ``program`` + EOS, every token supervised
    (labels = input ids; LeTI's loss covers the whole text); segments mark prefix and program."""
    prompt_ids = render_prompt_ids(tokenizer, prefix, system_prompt)
    program_ids = list(tokenizer(program, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    ids = prompt_ids + program_ids
    return {"input_ids": ids, "labels": list(ids),
            "segments": [SEGMENT_PROMPT] * len(prompt_ids) + [SEGMENT_ANSWER] * len(program_ids)}


# ---------------------------------------------------------------------------- the policy
class FeedbackConditionedLM(CausalLMModule):
    """A causal LM with LeTI's reward and feedback tokens (embeddings resized once); generation is
    conditioned on ``<|good|>`` (the paper's inference). Training is the plain causal LM loss over the
    LeTI rows' labels (every non-pad token). Takes every :class:`CausalLMModule` argument."""

    def configure_backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        extend_vocabulary(model, self.tokenizer, LETI_TOKENS)
        return model

    def generate_text(self, prompts: list[str], max_new_tokens: int = 256, system_prompt: str | None = None,
                      batch_size: int = 16, **sampling: Any) -> list[str]:
        """:meth:`CausalLMModule.generate_text` with ``<|good|>`` opening every prompt (once)."""
        conditioned = [p if p.startswith(GOOD) else GOOD + p for p in prompts]
        return super().generate_text(conditioned, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                                     batch_size=batch_size, **sampling)


# ---------------------------------------------------------------------------- problems with tests
class LeTIDataModule(CodeDataModule):
    """Problems with tests for :class:`LeTILoop`; the training rows are what the loop builds each iteration
    (no ground-truth solution is trained on). Val / test rows (held-out NLL, ``<|good|>``-conditioned) and
    the harness's pass@k come from :class:`CodeDataModule` (HumanEval for ``synthetic_code``)."""

    def __init__(
        self,
        dataset: str = SYNTHETIC,
        tokenizer: str = backbone.SMOLLM2,
        num_train: int = 64,
        num_val: int = 16,
        num_test: int = 164,
        max_length: int = 512,
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        sandbox_workers: int = 2,
    ) -> None:
        """
        Args:
            dataset: ``synthetic_code`` (the zoo's synthetic functions; test = HumanEval) or a built-in task
                (``chain_sum``, ...: problems "write solve() returning the answer", all splits from the task).
            tokenizer: the backbone whose tokenizer renders the data (LeTI's tokens are added to it).
            num_train: training problems (LeTI samples ``samples_per_problem`` programs for each).
            num_val: held-out problems for validation loss.
            num_test: held-out problems for the harness (HumanEval: the first ones in file order).
            max_length: longest training row in tokens (longer rows keep their head; held-out rows are
                never cut).
            system_prompt: optional system message.
            batch_size: training micro-batch size.
            eval_batch_size: validation / test batch size.
            num_workers: DataLoader workers.
            seed: seed of the problem generator.
            timeout: harness evaluation: wall-clock seconds per program in the sandbox.
            memory_mb: harness evaluation: memory limit per program.
            sandbox_workers: harness evaluation: programs run at the same time.
        """
        super().__init__(dataset=dataset, tokenizer=tokenizer, num_train=num_train, num_val=num_val,
                         num_test=num_test, max_length=max_length, system_prompt=system_prompt,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         seed=seed, timeout=timeout, memory_mb=memory_mb, sandbox_workers=sandbox_workers)
        self.token_ids = add_special_tokens(self.tokenizer, LETI_TOKENS)

    def encode_split(self, records: list[dict[str, Any]], split: str) -> EncodedDataset:
        if split == "train":
            return EncodedDataset([])  # filled by LeTILoop.iterate
        rows = []  # held-out rows are never cut: max_length bounds the training rows
        for index, record in enumerate(records):
            row = encode_example(self.tokenizer, GOOD + record["prompt"], record["response"],
                                 self.hparams.system_prompt)
            rows.append({**row, "index": index})
        return EncodedDataset(rows)

    def problems(self) -> list[dict[str, Any]]:
        """The training problems (prompt, code_prompt, test, entry_point; their responses are never used)."""
        self.setup("fit")
        return self.records["train"]

    def encode_rows(self, texts: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Training rows from (prefix, program) texts, cut to ``max_length``."""
        rows = []
        for index, (prefix, program) in enumerate(texts):
            row = fit_length(encode_fcft(self.tokenizer, prefix, program, self.hparams.system_prompt),
                             self.hparams.max_length, "truncate")
            row["index"] = index
            rows.append(row)
        return rows

    def reserve_training_rows(self, count: int) -> None:
        """Size the training set before the loop fills it (Lightning sizes the lr schedule from the loader
        before ``on_fit_start``, where iteration 0 samples on the module's device)."""
        self.setup("fit")
        if not self.encoded["train"].rows:
            self.encoded["train"].rows[:] = [None] * count

    def set_training_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replace the training set in place (the loader built on it serves the new rows next epoch)."""
        self.setup("fit")
        dataset = self.encoded["train"]
        if dataset.rows and len(rows) != len(dataset.rows):
            raise DataError(f"LeTI iterations must keep the training set size ({len(dataset.rows)} rows), "
                            f"got {len(rows)}")
        dataset.rows[:] = rows

    def train_dataloader(self):
        if not self.encoded.get("train") or not len(self.encoded["train"]):
            raise ConfigError("LeTIDataModule has no training rows: add the callback "
                              "zoo.modules.interaction.leti.LeTILoop (it samples, executes and builds them)")
        return super().train_dataloader()


# ---------------------------------------------------------------------------- the loop
@register_method(
    "leti",
    paper="LeTI: Learning to Generate from Textual Interactions (2023)",
    spec="23",
    scope="sample -> sandboxed execution -> FCFT loop on the zoo's synthetic code tasks (or built-in tasks "
          "as solve() problems); no continued-pretraining mix, no KL term, no heuristic post-processing "
          "feedback")
class LeTILoop(Callback):
    """LeTI's outer loop: sample, execute, rebuild the training set from reward + feedback + problem +
    program, at the start of every ``epochs_per_iteration``-th epoch (iteration 0 before the first)."""

    def __init__(
        self,
        samples_per_problem: int = 4,
        epochs_per_iteration: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        feedback: Literal["text", "binary"] = "text",
        executor: CodeExecutor | None = None,
        generation_batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        """
        Args:
            samples_per_problem: programs sampled per problem per iteration (paper n = 128; 16/64 ablations).
            epochs_per_iteration: epochs trained on each iteration's data (paper E = 3).
            temperature: sampling temperature (paper 1.0).
            top_p: nucleus mass (paper 1.0).
            max_new_tokens: longest sampled program in tokens (paper 512).
            feedback: ``text`` (reward token + interpreter feedback) or ``binary`` (reward token only: the
                coarse-only ablation).
            executor: how programs run (default :class:`SandboxExecutor`; :class:`FakeExecutor` in tests).
            generation_batch_size: prompts decoded together.
            seed: seed of the sampling (iteration ``t`` samples with ``seed + t``).
        """
        if samples_per_problem < 1 or epochs_per_iteration < 1:
            raise ConfigError("LeTILoop: samples_per_problem and epochs_per_iteration must be >= 1")
        self.samples_per_problem, self.epochs_per_iteration = samples_per_problem, epochs_per_iteration
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.feedback = feedback
        self.executor = executor if executor is not None else SandboxExecutor()
        self.generation_batch_size, self.seed = generation_batch_size, seed
        self.iteration = 0
        self.texts: list[tuple[str, str]] = []  # this iteration's (prefix, program): the checkpointed data
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ one iteration
    def sample(self, module: CausalLMModule, problems: list[dict[str, Any]], rank: int = 0) -> list[str]:
        """``samples_per_problem`` completions per problem (problem-major), through the module's decoder
        (the generator is seeded by the loop's seed, the iteration and the rank: rank 0 is unchanged)."""
        n = self.samples_per_problem
        prompts = [GOOD + p["prompt"] for p in problems for _ in range(n)]
        seed = self.seed + self.iteration + 1_000_003 * rank
        generator = torch.Generator(device=module.device).manual_seed(seed)
        return module.generate_text(prompts, max_new_tokens=self.max_new_tokens, do_sample=True,
                                    temperature=self.temperature, top_p=self.top_p, stop=STOP_WORDS,
                                    generator=generator, batch_size=self.generation_batch_size)

    def sample_and_run(self, module: CausalLMModule,
                       problems: list[dict[str, Any]]) -> tuple[list[str], list[Execution]]:
        """Completions and their executions for every problem, problem-major. Under torch.distributed each
        rank samples and runs its share of the problems (every world_size-th) and the shares are gathered,
        so the ranks split the generation instead of each repeating all of it; every rank ends with the
        same lists. Under DDP only (:func:`_world`)."""
        n = self.samples_per_problem
        world, rank = _world(module)
        mine = list(range(rank, len(problems), world))
        completions = self.sample(module, [problems[i] for i in mine], rank)
        records = [problems[i] for i in mine for _ in range(n)]
        executions = self.executor.run([build_program(r, c) for r, c in zip(records, completions)])
        if world == 1:
            return completions, executions
        shares: list[Any] = [None] * world
        torch.distributed.all_gather_object(shares, (mine, completions, executions))
        by_problem = {i: (c[j * n:(j + 1) * n], e[j * n:(j + 1) * n])
                      for indices, c, e in shares for j, i in enumerate(indices)}
        ordered = [by_problem[i] for i in range(len(problems))]
        return [c for cs, _ in ordered for c in cs], [e for _, es in ordered for e in es]

    def iterate(self, module: CausalLMModule, datamodule: LeTIDataModule) -> dict[str, float]:
        """Sample, execute, rebuild the training set; returns this iteration's statistics."""
        problems = datamodule.problems()
        n = self.samples_per_problem
        completions, executions = self.sample_and_run(module, problems)
        records = [p for p in problems for _ in range(n)]
        coarse = self.feedback == "binary"
        self.texts = [(fcft_prompt(r["prompt"], e, coarse), c)
                      for r, c, e in zip(records, completions, executions)]
        datamodule.set_training_rows(datamodule.encode_rows(self.texts))
        correct = [sum(e.passed for e in executions[i * n:(i + 1) * n]) for i in range(len(problems))]
        stats = {"leti/iteration": float(self.iteration),
                 "leti/good_fraction": sum(correct) / max(1, len(executions))}
        for k in sorted({1, n}):
            stats[f"leti/pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / max(1, len(problems))
        self.history.append(stats)
        self.iteration += 1
        return stats

    # ------------------------------------------------------------------ Lightning hooks
    def _check(self, trainer: L.Trainer, module: L.LightningModule) -> LeTIDataModule:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, LeTIDataModule):
            raise ConfigError(f"LeTILoop needs data: zoo.modules.interaction.leti.LeTIDataModule, got "
                              f"{type(datamodule).__name__}")
        vocab = module.tokenizer.get_vocab()
        if [vocab.get(t) for t in LETI_TOKENS] != datamodule.token_ids:
            raise ConfigError("LeTILoop: the model's tokenizer lacks LeTI's tokens or numbers them "
                              "differently from the data's: use model: "
                              "zoo.modules.interaction.leti.FeedbackConditionedLM on the data's tokenizer")
        return datamodule

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            datamodule = self._check(trainer, pl_module)
            datamodule.reserve_training_rows(len(datamodule.problems()) * self.samples_per_problem)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = self._check(trainer, pl_module)
        if self.texts:  # resumed: the checkpoint's iteration data, not a new sample from trained weights
            datamodule.set_training_rows(datamodule.encode_rows(self.texts))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample_if_due(trainer, pl_module)  # Lightning skips on_train_epoch_start for a resumed epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample_if_due(trainer, pl_module)

    def _sample_if_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Iteration ``t`` samples when epoch ``t * epochs_per_iteration`` starts (before its loader
        iterates), so a run resumed inside an epoch or at its end samples exactly when an uninterrupted run
        would, with the same weights and seed; nothing is sampled after the last epoch."""
        if self.iteration <= trainer.current_epoch // self.epochs_per_iteration:
            self._report(trainer, self.iterate(pl_module, trainer.datamodule))

    @staticmethod
    def _report(trainer: L.Trainer, stats: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
        if trainer.is_global_zero:
            line = ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in stats.items())
            print(f"[zoo] LeTI {line}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "texts": [list(t) for t in self.texts], "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.texts = [tuple(t) for t in state["texts"]]
        self.history = list(state.get("history", []))
