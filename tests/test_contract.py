"""The round-trip contract, one matrix over every registered method (the way PEFT tests every tuner).

For each method in :func:`zoo.registry.methods`, on the tiny backbone, through the method's own config:

``fit``        the config parses and trains 2 steps under ``precision="64-true"``;
``placement``  every tensor the module and its callbacks hold follows the module's dtype (a tensor
               left behind when Lightning casts would also be left behind when it moves to a GPU);
``trainable``  the optimizer holds exactly ``trainable_parameters()`` and every other tensor is bitwise
               unchanged by training;
``decoding``   greedy decoding with the KV cache equals decoding without it (the module's adapter hooks);
``ckpt``       ``zoo bench --ckpt RUN`` on the same 2-step run rebuilds the run's own class from its export
               and reports the response NLL of the in-process evaluation of that run (2e-4; the run is
               float64, the reload float32) and its trainable count; the NLL differs from the untuned base's;
``resume``     (methods with state outside the weights, and SFT as the control) a run stopped inside an
               epoch and resumed from the checkpoint taken then ends bitwise equal to an uninterrupted run
               (the training loaders are resumable: torchdata's StatefulDataLoader).

A method that cannot meet a row declares it in its registry ``scope`` as ``contract-exempt: <row>: <reason>``;
the matrix then checks the row fails as declared (an xfail with the reason, strict), never a bare skip.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from zoo import registry

REPO = Path(__file__).resolve().parent.parent
SFT_DATA = ["--data.init_args.dataset", "chain_sum", "--data.init_args.num_train", "8",
            "--data.init_args.num_val", "2", "--data.init_args.num_test", "4",
            "--data.init_args.max_length", "128", "--data.init_args.batch_size", "2",
            "--data.init_args.eval_batch_size", "4"]
# ZOO_TEST_ACCELERATOR=cuda runs the matrix's fits on a GPU (Lightning moves the module back to the CPU at the
# end of fit, so the placement row then also catches a tensor left on the GPU)
TRAINER = ["--trainer.accelerator", os.environ.get("ZOO_TEST_ACCELERATOR", "cpu"), "--trainer.devices", "1",
           "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false"]
STATEFUL = {"sft", "cdpo", "relation_distill", "leti", "ubpl", "list", "got_d", "locft_bf", "qtuning",
            "sstoken", "masked_thought", "hft", "lt_sft", "greentrainer", "dsee", "lemo", "promot", "panda",
            "tl_training", "stability", "caft"}


def _names() -> list[str]:
    try:
        return [m.name for m in registry.methods()]
    except Exception as err:  # a broken method file must fail loudly
        return [f"<registry import failed: {type(err).__name__}: {err}>"]


def exempt(name: str, row: str) -> str | None:
    """The reason ``name`` declares for not meeting ``row`` (``contract-exempt: row: reason`` in its
    scope)."""
    scope = registry.get(name).scope
    marker = f"contract-exempt: {row}:"
    return scope.split(marker, 1)[1].split(";")[0].strip() if marker in scope else None


def data_args(name: str) -> list[str]:
    from zoo.datamodules import SFTDataModule

    config = yaml.safe_load(registry.get(name).config_path.read_text()) or {}
    data = config.get("data")
    if isinstance(data, str):
        data = yaml.safe_load((registry.get(name).config_path.parent / data).read_text())
    module, _, cls = data["class_path"].rpartition(".")
    data_class = getattr(importlib.import_module(module or "zoo.datamodules"), cls)
    return SFT_DATA if issubclass(data_class, SFTDataModule) else []


def build(name: str, root: Path, steps: int, extra: tuple[str, ...] = (), checkpointing: bool = False):
    from zoo.cli import lightning_main

    config = registry.get(name).config_path
    args = ["--config", str(config), "--model.init_args.model", "tiny-llama", *data_args(name), *TRAINER,
            "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root),
            "--seed_everything", "0", *extra]
    cli = lightning_main(args, run=False)
    if not checkpointing:  # periodic checkpoints are not what these rows check (the resume row adds its own)
        from lightning.pytorch.callbacks import ModelCheckpoint

        cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    return cli


def held_tensors(obj, seen: set[int] | None = None, depth: int = 0):
    """Every tensor an object holds in its attributes (nn.Modules through their parameters and buffers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from held_tensors(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from held_tensors(value, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("zoo"):
        for value in vars(obj).values():
            yield from held_tensors(value, seen, depth + 1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """name -> (cli, snapshot before fit), fitted 2 steps in float64, built once per method."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            cli = build(name, root, steps=2, extra=("--trainer.precision", "64-true"))
            before = {k: v.detach().clone() for k, v in cli.model.state_dict(keep_vars=True).items()}
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            # the run's config.yaml, as `zoo fit` saves it
            (root / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False))
            cache[name] = (cli, before)
        return cache[name]

    return get


@contextmanager
def contract_row(name: str, row: str) -> Iterator[None]:
    """Run a row's checks; a declared exemption must really fail (then xfail with its reason), and an
    exemption that no longer fails is an error, so the declarations stay true."""
    reason = exempt(name, row)
    if reason is None:
        yield
        return
    try:
        yield
    except AssertionError:
        pytest.xfail(f"declared in the registry scope: {reason}")
    pytest.fail(f"{name} declares 'contract-exempt: {row}' but the row holds: remove the exemption")


@pytest.mark.parametrize("name", _names())
def test_placement_every_held_tensor_follows_the_module_dtype(name, fitted):
    with contract_row(name, "placement"):
        cli, _ = fitted(name)
        module = cli.model

        def left_behind(t: torch.Tensor) -> bool:
            return t.device != module.device or (t.is_floating_point() and t.dtype != torch.float64)

        stray = [f"{n} {t.dtype} {t.device}" for n, t in module.state_dict().items() if left_behind(t)]
        for callback in cli.trainer.callbacks:
            stray += [f"{type(callback).__name__}: {tuple(t.shape)} {t.dtype} {t.device}"
                      for t in held_tensors(callback) if left_behind(t)]
        assert not stray, f"tensors left behind by the cast to float64 / move to {module.device}: {stray[:8]}"


@pytest.mark.parametrize("name", _names())
def test_trainable_parameters_are_what_trains_and_the_rest_is_bitwise_unchanged(name, fitted):
    with contract_row(name, "trainable"):
        cli, before = fitted(name)
        module = cli.model
        trainable = module.trainable_parameters()
        optimized = {id(p) for opt in cli.trainer.optimizers for g in opt.param_groups for p in g["params"]}
        assert optimized == {id(p) for p in trainable.values()}
        names = module.trainable_state_names()
        after = module.state_dict()
        changed = [k for k, v in before.items()
                   if k in after and k not in names and after[k].is_floating_point()
                   and not torch.equal(after[k].to(v.dtype) if v.is_floating_point() else after[k], v)]
        # frozen tensors were cast to float64 exactly (fp32 -> fp64 is exact), so a cast back compares bitwise
        assert not changed, f"frozen tensors changed: {changed[:8]}"
        assert any(not torch.equal(after[k].to(before[k].dtype), before[k]) for k in names if k in before), \
            "nothing that is reported trainable changed"


@pytest.mark.parametrize("name", _names())
def test_a_logger_can_record_the_module_and_data_hparams_together(name, fitted, tmp_path):
    """Lightning refuses a run whose module and data module record one key with two values (UBPL's own
    ``seed`` against the data's), but only once a logger is attached, which these rows otherwise leave out."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.utilities import _log_hyperparams

    cli, _ = fitted(name)
    loggers = cli.trainer.loggers
    cli.trainer.loggers = [CSVLogger(tmp_path)]
    try:
        _log_hyperparams(cli.trainer)
    finally:
        cli.trainer.loggers = loggers


@pytest.mark.parametrize("name", _names())
def test_cached_greedy_decoding_equals_uncached(name, fitted):
    with contract_row(name, "decoding"):
        cli, _ = fitted(name)
        module = cli.model
        prompts = ["What is 3 + 4?", "hi"]
        cached = module.generate_text(prompts, max_new_tokens=5, use_cache=True)
        assert cached == module.generate_text(prompts, max_new_tokens=5, use_cache=False)


@pytest.fixture(scope="module")
def base_nll(tmp_path_factory):
    cache: dict[str, float] = {}

    def get(data: tuple[str, ...]) -> float:
        if data not in cache:
            from zoo.harness.generation import response_nll
            from zoo.modules import CausalLMModule

            datamodule = build("sft", tmp_path_factory.mktemp("base"), 1, extra=data).datamodule
            if not data:
                raise AssertionError("base NLL needs the SFT data overrides")
            base = CausalLMModule(model="tiny-llama", export=False)
            cache[data] = response_nll(base, datamodule, "test")["nll"]
        return cache[data]

    return get


@pytest.mark.parametrize("name", _names())
def test_bench_ckpt_rebuilds_the_run_and_reproduces_its_evaluation(name, tmp_path, monkeypatch, fitted,
                                                                   base_nll):
    with contract_row(name, "ckpt"):
        from zoo.harness.bench import main as bench
        from zoo.harness.generation import response_nll

        cli, _ = fitted(name)
        run = Path(cli.trainer.default_root_dir)
        assert (run / "export" / "zoo.json").exists(), "the fit wrote no export"
        live = response_nll(cli.model, cli.datamodule, "test")["nll"]
        monkeypatch.chdir(tmp_path)
        assert bench(["--ckpt", str(run), "--limit", "0", "--out", "ckpt"]) == 0  # data: the run's config
        ckpt = json.loads((tmp_path / "ckpt" / "results.jsonl").read_text().splitlines()[0])
        assert ckpt["module"] == type(cli.model).__name__
        assert ckpt["metrics"]["nll"] == pytest.approx(live, abs=2e-4)  # float32 reload of a float64 run
        assert ckpt["trainable_params"] == cli.model.trainable_count()
        if data_args(name):  # the same test split as the base model's: the reload is not the untuned backbone
            assert abs(ckpt["metrics"]["nll"] - base_nll(tuple(data_args(name)))) > 1e-4


def _final_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(STATEFUL & set(_names())))
def test_resume_inside_an_epoch_is_bitwise(name, tmp_path):
    """Preempted at step 3 (inside the second epoch of the tiny data) and resumed from the checkpoint taken
    then, a run ends bitwise equal to the uninterrupted run: weights, optimizer and the data position."""
    with contract_row(name, "resume"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        straight = build(name, tmp_path / "straight", steps=6, checkpointing=True)
        straight.trainer.callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                          save_top_k=-1, save_last=False))
        straight.trainer.fit(straight.model, datamodule=straight.datamodule)
        checkpoint = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
        resumed = build(name, tmp_path / "resumed", steps=6)
        resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(checkpoint))
        expected, got = _final_state(straight.model), _final_state(resumed.model)
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"resumed run differs from the uninterrupted one in {different[:8]}"


def test_exemptions_name_real_rows():
    rows = {"placement", "trainable", "decoding", "ckpt", "resume"}
    for method in registry.methods():
        for part in method.scope.split("contract-exempt: ")[1:]:
            assert part.split(":", 1)[0] in rows, f"{method.name}: unknown contract row in {part!r}"

