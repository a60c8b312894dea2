"""LeTI (spec 23): special tokens (tokenizer, export, zoo.load), FCFT texts and loss, deterministic fake
executor, the loop's mechanics, and no generated code ever running in the zoo's own process."""

from __future__ import annotations

import builtins
import hashlib

import pytest
import torch

from zoo.datamodules.code import build_program, pass_at_k
from zoo.errors import ConfigError, ZooError
from zoo.modules.interaction import leti
from zoo.modules.interaction.leti import (
    BAD,
    FAKE_ERRORS,
    FEEDBACK_CLOSE,
    FEEDBACK_OPEN,
    GOOD,
    LETI_TOKENS,
    Execution,
    FakeExecutor,
    FeedbackConditionedLM,
    LeTIDataModule,
    LeTILoop,
    SandboxExecutor,
    encode_fcft,
    fcft_prompt,
    task_as_code_problem,
)
from zoo.sandbox import Program


def policy() -> FeedbackConditionedLM:
    return FeedbackConditionedLM(model="tiny-llama", lr=1e-3, export=False)


def problems(**kwargs) -> LeTIDataModule:
    defaults = dict(dataset="synthetic_code", tokenizer="tiny-llama", num_train=2, num_val=1, num_test=1,
                    max_length=512, batch_size=2, eval_batch_size=2)
    return LeTIDataModule(**{**defaults, **kwargs})


def sandbox_or_skip() -> None:
    from zoo import sandbox

    try:
        sandbox.layers()
    except ZooError as err:
        pytest.skip(f"sandbox unavailable here: {err}")


def test_each_feedback_token_is_one_id_and_the_embeddings_grew_once():
    module = policy()
    ids = [module.tokenizer.encode(t, add_special_tokens=False) for t in LETI_TOKENS]
    assert ids == [[258], [259], [260], [261]]  # the byte tokenizer holds 258 entries before
    assert module.model.get_input_embeddings().weight.shape[0] == 262
    assert problems().token_ids == [258, 259, 260, 261]  # the data's own tokenizer copy agrees


def test_feedback_tokens_survive_export_and_zoo_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zoo

    module = policy()
    with torch.no_grad():
        module.model.get_input_embeddings().weight[259] += 0.5  # a trained <|bad|> row
    module.export(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # the plain HF export
    assert [tokenizer.convert_tokens_to_ids(t) for t in LETI_TOKENS] == [258, 259, 260, 261]
    assert AutoModelForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight.shape[0] == 262
    loaded = zoo.load(tmp_path)
    assert type(loaded) is FeedbackConditionedLM
    reloaded_ids = [loaded.tokenizer.encode(t, add_special_tokens=False) for t in LETI_TOKENS]
    assert reloaded_ids == [[258], [259], [260], [261]]
    assert torch.equal(loaded.model.get_input_embeddings().weight, module.model.get_input_embeddings().weight)


def test_fcft_texts_start_with_the_verdict_and_hold_feedback_only_when_there_is_some():
    prompt = "Write f."
    assert fcft_prompt(GOOD + prompt, Execution(True)) == "<|good|>Write f."
    failed = Execution(False, "NameError: name 'y' is not defined")
    assert fcft_prompt(GOOD + prompt, failed) == (
        "<|bad|><|lang_feedback|>NameError: name 'y' is not defined<|/lang_feedback|>Write f.")
    assert fcft_prompt(GOOD + prompt, failed, coarse_only=True) == "<|bad|>Write f."
    assert fcft_prompt(prompt, Execution(False)) == "<|bad|>Write f."  # no feedback, no span
    # a prefix is removed, not a character set (the repo's lstrip would also eat "|>d" here)
    assert fcft_prompt(GOOD + "|>doc", Execution(True)) == "<|good|>|>doc"


def test_labels_are_the_input_ids_and_the_reward_token_changes_the_loss():
    from zoo.datamodules.sft import collate
    from zoo.labels import target_mask

    module = policy()
    tokenizer = module.tokenizer
    rows = [encode_fcft(tokenizer, reward + "Write f.", "def f():\n    return 1\n") for reward in (GOOD, BAD)]
    for row in rows:
        assert row["labels"] == row["input_ids"]
        assert row["input_ids"].count(258 if row is rows[0] else 259) == 1
    embeddings = module.model.get_input_embeddings().weight
    losses = []
    for row, token in zip(rows, (258, 259)):
        batch = collate([{**row, "index": 0}], tokenizer.pad_token_id)
        outputs = module(batch)
        loss = module.compute_loss(batch, outputs, target_mask(batch["labels"]).float())
        module.zero_grad()
        loss.backward()
        assert embeddings.grad[token].abs().sum() > 0  # predicted and conditioned on: it gets a gradient
        losses.append(loss.item())
    # both rows start as the mean embedding (identical losses); once training separates them, they differ
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    with torch.no_grad():
        embeddings[259] += 0.3
    batches = [collate([{**row, "index": 0}], tokenizer.pad_token_id) for row in rows]
    after = [module.compute_loss(b, module(b), target_mask(b["labels"]).float()).item() for b in batches]
    assert after[0] != pytest.approx(after[1], abs=1e-4)


def digest_verdict(program: Program) -> tuple[bool, str]:
    """FakeExecutor's rule, re-derived: SHA-256 of source NUL test; first 4 bytes / 2^32 < rate passes."""
    digest = hashlib.sha256((program.source + "\0" + program.test).encode()).digest()
    if int.from_bytes(digest[:4], "big") < 0.5 * 2**32:
        return True, ""
    return False, FAKE_ERRORS[digest[4] % 4]


def test_fake_executor_makes_the_training_set_deterministic():
    module, data = policy(), problems()
    runs = []
    for seed in (0, 0, 1):
        loop = LeTILoop(samples_per_problem=3, max_new_tokens=12, executor=FakeExecutor(), seed=seed)
        stats = loop.iterate(module, data)
        runs.append((loop.texts, [r["input_ids"] for r in data.encoded["train"].rows], stats))
    assert runs[0][:2] == runs[1][:2]
    assert runs[0][0] != runs[2][0]  # another sampling seed: other programs
    texts, _, stats = runs[0]
    records = [p for p in data.problems() for _ in range(3)]
    verdicts = [digest_verdict(build_program(r, program)) for r, (_, program) in zip(records, texts)]
    for (prefix, _), (passed, message) in zip(texts, verdicts):
        expected = GOOD if passed else BAD + FEEDBACK_OPEN + message + FEEDBACK_CLOSE
        assert prefix.startswith(expected) and prefix.count(GOOD) + prefix.count(BAD) == 1
    correct = [sum(v[0] for v in verdicts[i:i + 3]) for i in (0, 3)]
    assert stats["leti/pass@1"] == pytest.approx(sum(c / 3 for c in correct) / 2)
    assert stats["leti/pass@3"] == pytest.approx(sum(pass_at_k(3, c, 3) for c in correct) / 2)
    assert len(data.encoded["train"].rows) == 6


class _Gathered(Exception):
    pass


def test_ranks_split_the_sampling_and_gather_one_problem_major_set(monkeypatch):
    """Under torch.distributed (2 ranks; a stand-in all_gather_object) each rank samples and runs only its
    problems (every 2nd), and every rank ends with the same problem-major set: rank 0's samples for problem
    0, then rank 1's for problem 1."""
    module, data = policy(), problems()
    n = 2
    sampled: dict[int, list[str]] = {}

    def run_as(rank, gather):
        loop = LeTILoop(samples_per_problem=n, max_new_tokens=8, executor=FakeExecutor())
        original = loop.sample

        def recording(mod, probs, r=0):
            sampled[r] = [p["prompt"] for p in probs]
            return original(mod, probs, r)

        loop.sample = recording
        monkeypatch.setattr(leti, "_world", lambda module: (2, rank))
        monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
        return loop

    shares = {}

    def keep_and_stop(out, obj):
        shares[1] = obj
        raise _Gathered

    with pytest.raises(_Gathered):
        run_as(1, keep_and_stop).iterate(module, data)

    def gather(out, obj):
        out[:] = [obj, shares[1]]

    loop = run_as(0, gather)
    loop.iterate(module, data)
    prompts = [p["prompt"] for p in data.problems()]
    assert sampled == {0: prompts[0::2], 1: prompts[1::2]}
    assert all(p in prefix for (prefix, _), p in zip(loop.texts, [q for q in prompts for _ in range(n)]))
    indices, completions, executions = shares[1]
    assert indices == [1] and [c for _, c in loop.texts[n:]] == completions
    assert len(loop.texts) == len(data.encoded["train"].rows) == n * len(prompts)


def test_sampling_is_shared_under_ddp_only():
    """FSDP runs every forward as a collective, so its ranks must all decode the same prompts: the sampling
    is shared out under DDP only (and not at all outside torch.distributed)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    module = policy()
    assert leti._world(module) == (1, 0)
    ranks = dict(world_size=4, global_rank=3)
    module._trainer = SimpleNamespace(strategy=DDPStrategy(), **ranks)
    assert leti._world(module) == (4, 3)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), **ranks)
    assert leti._world(module) == (1, 0)

    class ShardedDDP(DDPStrategy):  # as DeepSpeedStrategy: a DDP subclass whose forwards are collectives
        pass

    module._trainer = SimpleNamespace(strategy=ShardedDDP(), **ranks)
    assert leti._world(module) == (1, 0)


def test_loop_resamples_each_iteration_and_keeps_the_set_size(fit_tiny):
    module, data = policy(), problems()
    loop = LeTILoop(samples_per_problem=2, max_new_tokens=8, executor=FakeExecutor(pass_rate=0.3))
    seen = []
    original = loop.iterate

    def spy(module_, data_):
        stats = original(module_, data_)
        seen.append(list(loop.texts))
        return stats

    loop.iterate = spy
    fit_tiny(module, data, callbacks=[loop], max_steps=-1, max_epochs=2)
    # at fit start and after epoch 0, not after the last epoch
    assert [h["leti/iteration"] for h in loop.history] == [0.0, 1.0]
    assert len(seen[0]) == len(seen[1]) == 4 and seen[0] != seen[1]
    assert len(data.encoded["train"].rows) == 4


def test_loop_refuses_plain_modules_and_other_data(fit_tiny, tiny_module, tiny_data):
    with pytest.raises(ConfigError, match="FeedbackConditionedLM"):
        fit_tiny(tiny_module(), problems(), callbacks=[LeTILoop(executor=FakeExecutor())])
    with pytest.raises(ConfigError, match="LeTIDataModule"):
        fit_tiny(policy(), tiny_data(), callbacks=[LeTILoop(executor=FakeExecutor())])


def test_builtin_task_problems_are_tested_solve_functions():
    sandbox_or_skip()
    record = task_as_code_problem({"prompt": 'What is 2 - 5? Say """x""".', "answer": "-3"})
    wrong = record["response"].replace("'-3'", "'3'")
    results = SandboxExecutor(timeout=10).run([build_program(record, record["response"]),
                                               build_program(record, wrong)])
    assert results[0] == Execution(True, "")
    assert not results[1].passed and results[1].feedback.endswith("AssertionError")


def test_sandbox_feedback_is_the_normalised_traceback():
    sandbox_or_skip()
    test = "def check(candidate):\n    assert candidate(1) == 2\n"
    program = Program("def f(x):\n    return y\n", test, "f")
    feedback = SandboxExecutor().run([program])[0].feedback
    assert feedback.endswith("NameError: name 'y' is not defined")
    assert 'File "program.py", line 2, in f' in feedback
    assert "<string>" not in feedback and "/tmp" not in feedback and "zoo-sandbox" not in feedback


def test_the_loop_never_executes_generated_code_in_this_process(monkeypatch):
    """The real executor on a tiny problem, with exec/compile of this process made to raise: the loop still
    runs every program (in the sandbox's child processes), and a program that would mark this process's
    builtins leaves no mark."""
    sandbox_or_skip()
    module, data = policy(), problems(num_train=1)
    loop = LeTILoop(samples_per_problem=2, max_new_tokens=6, executor=SandboxExecutor(timeout=10))
    loop.sample(module, data.problems())  # warm caches that compile once (the chat template)
    marker = Program("import builtins\nbuiltins.LETI_RAN_HERE = True\n")
    ran: list[int] = []
    real_run_many = leti.run_many

    def counting_run_many(programs, **kwargs):
        ran.append(len(programs))
        return real_run_many(programs, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("generated code reached exec/compile in the zoo's process")

    monkeypatch.setattr(leti, "run_many", counting_run_many)
    with monkeypatch.context() as patched:
        patched.setattr(builtins, "exec", refuse)
        patched.setattr(builtins, "compile", refuse)
        stats = loop.iterate(module, data)
        marked = loop.executor.run([marker])
    assert ran == [2, 1] and stats["leti/iteration"] == 0.0
    assert marked[0].passed and not hasattr(builtins, "LETI_RAN_HERE")


def test_a_resumed_loop_trains_on_the_checkpointed_iteration_not_a_new_sample(fit_tiny):
    module, data = policy(), problems()
    first = LeTILoop(samples_per_problem=2, max_new_tokens=8, executor=FakeExecutor())
    first.iterate(module, data)
    resumed = LeTILoop(samples_per_problem=2, max_new_tokens=8, executor=FakeExecutor(), seed=5)
    resumed.load_state_dict(first.state_dict())
    calls: list[int] = []
    resumed.sample = lambda *args: calls.append(1) or []
    again = problems()
    fit_tiny(module, again, callbacks=[resumed], max_steps=1)
    assert not calls and resumed.iteration == 1
    rows = [r["input_ids"] for r in again.encoded["train"].rows]
    assert rows == [r["input_ids"] for r in data.encoded["train"].rows]


def test_a_lora_policy_reloads_with_the_same_tokens_and_outputs(tmp_path):
    """Frozen backbone (peft export): the reload adds the tokens again and rebuilds the same mean rows."""
    import zoo
    from zoo.modules.adapters import LoRA

    module = FeedbackConditionedLM(model="tiny-llama", export=False, adapter=LoRA(r=4))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    module.export(tmp_path)
    loaded = zoo.load(tmp_path)
    ids = loaded.tokenizer(BAD + "def f():", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 259
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    module.eval()
    torch.testing.assert_close(loaded(batch).hidden, module(batch).hidden)


@pytest.mark.parametrize("stop_at", [3, 4])  # inside epoch 1, and at its last batch (before epoch 2 samples)
def test_resume_from_a_checkpoint_is_bitwise(tmp_path, stop_at):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, steps, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        module, data = policy(), problems()  # 2 problems x 2 samples = 4 rows = 2 steps an epoch
        loop = LeTILoop(samples_per_problem=2, max_new_tokens=8, executor=FakeExecutor(pass_rate=0.4))
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, default_root_dir=root, callbacks=[loop, *callbacks])
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, loop

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_at, save_top_k=-1)
    straight, loop = run(tmp_path / "a", 6, [saver])
    checkpoint = next((tmp_path / "ckpt").glob(f"*step={stop_at}.ckpt"))
    resumed, resumed_loop = run(tmp_path / "b", 6, ckpt_path=str(checkpoint))
    assert loop.iteration == resumed_loop.iteration == 3 and loop.texts == resumed_loop.texts
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
