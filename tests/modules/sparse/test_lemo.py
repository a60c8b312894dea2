"""LeMo (spec 01) invariants: exactness at keep = 1, block counts, identity bypass, original positions,
oracle scores on hand-built inputs, schedules, predictor recall, MLP channel sparsity, memory direction."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import fields
from operator import attrgetter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.sparse.lemo import (
    BlockPatternPredictor,
    ChannelSparseMLP,
    ElasticOptions,
    KernelOptions,
    LeMoSparseStrategy,
    MLPOptions,
    PredictorOptions,
    SelectionOptions,
    apply_causal_fix,
    column_scores,
    layer_keep_fractions,
    oracle_block_scores,
    select_blocks,
    topk_recall,
)

REPO = Path(__file__).resolve().parents[3]


def tiny(seed=0):
    model, _ = backbone.tiny_llama(seed=seed)
    model.train()
    return model


def rope(model, length, batch=1):
    body = backbone.decoder(model)
    hidden = torch.zeros(batch, length, backbone.hidden_size(model))
    return body.rotary_emb(hidden, torch.arange(length)[None])


def test_keep_all_blocks_through_compacted_path_equals_dense_forward_and_backward():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 64))
    dense, sparse = tiny(), tiny()
    strategy = LeMoSparseStrategy(SelectionOptions(block_size=8, schedule="constant", keep_ratio=0.5))
    strategy.apply(sparse)
    for wrapper in strategy.wrappers:  # every block kept, but routed through gather / compact / scatter
        wrapper.keep_fraction, wrapper.bypass_dense = 1.0, False
    out_dense = dense(input_ids=ids, use_cache=False).logits
    out_sparse = sparse(input_ids=ids, use_cache=False).logits
    assert strategy.context.processed == {0: (64, 64), 1: (64, 64)}
    torch.testing.assert_close(out_sparse, out_dense, rtol=0, atol=1e-6)
    out_dense.square().mean().backward()
    out_sparse.square().mean().backward()
    grads = dict(sparse.named_parameters())
    for name, param in dense.named_parameters():  # parameter names are unchanged by the wrappers
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-6)


def test_each_sparse_layer_processes_exactly_the_scheduled_number_of_blocks():
    model = tiny()
    strategy = LeMoSparseStrategy(SelectionOptions(block_size=8, keep_fractions=[0.5, 0.3]))
    strategy.apply(model)
    rows = {}
    for idx, layer in enumerate(backbone.decoder_layers(model)):
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args, idx=idx: rows.__setitem__(idx, args[0].shape[:2]))
    model(input_ids=torch.randint(0, 256, (3, 64)), use_cache=False)
    # n_b = 8: floor(0.5 * 8) = 4 blocks, floor(0.3 * 8) = 2 blocks, of 8 tokens each, in every row
    assert rows == {0: (3, 32), 1: (3, 16)}


def test_eliminated_tokens_pass_attention_unchanged_and_send_no_gradient():
    model = tiny()
    strategy = LeMoSparseStrategy(SelectionOptions(block_size=8, keep_fractions=[0.25, 1.0]))
    strategy.apply(model)
    layer = backbone.decoder_layers(model)[0]
    seen = {}
    layer.register_forward_pre_hook(
        lambda _m, args, kw: seen.__setitem__("in", (args or (kw["hidden_states"],))[0]), with_kwargs=True)
    layer.post_attention_layernorm.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("mid", args[0]))
    model(input_ids=torch.randint(0, 256, (2, 64)), use_cache=False)
    kept = torch.zeros(2, 64, dtype=torch.bool)
    index = strategy.wrappers[0]._cache[1]
    for row in range(2):
        for block in index[row].tolist():
            kept[row, block * 8:(block + 1) * 8] = True
    assert kept.sum() == 2 * 2 * 8
    assert torch.equal(seen["mid"][~kept], seen["in"][~kept])  # bitwise: residual + 0
    assert not torch.equal(seen["mid"][kept], seen["in"][kept])

    wrapper = strategy.wrappers[0]
    hidden = torch.randn(2, 64, 64, requires_grad=True)
    out, _ = wrapper(hidden, position_embeddings=rope(model, 64, 2))
    eliminated = (out == 0).all(-1)
    assert eliminated.sum() == 2 * 6 * 8
    (grad,) = torch.autograd.grad(out.square().sum(), hidden)
    assert grad[eliminated].abs().max() == 0 and grad[~eliminated].abs().max() > 0


def test_compacted_attention_with_original_positions_equals_dense_attention_with_mask():
    torch.manual_seed(1)
    model = tiny()
    strategy = LeMoSparseStrategy(SelectionOptions(block_size=8, schedule="constant", keep_ratio=0.5))
    wrapper = strategy.apply(model)[0]
    hidden, cos_sin = torch.randn(1, 64, 64), rope(model, 64)
    keep = torch.tensor([[0, 3, 4, 7]])
    kept = torch.zeros(64, dtype=torch.bool)
    for block in keep[0].tolist():
        kept[block * 8:(block + 1) * 8] = True
    compact = wrapper.compacted_forward(hidden, cos_sin, keep)
    allowed = torch.ones(64, 64, dtype=torch.bool).tril() & (kept[None, :] | torch.eye(64, dtype=torch.bool))
    mask = torch.zeros(1, 1, 64, 64).masked_fill(~allowed, torch.finfo(torch.float32).min)
    dense, _ = wrapper.inner(hidden, position_embeddings=cos_sin, attention_mask=mask)
    torch.testing.assert_close(compact[0, kept], dense[0, kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(compact[0, ~kept], torch.zeros_like(compact[0, ~kept]))
    # Re-indexing the kept tokens 0..K-1 (the pitfall) gives a clearly different result.
    reindexed, _ = wrapper.inner(hidden[:, kept], position_embeddings=rope(model, 32), attention_mask=None)
    error = (compact[0, kept] - dense[0, kept]).abs().max()
    assert (reindexed[0] - dense[0, kept]).abs().max() > max(1e-5, 100 * error)


def test_oracle_block_scores_match_a_hand_computation_and_one_large_score_keeps_its_block():
    lower = torch.tensor([[[1.0, 0.0], [2.0, 3.0]]])
    for fix, expected in (("symmetrize", [3.0, 5.0]), ("none", [3.0, 3.0]), ("count_norm", [1.5, 3.0])):
        torch.testing.assert_close(column_scores(apply_causal_fix(lower, fix)), torch.tensor([expected]))
    # One head, d = 1, blocks of 2, causal: block 1 holds one key (token 2) with a huge score; it wins
    # although its other key (token 3) scores negative everywhere.
    q = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 1, 4, 1)
    k = torch.tensor([0.5, 0.4, 9.0, -5.0]).view(1, 1, 4, 1)
    matrix = oracle_block_scores(q, k, 2, causal=True, causal_fix="symmetrize")
    # lower block matrix [[0.5, 0], [0.5, 9]] -> symmetrized [[0.5, 0.5], [0.5, 9]]
    torch.testing.assert_close(matrix, torch.tensor([[[0.5, 0.5], [0.5, 9.0]]]))
    assert select_blocks(column_scores(matrix), 1).tolist() == [[1]]
    # padding blocks are never preferred
    assert select_blocks(column_scores(matrix), 1, torch.tensor([[True, False]])).tolist() == [[0]]


def test_schedules_follow_the_artifact():
    e2e = layer_keep_fractions(32, "artifact_e2e", keep_ratio=0.4)
    assert e2e[:15] == [1.0] * 15 and e2e[15:31] == [0.4] * 16 and e2e[31] == 1.0
    profiled = layer_keep_fractions(32, "profiled")
    for layer, eliminated in ((0, 0.01), (7, 0.21), (14, 0.39), (18, 0.50), (25, 0.575), (31, 0.51)):
        assert profiled[layer] == pytest.approx(1 - eliminated)
    assert layer_keep_fractions(4, "constant", keep_ratio=0.3, start_layer=2) == [1.0, 1.0, 0.3, 0.3]


def test_trained_predictor_recall_beats_random_selection():
    """Synthetic layer: block-wise scaled inputs make some key blocks informative; k = 3 of 8 blocks."""
    torch.manual_seed(0)
    heads, head_dim, block, nb = 2, 8, 8, 8
    q_proj = torch.nn.Linear(heads * head_dim, heads * head_dim, bias=False)
    k_proj = torch.nn.Linear(heads * head_dim, heads * head_dim, bias=False)

    def sample(batch=8):
        scale = torch.rand(batch, nb, 1, 1) * 2.5 + 0.2
        x = (torch.randn(batch, nb, block, heads * head_dim) * scale).view(batch, nb * block, -1)
        q = q_proj(x).view(batch, -1, heads, head_dim).transpose(1, 2)
        k = k_proj(x).view(batch, -1, heads, head_dim).transpose(1, 2)
        target = oracle_block_scores(q, k, block, causal=False) * heads / 16
        return x, target

    predictor = BlockPatternPredictor(head_dim, block, hidden=32, middle=32)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=3e-3, betas=(0.9, 0.95))
    with torch.no_grad():
        x_test, target_test = sample(64)
    before = topk_recall(column_scores(predictor(x_test)), column_scores(target_test), 3)
    for _ in range(150):
        with torch.no_grad():
            x, target = sample()
        loss = F.smooth_l1_loss(predictor(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = topk_recall(column_scores(predictor(x_test)), column_scores(target_test), 3)
    assert after > 3 / 8 + 0.25, (before, after)


def test_strategy_trains_predictors_offline_and_elastic_shrinking_removes_neurons():
    model = tiny()
    strategy = LeMoSparseStrategy(
        SelectionOptions(block_size=8, schedule="constant", keep_ratio=0.5, scorer="predictor"),
        predictor=PredictorOptions(hidden=16, lr=1e-3),
        elastic=ElasticOptions(enabled=True, every=3, tau=0.0))
    strategy.apply(model)
    before = sum(p.numel() for p in strategy.predictors.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"input_ids": torch.randint(0, 256, (2, 64)),
             "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    recalls = strategy.train_predictors(model, [batch], steps=3)
    assert len(recalls) == 3 and all(0.0 <= r <= 1.0 for r in recalls)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # the LLM stays frozen
    after = sum(p.numel() for p in strategy.predictors.parameters())
    assert after < before  # tau = 0 prunes every neuron that was ever <= 0 (one always survives)
    strategy.context.use_predictors = True
    model(input_ids=batch["input_ids"], use_cache=False)  # the shrunk predictors still select blocks
    assert strategy.context.processed[0] == (32, 64)
    model.to(torch.bfloat16)  # a *-true precision casts the LLM; the predictors (outside it) stay float32
    model(input_ids=batch["input_ids"], use_cache=False)
    assert {p.dtype for p in strategy.predictors.parameters()} == {torch.float32}


def test_channel_sparse_mlp_forward_is_exact_and_gradient_dense_at_rho_zero():
    torch.manual_seed(2)
    mlp = backbone.decoder_layers(tiny())[0].mlp
    x = torch.randn(2, 16, 64, requires_grad=True)
    dense = mlp(x)
    g_dense = torch.autograd.grad(dense.square().sum(), (x, *mlp.parameters()))
    for rho in (0.0, 0.75):
        sparse = ChannelSparseMLP(mlp, rho).train()
        out = sparse(x)
        assert torch.equal(out, dense)
        grads = torch.autograd.grad(out.square().sum(), (x, *mlp.parameters()))
        if rho == 0.0:
            for got, want in zip(grads, g_dense):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            down = dict(zip([n for n, _ in mlp.named_parameters()], grads[1:]))["down_proj.weight"]
            assert (down.abs().sum(0) > 0).sum() == 128 - 96  # only 32 of 128 channels get gradient


def saved_bytes(model, ids):
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # count each saved activation storage once (views share one); weights are not activations
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state.sum().backward()
    return sum(storages.values())


def test_saved_activation_bytes_fall_as_keep_falls():
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (1, 512))
    model = tiny()
    dense = saved_bytes(model, ids)
    results = {}
    for keep in (0.5, 0.25):
        strategy = LeMoSparseStrategy(SelectionOptions(block_size=16, schedule="constant", keep_ratio=keep),
                                      mlp=MLPOptions(drop_ratio=0.8))
        strategy.apply(model)
        results[keep] = saved_bytes(model, ids) / dense
        strategy.remove(model)
    assert results[0.25] < results[0.5] < 1 - 0.5 * (1 - 0.5)
    assert results[0.25] < 1 - 0.5 * (1 - 0.25)


def test_fit_with_lora_keeps_parameter_names_and_logs_elimination(tiny_module, tiny_data, fit_tiny):
    from zoo.modules import PeftModule

    module = tiny_module(cls=PeftModule, peft_config={"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                     "target_modules": ["q_proj", "v_proj"]})
    names = set(module.state_dict())
    strategy = LeMoSparseStrategy(SelectionOptions(block_size=8, schedule="constant", keep_ratio=0.5))
    trainer = fit_tiny(module, tiny_data(), callbacks=[strategy], max_steps=2)
    assert set(module.state_dict()) == names
    assert trainer.callback_metrics["lemo/kept_token_fraction"] < 1.0
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())


def test_gradient_checkpointing_recompute_reuses_the_cached_blocks():
    model = tiny()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    strategy = LeMoSparseStrategy(SelectionOptions(block_size=8, schedule="constant", keep_ratio=0.5))
    strategy.apply(model)
    calls = []
    for wrapper in strategy.wrappers:
        original = wrapper.block_scores
        wrapper.block_scores = lambda *a, original=original: calls.append(1) or original(*a)
    strategy.context.batch_id = 1
    model(input_ids=torch.randint(0, 256, (1, 64)), use_cache=False).logits.sum().backward()
    assert len(calls) == 2  # one scoring per layer although each layer's forward ran twice


def run_cli(config: str, tmp_path: Path):
    env = {**os.environ, "ZOO_RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "zoo", "fit", "--config", str(REPO / config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.multiproc
def test_ddp_two_processes_with_lora_and_predictors(tmp_path):
    run_cli("configs/strategies/lemo_ddp.yaml", tmp_path)


@pytest.mark.multiproc
def test_fsdp2_two_processes_full_finetuning(tmp_path):
    run_cli("configs/strategies/lemo_fsdp2.yaml", tmp_path)


def test_copy_of_wrapped_model_still_runs():
    model = tiny()
    LeMoSparseStrategy(SelectionOptions(block_size=8, schedule="constant", keep_ratio=0.5)).apply(model)
    clone = copy.deepcopy(model)
    assert clone(input_ids=torch.randint(0, 256, (1, 32)), use_cache=False).logits.shape == (1, 32, 258)


# The 23 flat constructor arguments LeMoSparseStrategy had before they were grouped, with the defaults copied
# from that signature, and where each one lives now.
FLAT_DEFAULTS = dict(
    block_size=64, schedule="artifact_e2e", keep_ratio=0.4, start_layer=None, dense_last=True,
    keep_fractions=None, causal_fix="symmetrize", oracle_rope=False, scorer="oracle", mlp_drop_ratio=0.0,
    sparse_eval=False, kernel="auto", predictor_hidden=128, predictor_steps=400, predictor_refresh_every=0,
    predictor_lr=2e-5, predictor_warmup=20, predictor_loss="smooth_l1", elastic=False, prune_every=100,
    prune_until=620, prune_tau=0.8, prune_tau_step=0.05)
SELECTION = ("block_size", "schedule", "keep_ratio", "start_layer", "dense_last", "keep_fractions",
             "causal_fix", "oracle_rope", "scorer", "sparse_eval")
PREDICTOR = ("hidden", "steps", "refresh_every", "lr", "warmup", "loss")
GROUPED_AS = {
    **{name: f"selection.{name}" for name in SELECTION},
    **{f"predictor_{name}": f"predictor.{name}" for name in PREDICTOR},
    "elastic": "elastic.enabled", "prune_every": "elastic.every", "prune_until": "elastic.until",
    "prune_tau": "elastic.tau", "prune_tau_step": "elastic.tau_step",
    "mlp_drop_ratio": "mlp.drop_ratio", "kernel": "kernel.backend",
}
# What each shipped config set with the flat arguments (copied from the configs before the change).
CONFIG_SETTINGS = {
    "configs/lemo.yaml": dict(block_size=64, schedule="artifact_e2e", keep_ratio=0.4, causal_fix="symmetrize",
                              scorer="oracle"),
    "configs/strategies/lemo_ddp.yaml": dict(block_size=16, schedule="constant", keep_ratio=0.5,
                                             scorer="predictor", predictor_steps=1, predictor_lr=1.0e-3),
    "configs/strategies/lemo_fsdp2.yaml": dict(block_size=16, schedule="constant", keep_ratio=0.5,
                                               mlp_drop_ratio=0.5),
}


def flat_settings(strategy: LeMoSparseStrategy) -> dict:
    return {old: attrgetter(new)(strategy) for old, new in GROUPED_AS.items()}


def test_option_blocks_hold_exactly_the_old_arguments_with_the_old_defaults():
    assert len(FLAT_DEFAULTS) == 23 and set(GROUPED_AS) == set(FLAT_DEFAULTS)
    blocks = {"selection": SelectionOptions, "predictor": PredictorOptions, "elastic": ElasticOptions,
              "mlp": MLPOptions, "kernel": KernelOptions}
    grouped = {f"{block}.{f.name}" for block, cls in blocks.items() for f in fields(cls)}
    assert set(GROUPED_AS.values()) == grouped
    assert flat_settings(LeMoSparseStrategy()) == FLAT_DEFAULTS


def _config_with_tiny_model(config: str, tmp_path: Path, **selection) -> Path:
    """The shipped config with its model block replaced by a tiny CausalLMModule (this test is about the LeMo
    block; tests/test_configs.py runs each whole config) on one CPU process."""
    raw = yaml.safe_load((REPO / config).read_text())
    raw["model"] = {"class_path": "zoo.modules.CausalLMModule",
                    "init_args": {"model": "tiny-llama", "export": False}}
    raw["trainer"].update(accelerator="cpu", devices=1, strategy="auto")
    raw["trainer"]["callbacks"][0]["init_args"].setdefault("selection", {}).update(selection)
    path = tmp_path / "lemo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("config", list(CONFIG_SETTINGS))
def test_grouped_options_parse_from_yaml_to_the_settings_the_config_had(config, tmp_path, monkeypatch):
    from zoo.cli import lightning_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)
    cli = lightning_main(["--config", str(_config_with_tiny_model(config, tmp_path))], run=False)
    (strategy,) = [c for c in cli.trainer.callbacks if isinstance(c, LeMoSparseStrategy)]
    assert isinstance(strategy.selection, SelectionOptions)
    assert isinstance(strategy.predictor, PredictorOptions)
    assert flat_settings(strategy) == {**FLAT_DEFAULTS, **CONFIG_SETTINGS[config]}
    strategy.apply(cli.model.model)  # tiny-llama, 2 layers: artifact_e2e starts at round(2 * 15 / 32) = 1
    expected = {"configs/lemo.yaml": [1.0, 0.4]}.get(config, [0.5, 0.5])
    assert strategy.fractions == expected and len(strategy.wrappers) == 2 - expected.count(1.0)


def test_print_config_shows_the_option_blocks(tmp_path, monkeypatch, capsys):
    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(_config_with_tiny_model("configs/lemo.yaml", tmp_path)),
              "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (lemo,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("LeMoSparseStrategy")]
    args = lemo["init_args"]
    assert set(args) == {"selection", "predictor", "elastic", "mlp", "kernel"}
    assert args["selection"]["block_size"] == 64 and args["selection"]["keep_ratio"] == 0.4
    assert args["predictor"]["steps"] == 400 and args["mlp"] == {"drop_ratio": 0.0}


def test_out_of_range_option_is_one_config_error_line(tmp_path, monkeypatch, capsys):
    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)
    path = _config_with_tiny_model("configs/lemo.yaml", tmp_path, keep_ratio=1.5)
    assert main(["fit", "--config", str(path), "--trainer.fast_dev_run", "1"]) == 1
    assert "selection.keep_ratio must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="mlp.drop_ratio"):
        MLPOptions(drop_ratio=-0.1)


def _shrink_on_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: its own zero counts (rank 0 saw neuron 0 <= 0 always, rank 1 never), then shrink."""
    from zoo.modules.sparse.lemo.predictor import _ReluMLP

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    torch.manual_seed(0)  # the same start on every rank, as DDP keeps it
    net = _ReluMLP((4, 6, 6, 2))
    counts = torch.zeros(6)
    counts[0] = 10.0 if rank == 0 else 0.0  # neuron 0: <= 0 in 10 of 20 samples over both ranks
    counts[1] = 10.0  # neuron 1: <= 0 in 20 of 20
    net.zero_counts, net.samples = [counts, torch.zeros(6)], 10
    net.shrink(tau=0.9)
    torch.save({"widths": net.widths, "weight": net.maps[0].weight.detach()}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes import the zoo: about 2 minutes on 2 busy cores
def test_elastic_shrinking_keeps_the_same_neurons_on_every_rank(tmp_path):
    """Under torch.distributed the zero counts are summed before the cut: a neuron <= 0 on one rank only is
    kept everywhere (10 of 20), one <= 0 on both is cut everywhere; per-rank counts would give the ranks
    different widths and the next gradient all-reduce would fail."""
    torch.multiprocessing.spawn(_shrink_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first["widths"] == second["widths"] == (4, 5, 6, 2)
    torch.testing.assert_close(first["weight"], second["weight"], rtol=0, atol=0)


def test_elastic_shrinking_cuts_on_counts_summed_over_ranks(monkeypatch):
    """The same decision in one process, the other rank's counts added by a stand-in all-reduce (the
    2-process run above is marked slow)."""
    from zoo.modules.sparse.lemo.predictor import _ReluMLP

    other = torch.zeros(6 + 6 + 1)
    other[1], other[-1] = 10.0, 10.0  # the other rank: neuron 1 <= 0 in all its 10 samples
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flat: flat.add_(other))
    net = _ReluMLP((4, 6, 6, 2))
    counts = torch.zeros(6)
    counts[0], counts[1] = 10.0, 10.0  # here: neurons 0 and 1 <= 0 in all 10 samples
    net.zero_counts, net.samples = [counts, torch.zeros(6)], 10
    before = net.maps[0].weight.detach().clone()
    net.shrink(tau=0.9)  # summed: neuron 0 at 10/20 stays, neuron 1 at 20/20 goes
    assert net.widths == (4, 5, 6, 2)
    assert torch.equal(net.maps[0].weight.detach(), before[[0, 2, 3, 4, 5]])
