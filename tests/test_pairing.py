"""Pairing adapter modules with checkpoint tensors, on hand-built key sets."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safelora_cli.adapter import Adapter, AdapterConfig, split_keys
from safelora_cli.adapter_tensors import SafetensorsTensors
from safelora_cli.checkpoint import Checkpoint, TensorInfo
from safelora_cli.errors import InputError, PairingError, UnsupportedError
from safelora_cli.pairing import layer_index, pair_layers

WHERE = Path("adapter")


def make_adapter(modules: dict[str, tuple[int, int, int]], extra: tuple[str, ...] = ()) -> Adapter:
    """modules: name → (out, in, r)."""
    tensors = {}
    for name, (out, inp, r) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(r, inp)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(out, r)
    for key in extra:
        tensors[key] = torch.zeros(2)
    found, other = split_keys(list(tensors), WHERE)
    # Pairing reads shapes from the adapter file's header, as a loaded adapter has them.
    weights = Path(tempfile.mkdtemp()) / "adapter_model.safetensors"
    save_file(tensors, str(weights))
    return Adapter(WHERE, AdapterConfig(r=4, lora_alpha=8), {}, SafetensorsTensors(weights), {}, found, other)


def make_checkpoint(label: str, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Checkpoint:
    file = Path(f"{label}.safetensors")
    return Checkpoint(Path(label), label, {k: TensorInfo(file, s, dtype) for k, s in shapes.items()})


def test_pairs_by_name_in_natural_layer_order() -> None:
    modules = {f"model.layers.{i}.self_attn.q_proj": (8, 6, 2) for i in (10, 2, 1)}
    weights = {f"{m}.weight": (8, 6) for m in modules}
    plans = pair_layers(make_adapter(modules), make_checkpoint("base", weights), make_checkpoint("aligned", weights))
    assert [p.layer_index for p in plans] == [1, 2, 10]
    assert plans[0].weight_key == "model.layers.1.self_attn.q_proj.weight"
    assert plans[0].scaling == 4.0  # lora_alpha 8 / r 2


def test_never_pairs_by_shape() -> None:
    """A same-shaped tensor under another name is not a match."""
    adapter = make_adapter({"model.layers.0.self_attn.q_proj": (8, 8, 2)})
    weights = {"model.layers.0.self_attn.k_proj.weight": (8, 8)}
    with pytest.raises(PairingError, match=r"no weight in the base model: model\.layers\.0\.self_attn\.q_proj\.weight"):
        pair_layers(adapter, make_checkpoint("base", weights), make_checkpoint("aligned", weights))


def test_unpaired_modules_are_all_listed() -> None:
    modules = {f"model.layers.{i}.mlp.up_proj": (8, 6, 2) for i in range(3)}
    weights = {"model.layers.0.mlp.up_proj.weight": (8, 6)}
    with pytest.raises(PairingError) as info:
        pair_layers(make_adapter(modules), make_checkpoint("base", weights), make_checkpoint("aligned", weights))
    assert "2 adapted module(s)" in info.value.message
    assert "layers.1.mlp" in info.value.message and "layers.2.mlp" in info.value.message


def test_missing_only_in_aligned_names_the_aligned_model() -> None:
    adapter = make_adapter({"model.layers.0.mlp.up_proj": (8, 6, 2)})
    weights = {"model.layers.0.mlp.up_proj.weight": (8, 6)}
    with pytest.raises(PairingError, match="aligned model"):
        pair_layers(adapter, make_checkpoint("base", weights), make_checkpoint("aligned", {}))


def test_base_aligned_shape_mismatch() -> None:
    adapter = make_adapter({"model.layers.0.mlp.up_proj": (8, 6, 2)})
    with pytest.raises(PairingError, match=r"base \(8, 6\), aligned \(8, 7\)"):
        pair_layers(adapter, make_checkpoint("base", {"model.layers.0.mlp.up_proj.weight": (8, 6)}),
                    make_checkpoint("aligned", {"model.layers.0.mlp.up_proj.weight": (8, 7)}))


def test_lora_shape_mismatch_with_weight() -> None:
    adapter = make_adapter({"model.layers.0.mlp.up_proj": (8, 5, 2)})
    weights = {"model.layers.0.mlp.up_proj.weight": (8, 6)}
    with pytest.raises(PairingError, match=r"LoRA B·A \(8, 5\)"):
        pair_layers(adapter, make_checkpoint("base", weights), make_checkpoint("aligned", weights))


def test_quantized_weights_are_refused() -> None:
    adapter = make_adapter({"model.layers.0.mlp.up_proj": (8, 6, 2)})
    weights = {"model.layers.0.mlp.up_proj.weight": (24, 1)}
    with pytest.raises(UnsupportedError, match="as U8: quantized"):
        pair_layers(adapter, make_checkpoint("base", weights, "U8"), make_checkpoint("aligned", weights, "U8"))


def test_non_lora_keys_are_kept_as_untouched() -> None:
    adapter = make_adapter({"model.layers.0.mlp.up_proj": (8, 6, 2)}, extra=("base_model.model.lm_head.weight",))
    assert adapter.other_keys == ["base_model.model.lm_head.weight"]


def test_lora_a_without_b_is_an_error() -> None:
    with pytest.raises(InputError, match="lack lora_A or lora_B: model.layers.0.mlp.up_proj"):
        split_keys(["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"], WHERE)


def test_variant_keys_are_grouped_by_module() -> None:
    """Embedding factors pair as A/B, DoRA magnitudes join their module, lora_B.bias stays untouched."""
    emb, up = "base_model.model.model.embed_tokens", "base_model.model.model.layers.0.mlp.up_proj"
    keys = [f"{emb}.lora_embedding_A", f"{emb}.lora_embedding_B", f"{up}.lora_A.weight", f"{up}.lora_B.weight",
            f"{up}.lora_magnitude_vector", f"{up}.lora_B.bias"]
    modules, other = split_keys(keys, WHERE)
    by_name = {m.module: m for m in modules}
    assert by_name["model.embed_tokens"].embedding and by_name["model.embed_tokens"].b_key == keys[1]
    assert by_name["model.layers.0.mlp.up_proj"].magnitude_key == keys[4]
    assert not by_name["model.layers.0.mlp.up_proj"].embedding
    assert other == [f"{up}.lora_B.bias"]


def test_embedding_a_without_b_is_an_error() -> None:
    with pytest.raises(InputError, match="lack lora_A or lora_B: model.embed_tokens"):
        split_keys(["base_model.model.model.embed_tokens.lora_embedding_A"], WHERE)


@pytest.mark.parametrize(
    ("module", "index"),
    [("model.layers.12.mlp.up_proj", 12), ("transformer.h.3.attn.c_attn", 3), ("lm_head", None),
     ("model.language_model.layers.0.self_attn.q_proj", 0)],
)
def test_layer_index(module: str, index: int | None) -> None:
    assert layer_index(module) == index
