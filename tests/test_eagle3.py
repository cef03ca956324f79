"""EAGLE-3 heads (drafters/eagle3.py) on a tiny random Llama target: shapes, the training-time
test's training and resume, and the saved directory as vLLM's own config parser and Eagle3 weight
loader read it (in a child process: the loader needs vLLM's distributed state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drafters import eagle3
from drafters.eagle3 import (ARCHITECTURE, TRAINED_STEPS_FIELD, default_aux_layers, head_example, head_from_target,
                             load_head, save_head, target_features, train_head, weights_in)
from drafters.recipe import REDUCED_RECIPE, Recipe
from drafters.vocab import VocabMap

VOCAB, HIDDEN, LAYERS = 64, 16, 8
KEPT = list(range(0, VOCAB, 2))  # a trimmed draft vocabulary: the even target ids


def _target(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                                        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=256)).eval()


def _examples(target, vocab: VocabMap, n: int, seed: int):
    """Responses as the cache holds them (random prompts and outputs, the target's own top-4 at each
    output position), made into head examples."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (4 + i % 3,), generator=generator).tolist()
        output = torch.randint(3, VOCAB, (5 + i % 4,), generator=generator).tolist()
        with torch.no_grad():
            logits = target(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
        top = torch.log_softmax(logits, -1).topk(4, dim=-1)
        response = {"prompt_ids": prompt, "output_ids": output, "topk_ids": top.indices.tolist(),
                    "topk_logprobs": top.values.tolist()}
        out.append(head_example("t", response, vocab, max_seq_len=64))
    return out


def test_features_without_logits_stop_at_the_deepest_aux_layer_and_equal_the_full_pass():
    target = _target()
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(target.model.layers)]
    early, none = target_features(target, ids, mask, [1, 4, 5], logits=False)
    assert none is None and ran == list(range(5))  # layer 5's input is layer 4's output: layers 5..7 never run
    ran.clear()
    full, _ = target_features(target, ids, mask, [1, 4, 5], logits=True)
    for hook in hooks:
        hook.remove()
    assert ran == list(range(LAYERS)) and torch.equal(early, full)


def test_target_features_are_the_residual_stream_vllm_feeds_and_the_head_has_its_shapes():
    target = _target()
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    layers = [2, 5, LAYERS]
    features, logits = target_features(target, ids, mask, layers)
    assert features.shape == (2, 7, 3 * HIDDEN) and logits.shape == (2, 7, VOCAB)
    with torch.no_grad():
        out = target(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last_layer = []
        hook = target.model.layers[-1].register_forward_hook(lambda m, a, o: last_layer.append(o))
        target(input_ids=ids, attention_mask=mask)
        hook.remove()
    last = last_layer[0][0] if isinstance(last_layer[0], tuple) else last_layer[0]
    # Layer id L is what enters layer L: hidden_states[L], and for L = num_layers the last layer's
    # output before the final norm (transformers' last hidden state is after it).
    assert torch.equal(features[..., :HIDDEN], out.hidden_states[2])
    assert torch.equal(features[..., HIDDEN:2 * HIDDEN], out.hidden_states[5])
    assert torch.equal(features[..., 2 * HIDDEN:], last)
    assert not torch.allclose(last, out.hidden_states[LAYERS])
    assert torch.equal(logits, out.logits)

    assert default_aux_layers(30) == [2, 15, 27]  # what vLLM picked for SmolLM2-135M
    head = head_from_target(target, KEPT)
    assert head.aux_layer_ids == default_aux_layers(LAYERS)
    features, _ = target_features(target, ids, mask, head.aux_layer_ids)
    positions = torch.arange(7).expand(2, 7)
    past: list = []
    logits1, hidden1 = head(features, head.embed(ids), positions, mask, past)
    assert logits1.shape == (2, 7, len(KEPT)) and hidden1.shape == (2, 7, HIDDEN)
    select = mask.bool() & (positions >= 2)
    logits2, hidden2 = head(hidden1, head.embed(ids), positions + 1, mask, past, select=select)
    assert logits2.shape == (int(select.sum()), len(KEPT)) and hidden2.shape == (2, 7, HIDDEN)
    assert len(past) == 2

    # The target's embedding (and, for the full vocabulary, its output head) are used frozen, not trained or saved.
    full = head_from_target(target)
    trainable = {n for n, p in full.named_parameters()}
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in trainable | set(full.state_dict()))
    assert "lm_head.weight" in dict(head.named_parameters()) and "embed_tokens.weight" not in head.state_dict()
    assert torch.equal(head.lm_head.weight, target.lm_head.weight[torch.tensor(KEPT)])

    # Causal: what a later position reads changes nothing before it, at any step.
    changed = features.clone()
    changed[:, -1] += 1
    with torch.no_grad():
        past_a, past_b = [], []
        a, hidden_a = head(features, head.embed(ids), positions, past=past_a)
        b, hidden_b = head(changed, head.embed(ids), positions, past=past_b)
        a2, _ = head(hidden_a, head.embed(ids), positions + 1, past=past_a)
        b2, _ = head(hidden_b, head.embed(ids), positions + 1, past=past_b)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    assert torch.equal(a2[:, :-1], b2[:, :-1])


@torch.no_grad()
def test_the_unrolled_steps_equal_drafting_one_token_at_a_time_as_vllm_does():
    """vLLM drafts step j at anchor t with step 1's KV cache for positions 0..t plus the entries
    steps 2..j-1 wrote for this chain: one causal pass over those inputs. The training's unrolled
    steps (all anchors at once) must give the same logits."""
    target = _target()
    head = head_from_target(target, KEPT)
    length, steps = 9, 3
    ids = torch.randint(0, VOCAB, (1, length))
    features, _ = target_features(target, ids, None, head.aux_layer_ids)
    embeds = head.embed(ids)
    positions = torch.arange(length)[None]
    unrolled, hidden, past = [], features, []
    for j in range(steps):
        step_embeds = torch.zeros_like(embeds)
        step_embeds[:, :length - 1 - j] = embeds[:, 1 + j:]
        logits, hidden = head(hidden, step_embeds, positions + j, past=past)
        unrolled.append(logits)
    for anchor in range(length - steps):
        chain_hidden, chain_embeds = head.fc(features[:, :anchor + 1]), embeds[:, 1:anchor + 2]
        for j in range(steps):
            logits, out = head(chain_hidden, chain_embeds, positions[:, :chain_hidden.shape[1]])
            assert torch.allclose(logits[0, -1], unrolled[j][0, anchor], atol=1e-5), (anchor, j)
            # The next step reads this step's own output and the next token, one position on.
            chain_hidden = torch.cat([chain_hidden, out[:, -1:]], dim=1)
            chain_embeds = torch.cat([chain_embeds, embeds[:, anchor + 2 + j:anchor + 3 + j]], dim=1)


def test_saved_head_has_vllms_config_fields_and_loads_back_tensor_for_tensor(tmp_path):
    target = _target()
    head = head_from_target(target, KEPT, aux_layer_ids=[6, 1, 4], norm_before_residual=True)
    save_head(head, tmp_path / "trimmed", dtype="float32", trained_draft_steps=3)
    config = json.loads((tmp_path / "trimmed" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "llama"
    assert (config["draft_vocab_size"], config["vocab_size"], config["target_hidden_size"]) == (len(KEPT), VOCAB, HIDDEN)
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 4, 6]  # layer order: how vLLM concatenates them
    assert config["norm_before_residual"] is True and config[TRAINED_STEPS_FIELD] == 3
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    tensors = load_file(tmp_path / "trimmed" / "model.safetensors")
    assert "embed_tokens.weight" not in tensors and tensors["lm_head.weight"].shape == (len(KEPT), HIDDEN)
    assert (tensors["d2t"] + torch.arange(len(KEPT))).tolist() == KEPT
    assert tensors["t2d"].dtype == torch.bool and tensors["t2d"].nonzero().flatten().tolist() == KEPT
    assert tensors["fc.weight"].shape == (HIDDEN, 3 * HIDDEN)
    assert tensors["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * HIDDEN

    loaded = load_head(tmp_path / "trimmed", target)
    assert loaded.trained_draft_steps == 3 and loaded.target_ids == KEPT and loaded.config.norm_before_residual
    assert loaded.state_dict().keys() == head.state_dict().keys()
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    full = head_from_target(target)
    save_head(full, tmp_path / "full")  # bfloat16, as the arms serve
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["draft_vocab_size"] == VOCAB and config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    tensors = load_file(tmp_path / "full" / "model.safetensors")
    assert not {"lm_head.weight", "d2t", "t2d", "embed_tokens.weight"} & set(tensors)
    assert tensors["fc.weight"].dtype == torch.bfloat16 and config["dtype"] == "bfloat16"

    with pytest.raises(ValueError, match="distinct"):
        head_from_target(_target(), aux_layer_ids=[2, 2, 5])


def _recipe(**overrides) -> Recipe:
    return Recipe.model_validate({**REDUCED_RECIPE, "batch_tokens": 64, "warmup_steps": 2, "learning_rate": 1e-2,
                                  "device": "cpu", **overrides})


def test_tiny_training_with_two_unrolled_steps_lowers_the_loss(tmp_path):
    target = _target()
    vocab = VocabMap(VOCAB, KEPT, unk_id=0)
    train_set, holdout = _examples(target, vocab, 24, seed=1), _examples(target, vocab, 4, seed=2)
    head = head_from_target(target, KEPT)
    record = train_head(head, target, train_set, holdout, _recipe(max_steps=40, eval_every_steps=40),
                        tmp_path / "c.pt", ttt_steps=2, progress=lambda m: None)
    assert record["steps"] == 40 and record["ttt_steps"] == 2 and head.trained_draft_steps == 2
    assert record["loss_last"] < 0.9 * record["loss_first"], record
    after = record["holdout_after"]
    assert len(after["top1_agreement_by_step"]) == 2 and all(n > 0 for n in after["tokens_by_step"])
    # Step 2 is scored at one anchor fewer per example than step 1.
    assert after["tokens_by_step"][1] == after["tokens_by_step"][0] - len(holdout)


def test_cached_target_features_give_the_draft_steps_running_the_target_gives():
    target = _target()
    vocab = VocabMap(VOCAB, KEPT, unk_id=0)
    examples = _examples(target, vocab, 6, seed=3)  # 9 to 15 tokens: the batch is padded
    head = head_from_target(target, KEPT)
    cache = eagle3.example_features(target, examples, head.aux_layer_ids, 0, torch.device("cpu"), batch_tokens=40)
    assert set(cache) == {id(e) for e in examples}
    assert all(cache[id(e)].shape == (len(e.input_ids), 3 * HIDDEN) for e in examples)
    with torch.no_grad():
        direct = eagle3._unrolled(head, target, examples, 0, torch.device("cpu"), 2)
        cached = eagle3._unrolled(head, target, examples, 0, torch.device("cpu"), 2, cache)
    for (logits, ids, _, scored), (logits_c, ids_c, _, scored_c) in zip(direct, cached):
        assert torch.equal(scored, scored_c) and torch.equal(ids, ids_c)
        torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)


def test_features_over_the_memory_limit_are_not_cached_and_training_runs_the_target(tmp_path, monkeypatch):
    target = _target()
    vocab = VocabMap(VOCAB, KEPT, unk_id=0)
    examples = _examples(target, vocab, 4, seed=4)
    monkeypatch.setattr(eagle3, "FEATURE_CACHE_MAX_BYTES", 4 * 3 * HIDDEN * 10)  # 10 tokens' worth
    assert eagle3.example_features(target, examples, [2, 4, 5], 0, torch.device("cpu"), 64) is None
    lines = []
    record = train_head(head_from_target(target, KEPT), target, examples, examples[:1], _recipe(max_steps=2),
                        tmp_path / "c.pt", ttt_steps=2, progress=lines.append)
    assert record["steps"] == 2 and any("every step runs the target" in line for line in lines)


def test_features_in_the_served_dtype_come_from_a_bfloat16_twin_and_the_target_is_left_float32(tmp_path, monkeypatch):
    target = _target()
    twin = weights_in(target, torch.bfloat16)
    assert weights_in(target, torch.float32) is target
    assert all(p.dtype == torch.bfloat16 for p in twin.parameters())
    assert twin.model.rotary_emb.inv_freq.dtype == torch.float32  # as in a model loaded in bfloat16
    ids = torch.randint(0, VOCAB, (2, 9))
    f32 = target_features(target, ids, torch.ones_like(ids), [2, 4, 5], logits=False)[0]
    bf16 = target_features(twin, ids, torch.ones_like(ids), [2, 4, 5], logits=False)[0]
    assert bf16.dtype == torch.bfloat16 and not torch.equal(bf16.float(), f32)
    torch.testing.assert_close(bf16.float(), f32, rtol=0.05, atol=0.05)

    vocab = VocabMap(VOCAB, KEPT, unk_id=0)
    examples = _examples(target, vocab, 4, seed=5)
    seen = []
    real = eagle3.example_features
    monkeypatch.setattr(eagle3, "example_features", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    record = train_head(head_from_target(target, KEPT), target, examples, examples[:1], _recipe(max_steps=2),
                        tmp_path / "c.pt", ttt_steps=2, feature_dtype="bfloat16", progress=lambda m: None)
    assert record["feature_dtype"] == "bfloat16" and record["steps"] == 2
    assert [next(m.parameters()).dtype for m in seen] == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in target.parameters())


def test_a_resumed_head_training_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    recipe = _recipe(max_steps=7, eval_every_steps=3)

    def setup():
        target = _target()
        vocab = VocabMap(VOCAB, KEPT, unk_id=0)
        torch.manual_seed(5)
        return target, head_from_target(target, KEPT), _examples(target, vocab, 12, 1), _examples(target, vocab, 2, 2)

    target, whole, examples, holdout = setup()
    uninterrupted = train_head(whole, target, examples, holdout, recipe, tmp_path / "whole.pt", ttt_steps=2,
                               progress=lambda m: None)

    class Interrupted(Exception):
        pass

    real_save = torch.save

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise Interrupted

    target, interrupted, examples, holdout = setup()
    monkeypatch.setattr(torch, "save", save_then_stop)
    with pytest.raises(Interrupted):  # right after the checkpoint at step 3, mid-epoch
        train_head(interrupted, target, examples, holdout, recipe, tmp_path / "resumed.pt", ttt_steps=2,
                   progress=lambda m: None)
    monkeypatch.setattr(torch, "save", real_save)
    target, resumed, examples, holdout = setup()  # a new process: fresh weights, then the checkpoint
    record = train_head(resumed, target, examples, holdout, recipe, tmp_path / "resumed.pt", ttt_steps=2,
                        progress=lambda m: None)
    assert record["steps"] == 7 and record["train_tokens"] == uninterrupted["train_tokens"]
    assert resumed.state_dict().keys() == whole.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


VLLM_CHECK = r"""
import json, socket, sys
import torch
from safetensors.torch import load_file
from vllm.config import DeviceConfig, ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.models.registry import ModelRegistry

target_dir, heads = sys.argv[1], sys.argv[2:]
target = ModelConfig(model=target_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=128)
report = {}
for i, head_dir in enumerate(heads):
    spec = SpeculativeConfig(target_model_config=target, target_parallel_config=ParallelConfig(), model=head_dir,
                             method="eagle3", num_speculative_tokens=2)
    hf = spec.draft_model_config.hf_config
    cls, arch = ModelRegistry.resolve_model_cls(spec.draft_model_config.architectures, spec.draft_model_config)
    vllm_config = VllmConfig(model_config=target, speculative_config=spec, device_config=DeviceConfig("cpu"))
    with set_current_vllm_config(vllm_config):
        if i == 0:
            s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                         local_rank=0, backend="gloo")
            initialize_model_parallel(1, 1)
        model = cls(vllm_config=vllm_config)
    weights = load_file(f"{head_dir}/model.safetensors")
    model.load_weights(weights.items())  # raises on a name it cannot map
    params = dict(model.named_parameters())
    w = {k: v.float() for k, v in weights.items() if v.is_floating_point()}
    pre = "model.layers.0."
    a = pre + "self_attn."
    m = pre + "mlp."
    expected = {
        "model.fc.weight": w["fc.weight"],
        "model.norm.weight": w["norm.weight"],
        a + "qkv_proj.weight": torch.cat([w[a[6:] + p + "_proj.weight"] for p in "qkv"]),
        a + "o_proj.weight": w[a[6:] + "o_proj.weight"],
        m + "gate_up_proj.weight": torch.cat([w[m[6:] + "gate_proj.weight"], w[m[6:] + "up_proj.weight"]]),
        m + "down_proj.weight": w[m[6:] + "down_proj.weight"],
        **{pre + n + ".weight": w[pre[6:] + n + ".weight"]
           for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")},
    }
    if "lm_head.weight" in w:
        expected["lm_head.weight"] = w["lm_head.weight"]
    matched = sorted(n for n, t in expected.items() if torch.equal(params[n].detach().float()[: len(t)], t))
    d2t = getattr(model, "draft_id_to_target_id", None)
    report[head_dir] = {
        "config_class": type(hf).__name__, "architectures": list(hf.architectures), "class": cls.__name__,
        "draft_vocab_size": hf.draft_vocab_size, "target_hidden_size": hf.target_hidden_size,
        "aux_layers": list(hf.eagle_aux_hidden_state_layer_ids), "norm_before_residual": hf.norm_before_residual,
        "num_aux_hidden_states": model.model.num_aux_hidden_states, "fc_input_size": model.model.fc_input_size,
        "expected": sorted(expected), "matched": matched,
        "d2t_equal": None if d2t is None else torch.equal(d2t.cpu(), weights["d2t"]),
        "has_own_lm_head": getattr(model, "has_own_lm_head", None),
        "has_own_embed_tokens": getattr(model, "has_own_embed_tokens", None),
    }
print("REPORT " + json.dumps(report))
"""


def test_vllm_parses_the_saved_head_as_an_eagle3_draft_and_its_loader_maps_every_tensor(tmp_path):
    target = _target()
    target.save_pretrained(tmp_path / "target")
    trimmed, full = tmp_path / "trimmed", tmp_path / "full"
    save_head(head_from_target(target, KEPT, aux_layer_ids=[1, 4, 6]), trimmed, dtype="float32", trained_draft_steps=2)
    save_head(head_from_target(target), full, dtype="float32", trained_draft_steps=2)
    result = subprocess.run([sys.executable, "-c", VLLM_CHECK, str(tmp_path / "target"), str(trimmed), str(full)],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    report = json.loads(lines[0].removeprefix("REPORT "))

    for head_dir, vocab_size, layers in ((trimmed, len(KEPT), [1, 4, 6]), (full, VOCAB, [2, 4, 5])):
        seen = report[str(head_dir)]
        assert seen["config_class"] == "EAGLEConfig" and seen["architectures"] == [ARCHITECTURE]
        assert seen["class"] == "Eagle3LlamaForCausalLM"
        assert (seen["draft_vocab_size"], seen["target_hidden_size"], seen["aux_layers"]) == (vocab_size, HIDDEN, layers)
        assert seen["norm_before_residual"] is False
        assert (seen["num_aux_hidden_states"], seen["fc_input_size"]) == (3, 3 * HIDDEN)
        assert seen["matched"] == seen["expected"]  # every saved weight landed in vLLM's parameter, unchanged
        assert seen["has_own_embed_tokens"] is False  # so vLLM shares the target's embedding
    assert report[str(trimmed)]["d2t_equal"] is True and report[str(trimmed)]["has_own_lm_head"] is True
    assert report[str(full)]["d2t_equal"] is None and report[str(full)]["has_own_lm_head"] is False
    assert "lm_head.weight" not in report[str(full)]["expected"]
