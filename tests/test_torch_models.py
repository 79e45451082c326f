"""aimdo.torch.offload on the model classes people run, built from their libraries' config
classes with tiny sizes and random bf16 weights: outputs bit for bit and of the same
types, generate(), a pipeline holding the model, tied weights, host bytes, undo."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")  # the test extra installs these: a skip is a setup error
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import aimdo.torch as atorch  # noqa: E402
from conftest import PAGE  # noqa: E402
from torch_support import new_manager, where  # noqa: E402


def distinct_weight_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def on_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def qwen_image():
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(8, 12, 12),
    )
    inputs = {
        "hidden_states": bf16(1, 16, 16),
        "encoder_hidden_states": bf16(1, 6, 32),
        "encoder_hidden_states_mask": torch.ones(1, 6),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, 4, 4)],
        "return_dict": True,
    }
    return model, inputs


def flux():
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    )
    inputs = {
        "hidden_states": bf16(1, 16, 16),
        "encoder_hidden_states": bf16(1, 6, 32),
        "pooled_projections": bf16(1, 32),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(6, 3),
        "return_dict": False,  # a tuple, this time
    }
    return model, inputs


def wan():
    # Owns scale_shift_table at its top level: a weight of the module offloaded itself.
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    )
    inputs = {
        "hidden_states": bf16(1, 4, 2, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": bf16(1, 6, 32),
        "return_dict": True,
    }
    return model, inputs


def build(make):
    torch.manual_seed(0)
    model, inputs = make()
    return model.to(torch.bfloat16).eval(), on_device(inputs, where(0))


def sample(output):
    return output.sample if hasattr(output, "sample") else output[0]


@pytest.mark.parametrize("make", [qwen_image, flux, wan], ids=["qwen-image", "flux", "wan"])
@pytest.mark.parametrize("pages", [16, 0], ids=["resident", "all-offloaded"])
def test_diffusers_transformers_run_in_place_bit_for_bit(make_manager, make, pages):
    model, inputs = build(make)
    with torch.no_grad():
        expected = copy.deepcopy(model).to(where(0))(**inputs)
    state = {name: (t, t.clone()) for name, t in model.state_dict(keep_vars=True).items()}
    weights = distinct_weight_bytes(model)
    manager = new_manager(make_manager, pages=pages, headroom=0 if pages else PAGE)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        assert weights <= offloaded.pinned_bytes <= 1.05 * weights
        assert model.device == where(0) and model.dtype == torch.bfloat16
        for _ in range(3):
            output = model(**inputs)
            assert type(output) is type(expected)
            assert torch.equal(sample(output), sample(expected))
        stats = offloaded.last_stats
        blocks = len(offloaded.placement())
        if pages:
            assert (stats.hits, stats.bytes_copied) == (blocks, 0)
        else:
            assert stats.offloaded_layers == stats.layers >= blocks
    assert offloaded.pinned_bytes == 0
    after = model.state_dict(keep_vars=True)
    for name, (tensor, values) in state.items():
        assert after[name] is tensor and torch.equal(tensor, values), name


def test_a_pipeline_holding_the_model_runs_it_on_the_compute_device(make_manager):
    class Denoise(diffusers.DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

        def __call__(self, **inputs):
            return self.transformer(**inputs)

    model, inputs = build(wan)
    with torch.no_grad():
        expected = copy.deepcopy(model).to(where(0))(**inputs)
    pipeline = Denoise(model)
    with atorch.offload(model, 0, manager=new_manager(make_manager, pages=16)) as offloaded:
        assert pipeline.device == pipeline._execution_device == offloaded.device
        assert torch.equal(pipeline(**inputs).sample, expected.sample)


def llama(tie: bool = True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("pages", [8, 1], ids=["resident", "one-page"])
def test_llama_with_tied_embeddings_generates_the_same_tokens(make_manager, pages):
    model = llama()
    ids = torch.tensor([[3, 141, 59, 26, 535]]).to(where(0))
    plain = copy.deepcopy(model).to(where(0))
    with torch.no_grad():
        logits = plain(ids).logits
    tokens = plain.generate(ids, max_new_tokens=8, do_sample=False)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    manager = new_manager(make_manager, pages=pages)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        names = [name for name, _, _ in offloaded.placement()]
        assert "model.embed_tokens" in names and "lm_head" not in names  # placed once
        assert offloaded.pinned_bytes <= 1.05 * distinct_weight_bytes(model)
        assert model.device == where(0)
        output = model(ids)
        assert type(output) is transformers.modeling_outputs.CausalLMOutputWithPast
        assert torch.equal(output.logits, logits)
        # Copied once in the first forward: the head finds the embedding in place, or the
        # budget of one page takes it out between them and it is offloaded then.
        assert offloaded.last_stats.bytes_copied >= distinct_weight_bytes(model)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    assert model.lm_head.weight is embedding and model.model.embed_tokens.weight is embedding


def test_llama_decodes_through_the_prefetch_trials(make_manager, monkeypatch):
    import aimdo._torch_tune as tune
    from aimdo.predict import PredictedStep

    def predict(manager, device, sizes, seconds, *, steps, prefetch, staging_bytes, first=()):
        return [PredictedStep(seconds=0.5 if prefetch == tune.START else 1.0)]

    monkeypatch.setattr(tune, "predict_offload", predict)
    model = llama()
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1024, (1, 40), generator=generator).to(where(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # padded on the left: the mask is passed at every decode, a column longer
    plain = copy.deepcopy(model).to(where(0))
    tokens = plain.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    manager = new_manager(make_manager, pages=1)
    with atorch.offload(model, 0, manager=manager, prefetch="auto") as offloaded:
        seconds = {2: 1.0, 3: 0.875, 4: 2.0}
        ticks = [0.0]

        def clock() -> float:
            read = ticks[0]
            ticks[0] += seconds[offloaded.prefetch]
            return read

        offloaded._runner.tuner.clock = clock
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, tokens)
        # The prefill learns the order, the first decode is timed and predicted, the
        # next six decodes try 2, 3 and 4 (alike: only the mask grew), and 3 stays.
        assert offloaded.prefetch_measured == {2: 1.0, 3: 0.875, 4: 2.0}
        assert offloaded.prefetch == 3 and not offloaded.prefetch_choosing
