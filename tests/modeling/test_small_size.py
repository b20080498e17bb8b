import torch

from radgrounder.modeling import init_model, load_model


def test_small_size_initialises_loads_and_runs(tmp_path):
    loaded = load_model(init_model("small", "detection", tmp_path / "small", seed=1))
    text = loaded.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (128, 4)
    ids = torch.tensor(
        [
            [loaded.tokenizer.convert_tokens_to_ids("<image>")] * 256
            + [loaded.tokenizer.bos_token_id, 5, 6]
        ]
    )
    out = loaded.model(
        input_ids=ids, pixel_values=torch.zeros(1, 3, 224, 224), attention_mask=torch.ones_like(ids)
    )
    assert out.logits.shape == (1, 259, len(loaded.tokenizer))
