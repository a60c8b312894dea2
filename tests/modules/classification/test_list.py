"""LiST invariants: adapter algebra, meta weights against the closed form, sessions re-initialise the
student."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from zoo import backbone
from zoo.modules.classification.list import (
    LiSTAdapter,
    LiSTModule,
    SelfTrainingLoop,
    confidence_weights,
    meta_weights,
    soft_label_kl,
)


def test_zero_up_projection_gives_the_frozen_backbone_and_adapters_sit_after_o_proj_and_down_proj():
    model, tokenizer = backbone.tiny_llama()
    reference, _ = backbone.tiny_llama()  # the same seed: an untouched copy
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    adapter = LiSTAdapter(bottleneck=4, init="zero")
    adapter.attach(model, tokenizer)
    assert len(adapter.adapters) == 2 * len(backbone.decoder_layers(model))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    adapter.init = "normal"
    adapter.reinitialise(1)  # N(0, 0.02) both: not the identity any more
    assert not torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    captured: dict[str, torch.Tensor] = {}
    ref_layer, layer = backbone.decoder_layers(reference)[0], backbone.decoder_layers(model)[0]
    ref_layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: captured.setdefault("o", out))
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    layer.mlp.down_proj.register_forward_hook(lambda m, a, out: captured.setdefault("d", out))
    reference(input_ids=ids)
    model(input_ids=ids)
    h = captured["h"]  # layer 0's attention output is the same in both models before the adapter
    assert torch.allclose(captured["o"], h + adapter.adapters[0].up(adapter.adapters[0].down(h)), atol=1e-6)
    plain = captured["x"] @ layer.mlp.down_proj.weight.T
    assert torch.allclose(captured["d"], plain + adapter.adapters[1].up(adapter.adapters[1].down(plain)),
                          atol=1e-6)


def _logreg_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_u, x_m = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    y_m = torch.tensor([0, 1, 2, 1])
    teacher = torch.softmax(torch.randn(6, 3, generator=g), -1)
    weight = torch.randn(5, 3, generator=g) * 0.3
    return x_u, x_m, y_m, teacher, weight


def test_meta_weights_equal_the_closed_form_and_do_not_depend_on_eta():
    x_u, x_m, y_m, teacher, weight = _logreg_problem()

    def unlabeled(ps):
        return soft_label_kl(x_u @ ps["w"], teacher)

    def meta(ps):
        return F.cross_entropy(x_m @ ps["w"], y_m)

    # oracle: w_i ∝ relu(<grad L_meta, grad l_i>), per-example gradients one by one
    w0 = weight.clone().requires_grad_(True)
    (g_meta,) = torch.autograd.grad(meta({"w": w0}), w0)
    dots = torch.stack([(torch.autograd.grad(unlabeled({"w": w0})[i], w0)[0] * g_meta).sum()
                        for i in range(6)])
    oracle = dots.clamp_min(0) / dots.clamp_min(0).sum()
    for eta in (1e-3, 0.1, 1.0):
        got = meta_weights({"w": weight}, unlabeled, meta, eta)
        assert torch.allclose(got, oracle, atol=1e-5), (eta, got, oracle)
        assert abs(float(got.sum()) - 1.0) < 1e-6 and (got >= 0).all()


def test_planted_anti_aligned_pseudo_label_gets_zero_weight():
    """Meta batch: feature e1 is class 1. Unlabeled: e1 pseudo-labelled 1 (agrees), e1 pseudo-labelled 0 (the
    planted error: its gradient opposes the labeled one), e2 (orthogonal: no agreement either way)."""
    eye = torch.eye(4)
    x_u, x_m, y_m = eye[[1, 1, 2]], eye[[1, 1]], torch.tensor([1, 1])
    teacher = F.one_hot(torch.tensor([1, 0, 2]), 3).float() * 0.9 + 0.1 / 3
    got = meta_weights({"w": torch.zeros(4, 3)}, lambda ps: soft_label_kl(x_u @ ps["w"], teacher),
                       lambda ps: F.cross_entropy(x_m @ ps["w"], y_m), 0.5)
    assert got.tolist() == [1.0, 0.0, 0.0]


def test_confidence_weights():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
    assert torch.allclose(confidence_weights(probs, 0.6), torch.tensor([1.0, 0.0, 1.0]) / (2 + 1e-5))
    assert torch.allclose(confidence_weights(probs, 0.0), torch.full((3,), 1 / (3 + 1e-5)))


def test_sessions_reinitialise_the_student_from_a_teacher_copy_with_a_fresh_optimizer(tmp_path):
    from zoo.datamodules.classification import ClassificationDataModule

    data = ClassificationDataModule(dataset="sentiment_hard", tokenizer="tiny-llama", num_train=60, num_val=4,
                                    num_test=4, batch_size=4, eval_batch_size=8, max_length=512,
                                    shots_per_class=4, num_unlabeled=8)
    module = LiSTModule(model="tiny-llama", lr=1e-2, export=False, adapter=LiSTAdapter(bottleneck=4))
    loop = SelfTrainingLoop(teacher_steps=2, sessions=2, unlabeled_steps=2, labeled_steps=1, meta_warmup=0.5,
                            seed=7)
    seen: dict[str, list] = {"sessions": [], "meta": [], "losses": []}

    class Spy(L.Callback):
        before: dict | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if loop.session > len(seen["sessions"]):  # the loop just started a session
                fresh = LiSTAdapter(bottleneck=4)
                fresh.adapters.extend(torch.nn.ModuleList(
                    [type(a)(64, 4) for a in pl_module.adapter.adapters]))
                fresh.reinitialise(7 + loop.session)
                state = trainer.optimizers[0].state
                seen["sessions"].append(dict(
                    teacher_is_previous_student=all(torch.equal(pl_module.teacher_state[k], v)
                                                    for k, v in self.before.items()),
                    student_is_fresh_draw=all(torch.equal(a.down.weight, b.down.weight) and
                                              torch.equal(a.up.weight, b.up.weight)
                                              for a, b in zip(pl_module.adapter.adapters, fresh.adapters)),
                    optimizer_empty=len(state) == 0,
                    teacher_frozen=all(not t.requires_grad for t in pl_module.teacher_state.values())))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.before = pl_module.adapter_state()
            if pl_module.phase == "unlabeled":
                seen["meta" if pl_module.use_meta else "losses"].append(pl_module.last_weights)

    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[loop, Spy()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(seen["sessions"]) == 2
    for session in seen["sessions"]:
        assert all(session.values()), session
    assert len(seen["meta"]) == 2
    for weights in seen["meta"]:  # meta weights: non-negative, sum to one (or all zero)
        assert (weights >= 0).all() and (abs(float(weights.sum()) - 1) < 1e-5 or float(weights.sum()) == 0)


def test_unlabeled_phase_loss_is_the_weighted_kl_only():
    module = LiSTModule(model="tiny-llama", labels=["yes", "no"], export=False,
                        adapter=LiSTAdapter(bottleneck=4))
    ids = torch.tensor([[60, 61, 62, 63, 121, 101], [64, 65, 66, 67, 110, 111]])
    labels = ids.clone()
    labels[:, :4] = -100
    labeled = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
               "class_index": torch.tensor([0, 1])}
    unlabeled = {k: v.flip(0) if isinstance(v, torch.Tensor) else v for k, v in labeled.items()}
    module.teacher_state = {k: v + 0.01 for k, v in module.adapter_state().items()}
    module.phase, module.use_meta = "unlabeled", False
    loss = module.compute_loss({**labeled, "unlabeled": unlabeled}, module(labeled), None)
    teacher = module.scores_at(module.teacher_state, unlabeled).softmax(-1)
    kl = (teacher * (teacher.log() - module.label_scores(unlabeled).log_softmax(-1))).sum(-1)
    assert torch.allclose(loss, (kl / (2 + 1e-5)).sum(), atol=1e-6)


def test_students_and_their_first_draw_follow_the_run_seed_unless_given(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    assert SelfTrainingLoop().seed == 3 and SelfTrainingLoop(seed=7).seed == 7
    assert LiSTAdapter().init_seed == 3 and LiSTAdapter(init_seed=1).init_seed == 1
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert SelfTrainingLoop().seed == 0


def test_unlabeled_batches_are_shared_out_over_ranks():
    """Under DDP each rank reads its own unlabeled batches (disjoint, together all of them), as the labeled
    loader's sampler shares the labeled data; with fewer batches than ranks every rank reads them all."""
    from types import SimpleNamespace

    batches = [{"index": torch.tensor([i])} for i in range(5)]
    seen = [[int(b["index"]) for b in SelfTrainingLoop.rank_share(batches, SimpleNamespace(world_size=2,
                                                                                          global_rank=r))]
            for r in (0, 1)]
    assert seen == [[0, 2, 4], [1, 3]]
    one = SimpleNamespace(world_size=1, global_rank=0)
    assert [int(b["index"]) for b in SelfTrainingLoop.rank_share(batches, one)] == [0, 1, 2, 3, 4]
    many = SimpleNamespace(world_size=8, global_rank=5)
    assert len(list(SelfTrainingLoop.rank_share(batches, many))) == 5
