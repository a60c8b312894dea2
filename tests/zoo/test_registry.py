"""zoo.registry: one consistent entry per method, resolvable targets, existing configs, tables."""

from __future__ import annotations

import importlib

import pytest

from zoo import registry

KINDS = {"module", "adapter", "callback", "loss", "datamodule", "strategy", "analysis"}


@pytest.fixture
def scratch_registry(monkeypatch):
    """An isolated copy of the registry, so test entries never leak into other tests."""
    registry.methods()  # import every method first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_import_all_methods", lambda: None)
    return registry


def test_baselines_are_registered():
    names = {m.name for m in registry.methods()}
    assert {"sft", "lora"} <= names
    assert registry.get("sft").target == "zoo.modules.base:CausalLMModule"


def test_every_entry_is_well_formed_and_resolves():
    for method in registry.methods():
        assert method.kind in KINDS, method
        assert method.paper, method
        assert method.spec == "" or (method.spec.isdigit() and len(method.spec) == 2), method
        assert method.config.startswith("configs/") and method.config.endswith(".yaml"), method
        assert method.config_path.is_file(), f"{method.name}: missing {method.config}"
        module_name, _, attr = method.target.partition(":")
        assert module_name.startswith("zoo.") and attr, method
        assert isinstance(getattr(importlib.import_module(module_name), attr), type), method
        assert method.scope, method


def test_reregistering_identically_is_fine_but_conflicts_fail(scratch_registry):
    entry = dict(name="zz-test", kind="module", paper="P (2024)", spec="99", config="configs/sft.yaml",
                 target="zoo.modules.base:CausalLMModule")
    first = scratch_registry.register(**entry)
    assert scratch_registry.register(**entry) == first
    with pytest.raises(ValueError, match="registered twice"):
        scratch_registry.register(**{**entry, "paper": "Other (2025)"})


def test_methods_sorted_baselines_first(scratch_registry):
    scratch_registry.register(name="aa-late", kind="callback", paper="P", spec="42",
                              config="configs/sft.yaml",
                              target="zoo.modules.base:CausalLMModule")
    specs = [m.spec or "00" for m in scratch_registry.methods()]
    assert specs == sorted(specs)
    assert scratch_registry.methods()[-1].name == "aa-late" or specs[-1] > "42"


def test_unknown_method_is_a_key_error():
    with pytest.raises(KeyError, match="zoo list"):
        registry.get("no-such-method")


def test_markdown_table_has_one_row_per_method():
    table = registry.markdown_table().splitlines()
    methods = registry.methods()
    assert len(table) == len(methods) + 2
    for row, method in zip(table[2:], methods):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"`{method.name}`" and cells[1] == method.kind
        assert f"`{method.config}`" in cells


def test_the_decorator_derives_the_entry_the_explicit_call_spelled_out():
    # the register(...) call masked_thought.py had before it used @register_method, field by field
    expected = registry.Method(
        name="masked_thought", kind="callback",
        paper="Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning "
              "Learning of Language Models (2024)",
        spec="18", config="configs/masked_thought.yaml",
        target="zoo.modules.token_level.masked_thought:MaskedThoughtCallback", scope="full")
    assert registry.get("masked_thought") == expected


def test_kind_comes_from_the_nearest_known_base_class(scratch_registry):
    from lightning.pytorch import Callback

    from zoo.errors import ConfigError
    from zoo.modules.adapters.base import Adapter
    from zoo.modules.base import CausalLMModule
    from zoo.modules.sparse.param_mask import ParameterMaskCallback

    class Objective(CausalLMModule):
        pass

    class Wrapper(Adapter):
        pass

    class Selector(ParameterMaskCallback):  # a Callback two levels up
        pass

    class Plain:
        pass

    decorate = scratch_registry.register_method
    assert decorate(name="zz-objective", paper="P", spec="99")(Objective) is Objective  # the class, unchanged
    decorate(name="zz-wrapper", paper="P", spec="99", config="configs/sft.yaml")(Wrapper)
    decorate(name="zz-selector", paper="P", spec="99", kind="strategy")(Selector)  # an explicit kind wins
    entries = {name: scratch_registry.get(name) for name in ("zz-objective", "zz-wrapper", "zz-selector")}
    assert [e.kind for e in entries.values()] == ["module", "adapter", "strategy"]
    assert entries["zz-objective"].config == "configs/zz-objective.yaml"
    assert entries["zz-wrapper"].config == "configs/sft.yaml"
    local = "test_kind_comes_from_the_nearest_known_base_class.<locals>.Objective"
    assert entries["zz-objective"].target.endswith(f":{local}")
    assert scratch_registry.kind_of(Callback) == scratch_registry.kind_of(Selector) == "callback"
    with pytest.raises(ConfigError, match="kind="):
        decorate(name="zz-plain", paper="P", spec="99")(Plain)


def test_method_packages_come_from_the_installed_entry_points():
    # pyproject.toml: [project.entry-points."zoo.methods"] zoo = "zoo.modules"
    assert "zoo.modules" in registry.method_packages()
