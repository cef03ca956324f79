"""EAGLE-3 drafters in the config: the kind, its recipe, the arms that serve it and their K, the
launcher's checks of a head directory, and the cost step that cannot time a head alone (no servers)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from core.arms import TRAINED_STEPS_FIELD, missing_inputs, vllm_command
from core.config import ConfigError, DrafterConfig, load_config, parse_config
from core.paths import drafter_dir
from drafters.recipe import HeadRecipe, Recipe, recipe_for


def experiment(drafters=(), arms=(), **extra) -> dict:
    return {"name": "t", "target": {"name": "tiny"}, "drafters": list(drafters),
            "arms": [{"name": "baseline"}, *arms], **extra}


GENERIC = {"name": "generic", "kind": "eagle3", "init": "target"}
FINETUNED = {"name": "ft", "kind": "eagle3", "init": "generic", "tasks": ["gsm8k"]}
DRAFT_MODEL = {"name": "small"}


def arm(name="head", **speculative) -> dict:
    return {"name": name, "speculative": {"method": "eagle3", "num_speculative_tokens": 2, **speculative}}


def test_a_generic_and_a_fine_tuned_head_with_their_arms_load(tmp_path):
    config = parse_config(experiment(
        [GENERIC, {**FINETUNED, "recipe": {"ttt_steps": 3}}, DRAFT_MODEL],
        [arm("g", drafter="generic"), arm("f", drafter="ft", num_speculative_tokens=3),
         arm("external", model="/models/llama-eagle3", num_speculative_tokens=5),
         {"name": "d", "speculative": {"method": "draft_model", "drafter": "small", "num_speculative_tokens": 4}}]),
        tmp_path / "exp.yaml")
    assert [d.kind for d in config.drafters] == ["eagle3", "eagle3", "draft_model"]
    assert [d.draft_steps() for d in config.drafters] == [2, 3, None]


@pytest.mark.parametrize("data, words", [
    (experiment([DRAFT_MODEL], [arm(drafter="small")]),
     "arm 'head' has method 'eagle3' but drafter 'small' is of kind draft_model (give it method: draft_model"),
    (experiment([GENERIC], [{"name": "d", "speculative": {"method": "draft_model", "drafter": "generic",
                                                           "num_speculative_tokens": 2}}]),
     "arm 'd' has method 'draft_model' but drafter 'generic' is of kind eagle3"),
    (experiment([GENERIC], [arm(drafter="generic", num_speculative_tokens=3)]),
     "arm 'head' drafts K = 3 tokens but EAGLE-3 head 'generic' is trained for 2 draft steps: "
     "raise drafters.generic.recipe.ttt_steps to 3 or lower num_speculative_tokens to 2"),
    (experiment([GENERIC, {**FINETUNED, "recipe": {"ttt_steps": 1}}], [arm(drafter="ft")]),
     "trained for 1 draft steps"),
    (experiment([DRAFT_MODEL, {**FINETUNED, "init": "small"}]),
     "drafter 'ft' (kind eagle3) starts from 'small', a drafter of kind draft_model: a drafter continues one of "
     "its own kind (init: target builds a fresh eagle3)"),
    (experiment([GENERIC, {"name": "cut", "init": "generic"}]), "starts from 'generic', a drafter of kind eagle3"),
    (experiment(arms=[arm()]), "method 'eagle3' needs 'drafter'"),
    (experiment([GENERIC], [arm(drafter="generic", use_heterogeneous_vocab=True)]),
     "use_heterogeneous_vocab is for draft models"),
    (experiment([GENERIC], [arm(drafter="generic")], cost={"k_sweep": [1, 4], "sweep_arms": ["head"]}),
     "cost.k_sweep, for arm 'head', drafts K = 4 tokens but EAGLE-3 head 'generic' is trained for 2 draft steps: "
     "raise drafters.generic.recipe.ttt_steps to 4 or lower cost.k_sweep to 2"),
    (experiment([{**GENERIC, "kind": "medusa"}]), "drafters.0.kind"),
])
def test_eagle3_config_errors_say_what_to_change(tmp_path, data, words):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert words in message, message


def test_head_recipes_have_their_own_fields_and_defaults():
    head = recipe_for(DrafterConfig(**GENERIC))
    assert isinstance(head, HeadRecipe)
    assert (head.ttt_steps, head.step_decay, head.aux_layers, head.norm_before_residual) == (2, 1.0, None, False)
    assert head.vocab_size is None and head.learning_rate == 1e-3  # a head's defaults, not a draft model's
    assert (head.max_steps, head.top_k, head.batch_tokens) == (Recipe().max_steps, Recipe().top_k,
                                                              Recipe().batch_tokens)
    assert isinstance(recipe_for(DrafterConfig(**DRAFT_MODEL)), Recipe)
    tuned = recipe_for(DrafterConfig(**{**FINETUNED, "recipe": {"ttt_steps": 3, "learning_rate": 5e-4}}))
    assert (tuned.ttt_steps, tuned.learning_rate) == (3, 5e-4)


@pytest.mark.parametrize("drafter, words", [
    ({**GENERIC, "recipe": {"layers": 2}}, "drafters.generic.recipe.layers: a field for draft models "
                                           "(kind: draft_model), not for this drafter of kind eagle3; remove it"),
    ({**GENERIC, "recipe": {"freeze_embedding": True}}, "drafters.generic.recipe.freeze_embedding: a field for "
                                                        "draft models"),
    ({**DRAFT_MODEL, "recipe": {"ttt_steps": 3}}, "drafters.small.recipe.ttt_steps: a field for EAGLE-3 heads "
                                                  "(kind: eagle3), not for this drafter of kind draft_model"),
    ({**FINETUNED, "recipe": {"aux_layers": [1, 2, 3]}}, "drafters.ft.recipe.aux_layers: a drafter fine-tuned "
                                                         "from 'generic' inherits its shape"),
    ({**FINETUNED, "recipe": {"vocab_size": 4096}}, "drafters.ft.recipe.vocab_size: a drafter fine-tuned"),
    ({**GENERIC, "recipe": {"aux_layers": [2, 2, 5]}}, "drafters.generic.recipe.aux_layers: [2, 2, 5]: "
                                                       "need distinct layer ids"),
    ({**GENERIC, "recipe": {"ttt_steps": 0}}, "drafters.generic.recipe.ttt_steps: Input should be greater than"),
    ({**GENERIC, "recipe": {"step_decay": 1.5}}, "drafters.generic.recipe.step_decay"),
    ({**GENERIC, "recipe": {"lerning_rate": 1e-3}}, "drafters.generic.recipe.lerning_rate: Extra inputs"),
])
def test_head_recipe_errors_name_the_field(drafter, words):
    with pytest.raises(ConfigError) as err:
        recipe_for(DrafterConfig(**drafter))
    assert words in str(err.value), str(err.value)


def _launcher_config(tmp_path, arms):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    return parse_config({"name": "t", "cache_dir": str(tmp_path / "cache"),
                         "target": {"name": "tiny", "source": "path", "path": str(tmp_path / "model")},
                         "drafters": [GENERIC, {**FINETUNED, "recipe": {"ttt_steps": 3}}],
                         "arms": [{"name": "baseline"}, *arms]}, tmp_path / "exp.yaml")


def _head_dir(path, steps):
    path.mkdir(parents=True, exist_ok=True)
    fields = {"architectures": ["LlamaForCausalLMEagle3"]} | ({TRAINED_STEPS_FIELD: steps} if steps else {})
    (path / "config.json").write_text(json.dumps(fields))
    return path


def test_an_eagle3_arm_is_launched_with_its_head_directory_and_no_draft_model_keys(tmp_path):
    config = _launcher_config(tmp_path, [arm("g", drafter="generic"), arm("f", drafter="ft", num_speculative_tokens=3)])
    cmd = vllm_command(config, config.arm("f"), 8125)
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == {"method": "eagle3", "model": str(drafter_dir(config, "ft")), "num_speculative_tokens": 3}
    assert missing_inputs(config, config.arm("g")) == [
        f"drafter 'generic' is not built at {drafter_dir(config, 'generic')} "
        "(run `specdrift drafter distill --drafter generic`)"]
    _head_dir(drafter_dir(config, "generic"), 2)
    assert missing_inputs(config, config.arm("g")) == []
    _head_dir(drafter_dir(config, "ft"), 2)  # built for fewer steps than the config now asks
    assert "trained for 2 draft steps" in missing_inputs(config, config.arm("f"))[0]


def test_an_external_head_needs_a_config_and_enough_trained_steps(tmp_path):
    external = tmp_path / "external"
    config = _launcher_config(tmp_path, [arm("x", model=str(external), num_speculative_tokens=3),
                                         arm("hub", model="org/llama-eagle3", num_speculative_tokens=3)])
    assert missing_inputs(config, config.arm("hub")) == []  # a name vLLM resolves from a mounted HF cache
    [problem] = missing_inputs(config, config.arm("x"))
    assert problem == f"EAGLE-3 head {external} has no config.json (give a directory holding a head in the " \
                      "speculators or vLLM format)"
    _head_dir(external, None)  # trained elsewhere: no record of its steps, so any K
    assert missing_inputs(config, config.arm("x")) == []
    _head_dir(external, 2)
    [problem] = missing_inputs(config, config.arm("x"))
    assert problem == (f"EAGLE-3 head {external} is trained for 2 draft steps ({TRAINED_STEPS_FIELD}), fewer than "
                       "num_speculative_tokens 3: lower it, or train the head for 3")
    _head_dir(external, 3)
    assert missing_inputs(config, config.arm("x")) == []


def test_the_cost_step_skips_a_head_and_says_why(tmp_path):
    from specdrift.cost import draft_model_path, measure_costs

    config = _launcher_config(tmp_path, [arm("g", drafter="generic")])
    assert draft_model_path(config, config.arm("g")) is None
    said = []
    measured = measure_costs(config, ["baseline", "g"], "http://127.0.0.1:1", [{"messages": []}] * 8,
                             tmp_path / "cost.json", tmp_path, progress=said.append)
    assert measured == {}
    assert said == ["cost g: not measured alone (an EAGLE-3 head reads the target's hidden states, so vLLM cannot "
                    "serve it without the target); its step cost r comes from the served TPOT"]


def test_the_chain_tau_is_the_draft_models_when_every_step_hits_alike():
    """With the same hits at every unrolled step the chain is a draft model's: both walks agree."""
    from drafters.train import chain_tau, simulated_tau

    generator = torch.Generator().manual_seed(0)
    correct = [torch.rand(n, generator=generator) < 0.6 for n in (1, 2, 7, 30)]
    for k in (1, 2, 3):
        assert chain_tau([c.expand(k, -1) for c in correct], k) == pytest.approx(simulated_tau(correct, k))
    # The draft model's walk by hand: steps at response tokens 1, 3 and 6 accept 1, 2 and 1 drafts.
    assert simulated_tau([torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)], 2) == pytest.approx(7 / 3)
    # A head whose second step never hits accepts at most one draft per step.
    hits = torch.ones(2, 9, dtype=torch.bool)
    hits[1] = False
    assert chain_tau([hits], 2) == pytest.approx(2.0) and chain_tau([torch.ones(2, 9, dtype=torch.bool)], 2) == 3.0
