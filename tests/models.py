"""Tiny random Hugging Face models for fast tests (no download: built from configs)."""

import torch

VOCAB = 96


def llama(
    vocab_size: int = VOCAB,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    **kwargs,
):
    """A random Llama of the given size (no download), in train mode as built."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kwargs.pop("kv_heads", 2),
        **kwargs,
    )
    return tf.AutoModelForCausalLM.from_config(cfg)


def tiny(arch: str = "llama", dtype=torch.float32, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "llama_tied":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=8)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


def random_batches(n: int, batch: int = 3, length: int = 9, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out
